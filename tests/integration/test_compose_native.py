"""The compose stack's relay and demo producer, run natively: no Docker engine needed.

What the containers would run, with the environment ``compose.yaml`` gives them, against the
test suite's PostgreSQL and Kafka:

* the relay: the image's ENTRYPOINT, ``deploy/relay-entrypoint.sh`` (``outbox-cdc init``, then
  ``exec outbox-cdc start``), found through the Dockerfile (see ``relay_entrypoint``);
* its healthcheck: the ``test`` command of ``compose.yaml``, with this interpreter as ``python``;
* the demo producer: its compose ``entrypoint``, the script mapped from its bind mount.

Only what must differ here is replaced: the addresses of PostgreSQL and Kafka (the fixtures
``postgres_url`` and ``kafka_bootstrap``), a free HTTP port, and per-test names for the table,
slot (and message prefix, database-wide in WAL mode) and topic; a finite ``DEMO_EVENTS``.
Everything else (JSON logs, heartbeats, partitions, source name...) is taken as it is.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from kafka import KafkaConsumer

from tests.acceptance.harness import drop_outbox_table, header
from tests.support.kafka import consume_all
from tests.unit.test_compose import (
    demo_producer_command,
    environment,
    healthcheck_argv,
    relay_entrypoint,
    service,
)

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(240)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def native_env(values: dict[str, str]) -> dict[str, str]:
    """This process's environment without any OUTBOX_CDC_*/DEMO_* variable, plus ``values``;
    the interpreter's bin directory first on PATH, where ``outbox-cdc`` is installed (the
    image has it in /usr/local/bin)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_CDC_", "DEMO_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(values)
    return env


def seconds(duration: str) -> float:
    """A compose duration such as ``40s``, ``1m30s``."""
    total, number = 0.0, ""
    units = {"h": 3600, "m": 60, "s": 1}
    for ch in duration:
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            total += float(number) * units[ch]
            number = ""
    return total + (float(number) if number else 0.0)


class Container:
    """One native 'container': a process with its log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Container:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float) -> int | None:
        """SIGTERM (docker stop), then SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_healthy(relay: Container, timeout: float) -> float:
    """Run the compose healthcheck of the relay until it passes; the seconds it took."""
    check = healthcheck_argv(service("relay")["healthcheck"]["test"])
    assert check[0] == "python"
    argv = [sys.executable, *check[1:]]
    started = time.monotonic()
    while True:
        result = subprocess.run(argv, env=relay.env, capture_output=True, timeout=30)
        if result.returncode == 0:
            return time.monotonic() - started
        assert relay.running, f"the relay exited before it was healthy:\n{relay.text()}"
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"the relay's healthcheck did not pass within {timeout:.0f} s "
                f"({result.stderr.decode(errors='replace')[-300:]}):\n{relay.text()}"
            )
        time.sleep(0.5)


@pytest.fixture
def names(
    postgres_url: str, unique_name: Callable[[str], str], replication_slot: str, kafka_topic: str
) -> Iterator[dict[str, str]]:
    """This test's table (created by the entrypoint's init, dropped here), slot and topic
    (dropped and deleted by their fixtures)."""
    table = f"public.{unique_name('compose_outbox')}"
    yield {"table": table, "slot": replication_slot, "topic": kafka_topic}
    drop_outbox_table(postgres_url, table)


def relay_container(
    tmp_path: Path, postgres_url: str, kafka_bootstrap: str, names: dict[str, str]
) -> Container:
    compose_env = environment(service("relay"))
    db = urlsplit(compose_env["OUTBOX_CDC_DATABASE_URL"])
    assert db.hostname == "postgres"
    assert compose_env["OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    env = dict(compose_env)
    env.update(
        OUTBOX_CDC_DATABASE_URL=postgres_url,
        OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        OUTBOX_CDC_HTTP_PORT=str(free_port()),
        OUTBOX_CDC_TABLE=names["table"],
        OUTBOX_CDC_SLOT=names["slot"],
        OUTBOX_CDC_MESSAGE_PREFIX=names["slot"],
    )
    script, args = relay_entrypoint()
    return Container([str(script), *args], native_env(env), tmp_path / "relay.log")


def producer_container(
    tmp_path: Path, postgres_url: str, names: dict[str, str], events: int, name: str
) -> Container:
    argv, compose_env = demo_producer_command()
    env = dict(compose_env)
    env.update(
        DEMO_DATABASE_URL=postgres_url,
        DEMO_TABLE=names["table"],
        DEMO_TOPIC=names["topic"],
        DEMO_EVENTS=str(events),
    )
    return Container(argv, native_env(env), tmp_path / f"{name}.log")


def committed_ids(producer: Container) -> list[str]:
    return [
        line.split("committed event ", 1)[1].split()[0]
        for line in producer.text().splitlines()
        if "committed event " in line
    ]


def run_producer(producer: Container, events: int) -> list[str]:
    interval = float(producer.env["DEMO_INTERVAL"])
    producer.start()
    assert producer.proc is not None
    code = producer.proc.wait(timeout=30 + events * interval)
    assert code == 0, producer.text()
    ids = committed_ids(producer)
    assert len(ids) == events, producer.text()
    return ids


def topic_partitions(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, allow_auto_create_topics=False)
    try:
        return len(consumer.partitions_for_topic(topic) or ())
    finally:
        consumer.close()


def test_relay_and_demo_producer_run_as_in_compose(
    tmp_path: Path,
    postgres_url: str,
    kafka_bootstrap: str,
    names: dict[str, str],
) -> None:
    """Start the relay as its container does, wait for its compose healthcheck, run the demo
    producer as its container does: its events arrive in Kafka as CloudEvents records, on the
    topic partitions the compose settings ask for. Then stop the relay like ``docker stop``
    (it exits 0 within the stop_grace_period) and start it again like ``restart:``: init
    changes nothing, the next events arrive, and none of the first ones twice."""
    relay_service = service("relay")
    grace = seconds(relay_service["stop_grace_period"])
    relay = relay_container(tmp_path, postgres_url, kafka_bootstrap, names)
    port = relay.env["OUTBOX_CDC_HTTP_PORT"]
    try:
        relay.start()
        wait_healthy(relay, timeout=seconds(relay_service["healthcheck"]["start_period"]) + 30)
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200, body
        assert json.loads(body)["status"] == "ok"

        first = run_producer(producer_container(tmp_path, postgres_url, names, 3, "p1"), 3)
        records = consume_all(kafka_bootstrap, names["topic"], 3, timeout=60, settle=1.0)
        assert sorted(header(r, "ce_id") or "" for r in records) == sorted(first)
        assert {r.key.decode() for r in records} == {"order-0", "order-1", "order-2"}
        compose_env = environment(relay_service)
        for rec in records:
            assert header(rec, "ce_type") == "order.created"
            assert header(rec, "ce_source") == compose_env["OUTBOX_CDC_SOURCE_NAME"]
            assert json.loads(rec.value)["order"] in (1, 2, 3)
        assert topic_partitions(kafka_bootstrap, names["topic"]) == int(
            compose_env["OUTBOX_CDC_KAFKA_TOPIC_PARTITIONS"]
        )

        status, metrics = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert b"outbox_cdc_build_info" in metrics
        status, body = get(f"http://127.0.0.1:{port}/readyz")
        assert status == 200, body

        # docker stop: SIGTERM, then SIGKILL after stop_grace_period
        started = time.monotonic()
        assert relay.stop(timeout=grace) == 0, relay.text()
        print(f"the relay stopped {time.monotonic() - started:.1f} s after SIGTERM")
        log = relay.text()
        assert "created" in log  # init's own lines (table, slot), before start's log
        json_lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert json_lines, f"no JSON log lines (OUTBOX_CDC_LOG_FORMAT=json):\n{log}"
        assert {"time", "level", "logger", "message"} <= set(json_lines[0])

        # restart: the same command again
        relay.start()
        wait_healthy(relay, timeout=60)
        assert "already present" in relay.text()
        second = run_producer(producer_container(tmp_path, postgres_url, names, 2, "p2"), 2)
        records = consume_all(kafka_bootstrap, names["topic"], 5, timeout=60, settle=2.0)
        ids = [header(r, "ce_id") or "" for r in records]
        assert sorted(ids) == sorted(first + second), "lost or duplicated events"
        assert relay.stop(timeout=grace) == 0, relay.text()
    finally:
        relay.kill()
        print(relay.text())


def test_demo_producer_waits_for_the_outbox_table(
    tmp_path: Path, postgres_url: str, names: dict[str, str]
) -> None:
    """Started before ``outbox-cdc init`` created its table, the producer retries until the
    table exists instead of failing: the stack does not depend on start-up timing."""
    producer = producer_container(tmp_path, postgres_url, names, 1, "producer").start()
    try:
        deadline = time.monotonic() + 30
        while "retrying" not in producer.text():
            assert producer.running, producer.text()
            assert time.monotonic() < deadline, producer.text()
            time.sleep(0.2)
        init = subprocess.run(
            ["outbox-cdc", "init", "--no-slot"],
            env=native_env(
                {"OUTBOX_CDC_DATABASE_URL": postgres_url, "OUTBOX_CDC_TABLE": names["table"]}
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert init.returncode == 0, init.stderr
        assert producer.proc is not None
        assert producer.proc.wait(timeout=30) == 0, producer.text()
        assert len(committed_ids(producer)) == 1
    finally:
        producer.kill()
