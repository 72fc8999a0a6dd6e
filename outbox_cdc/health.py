"""Health: a watchdog thread that probes Kafka and the database every few seconds, warns about a
slot that retains too much WAL or was invalidated, and feeds the metrics; and the HTTP server for
``/metrics``, ``/healthz`` (alive) and ``/readyz`` (ready to relay).

What it must not do: touch the relay's connections (every probe has its own), hold the poller
lock, or print a secret (probe errors are one line without the URL).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from outbox_cdc.errors import ConfigurationError, OutboxError
from outbox_cdc.metrics import RelayMetrics

log = logging.getLogger(__name__)

READY_STATES = ("streaming", "recovering", "standby")
LOOP_STALE_SECONDS = 120.0  # the relay's loop passes at least every ~30 s (longest backoff)


class RelayView(Protocol):
    @property
    def state(self) -> str: ...

    loop_time: float


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    name = type(exc).__name__
    return first if first.startswith(name) else f"{name}: {first}".strip()


# -- probes --------------------------------------------------------------------------------------


class KafkaProbe:
    """A metadata request on a connection of its own (kafka-python admin client, whatever the
    relay's Kafka client is)."""

    def __init__(self, bootstrap_servers: str, client_config: Mapping[str, Any], timeout: float):
        self.bootstrap = bootstrap_servers.split(",")
        self.client_config = dict(client_config)
        self.timeout_ms = int(timeout * 1000)
        self._admin: Any = None

    def __call__(self) -> None:
        from kafka.admin import KafkaAdminClient

        from outbox_cdc.sinks.security import kafka_python_failures

        try:
            with kafka_python_failures() as failures:
                if self._admin is None:
                    self._admin = KafkaAdminClient(
                        bootstrap_servers=self.bootstrap,
                        client_id="outbox-cdc-health",
                        request_timeout_ms=self.timeout_ms,
                        # kafka-python's default is 30 s: a probe must not outlast its timeout
                        bootstrap_timeout_ms=self.timeout_ms,
                        **self.client_config,
                    )
                self._admin.describe_cluster()
        except Exception as exc:
            self.close()
            raise OutboxError(
                f"Kafka did not answer a metadata request: {_one_line(exc)}"
                + failures.describe(self.client_config)
            ) from None

    def close(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None


class SlotProbe:
    """The replication slot's state, on a PostgreSQL connection of its own."""

    def __init__(self, dsn: str, slot: str, warn_bytes: int | None) -> None:
        self.dsn = dsn
        self.slot = slot
        self.warn_bytes = warn_bytes
        self._conn: Any = None
        self._warned = False
        self._lost_reported = False

    def __call__(self) -> dict[str, float | None]:
        import psycopg

        try:
            if self._conn is None:
                self._conn = psycopg.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=5,
                    application_name="outbox-cdc-probe",
                )
            row = self._conn.execute(
                "SELECT wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8,"
                " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8,"
                " safe_wal_size::float8 FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot,),
            ).fetchone()
        except psycopg.Error as exc:
            self.close()
            raise OutboxError(f"PostgreSQL probe failed: {_one_line(exc)}") from None
        if row is None:
            return {}
        status, retained, lag, safe = row
        over = bool(
            self.warn_bytes is not None and retained is not None and retained > self.warn_bytes
        )
        self._report(status, retained, over)
        return {
            "slot_retained_wal_bytes": retained,
            "replication_lag_bytes": lag,
            "slot_safe_wal_size_bytes": safe,
            "slot_invalidated": 1.0 if status == "lost" else 0.0,
            "slot_retained_wal_warning": 1.0 if over else 0.0,
        }

    def _report(self, status: str | None, retained: float | None, over: bool) -> None:
        if status == "lost" and not self._lost_reported:
            self._lost_reported = True
            log.error(
                "replication slot %s was invalidated (wal_status lost): PostgreSQL removed WAL "
                "it still needed; run 'outbox-cdc recover' (docs/operations.md)",
                self.slot,
            )
        if over and not self._warned:
            self._warned = True
            log.warning(
                "replication slot %s retains %.1f MiB of WAL (warning above %.1f MiB): the relay "
                "is behind or stopped; past max_slot_wal_keep_size PostgreSQL invalidates the "
                "slot",
                self.slot,
                (retained or 0) / 2**20,
                (self.warn_bytes or 0) / 2**20,
            )
        elif not over and self._warned:
            self._warned = False
            log.info(
                "replication slot %s retains less WAL than the warning threshold again", self.slot
            )

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


class PendingProbe:
    """Pending rows of a polled table, on a connection of its own (never takes the lock)."""

    def __init__(self, url: str, table: str) -> None:
        from outbox_cdc.sources.polling_databases import open_database

        self.db = open_database(url, table)
        self._connected = False

    def __call__(self) -> dict[str, float | None]:
        try:
            if not self._connected:
                self.db.connect()
                self._connected = True
            count, oldest = self.db.pending()
        except OutboxError:
            self.close()
            raise
        return {"pending_rows": float(count), "oldest_pending_age_seconds": oldest or 0.0}

    def close(self) -> None:
        self.db.close()
        self._connected = False


# -- the watchdog --------------------------------------------------------------------------------


class Watchdog:
    """Runs the probes every ``interval`` seconds on its own thread."""

    def __init__(
        self,
        relay: RelayView,
        kafka_probe: Callable[[], None],
        db_probe: Callable[[], dict[str, float | None]] | None,
        metrics: RelayMetrics | None,
        interval: float = 5.0,
    ) -> None:
        self.relay = relay
        self.kafka_probe = kafka_probe
        self.db_probe = db_probe
        self.metrics = metrics
        self.interval = interval
        self.kafka_ok = False
        self.kafka_error = "not probed yet"
        self.db_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-cdc-watchdog", daemon=True)
        self._checked = threading.Event()

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for probe in (self.kafka_probe, self.db_probe):
            close = getattr(probe, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    def wait_checked(self, timeout: float) -> bool:
        return self._checked.wait(timeout)

    def check_once(self) -> None:
        try:
            self.kafka_probe()
            if not self.kafka_ok:
                log.debug("Kafka probe succeeded")
            self.kafka_ok, self.kafka_error = True, ""
        except OutboxError as exc:
            self.kafka_ok, self.kafka_error = False, str(exc)
        if self.db_probe is not None:
            try:
                values = self.db_probe()
                values["probe_up"] = 1.0
                self.db_error = ""
            except OutboxError as exc:
                values = {"probe_up": 0.0}
                self.db_error = str(exc)
            if self.metrics is not None:
                self.metrics.set_probe(values)
        self._checked.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception:  # a probe bug must not kill the watchdog
                log.exception("health probe failed")
            self._stop.wait(self.interval)

    # -- answers --------------------------------------------------------------------------------

    def alive(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self.relay.loop_time
        return age < LOOP_STALE_SECONDS, {"loop_seconds_ago": round(age, 3)}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        state = self.relay.state or "starting"
        base = state.split(":", 1)[0]
        alive, info = self.alive()
        ok = alive and base in READY_STATES and self.kafka_ok
        detail: dict[str, Any] = {
            "state": state,
            "kafka": "ok" if self.kafka_ok else self.kafka_error,
        }
        detail.update(info)
        if self.db_error:
            detail["database_probe"] = self.db_error
        return ok, detail


# -- HTTP ----------------------------------------------------------------------------------------


class HealthServer:
    """``/metrics`` (Prometheus text format), ``/healthz`` and ``/readyz`` (200 or 503 with a
    JSON body saying why), on ``bind:port``."""

    def __init__(self, bind: str, port: int, watchdog: Watchdog, metrics: RelayMetrics) -> None:
        self.watchdog = watchdog
        self.metrics = metrics
        handler = _handler(self)
        try:
            self.httpd = ThreadingHTTPServer((bind, port), handler)
        except OSError as exc:
            raise ConfigurationError(
                f"http_port: cannot listen on {bind}:{port} ({exc.strerror}); choose another "
                "port (--http-port / OUTBOX_CDC_HTTP_PORT)"
            ) from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="outbox-cdc-http", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(server: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/livez"):
                self._json(*server.watchdog.alive())
            elif path == "/readyz":
                self._json(*server.watchdog.ready())
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _json(self, ok: bool, detail: dict[str, Any]) -> None:
            body = json.dumps({"status": "ok" if ok else "unavailable", **detail}).encode()
            self._send(200 if ok else 503, body + b"\n", "application/json")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    return Handler
