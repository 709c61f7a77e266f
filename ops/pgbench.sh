#!/usr/bin/env bash
# Run the pgbench comparison of docs/benchmarks.md against a PostgreSQL database.
#   ops/pgbench.sh [DATABASE_URL] [SECONDS] [CLIENTS] [ACCOUNTS]
# Prints pgbench's summary; the line "tps = ..." is transfers per second.
set -euo pipefail
url=${1:-postgresql://postgres@127.0.0.1:5432/postgres}
seconds=${2:-30}
clients=${3:-64}
accounts=${4:-10000}
here=$(cd "$(dirname "$0")" && pwd)
psql "$url" -q -v ON_ERROR_STOP=1 -v accounts="$accounts" -f "$here/pgbench/setup.sql"
pgbench "$url" -n -M prepared -c "$clients" -j 2 -T "$seconds" --max-tries=10 \
    -D accounts="$accounts" -f "$here/pgbench/transfer.sql"
