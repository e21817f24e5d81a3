#!/usr/bin/env bash
# Start Debian's PostgreSQL cluster if it is not running and make sure the test role
# and database exist. Prints the SQLAlchemy URL the tests use.
set -euo pipefail

cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
if [[ -z $cluster ]]; then
  pg_createcluster 15 main >/dev/null
  cluster="15 main"
fi
# shellcheck disable=SC2086
pg_ctlcluster $cluster start >/dev/null 2>&1 || true
for _ in $(seq 50); do
  pg_isready -q -h 127.0.0.1 && break
  sleep 0.2
done

as_postgres() { su postgres -c "psql -qtAX -v ON_ERROR_STOP=1 -c \"$1\""; }
[[ $(as_postgres "SELECT 1 FROM pg_roles WHERE rolname='kiln'") == 1 ]] \
  || as_postgres "CREATE ROLE kiln LOGIN PASSWORD 'kiln' CREATEDB" >/dev/null
[[ $(as_postgres "SELECT 1 FROM pg_database WHERE datname='kiln_test'") == 1 ]] \
  || as_postgres "CREATE DATABASE kiln_test OWNER kiln" >/dev/null

echo "postgresql+asyncpg://kiln:kiln@127.0.0.1:5432/kiln_test"
