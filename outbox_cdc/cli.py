"""Command line: ``outbox-cdc start | init | status | check``.

The only place that reads settings (flags, ``OUTBOX_CDC_*`` variables, a TOML config file) and
turns them into the option objects the library takes.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from outbox_cdc import __version__
from outbox_cdc.errors import ConfigurationError, OutboxError

if TYPE_CHECKING:
    from outbox_cdc.sinks.base import Sink
    from outbox_cdc.sinks.kafka import KafkaOptions

log = logging.getLogger("outbox_cdc")

EXIT_FATAL = 1
EXIT_CONFIG = 2


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # kafka-python logs every failed connection attempt at ERROR/WARNING: the relay reports
    # broker state changes itself, once each.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("confluent_kafka").setLevel(logging.CRITICAL)  # librdkafka's, likewise


def _fail(exc: Exception, code: int) -> None:
    click.echo(f"outbox-cdc: error: {exc}", err=True)
    sys.exit(code)


@click.group()
@click.version_option(__version__, prog_name="outbox-cdc")
def main() -> None:
    """outbox-cdc: relay transactional outbox events from PostgreSQL to Kafka."""


_db_url = click.option(
    "--database-url",
    envvar="OUTBOX_CDC_DATABASE_URL",
    show_envvar=True,
    help="Database URL, e.g. postgresql://user:pass@host:5432/db",
)
_table = click.option(
    "--table",
    envvar="OUTBOX_CDC_TABLE",
    show_envvar=True,
    default=None,
    help="Outbox table [default: public.outbox, or outbox outside PostgreSQL]",
)
_config = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="OUTBOX_CDC_CONFIG",
    show_envvar=True,
    help="TOML file with settings (the same for start and recover)",
)
_mode = click.option(
    "--mode",
    envvar="OUTBOX_CDC_MODE",
    show_envvar=True,
    type=click.Choice(["auto", "wal", "polling"]),
    default="auto",
    show_default=True,
    help="wal (PostgreSQL + wal2json) or polling; auto: wal for PostgreSQL only",
)
_slot = click.option(
    "--slot",
    envvar="OUTBOX_CDC_SLOT",
    show_envvar=True,
    default="outbox_cdc",
    show_default=True,
    help="Logical replication slot",
)


@main.command()
@_config
@click.option("--database-url", help="Database URL [env OUTBOX_CDC_DATABASE_URL]")
@click.option(
    "--mode",
    type=click.Choice(["auto", "wal", "polling"]),
    help="wal (PostgreSQL + wal2json) or polling [default: auto]",
)
@click.option(
    "--kafka-bootstrap-servers",
    help="host:port[,host:port] [env OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS]",
)
@click.option("--table", help="Outbox table, schema-qualified [default: public.outbox]")
@click.option("--slot", help="Replication slot [default: outbox_cdc]")
@click.option(
    "--create-slot/--no-create-slot",
    default=None,
    help="Create the slot when missing [default: create]",
)
@click.option(
    "--recover-lost-slot/--no-recover-lost-slot",
    default=None,
    help="Recreate a slot lost or dropped over a gap and re-publish the gap [default: on]",
)
@click.option("--dead-letter-topic", help="Route records Kafka refuses for good to this topic")
@click.option("--http-port", type=int, help="Serve /metrics, /healthz, /readyz on this port")
@click.option(
    "--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)
)
def start(config_file: Path | None, **flags: Any) -> None:
    """Relay the outbox to Kafka until SIGTERM/SIGINT: from PostgreSQL's WAL, or by polling
    (MySQL/MariaDB, SQLite, or --mode polling).

    Every setting also reads OUTBOX_CDC_<NAME> (e.g. OUTBOX_CDC_KAFKA_LINGER_MS) and the
    config file; see docs/settings.md.
    """
    from outbox_cdc.exactly_once import ProgressStore
    from outbox_cdc.health import HealthServer, KafkaProbe, PendingProbe, SlotProbe, Watchdog
    from outbox_cdc.metrics import RelayMetrics
    from outbox_cdc.relay import Relay, RelayOptions
    from outbox_cdc.settings import load_settings
    from outbox_cdc.sources.base import Source

    try:
        settings = load_settings(config_file, **flags)
        _setup_logging(settings.log_level, settings.log_format)
        metrics = RelayMetrics(version=__version__, mode="polling" if settings.polling else "wal")
        source: Source
        db_probe: Callable[[], dict[str, float | None]]
        if settings.polling:
            from outbox_cdc.sources.polling import PollingSource

            source = PollingSource(settings.polling_source_options(), cleanup_observer=metrics)
            origin = f"by polling {settings.dialect}"
            db_probe = PendingProbe(settings.database_url.get_secret_value(), settings.outbox_table)
        else:
            from outbox_cdc.sources.wal import WalSource

            source = WalSource(settings.wal_source_options(), cleanup_observer=metrics)
            origin = f"from the WAL (slot {settings.slot})"
            db_probe = SlotProbe(
                settings.postgres_dsn(), settings.slot, settings.slot_wal_warning_bytes or None
            )
        kafka_options = settings.kafka_options()
        sink_class = _sink_class(settings.kafka_client)
    except ConfigurationError as exc:
        _fail(exc, EXIT_CONFIG)
        return
    relay = Relay(
        source,
        lambda: sink_class(kafka_options),
        RelayOptions(
            source_name=settings.source_name,
            max_in_flight_events=settings.max_in_flight_events,
            max_in_flight_bytes=settings.max_in_flight_bytes,
            dead_letter_topic=settings.dead_letter_topic,
            shutdown_timeout=settings.shutdown_timeout,
            read_batch=max(2_000, settings.poll_batch_size + 2),
            exactly_once=settings.exactly_once,
            progress_topic=settings.progress_topic,
            transaction_max_events=settings.transaction_max_events,
            transaction_max_seconds=settings.transaction_max_ms / 1000,
        ),
        observer=metrics,
        progress_store=ProgressStore(
            settings.kafka_bootstrap_servers,
            settings.progress_topic,
            dict(kafka_options.client_config),
            replication_factor=settings.kafka_topic_replication_factor,
        )
        if settings.exactly_once
        else None,
    )
    metrics.bind_in_flight(lambda: relay.tracker.in_flight)
    kafka_probe = KafkaProbe(
        settings.kafka_bootstrap_servers, kafka_options.client_config, timeout=4.0
    )
    watchdog = Watchdog(relay, kafka_probe, db_probe, metrics).start()
    if settings.http_port is not None:
        try:
            server = HealthServer(settings.http_bind, settings.http_port, watchdog, metrics)
        except ConfigurationError as exc:
            _fail(exc, EXIT_CONFIG)
            return
        server.start()
        log.info("serving /metrics, /healthz and /readyz on %s:%d", settings.http_bind, server.port)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        relay.stop()
        # A second signal ends the process at once.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "outbox-cdc %s: relaying %s %s to Kafka %s (%s%s)",
        __version__,
        settings.outbox_table,
        origin,
        settings.kafka_bootstrap_servers,
        settings.kafka_client,
        ", exactly once" if settings.exactly_once else "",
    )
    try:
        relay.run()
    except ConfigurationError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_CONFIG)
    except OutboxError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_FATAL)
    finally:
        watchdog.stop()


def _sink_class(kafka_client: str) -> Callable[[KafkaOptions], Sink]:
    """The sink of the ``kafka_client`` setting; confluent-kafka is imported only when chosen."""
    if kafka_client == "confluent":
        try:
            from outbox_cdc.sinks.confluent import ConfluentSink
        except ImportError:
            raise ConfigurationError(
                "kafka_client=confluent needs the confluent extra: "
                "pip install 'outbox-cdc[confluent]'"
            ) from None
        return ConfluentSink
    from outbox_cdc.sinks.kafka import KafkaSink

    return KafkaSink


@main.command()
@_db_url
@_table
@_slot
@click.option("--no-slot", is_flag=True, help="Do not create the replication slot")
@click.option(
    "--polling",
    is_flag=True,
    help="PostgreSQL in polling mode: create the polling index, and no slot",
)
@click.option(
    "--notify",
    is_flag=True,
    help="With --polling: add the trigger whose NOTIFY wakes the relay (poll_notify)",
)
@click.option("--print-sql", is_flag=True, help="Print the DDL instead of running it")
@click.option(
    "--dialect",
    type=click.Choice(["postgresql", "mysql", "sqlite"]),
    help="With --print-sql and no URL: which database",
)
def init(
    database_url: str | None,
    table: str | None,
    slot: str,
    no_slot: bool,
    polling: bool,
    notify: bool,
    print_sql: bool,
    dialect: str | None,
) -> None:
    """Create the outbox table and (PostgreSQL) the replication slot, if missing."""
    from outbox_cdc.admin import init as do_init
    from outbox_cdc.admin import init_sql
    from outbox_cdc.sources.polling_databases import dialect_of

    try:
        if dialect is None:
            if not database_url:
                raise ConfigurationError(
                    "database_url (--database-url / OUTBOX_CDC_DATABASE_URL): "
                    "is required (or give --dialect with --print-sql)"
                )
            dialect = dialect_of(database_url)
        if table is None:
            table = "public.outbox" if dialect == "postgresql" else "outbox"
        if notify and (not polling or dialect != "postgresql"):
            raise ConfigurationError("--notify: only with --polling on PostgreSQL")
        slot_name = None if no_slot or polling or dialect != "postgresql" else slot
        if print_sql:
            click.echo(init_sql(dialect, table, slot_name, polling, notify), nl=False)
            return
        assert database_url is not None
        for line in do_init(database_url, table, slot_name, polling, notify):
            click.echo(line)
    except ConfigurationError as exc:
        _fail(exc, EXIT_CONFIG)
    except Exception as exc:  # driver errors: one line, no URL
        _fail(_one_line(exc), EXIT_FATAL)


def _polling_and_table(url: str, mode: str, table: str | None) -> tuple[bool, str]:
    from outbox_cdc.sources.polling_databases import dialect_of

    dialect = dialect_of(url)
    if mode == "wal" and dialect != "postgresql":
        raise ConfigurationError(
            f"mode (--mode / OUTBOX_CDC_MODE): wal needs PostgreSQL, not {dialect}"
        )
    polling = mode == "polling" or dialect != "postgresql"
    return polling, table or ("public.outbox" if dialect == "postgresql" else "outbox")


def _one_line(exc: BaseException) -> Exception:
    text = str(exc).strip().splitlines()
    return RuntimeError(f"{type(exc).__name__}: {text[0] if text else ''}")


@main.command()
@_db_url
@_table
@_slot
@_mode
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
def status(
    database_url: str | None, table: str | None, slot: str, mode: str, as_json: bool
) -> None:
    """WAL: the slot's confirmed LSN, retained WAL, lag, active process. Polling: pending rows,
    age of the oldest, the active relay."""
    from outbox_cdc.admin import polling_status, slot_status

    if not database_url:
        _fail(
            ConfigurationError(
                "database_url (--database-url / OUTBOX_CDC_DATABASE_URL): is required"
            ),
            EXIT_CONFIG,
        )
        return
    try:
        polling, table = _polling_and_table(database_url, mode, table)
        info = polling_status(database_url, table) if polling else slot_status(database_url, slot)
    except ConfigurationError as exc:
        _fail(exc, EXIT_CONFIG)
        return
    except Exception as exc:
        _fail(_one_line(exc), EXIT_FATAL)
        return
    if polling:
        if as_json:
            click.echo(json.dumps(info, indent=2, default=str))
            return
        age = info["oldest_pending_age_seconds"]
        rows = [
            ("table", f"{table} ({info['database']}, polling)"),
            ("pending rows", info["pending_rows"]),
            ("oldest pending", "none" if age is None else f"{age:.1f} s old"),
            ("active relay", info["active_poller"] or "none (no relay polls this table)"),
        ]
        for name, value in rows:
            click.echo(f"{name:>18}: {value}")
        for warning in info["warnings"]:
            click.echo(f"warning: {warning}")
        return
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    from outbox_cdc.admin import describe_gap

    gap = info.get("slot_gap")
    if not info["exists"]:
        if gap is not None and gap.get("state") in ("creating", "backfilling"):
            click.echo(f"slot {slot}: {describe_gap(gap)}")
        elif info.get("recorded_delivered") is not None or gap is not None:
            click.echo(
                f"slot {slot}: does not exist, but events were delivered through it: the "
                "relay recreates it over the gap and re-publishes the gap (or run "
                "'outbox-cdc recover')"
            )
        else:
            click.echo(f"slot {slot}: does not exist (outbox-cdc init creates it)")
        sys.exit(EXIT_FATAL)
    proc = info["active_process"]
    rows = [
        ("slot", f"{slot} ({info['plugin']}, wal_status {info['wal_status']})"),
        (
            "active",
            f"yes, PID {info['active_pid']} ({proc['application_name']}, "
            f"since {proc['backend_start']})"
            if proc
            else "no (no relay streaming)",
        ),
        ("confirmed LSN", info["confirmed_flush_lsn"]),
        ("current WAL LSN", info["current_wal_lsn"]),
        ("lag", f"{info['lag_bytes']} bytes"),
        ("retained WAL", f"{info['retained_wal_bytes']} bytes"),
        ("recorded delivered", (info["recorded_delivered"] or {}).get("lsn", "none")),
    ]
    if gap is not None:
        rows.append(("slot gap", describe_gap(gap)))
    for name, value in rows:
        click.echo(f"{name:>18}: {value}")


@main.command()
@_db_url
@_table
@_slot
@_mode
@click.option(
    "--kafka-bootstrap-servers",
    envvar="OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS",
    show_envvar=True,
    help="Kafka to check (skipped when not given)",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON")
@_config
def check(
    config_file: Path | None,
    database_url: str | None,
    table: str | None,
    slot: str,
    mode: str,
    kafka_bootstrap_servers: str | None,
    as_json: bool,
) -> None:
    """Preflight: wal_level, wal2json, role, table, slot (polling: table, index, pending rows,
    active relay), Kafka (with the OUTBOX_CDC_KAFKA_SECURITY_PROTOCOL, _SASL_* and _SSL_*
    settings of the environment or --config). Each failure with its fix."""
    from outbox_cdc.admin import Check, preflight_kafka, preflight_polling, preflight_postgres
    from outbox_cdc.settings import kafka_security_config

    checks: list[Check] = []
    if not database_url:
        checks.append(
            Check(
                "database url", False, "not given", "set OUTBOX_CDC_DATABASE_URL or --database-url"
            )
        )
    else:
        try:
            polling, table = _polling_and_table(database_url, mode, table)
        except ConfigurationError as exc:
            _fail(exc, EXIT_CONFIG)
            return
        if polling:
            checks.extend(preflight_polling(database_url, table))
        else:
            checks.extend(preflight_postgres(database_url, table, slot))
    if kafka_bootstrap_servers:
        try:
            security = kafka_security_config(config_file)
        except ConfigurationError as exc:
            checks.append(Check("kafka settings", False, str(exc), "fix the settings named above"))
        else:
            checks.append(preflight_kafka(kafka_bootstrap_servers, security))
    failed = [c for c in checks if not c.ok]
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        for c in checks:
            mark = "ok  " if c.ok and not c.warning else ("warn" if c.ok else "FAIL")
            click.echo(f"[{mark}] {c.name}: {c.detail}")
            if (not c.ok or c.warning) and c.fix:
                click.echo(f"       fix: {c.fix}")
    if failed:
        sys.exit(EXIT_FATAL)


@main.command()
@_config
@click.option("--database-url", help="PostgreSQL URL [env OUTBOX_CDC_DATABASE_URL]")
@click.option("--kafka-bootstrap-servers", help="[env OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS]")
@click.option("--table", help="Outbox table [default: public.outbox]")
@click.option("--slot", help="Replication slot [default: outbox_cdc]")
@click.option(
    "--since",
    type=click.DateTime(
        formats=[
            "%Y-%m-%dT%H:%M:%S.%f%z",
            "%Y-%m-%dT%H:%M:%S%z",
            "%Y-%m-%dT%H:%M:%S.%f",
            "%Y-%m-%dT%H:%M:%S",
            "%Y-%m-%d %H:%M:%S",
        ]
    ),
    help="Re-publish rows created at or after this time (UTC if no offset) instead of the "
    "recorded last delivery minus --margin",
)
@click.option(
    "--margin",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds before the last recorded delivery to start from (covers transactions that "
    "ran that long before committing)",
)
@click.option("--force", is_flag=True, help="Recreate the slot even if it is healthy")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing")
def recover(
    config_file: Path | None,
    since: datetime | None,
    margin: float,
    force: bool,
    dry_run: bool,
    **flags: Any,
) -> None:
    """Recover from a lost (invalidated) or dropped replication slot: recreate it, and
    re-publish the outbox rows written since the last delivered event. Costs duplicates (same
    ce_id), never losses. Stop every relay of the slot first; start them again afterwards."""
    from outbox_cdc.admin import recover as do_recover
    from outbox_cdc.settings import load_settings

    try:
        settings = load_settings(config_file, **flags)
        _setup_logging(settings.log_level, settings.log_format)
        if settings.polling:
            raise ConfigurationError(
                "mode: recover is for the WAL relay's slot; in polling mode the table itself "
                "says what is pending (published_at IS NULL)"
            )
        kafka_options = settings.kafka_options()
        sink_class = _sink_class(settings.kafka_client)
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        result = do_recover(
            settings.database_url.get_secret_value(),
            settings.outbox_table,
            settings.slot,
            lambda: sink_class(kafka_options),
            source_name=settings.source_name,
            margin=margin,
            since=since,
            force=force,
            dry_run=dry_run,
        )
    except ConfigurationError as exc:
        _fail(exc, EXIT_CONFIG)
        return
    except OutboxError as exc:
        _fail(exc, EXIT_FATAL)
        return
    except Exception as exc:  # driver errors: one line, no URL
        _fail(_one_line(exc), EXIT_FATAL)
        return
    if result.gap:
        start = (
            f"the gap after the last delivered position {result.gap_from}"
            if result.gap_from
            else "the rows of the transactions never delivered"
        )
    else:
        start = f"rows created since {result.since}" if result.since else "every retained row"
    if result.dry_run:
        click.echo(
            f"slot {result.slot}: {result.slot_state}; would recreate it and re-publish "
            f"{result.rows} events ({start})"
        )
    else:
        click.echo(
            f"slot {result.slot}: was {result.slot_state}, recreated at {result.new_slot_lsn}; "
            f"re-published {result.published} events ({start}). Start the relay now."
        )
    if settings.message_prefix:
        # They only ever existed in the WAL the lost slot no longer has.
        click.echo(
            f"note: table-less events (Outbox(mode='message'), prefix "
            f"{settings.message_prefix!r}) are not rows; those committed while the slot was "
            "lost cannot be re-published"
        )


if __name__ == "__main__":
    main()
