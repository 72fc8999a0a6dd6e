"""The CLI in polling mode: ``init`` (with the polling index on PostgreSQL), ``status`` and
``check`` on SQLite, MariaDB and PostgreSQL, and settings that cannot work."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from outbox_cdc import Outbox
from tests.integration.test_relay import cli


def test_sqlite_init_status_and_check(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    env = {"OUTBOX_CDC_DATABASE_URL": f"sqlite:///{path}"}
    first = cli("init", env=env)
    assert first.returncode == 0, first.stderr
    assert "table outbox: present" in first.stdout
    conn = sqlite3.connect(path)
    Outbox("outbox").publish(conn, topic="t", type="x", payload=b"1")
    conn.commit()
    conn.close()
    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert (info["mode"], info["pending_rows"], info["active_poller"]) == ("polling", 1, None)
    assert 0 <= info["oldest_pending_age_seconds"] < 60
    human = cli("status", env=env)
    assert "pending rows: 1" in human.stdout
    check = cli("check", "--json", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    names = {c["name"]: c for c in json.loads(check.stdout)}
    assert set(names) == {"database reachable", "outbox table", "pending rows", "poller"}
    missing = cli("check", "--table", "nope", env=env)
    assert missing.returncode == 1
    assert "table nope does not exist" in missing.stdout
    assert "fix: run 'outbox-cdc init'" in missing.stdout


@pytest.mark.mysql
def test_mysql_status_names_the_active_relay(
    mysql_url: str, unique_name: Callable[[str], str]
) -> None:
    import pymysql

    from outbox_cdc.sources.polling_databases import MySqlDatabase

    table = unique_name("outbox_cli")
    env = {"OUTBOX_CDC_DATABASE_URL": mysql_url, "OUTBOX_CDC_TABLE": table}
    assert cli("init", env=env).returncode == 0
    holder = MySqlDatabase(mysql_url, table)
    holder.connect()
    try:
        assert holder.try_lock()
        info = json.loads(cli("status", "--json", env=env).stdout)
        assert info["active_poller"].startswith("connection ")
        assert info["database"] == "MySQL/MariaDB"
    finally:
        holder.close()
        from tests.integration.insert_support import pymysql_args

        with pymysql.connect(**pymysql_args(mysql_url), autocommit=True) as c, c.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
    assert "password" not in json.dumps(info)


@pytest.mark.postgres
def test_postgres_init_polling_creates_the_index_check_stops_warning(
    postgres_url: str, unique_name: Callable[[str], str]
) -> None:
    table = f"public.{unique_name('outbox_cli')}"
    env = {"OUTBOX_CDC_DATABASE_URL": postgres_url, "OUTBOX_CDC_TABLE": table}
    try:
        plain = cli("init", "--no-slot", env=env)
        assert plain.returncode == 0, plain.stderr
        warned = cli("check", "--mode", "polling", env=env)
        assert "[warn] polling index" in warned.stdout
        assert "outbox-cdc init --polling" in warned.stdout
        polled = cli("init", "--polling", env=env)
        assert polled.returncode == 0, polled.stderr
        assert "slot" not in polled.stdout  # polling needs no replication slot
        quiet = cli("check", "--mode", "polling", env=env)
        assert quiet.returncode == 0, quiet.stdout
        assert "polling index" not in quiet.stdout
        sql = cli("init", "--polling", "--print-sql", env=env)
        assert "WHERE published_at IS NULL" in sql.stdout
        assert "pg_create_logical_replication_slot" not in sql.stdout
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def test_start_refuses_wal_mode_on_sqlite_naming_the_setting(tmp_path: Path) -> None:
    env = {
        "OUTBOX_CDC_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
        "OUTBOX_CDC_MODE": "wal",
        "OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
    }
    out = cli("start", env=env)
    assert out.returncode == 2
    assert "mode (--mode / OUTBOX_CDC_MODE): wal needs PostgreSQL" in out.stderr
