#!/usr/bin/env bash
# The test command: start PostgreSQL 15 + wal2json, Kafka and MariaDB on this machine (installing
# what is missing, see scripts/services.sh), then run pytest against them.
#
#   scripts/test.sh                      # the whole suite
#   scripts/test.sh tests/unit -q        # any pytest arguments
#
# With CI=true (or --require-services) a missing service fails the tests instead of skipping them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/services.sh up
# shellcheck source=/dev/null
. ./.services.env

if [ -x .venv/bin/python ]; then
    python=.venv/bin/python
else
    python=python3
fi
exec "$python" -m pytest "$@"
