"""TCP timeout defaults for the relay's PostgreSQL connections: added unless the DSN sets them."""

from __future__ import annotations

import psycopg
import pytest

from outbox_cdc.sources.keepalive import TCP_TIMEOUT_DEFAULTS, tcp_timeouts


def test_all_defaults_for_a_plain_url() -> None:
    assert tcp_timeouts("postgresql://u:p@db:5432/app") == TCP_TIMEOUT_DEFAULTS


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u:p@db/app?tcp_user_timeout=5000&keepalives_idle=7",
        "host=db dbname=app tcp_user_timeout=5000 keepalives_idle=7",
    ],
)
def test_the_dsn_wins(dsn: str) -> None:
    got = tcp_timeouts(dsn)
    assert "tcp_user_timeout" not in got and "keepalives_idle" not in got
    assert got["keepalives_count"] == 3
    # and libpq accepts what is added
    params = psycopg.conninfo.conninfo_to_dict(dsn, **got)
    assert params["tcp_user_timeout"] == "5000"


def test_a_bad_dsn_is_left_to_psycopg() -> None:
    assert tcp_timeouts("host='unterminated") == {}
