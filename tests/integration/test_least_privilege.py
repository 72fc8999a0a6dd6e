"""The least-privilege roles of docs/operations.md, created exactly as documented, at work.

The GRANT statements are read from the ``sql`` blocks of docs/operations.md ("Least-privilege
roles"), with the role names, the password, the host and the table replaced, so this test checks
the documentation itself: a GRANT too few fails here, and a privilege a role must not have is
checked to be refused.

PostgreSQL runs in a database of its own, created for this module by the superuser (the schema
owner) and dropped afterwards: the documented ``REVOKE ... FROM PUBLIC`` on
``pg_logical_emit_message`` is database-wide and must not touch the shared test database.
MariaDB users are created by ``root`` over the server's Unix socket (the test user may not
create users); without it the MariaDB test is skipped (failed with ``CI=true``).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pymysql
import pytest

from outbox_cdc import Outbox
from tests.acceptance.harness import (
    MariaDatabase,
    RelayProcess,
    read_topic,
    relay_env,
    wait_until,
)
from tests.support.services import mysql_connect_kwargs, truthy

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
TOPIC_PARTITIONS = 1


# -- the documented statements -------------------------------------------------------------------


def documented_sql(heading: str) -> list[str]:
    """The statements of the first ``sql`` block after ``### {heading}`` in operations.md,
    comments removed."""
    text = DOC.read_text("utf-8")
    start = text.index(f"### {heading}\n")
    block = re.search(r"```sql\n(.*?)```", text[start:], re.S)
    assert block, f"no sql block under '### {heading}' in {DOC}"
    lines = [re.sub(r"--.*$", "", line).rstrip() for line in block.group(1).splitlines()]
    statements = [s.strip() for s in "\n".join(lines).split(";")]
    return [s for s in statements if s]


def substitute(statement: str, names: dict[str, str]) -> str:
    """Replace whole words (role names, tables; keys may contain dots and quotes)."""
    for old, new in names.items():
        statement = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w])", new, statement)
    return statement


def password() -> str:
    return "Pw" + secrets.token_hex(12)


# -- helpers -------------------------------------------------------------------------------------


def with_credentials(url: str, user: str, pw: str, database: str | None = None) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}:{pw}@{host}" + (f":{parts.port}" if parts.port else "")
    path = f"/{database}" if database is not None else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_CDC_")}
    return subprocess.run(
        [sys.executable, "-m", "outbox_cdc.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _services_required(config: pytest.Config) -> bool:
    return bool(config.getoption("--require-services")) or truthy(os.environ.get("CI"))


@pytest.fixture
def topic(kafka_topic: str) -> str:
    return kafka_topic


# -- PostgreSQL: a database of its own, the documented roles -------------------------------------


@dataclass
class PgSetup:
    admin_url: str  # superuser, on the test database: the schema owner
    database: str
    relay_url: str  # WAL relay role, exactly the documented grants
    app_url: str  # producer: INSERT only
    poller_url: str  # polling relay role
    relay_no_select_url: str  # WAL relay role without SELECT on outbox_cdc_offsets
    wal_table: str = "public.outbox"
    poll_table: str = "public.outbox_poll"


def _drop_slots_and_database(admin_url: str, database: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for _ in range(50):
            rows = conn.execute(
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s",
                (database,),
            ).fetchall()
            if not rows:
                break
            for slot, pid in rows:
                if pid is not None:
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                except (psycopg.errors.ObjectInUse, psycopg.errors.UndefinedObject):
                    time.sleep(0.1)
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pg(postgres_admin_url: str) -> Iterator[PgSetup]:
    tag = uuid.uuid4().hex[:10]
    database = f"lp_{tag}"
    roles = {
        "outbox_relay": f"lp_relay_{tag}",
        "app": f"lp_app_{tag}",
        "outbox_poller": f"lp_poller_{tag}",
    }
    no_select_role = f"lp_relay_nosel_{tag}"
    passwords = {name: password() for name in [*roles.values(), no_select_role]}
    owner_url = with_credentials(
        postgres_admin_url,
        urlsplit(postgres_admin_url).username or "",
        urlsplit(postgres_admin_url).password or "",
        database,
    )

    wal_sql = documented_sql("PostgreSQL, WAL mode")
    polling_sql = documented_sql("PostgreSQL, polling mode")
    # Sanity: the blocks hold what this test expects to find.
    assert any(s.startswith("CREATE ROLE outbox_relay LOGIN REPLICATION") for s in wal_sql)
    assert any(s.startswith("GRANT INSERT ON public.outbox TO app") for s in wal_sql)
    assert any(s.startswith("CREATE ROLE outbox_poller") for s in polling_sql)

    def render(statements: list[str], names: dict[str, str], pw: dict[str, str]) -> list[str]:
        out = []
        for s in statements:
            s = substitute(s, names)
            m = re.match(r"CREATE ROLE (\w+)", s)
            if m:
                s = s.replace("'...'", f"'{pw[m.group(1)]}'")
            out.append(s)
        return out

    # The WAL block, the polling block (on a table of its own, with the polling index; the
    # producer role is the same), and the relay role again without SELECT on the offsets table.
    setup = render(wal_sql, roles, passwords)
    setup += [
        s
        for s in render(polling_sql, {**roles, "public.outbox": "public.outbox_poll"}, passwords)
        if not s.startswith("CREATE ROLE " + roles["app"])
    ]
    offsets_grant = "GRANT SELECT, INSERT, UPDATE, DELETE ON public.outbox_cdc_offsets TO"
    broken = [
        substitute(s, {roles["outbox_relay"]: no_select_role})
        for s in setup
        if roles["outbox_relay"] in s and "outbox_poll " not in s
    ]
    assert any(s.startswith(offsets_grant) for s in broken), broken
    broken = [
        re.sub(
            r"PASSWORD '\w+'",
            f"PASSWORD '{passwords[no_select_role]}'",
            s.replace(
                offsets_grant, "GRANT INSERT, UPDATE, DELETE ON public.outbox_cdc_offsets TO"
            ),
        )
        for s in broken
    ]

    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    created_roles: list[str] = []
    try:
        # the schema, as the owner, the documented way
        for args in (
            ("--table", "public.outbox", "--no-slot"),
            ("--table", "public.outbox_poll", "--polling"),
        ):
            proc = cli("init", "--database-url", owner_url, *args)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        with psycopg.connect(owner_url, autocommit=True) as conn:
            for statement in setup + broken:
                m = re.match(r"CREATE ROLE (\w+)", statement)
                conn.execute(statement)
                if m:
                    created_roles.append(m.group(1))
        yield PgSetup(
            admin_url=owner_url,
            database=database,
            relay_url=with_credentials(
                owner_url, roles["outbox_relay"], passwords[roles["outbox_relay"]]
            ),
            app_url=with_credentials(owner_url, roles["app"], passwords[roles["app"]]),
            poller_url=with_credentials(
                owner_url, roles["outbox_poller"], passwords[roles["outbox_poller"]]
            ),
            relay_no_select_url=with_credentials(
                owner_url, no_select_role, passwords[no_select_role]
            ),
        )
    finally:
        _drop_slots_and_database(postgres_admin_url, database)
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            for role in [*roles.values(), no_select_role]:
                conn.execute(f"DROP ROLE IF EXISTS {role}")


def pg_count(url: str, sql: str, params: tuple[Any, ...] = ()) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])


def publish_pg(url: str, table: str, topic: str, n: int, tag: str) -> list[str]:
    with psycopg.connect(url) as conn:
        ids = [
            str(
                Outbox(table, capture_trace_context=False).publish(
                    conn, topic=topic, type="lp.test", key=f"k{i % 3}", payload=f"{tag}-{i}"
                )
            )
            for i in range(n)
        ]
        conn.commit()
    return ids


def delivered(bootstrap: str, topic: str, ids: list[str]) -> None:
    records = read_topic(bootstrap, topic, expect_ids=ids, timeout=15)
    seen = {dict(r.headers).get("ce_id", b"").decode() for r in records}
    missing = set(ids) - seen
    assert not missing, f"{len(missing)} of {len(ids)} events not delivered"


def assert_refused_pg(url: str, table: str) -> None:
    """The producer role may INSERT only: reading, changing or deleting rows is refused, and
    so is writing a table-less event once pg_logical_emit_message was revoked from PUBLIC."""
    for statement in (
        f"SELECT count(*) FROM {table}",
        f"UPDATE {table} SET topic = 'x'",
        f"DELETE FROM {table}",
    ):
        with (
            psycopg.connect(url, autocommit=True) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(statement)


def test_postgres_wal_relay_and_producer_roles_as_documented(
    pg: PgSetup, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    """The producer publishes with INSERT only and can do nothing else; the relay role (LOGIN
    REPLICATION and the documented table grants) creates its slot, streams, records its
    position, emits heartbeats (EXECUTE granted after the REVOKE from PUBLIC), cleans up rows
    older than the retention; status, check and recover --dry-run work with it."""
    assert_refused_pg(pg.app_url, pg.wal_table)
    with (
        psycopg.connect(pg.app_url) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="pg_logical_emit_message"),
    ):
        Outbox(mode="message", message_prefix="lp", capture_trace_context=False).publish(
            conn, topic=topic, type="lp.test", payload=b"x"
        )

    slot = f"lp_slot_{uuid.uuid4().hex[:12]}"
    env = relay_env(
        database_url=pg.relay_url,
        bootstrap=kafka_bootstrap,
        table=pg.wal_table,
        slot=slot,
        retention=1,
        heartbeat_interval=1,
        kafka_topic_partitions=TOPIC_PARTITIONS,
    )
    relay = RelayProcess(env, tmp_path, "lp-relay")
    relay.start()
    try:
        relay.wait_streaming(timeout=15)
        first = publish_pg(pg.app_url, pg.wal_table, topic, 5, "first")
        delivered(kafka_bootstrap, topic, first)
        time.sleep(1.2)  # the next commit is more than the retention later
        second = publish_pg(pg.app_url, pg.wal_table, topic, 5, "second")
        delivered(kafka_bootstrap, topic, second)

        # status and check with the relay's role, while it streams
        status = cli("status", "--database-url", pg.relay_url, "--slot", slot)
        assert status.returncode == 0, status.stdout + status.stderr
        assert re.search(r"active: yes, PID \d+", status.stdout), status.stdout
        check = cli(
            "check",
            "--database-url",
            pg.relay_url,
            "--table",
            pg.wal_table,
            "--slot",
            slot,
            "--kafka-bootstrap-servers",
            kafka_bootstrap,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert "FAIL" not in check.stdout, check.stdout
        # the clean-up (every 10 s) deletes the first events: older than the retention
        marks = ", ".join(["%s"] * len(first))
        wait_until(
            lambda: (
                pg_count(
                    pg.admin_url,
                    f"SELECT count(*) FROM {pg.wal_table} WHERE id IN ({marks})",
                    first,
                )
                == 0
            ),
            timeout=15,
            what="the clean-up to delete the first events (retention 1 s)",
            interval=0.2,
        )
        assert (
            pg_count(
                pg.admin_url,
                "SELECT count(*) FROM outbox_cdc_offsets WHERE slot_name = %s",
                (slot,),
            )
            == 1
        ), "the relay recorded no delivered position"
    finally:
        code = relay.stop(timeout=20)
    log = relay.all_logs()
    assert code == 0, log
    assert "permission denied" not in log, log
    assert "heartbeat failed" not in log, log
    assert "clean-up of old outbox rows failed" not in log, log

    # recover --force --dry-run with the relay's role (refused while a relay streams the slot,
    # and without --force on a healthy slot)
    dry = cli(
        "recover",
        "--database-url",
        pg.relay_url,
        "--kafka-bootstrap-servers",
        kafka_bootstrap,
        "--table",
        pg.wal_table,
        "--slot",
        slot,
        "--force",
        "--dry-run",
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"slot {slot}:" in dry.stdout, dry.stdout


def test_postgres_relay_role_without_select_on_offsets_names_the_privilege(
    pg: PgSetup, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    """One documented GRANT short (SELECT on outbox_cdc_offsets): the relay says which
    privilege on which table it lacks, keeps retrying, and stops cleanly."""
    slot = f"lp_slot_{uuid.uuid4().hex[:12]}"
    env = relay_env(
        database_url=pg.relay_no_select_url,
        bootstrap=kafka_bootstrap,
        table=pg.wal_table,
        slot=slot,
        kafka_topic_partitions=TOPIC_PARTITIONS,
    )
    relay = RelayProcess(env, tmp_path, "lp-relay-noselect")
    relay.start()
    try:
        relay.wait_for_log(r"permission denied for table outbox_cdc_offsets", timeout=15)
        time.sleep(1)
        assert relay.running, relay.log_text()  # retried, not a crash
    finally:
        code = relay.stop(timeout=20)
    log = relay.all_logs()
    assert code == 0, log
    assert "Traceback" not in log, log


def test_postgres_polling_role_as_documented(
    pg: PgSetup, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    """Polling on PostgreSQL with the documented poller role (no REPLICATION): publishes,
    marks, cleans up after the retention; status and check work with it."""
    assert_refused_pg(pg.app_url, pg.poll_table)
    env = relay_env(
        database_url=pg.poller_url,
        bootstrap=kafka_bootstrap,
        table=pg.poll_table,
        slot="unused",
        mode="polling",
        retention=1,
        kafka_topic_partitions=TOPIC_PARTITIONS,
    )
    relay = RelayProcess(env, tmp_path, "lp-poller")
    relay.start()
    try:
        ids = publish_pg(pg.app_url, pg.poll_table, topic, 5, "poll")
        delivered(kafka_bootstrap, topic, ids)
        status = cli(
            "status", "--mode", "polling", "--database-url", pg.poller_url, "--table", pg.poll_table
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert "active relay" in status.stdout, status.stdout
        check = cli(
            "check",
            "--mode",
            "polling",
            "--database-url",
            pg.poller_url,
            "--table",
            pg.poll_table,
            "--kafka-bootstrap-servers",
            kafka_bootstrap,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert "FAIL" not in check.stdout, check.stdout
        wait_until(
            lambda: pg_count(pg.admin_url, f"SELECT count(*) FROM {pg.poll_table}") == 0,
            timeout=15,
            what="the clean-up to delete the published rows (retention 1 s)",
            interval=0.2,
        )
    finally:
        code = relay.stop(timeout=20)
    log = relay.all_logs()
    assert code == 0, log
    assert "failed" not in log and "denied" not in log, log


# -- MariaDB -------------------------------------------------------------------------------------


def mysql_root(sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mysql", "--protocol=socket", "-uroot", "-N", "-B", "-e", sql],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@dataclass
class MySetup:
    owner_url: str
    table: str
    relay_url: str
    app_url: str


@pytest.fixture
def my(request: pytest.FixtureRequest, mysql_url: str) -> Iterator[MySetup]:
    try:
        ok = mysql_root("SELECT 1").returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        message = "MariaDB: no root access over the Unix socket to create users"
        if _services_required(request.config):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    tag = uuid.uuid4().hex[:10]
    table = f"lp_outbox_{tag}"
    database = urlsplit(mysql_url).path.lstrip("/")
    users = {"outbox_relay": f"lp_relay_{tag}", "app": f"lp_app_{tag}"}
    passwords = {u: password() for u in users.values()}
    statements = documented_sql("MySQL / MariaDB")
    assert any("GRANT INSERT ON shop.outbox TO 'app'" in s for s in statements), statements
    # a connection from 127.0.0.1 may be seen as localhost: both hosts, like the test user
    rendered = []
    for host in ("localhost", "127.0.0.1"):
        for s in statements:
            s = s.replace("'10.0.0.%'", f"'{host}'").replace("shop.outbox", f"{database}.{table}")
            for old, new in users.items():
                s = s.replace(f"'{old}'@", f"'{new}'@")
            m = re.match(r"CREATE USER '(\w+)'", s)
            if m:
                s = s.replace("'...'", f"'{passwords[m.group(1)]}'")
            rendered.append(s)
    proc = cli("init", "--database-url", mysql_url, "--table", table)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        done = mysql_root(";\n".join(rendered) + ";")
        assert done.returncode == 0, done.stderr
        yield MySetup(
            owner_url=mysql_url,
            table=table,
            relay_url=with_credentials(
                mysql_url, users["outbox_relay"], passwords[users["outbox_relay"]]
            ),
            app_url=with_credentials(mysql_url, users["app"], passwords[users["app"]]),
        )
    finally:
        drops = [
            f"DROP USER IF EXISTS '{u}'@'{h}'"
            for u in users.values()
            for h in ("localhost", "127.0.0.1")
        ]
        mysql_root(";\n".join(drops) + ";")
        MariaDatabase(mysql_url).drop_table(table)


def test_mariadb_relay_and_producer_users_as_documented(
    my: MySetup, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    """MariaDB: the producer user has INSERT only; the relay user (SELECT, DELETE and UPDATE of
    published_at) publishes, marks and cleans up; status and check work with it."""
    app = pymysql.connect(**mysql_connect_kwargs(my.app_url), charset="utf8mb4")
    try:
        for statement in (
            f"SELECT count(*) FROM {my.table}",
            f"UPDATE {my.table} SET topic = 'x'",
            f"DELETE FROM {my.table}",
        ):
            with pytest.raises(pymysql.err.OperationalError) as err:
                app.cursor().execute(statement)
            assert err.value.args[0] == 1142, err.value  # command denied to user
        outbox = Outbox(my.table, capture_trace_context=False)
        ids = [
            str(outbox.publish(app, topic=topic, type="lp.test", key=f"k{i}", payload=b"m"))
            for i in range(5)
        ]
        app.commit()
    finally:
        app.close()

    env = relay_env(
        database_url=my.relay_url,
        bootstrap=kafka_bootstrap,
        table=my.table,
        slot="unused",
        retention=1,
        kafka_topic_partitions=TOPIC_PARTITIONS,
    )
    relay = RelayProcess(env, tmp_path, "lp-mariadb")
    relay.start()
    owner = MariaDatabase(my.owner_url)
    try:
        delivered(kafka_bootstrap, topic, ids)
        status = cli("status", "--database-url", my.relay_url, "--table", my.table)
        assert status.returncode == 0, status.stdout + status.stderr
        check = cli(
            "check",
            "--database-url",
            my.relay_url,
            "--table",
            my.table,
            "--kafka-bootstrap-servers",
            kafka_bootstrap,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert "FAIL" not in check.stdout, check.stdout
        wait_until(
            lambda: owner.table_state(my.table)[0] == 0,
            timeout=15,
            what="the clean-up to delete the published rows (retention 1 s)",
            interval=0.2,
        )
    finally:
        code = relay.stop(timeout=20)
    log = relay.all_logs()
    assert code == 0, log
    assert "failed" not in log and "denied" not in log, log
