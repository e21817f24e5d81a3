#!/usr/bin/env bash
# `make test`: the whole suite against real QEMU, real SQLite and real PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

KILN_SETUP_VARIANTS="default minimal" scripts/setup.sh postgresql dnsmasq-base  # dnsmasq: the test world's DNS server
export KILN_TEST_POSTGRES_URL=${KILN_TEST_POSTGRES_URL:-$(scripts/postgres-test.sh)}

exec .venv/bin/pytest -q -p no:cacheprovider "$@"
