#!/usr/bin/env bash
# `make test`: the whole suite against real QEMU, real SQLite and real PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

# dnsmasq: the test world's DNS server; knot (authoritative, TSIG updates) and pebble (an ACME
# test CA): the custom-domain tests' world (tests/integration/domain_world.py); openssh-client:
# the SSH gateway's tests; chromium (driven by Playwright with this executable): the dashboard's
# browser tests (tests/e2e/test_dashboard_browser.py); dpkg-dev (dpkg-scanpackages): the apt
# repository the snapshot-build tests serve (tests/integration/package_mirrors.py).
KILN_SETUP_VARIANTS="default minimal" scripts/setup.sh postgresql dnsmasq-base knot pebble openssh-client chromium dpkg-dev
export KILN_TEST_POSTGRES_URL=${KILN_TEST_POSTGRES_URL:-$(scripts/postgres-test.sh)}

# Lint and types first: they take seconds and fail fast.
.venv/bin/ruff check kiln tests bench
.venv/bin/mypy

started=$SECONDS
status=0
.venv/bin/pytest -q -p no:cacheprovider --durations=25 "$@" || status=$?
echo "make test: the suite took $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
exit $status
