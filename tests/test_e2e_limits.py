"""End to end: slow, idle and too many clients (issue 8's limits)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from tests.conftest import start_proxy
from tests.support import TIMEOUT, Origin, fetch, request_bytes


class _Raw(protocol.Protocol):
    """Keeps what the proxy sends; ``gone`` fires when the proxy closes."""

    def __init__(self) -> None:
        self.data = b""
        self.gone: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.gone.callback(None)


async def _connect(port: int, data: bytes = b"") -> _Raw:
    client = _Raw()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    if data:
        client.transport.write(data)
    return client


@pytest_twisted.ensureDeferred
async def test_slow_request_head_gets_408(tmp_path):
    """A client that never finishes its request head is answered 408 and cut off."""
    running = await start_proxy(tmp_path, header_timeout=0.3)
    try:
        client = await _connect(running.port, b"GET http://127.0.0.1:1/ HTTP/1.1\r\n")
        await client.gone.addTimeout(TIMEOUT, reactor)
    finally:
        await running.service.stopService()
    assert client.data.startswith(b"HTTP/1.1 408 ")


@pytest_twisted.ensureDeferred
async def test_stalled_request_body_is_cut_off(origin: Origin, tmp_path):
    """A request body that stops arriving is cut off after the timeout."""
    url = origin.static("/upload", b"ok")
    running = await start_proxy(tmp_path, header_timeout=0.3)
    try:
        head = request_bytes("POST", url, {"Content-Length": "100"})
        client = await _connect(running.port, head + b"only a part")
        await client.gone.addTimeout(TIMEOUT, reactor)
    finally:
        await running.service.stopService()
    assert b"HTTP/1.1 200" not in client.data


@pytest_twisted.ensureDeferred
async def test_idle_connection_is_closed(origin: Origin, tmp_path):
    """A keep-alive connection with no request for the idle timeout is closed."""
    url = origin.static("/idle", b"ok")
    running = await start_proxy(tmp_path, idle_timeout=0.3)
    try:
        silent = await _connect(running.port)
        await silent.gone.addTimeout(TIMEOUT, reactor)
        used = await _connect(running.port, request_bytes("GET", url))
        await used.gone.addTimeout(TIMEOUT, reactor)
    finally:
        await running.service.stopService()
    assert silent.data == b""
    assert used.data.startswith(b"HTTP/1.1 200 OK") and used.data.endswith(b"ok")


@pytest_twisted.ensureDeferred
async def test_connections_past_the_limit_get_503(origin: Origin, tmp_path):
    """Past --max-connections a new client gets 503; once one leaves, it is served."""
    url = origin.static("/busy", b"ok")
    running = await start_proxy(tmp_path, max_connections=2)
    try:
        first = await _connect(running.port)
        second = await _connect(running.port)
        third = await _connect(running.port)
        await third.gone.addTimeout(TIMEOUT, reactor)
        first.transport.loseConnection()
        await first.gone
        second.transport.loseConnection()
        await second.gone
        served = await fetch(running.port, "GET", url)
    finally:
        await running.service.stopService()
    assert third.data.startswith(b"HTTP/1.1 503 ")
    assert served.status == 200
