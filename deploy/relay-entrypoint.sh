#!/bin/sh
# The relay container's command, kept in this one file: the Dockerfile installs it as the image's
# ENTRYPOINT (compose.yaml adds nothing), and tests/integration/test_compose_native.py runs this
# same file natively against the test services.
#
# 1. outbox-cdc init: create the outbox table and the replication slot if they are missing
#    (idempotent: a restarted container changes nothing). In polling mode (OUTBOX_CDC_MODE=polling)
#    it creates the polling index instead of a slot.
# 2. exec outbox-cdc start: the relay becomes PID 1 of the container, so `docker stop` (SIGTERM)
#    reaches it and it drains what is in flight before it exits.
#
# Settings come from OUTBOX_CDC_* variables (docs/settings.md); arguments are passed to `start`.
set -eu

if [ "${OUTBOX_CDC_MODE:-auto}" = polling ]; then
    outbox-cdc init --polling
else
    outbox-cdc init
fi
exec outbox-cdc start "$@"
