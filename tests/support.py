"""Test parts: a counting origin server and a raw HTTP client, both on 127.0.0.1."""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web import resource, server

TIMEOUT = 30.0


@dataclass
class Response:
    """A response as a client saw it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    version: str = "1.1"

    def header(self, name: str) -> str | None:
        """The field's values joined, or None."""
        values = self.headers_named(name)
        return ", ".join(values) if values else None

    def headers_named(self, name: str) -> list[str]:
        """Every value of a field."""
        lname = name.lower().encode()
        return [v.decode("latin-1") for n, v in self.headers if n.lower() == lname]


@dataclass
class Seen:
    """A request as the origin saw it."""

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        lname = name.lower().encode()
        values = [v.decode("latin-1") for n, v in self.headers if n.lower() == lname]
        return ", ".join(values) if values else None


Handler = Callable[[server.Request], Any]


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, origin: Origin) -> None:
        super().__init__()
        self._origin = origin

    def render(self, request: server.Request) -> Any:
        body = request.content.read() if request.content else b""
        if request.content:
            request.content.seek(0)
        raw = [
            (n, v) for n, vs in request.requestHeaders.getAllRawHeaders() for v in vs
        ]
        seen = Seen(request.method, request.uri, raw, body)
        path = request.path
        self._origin.requests[path].append(seen)
        handler = self._origin.routes.get(path)
        if handler is None:
            request.setResponseCode(404)
            return b"no such path\n"
        return handler(request)


@dataclass
class Origin:
    """A twisted.web origin that counts the requests it sees, per path."""

    routes: dict[bytes, Handler] = field(default_factory=dict)
    requests: dict[bytes, list[Seen]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    port: Any = None
    connections: int = 0

    def route(self, path: str, handler: Handler) -> str:
        """Serve ``path`` with ``handler``; returns the absolute URL of it."""
        self.routes[path.encode()] = handler
        return self.url(path)

    def static(
        self,
        path: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        status: int = 200,
    ) -> str:
        """Serve a fixed response at ``path``."""

        def handler(request: server.Request) -> bytes:
            request.setResponseCode(status)
            for name, value in (headers or {}).items():
                request.setHeader(name, value)
            return body if request.method != b"HEAD" else b""

        return self.route(path, handler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}{path}"

    def count(self, path: str) -> int:
        """How many requests reached ``path``."""
        return len(self.requests[path.split("?")[0].encode()])


class _CountingSite(server.Site):
    """A Site that counts the TCP connections it accepts."""

    def __init__(self, origin: Origin) -> None:
        super().__init__(_Root(origin))
        self._origin = origin

    def buildProtocol(self, addr: Any) -> Any:
        self._origin.connections += 1
        return super().buildProtocol(addr)


def start_origin() -> Origin:
    origin = Origin()
    site = _CountingSite(origin)
    site.noisy = False
    origin.port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return origin


class _Client(protocol.Protocol):
    """Sends raw bytes, parses responses with httptools, counts them."""

    def __init__(self, expected: int, head_only: bool) -> None:
        self.expected = expected
        self.head_only = head_only
        self.responses: list[Response] = []
        self.done: defer.Deferred[list[Response]] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._new_parser()

    def _new_parser(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._parser.get_status_code() == 100:
            self._headers = []
            return
        if self.head_only:
            self._complete()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() == 100:
            return
        if not self.head_only:
            self._complete()

    def _complete(self) -> None:
        self.responses.append(
            Response(
                self._parser.get_status_code(),
                self._headers,
                bytes(self._body),
                self._parser.get_http_version(),
            )
        )
        self._headers = []
        self._body = bytearray()
        if len(self.responses) == self.expected and not self.done.called:
            self.done.callback(self.responses)

    def dataReceived(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            if not self.done.called:
                self.done.errback(error)

    def connectionLost(self, reason: Any = None) -> None:
        if self._headers and self.head_only is False and not self.done.called:
            # A close-delimited body ends here (RFC 9112 section 6.3, item 8).
            self._complete()
        if not self.done.called:
            self.done.callback(self.responses)
        self.closed.callback(None)


async def send_raw(
    port: int,
    data: bytes,
    expected: int = 1,
    head_only: bool = False,
    keep_open: bool = False,
) -> list[Response]:
    """Send ``data`` to 127.0.0.1:port; the responses once ``expected`` arrived."""
    client = _Client(expected, head_only)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    proto = await protocol_connect(endpoint, client)
    proto.transport.write(data)
    d = client.done
    d.addTimeout(TIMEOUT, reactor)
    responses = await d
    if not keep_open:
        proto.transport.loseConnection()
        await client.closed
    return responses


async def protocol_connect(endpoint: Any, proto: protocol.Protocol) -> Any:
    from twisted.internet.endpoints import connectProtocol

    return await connectProtocol(endpoint, proto)


def request_bytes(
    method: str,
    url: str,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    version: str = "1.1",
) -> bytes:
    """A request in absolute form, with Host, as a proxy client sends it."""
    from urllib.parse import urlsplit

    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {n.lower() for n, _ in items}
    lines = [f"{method} {url} HTTP/{version}"]
    if "host" not in names and url.startswith("http"):
        lines.append(f"Host: {urlsplit(url).netloc}")
    lines += [f"{n}: {v}" for n, v in items]
    if (
        body is not None
        and "content-length" not in names
        and ("transfer-encoding" not in names)
    ):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def fetch(
    port: int,
    method: str,
    url: str,
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    body: bytes | None = None,
) -> Response:
    """One request through the proxy at ``port`` on a fresh connection."""
    data = request_bytes(method, url, headers, body)
    responses = await send_raw(port, data, 1, head_only=(method == "HEAD"))
    assert responses, "the proxy closed the connection without a response"
    return responses[0]


class _RawOriginProtocol(protocol.Protocol):
    """Reads one request head, then lets the test's script answer it byte by byte."""

    def __init__(self, origin: RawOrigin) -> None:
        self._origin = origin
        self._buffer = b""

    def connectionMade(self) -> None:
        self._origin.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            self._origin.requests.append(head)
            self._origin.script(self.transport, head)


@dataclass
class RawOrigin:
    """An origin that answers with whatever bytes a test scripts, counting requests."""

    script: Callable[[Any, bytes], None]
    requests: list[bytes] = field(default_factory=list)
    connections: list[_RawOriginProtocol] = field(default_factory=list)
    port: Any = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}{path}"

    async def stop(self) -> None:
        for connection in self.connections:
            if connection.transport is not None and connection.transport.connected:
                connection.transport.abortConnection()
        await defer.maybeDeferred(self.port.stopListening)


def start_raw_origin(script: Callable[[Any, bytes], None]) -> RawOrigin:
    """Listen on 127.0.0.1:0; ``script(transport, head)`` answers each request."""
    origin = RawOrigin(script)
    factory = protocol.Factory.forProtocol(lambda: _RawOriginProtocol(origin))
    factory.noisy = False
    origin.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return origin


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait, polling the reactor, until ``predicate()`` holds, at most ``timeout``."""
    from twisted.internet import task

    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await task.deferLater(reactor, 0.02, lambda: None)
