"""TCP timeouts for the relay's PostgreSQL connections: how a vanished peer gets noticed.

A host that went down or a network partition leaves a connection half-open: nothing is closed,
nothing answers, and the kernel only gives up after ~15 minutes of retransmissions. The libpq
connection parameters ``keepalives_*`` and ``tcp_user_timeout`` (Linux) cut that to about a
minute. They are added to the relay's connections unless the DSN sets them itself. No IO here.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

TCP_TIMEOUT_DEFAULTS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,  # seconds of silence before the first probe
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms that sent data may stay unacknowledged
}


def tcp_timeouts(dsn: str) -> dict[str, Any]:
    """The defaults above that ``dsn`` (a URL or a key=value string) does not set itself."""
    try:
        given = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return {}  # psycopg.connect reports the bad DSN itself
    return {k: v for k, v in TCP_TIMEOUT_DEFAULTS.items() if k not in given}
