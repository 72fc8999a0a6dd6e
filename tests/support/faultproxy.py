"""A TCP proxy that injects network faults, for the fault-injection tests (the role Toxiproxy
plays elsewhere, written here so that the suite needs nothing but Python).

It sits between the relay and Kafka, or between the relay and PostgreSQL::

    proxy = FaultProxy(upstream=("127.0.0.1", 9094), listen_port=19094).start()
    ...                              # the relay connects to proxy.address
    proxy.blackhole()                # packets "dropped": nothing flows, nothing is closed
    proxy.heal()
    proxy.set_latency(0.5)           # 500 ms added to every chunk towards the server
    proxy.reset()                    # every open connection closed with a TCP RST
    proxy.close()

Faults, and how faithful they are:

* **blackhole**: bytes stop flowing in both directions and no connection is closed, as in a
  network partition (no RST, no FIN: the peers see half-open connections and find out only by
  their own timeouts). New connections are accepted (the kernel completes the handshake of a
  listening socket anyway) and stay silent. What was sent during the blackhole is delivered once
  it heals, as TCP retransmission would; a peer that closed its side meanwhile is seen closed only
  then. Unlike a real partition, the proxy's kernel acknowledges what the peers send, so TCP
  keepalives and ``TCP_USER_TIMEOUT`` cannot detect it: only application-level timeouts do.
* **latency**: each chunk is delivered ``seconds`` after it was read, per direction, with
  pipelining (a second chunk does not wait for the first one's delay).
* **bandwidth**: at most ``bytes_per_second`` per connection and direction.
* **slow close**: a closed side is propagated ``seconds`` late.
* **reset**: every open connection is aborted with ``SO_LINGER`` 0, so both peers get an RST.
* **refuse**: the listening socket is closed (connection refused), and open connections reset.

The proxy runs an asyncio loop in a daemon thread; every method is thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

Direction = Literal["upstream", "downstream", "both"]
_CHUNK = 64 * 1024
_QUEUE_CHUNKS = 64  # per direction: what a blackholed peer can push before it blocks


@dataclass
class ProxyStats:
    accepted: int = 0
    active: int = 0
    resets: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Abort with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        name: str = "proxy",
    ) -> None:
        self.upstream = upstream
        self.name = name
        self._listen = (listen_host, listen_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None  # cleared while blackholed
        self._latency = {"upstream": 0.0, "downstream": 0.0}
        self._bandwidth: float | None = None
        self._slow_close = 0.0
        self.stats = ProxyStats()
        self.port = listen_port

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._refuse())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"{self._listen[0]}:{self.port}"

    # -- faults (thread-safe) ----------------------------------------------------------------

    def blackhole(self) -> None:
        self._call(self._set_flowing(False))

    def heal(self) -> None:
        """Ends a blackhole, latency, bandwidth limit and slow close; listens again if refusing."""
        self._latency = {"upstream": 0.0, "downstream": 0.0}
        self._bandwidth = None
        self._slow_close = 0.0
        self._call(self._set_flowing(True))
        if self._server is None:
            self._call(self._start())

    @contextlib.contextmanager
    def blackholed(self) -> Iterator[None]:
        self.blackhole()
        try:
            yield
        finally:
            self.heal()

    def set_latency(self, seconds: float, direction: Direction = "upstream") -> None:
        for d in ("upstream", "downstream"):
            if direction in (d, "both"):
                self._latency[d] = seconds

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        self._bandwidth = bytes_per_second

    def set_slow_close(self, seconds: float) -> None:
        self._slow_close = seconds

    def reset(self) -> int:
        """Abort every open connection with an RST; returns how many."""
        return self._call(self._reset())

    def refuse(self) -> None:
        """Stop listening (connection refused) and reset the open connections."""
        self._call(self._refuse())

    # -- internals ---------------------------------------------------------------------------

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _start(self) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
            self._flowing.set()
        self._server = await asyncio.start_server(
            self._accept, self._listen[0], self.port, reuse_address=True, limit=_CHUNK
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _reset(self) -> int:
        links = list(self._links)
        for link in links:
            _rst(link.client)
            _rst(link.server)
            for task in link.tasks:
                task.cancel()
        self.stats.resets += len(links)
        return len(links)

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._reset()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer)
        self._links.add(link)
        self.stats.accepted += 1
        self.stats.active += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=_CHUNK)
            except OSError:
                _rst(writer)
                return
            link.server = up_writer
            link.tasks = [
                asyncio.ensure_future(self._direction(reader, up_writer, "upstream")),
                asyncio.ensure_future(self._direction(up_reader, writer, "downstream")),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            self.stats.active -= 1
            for w in (writer, link.server):
                if w is not None and not w.is_closing():
                    w.close()

    async def _direction(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)
        writer = asyncio.ensure_future(self._deliver(queue, dst, direction))
        try:
            while True:
                try:
                    data = await src.read(_CHUNK)
                except OSError:
                    data = b""
                await queue.put((time.monotonic(), data))
                if not data:
                    break
            await writer
        finally:
            writer.cancel()

    async def _deliver(
        self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter, direction: str
    ) -> None:
        assert self._flowing is not None
        while True:
            read_at, data = await queue.get()
            await self._flowing.wait()
            delay = read_at + self._latency[direction] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._flowing.wait()  # a blackhole that began during the delay
            if not data:
                if self._slow_close:
                    await asyncio.sleep(self._slow_close)
                with contextlib.suppress(OSError):
                    if dst.can_write_eof():
                        dst.write_eof()
                    else:
                        dst.close()
                return
            rate = self._bandwidth
            step = len(data) if not rate else max(1, int(rate / 20))
            for i in range(0, len(data), step):
                piece = data[i : i + step]
                try:
                    dst.write(piece)
                    await dst.drain()
                except OSError:
                    return
                if direction == "upstream":
                    self.stats.bytes_upstream += len(piece)
                else:
                    self.stats.bytes_downstream += len(piece)
                if rate:
                    await asyncio.sleep(len(piece) / rate)
