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

# A new checkout gets its virtual environment here, so this one command is all a user needs.
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv and installing outbox-cdc with its test dependencies"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q -e '.[dev]'
fi
python=.venv/bin/python
exec "$python" -m pytest "$@"
