"""A second, throw-away Kafka broker whose data lives on a small tmpfs, for the disk-full test.

It runs from the jars ``scripts/services.sh`` fetched (``<cache>/kafka/lib``), single node KRaft
like the main broker, with its metadata log on the normal disk so that only the data directory
can fill up. Needs root (``mount -t tmpfs``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

from tests.support.services import probe_kafka

REPO_ROOT = Path(__file__).resolve().parents[2]


def kafka_lib() -> Path:
    """Where scripts/services.sh keeps the broker's jars (its CACHE_DIR/kafka/lib)."""
    cache = os.environ.get("OUTBOX_CDC_CACHE") or str(Path.home() / ".cache" / "outbox-cdc")
    return Path(cache) / "kafka" / "lib"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DiskBroker:
    def __init__(self, workdir: Path, data_mb: int) -> None:
        self.workdir = workdir
        self.data = workdir / "data"  # the tmpfs
        self.meta = workdir / "metadata"
        self.conf = workdir / "server.properties"
        self.log = workdir / "broker.log"
        self.data_mb = data_mb
        self.port, self.controller_port = _free_port(), _free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._mounted = False

    def _java(self, *args: str) -> list[str]:
        log4j = REPO_ROOT / "scripts" / "kafka" / "log4j2.properties"
        return [
            "java",
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            f"{kafka_lib()}/*",
            *args,
        ]

    def setup(self) -> DiskBroker:
        self.data.mkdir(parents=True)
        self.meta.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.data_mb}m", "tmpfs", str(self.data)],
            check=True,
            capture_output=True,
        )
        self._mounted = True
        self.conf.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
                    "controller.listener.names=CONTROLLER",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"log.dirs={self.data}",
                    f"metadata.log.dir={self.meta}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "transaction.state.log.num.partitions=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "log.segment.bytes=1048576",
                    "",
                ]
            )
        )
        subprocess.run(
            self._java(
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                uuid.uuid4().hex[:22],
                "-c",
                str(self.conf),
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        return self

    def start(self, timeout: float = 90.0) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self._java("kafka.Kafka", str(self.conf)),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                probe_kafka(self.bootstrap, timeout=5)
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"the disk broker did not start:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def fill(self, keep_bytes: int = 0) -> int:
        """Fill the data disk (leaving about ``keep_bytes``); returns the bytes written."""
        filler = self.data / "filler"
        written = 0
        chunk = b"\0" * (256 * 1024)
        with filler.open("wb", buffering=0) as f:
            while True:
                st = os.statvfs(self.data)
                free = st.f_bavail * st.f_frsize
                if free <= keep_bytes + len(chunk):
                    break
                try:
                    written += f.write(chunk)
                except OSError:
                    break
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.data / "filler").unlink()

    def close(self) -> None:
        self.stop()
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.data)], check=False, capture_output=True)
            self._mounted = False
