#!/usr/bin/env bash
# `make test`: the whole suite against real QEMU, real SQLite and real PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

KILN_SETUP_VARIANTS="default minimal" scripts/setup.sh postgresql dnsmasq-base openssh-client  # dnsmasq: the test world's DNS server; openssh-client: the SSH gateway's tests
export KILN_TEST_POSTGRES_URL=${KILN_TEST_POSTGRES_URL:-$(scripts/postgres-test.sh)}

# Lint and types first: they take seconds and fail fast.
.venv/bin/ruff check kiln tests bench
.venv/bin/mypy

started=$SECONDS
status=0
.venv/bin/pytest -q -p no:cacheprovider "$@" || status=$?
echo "make test: the suite took $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
exit $status
