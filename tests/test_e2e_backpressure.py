"""End to end: a slow client slows the origin down instead of filling the proxy's memory
(issue 2). ``bench/slow_client.py`` measures the proxy's memory for a 1 GiB body."""

from __future__ import annotations

import hashlib
import socket

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols.basic import FileSender

from tests.conftest import start_proxy
from tests.support import TIMEOUT, request_bytes, start_raw_origin

BODY_SIZE = 128 << 20
CHUNK = 1 << 16


class _Generated:
    """A file-like body of BODY_SIZE pseudo-random bytes, counting what was read."""

    def __init__(self) -> None:
        self.sent = 0
        self.digest = hashlib.sha256()
        self._block = hashlib.sha256(b"seed").digest() * (CHUNK // 32)

    def read(self, size: int) -> bytes:
        size = min(size, BODY_SIZE - self.sent, CHUNK)
        data = self._block[:size]
        self.sent += size
        self.digest.update(data)
        return data


class _SlowReader(protocol.Protocol):
    """Reads the response, pausing 20 ms after every MiB; tracks bytes in flight."""

    def __init__(self, body: _Generated) -> None:
        self.body = body
        self.received = 0
        self.max_in_flight = 0
        self.digest = hashlib.sha256()
        self._head = b""
        self._since_pause = 0
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        sock = self.transport.getHandle()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)

    def dataReceived(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            if b"\r\n\r\n" not in self._head:
                return
            _, data = self._head.split(b"\r\n\r\n", 1)
            self._head = None
        self.received += len(data)
        self.digest.update(data)
        self.max_in_flight = max(self.max_in_flight, self.body.sent - self.received)
        self._since_pause += len(data)
        if self.received >= BODY_SIZE and not self.done.called:
            self.done.callback(None)
        elif self._since_pause >= 1 << 20:
            self._since_pause = 0
            self.transport.pauseProducing()
            reactor.callLater(0.02, self.transport.resumeProducing)


@pytest_twisted.ensureDeferred
async def test_slow_client_throttles_origin(tmp_path):
    """A slow client holds the origin back: the bytes in flight stay bounded."""
    body = _Generated()

    def script(transport, head):
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        transport.write(
            b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\n"
            b"Content-Length: %d\r\n\r\n" % BODY_SIZE
        )
        FileSender().beginFileTransfer(body, transport)

    raw = start_raw_origin(script)
    running = await start_proxy(tmp_path)
    try:
        reader = _SlowReader(body)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", running.port)
        client = await connectProtocol(endpoint, reader)
        client.transport.write(request_bytes("GET", raw.url("/big")))
        reader.done.addTimeout(TIMEOUT, reactor)
        await reader.done
        client.transport.loseConnection()
    finally:
        await running.service.stopService()
        await raw.stop()
    assert reader.received == BODY_SIZE
    assert reader.digest.digest() == body.digest.digest()
    # Without backpressure the proxy would read the origin at full speed and hold
    # most of the 128 MiB; with it, only socket buffers' worth is in flight.
    assert reader.max_in_flight < 64 << 20, reader.max_in_flight
