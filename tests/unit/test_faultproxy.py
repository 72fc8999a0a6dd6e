"""The fault proxy of the fault-injection suite (tests/support/faultproxy.py) against a local echo
server: each fault must do what the scenarios rely on."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support.faultproxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[0], server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[FaultProxy]:
    with FaultProxy(echo) as p:
        yield p


def _connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    host, port = proxy.address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def _roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _send_until_closed(sock: socket.socket) -> None:
    for _ in range(50):  # the RST may race the first send
        sock.sendall(b"b")
        if not sock.recv(10):
            raise AssertionError("closed with a FIN, not an RST")
        time.sleep(0.01)


def test_passes_bytes_through(proxy: FaultProxy) -> None:
    with _connect(proxy) as s:
        assert _roundtrip(s, b"hello" * 10_000) == b"hello" * 10_000
    assert proxy.stats.accepted == 1


def test_blackhole_holds_bytes_without_closing_and_delivers_them_after_heal(
    proxy: FaultProxy,
) -> None:
    with _connect(proxy, timeout=0.5) as s:
        proxy.blackhole()
        s.sendall(b"ping")
        with pytest.raises(TimeoutError):
            s.recv(10)  # nothing comes back, and the connection is not closed either
        with _connect(proxy, timeout=0.5) as s2:  # new connections are accepted, and silent
            s2.sendall(b"new")
            with pytest.raises(TimeoutError):
                s2.recv(10)
            proxy.heal()
            s2.settimeout(5)
            assert s2.recv(10) == b"new"
        s.settimeout(5)
        assert s.recv(10) == b"ping"


def test_latency_delays_each_chunk(proxy: FaultProxy) -> None:
    proxy.set_latency(0.3, "upstream")
    with _connect(proxy) as s:
        t0 = time.monotonic()
        assert _roundtrip(s, b"x") == b"x"
        assert time.monotonic() - t0 >= 0.3
        proxy.heal()
        t0 = time.monotonic()
        assert _roundtrip(s, b"y") == b"y"
        assert time.monotonic() - t0 < 0.3


def test_reset_gives_both_peers_an_rst(proxy: FaultProxy) -> None:
    with _connect(proxy) as s:
        assert _roundtrip(s, b"a") == b"a"
        assert proxy.reset() == 1
        with pytest.raises(ConnectionResetError):
            _send_until_closed(s)
    with _connect(proxy) as s:  # the proxy still accepts
        assert _roundtrip(s, b"c") == b"c"


def test_bandwidth_limits_throughput(proxy: FaultProxy) -> None:
    proxy.set_bandwidth(100_000)
    with _connect(proxy, timeout=10) as s:
        t0 = time.monotonic()
        assert _roundtrip(s, b"z" * 50_000) == b"z" * 50_000
        assert time.monotonic() - t0 >= 0.4  # 50 kB at 100 kB/s, each way: >= 0.5 s


def test_slow_close_delays_the_fin(proxy: FaultProxy) -> None:
    proxy.set_slow_close(0.5)
    with _connect(proxy) as s:
        assert _roundtrip(s, b"q") == b"q"
        s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        assert s.recv(10) == b""
        assert time.monotonic() - t0 >= 0.45  # upstream EOF late, then the echo's FIN late


def test_refuse_closes_the_port_until_heal(proxy: FaultProxy) -> None:
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)
    proxy.heal()
    with _connect(proxy) as s:
        assert _roundtrip(s, b"ok") == b"ok"
