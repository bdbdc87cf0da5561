"""End to end: a real origin, the real proxy, raw HTTP between them (issue 2)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.web import server

from tests.conftest import RunningProxy, start_proxy
from tests.support import (
    TIMEOUT,
    Origin,
    fetch,
    request_bytes,
    send_raw,
    start_raw_origin,
)

ALL_BYTES = bytes(range(256)) * 64


@pytest_twisted.ensureDeferred
async def test_miss_then_hit_is_byte_exact(origin: Origin, proxy: RunningProxy):
    """A fresh response is relayed byte-exact, then served from the store."""
    url = origin.static(
        "/bin", ALL_BYTES, {"Cache-Control": "max-age=300", "Content-Type": "x/bin"}
    )
    first = await fetch(proxy.port, "GET", url)
    second = await fetch(proxy.port, "GET", url)
    assert first.status == second.status == 200
    assert first.body == second.body == ALL_BYTES
    assert origin.count("/bin") == 1
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert second.header("Age") is not None and int(second.header("Age")) >= 0
    assert second.header("Content-Type") == "x/bin"


@pytest_twisted.ensureDeferred
async def test_large_body_relayed_and_stored(origin: Origin, proxy: RunningProxy):
    """A 12 MB body arrives whole on the miss and on the hit."""
    body = ALL_BYTES * 750  # 12,288,000 bytes
    url = origin.static("/big", body, {"Cache-Control": "max-age=300"})
    first = await fetch(proxy.port, "GET", url)
    second = await fetch(proxy.port, "GET", url)
    assert first.body == body
    assert second.body == body
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/big") == 1


@pytest_twisted.ensureDeferred
async def test_restart_serves_what_was_stored(origin: Origin, tmp_path):
    """A new proxy process on the same cache dir serves the stored response."""
    url = origin.static("/keep", b"kept", {"Cache-Control": "max-age=300"})
    first = await start_proxy(tmp_path)
    await fetch(first.port, "GET", url)
    await first.service.stopService()
    second = await start_proxy(tmp_path)
    try:
        again = await fetch(second.port, "GET", url)
    finally:
        await second.service.stopService()
    assert again.body == b"kept"
    assert again.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/keep") == 1


def _echo(request: server.Request) -> bytes:
    body = request.content.read()
    request.setHeader("X-Method", request.method)
    request.setHeader("Content-Type", "application/octet-stream")
    return body


@pytest_twisted.ensureDeferred
async def test_every_method_with_binary_bodies(origin: Origin, proxy: RunningProxy):
    """POST, PUT, PATCH, DELETE, OPTIONS carry binary bodies both ways."""
    url = origin.route("/echo", _echo)
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        response = await fetch(proxy.port, method, url, body=ALL_BYTES)
        assert response.status == 200, method
        assert response.header("X-Method") == method
        assert response.body == ALL_BYTES, method
        seen = origin.requests[b"/echo"][-1]
        assert seen.method == method.encode()
        assert seen.body == ALL_BYTES
    assert origin.count("/echo") == 5


@pytest_twisted.ensureDeferred
async def test_chunked_request_body(origin: Origin, proxy: RunningProxy):
    """A chunked request body reaches the origin whole."""
    url = origin.route("/echo", _echo)
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    data = request_bytes("POST", url, {"Transfer-Encoding": "chunked"}) + chunked
    (response,) = await send_raw(proxy.port, data)
    assert response.body == b"hello world"
    assert origin.requests[b"/echo"][0].body == b"hello world"


@pytest_twisted.ensureDeferred
async def test_expect_continue_is_answered(origin: Origin, proxy: RunningProxy):
    """A client waiting for 100 Continue gets it from the proxy, then its answer."""
    url = origin.route("/echo", _echo)
    head = request_bytes("PUT", url, {"Expect": "100-continue", "Content-Length": "4"})
    (response,) = await send_raw(proxy.port, head + b"data")
    assert response.status == 200
    assert response.body == b"data"
    assert origin.requests[b"/echo"][0].header("Expect") is None


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_answered_in_order(
    origin: Origin, proxy: RunningProxy
):
    """Three pipelined requests on one connection get three responses in order."""
    urls = [origin.static(f"/p{i}", b"body %d" % i) for i in range(3)]
    data = b"".join(request_bytes("GET", url) for url in urls)
    responses = await send_raw(proxy.port, data, expected=3)
    assert [r.body for r in responses] == [b"body 0", b"body 1", b"body 2"]


@pytest_twisted.ensureDeferred
async def test_keep_alive_connection_serves_sequential_requests(
    origin: Origin, proxy: RunningProxy
):
    """Requests sent one after another on one connection are all answered."""
    url = origin.static("/k", b"k", {"Cache-Control": "max-age=60"})
    data = request_bytes("GET", url) + request_bytes("GET", url + "?2")
    responses = await send_raw(proxy.port, data, expected=2)
    assert [r.status for r in responses] == [200, 200]
    assert all(r.header("Connection") != "close" for r in responses)


@pytest_twisted.ensureDeferred
async def test_http10_client_gets_close_delimited_answer(
    origin: Origin, proxy: RunningProxy
):
    """An HTTP/1.0 client is answered and the connection closes."""
    url = origin.static("/old", b"old")
    data = request_bytes("GET", url, version="1.0")
    (response,) = await send_raw(proxy.port, data)
    assert response.body == b"old"


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_stripped_via_added_repeats_kept(
    origin: Origin, proxy: RunningProxy
):
    """Hop-by-hop fields never cross; Via is added; two Set-Cookie stay two."""

    def handler(request: server.Request) -> bytes:
        request.responseHeaders.addRawHeader(b"Set-Cookie", b"a=1")
        request.responseHeaders.addRawHeader(b"Set-Cookie", b"b=2")
        request.setHeader(b"Connection", b"X-Private")
        request.setHeader(b"X-Private", b"secret")
        request.setHeader(b"Keep-Alive", b"timeout=5")
        return b"ok"

    url = origin.route("/hop", handler)
    headers = [
        ("Proxy-Connection", "keep-alive"),
        ("Connection", "X-Client-Hop"),
        ("X-Client-Hop", "1"),
        ("Proxy-Authorization", "Basic eDp5"),
        ("X-End", "yes"),
    ]
    response = await fetch(proxy.port, "GET", url, headers)
    seen = origin.requests[b"/hop"][0]
    assert seen.header("X-Client-Hop") is None
    assert seen.header("Proxy-Connection") is None
    assert seen.header("Proxy-Authorization") is None
    assert seen.header("X-End") == "yes"
    assert seen.header(
        "Via",
    ).startswith("1.1 cacheproxy-")
    assert response.headers_named("Set-Cookie") == ["a=1", "b=2"]
    assert response.header("X-Private") is None
    assert response.header("Keep-Alive") is None
    assert response.header("Via").startswith("1.1 cacheproxy-")
    assert response.header("Via") == seen.header("Via")


class _Trickle:
    """An origin that sends the head and a first part, then the rest on demand."""

    def __init__(self, head: bytes, first: bytes, rest: bytes) -> None:
        self.head, self.first, self.rest = head, first, rest
        self.transports: list = []

    def __call__(self, transport, request_head: bytes) -> None:
        self.transports.append(transport)
        transport.write(self.head + self.first)

    def finish(self) -> None:
        self.transports[0].write(self.rest)


class _Watcher(protocol.Protocol):
    """Collects what the proxy sends; fires ``got`` once ``marker`` has arrived."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.data = b""
        self.got: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.marker in self.data and not self.got.called:
            self.got.callback(None)


@pytest.mark.parametrize(
    ("head", "first", "rest", "final"),
    [
        (
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n"
            b"Content-Length: 10\r\n\r\n",
            b"first",
            b"-rest",
            b"first-rest",
        ),
        (
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            b"5\r\nfirst\r\n",
            b"5\r\n-rest\r\n0\r\n\r\n",
            b"first-rest",
        ),
    ],
    ids=["content-length", "chunked"],
)
@pytest_twisted.ensureDeferred
async def test_body_streams_as_it_arrives(tmp_path, head, first, rest, final):
    """The client gets the first part of a body before the origin has sent the rest."""
    trickle = _Trickle(head, first, rest)
    raw = start_raw_origin(trickle)
    running = await start_proxy(tmp_path)
    try:
        watcher = _Watcher(b"first")
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", running.port)
        client = await connectProtocol(endpoint, watcher)
        client.transport.write(request_bytes("GET", raw.url("/trickle")))
        try:
            await watcher.got.addTimeout(TIMEOUT, reactor)
        except defer.TimeoutError:
            seen = f"saw only {watcher.data!r}, origin got {raw.requests}"
            raise AssertionError(seen) from None
        assert b"rest" not in watcher.data
        # The response is whole once its last byte is in: the held-back last
        # bytes of a known length, or the last chunk of a chunked body.
        watcher.marker = b"0\r\n\r\n" if b"chunked" in head else b"-rest"
        watcher.got = defer.Deferred()
        trickle.finish()
        try:
            await watcher.got.addTimeout(TIMEOUT, reactor)
        except defer.TimeoutError:
            seen = f"saw only {watcher.data!r}; origin got {raw.requests}"
            raise AssertionError(seen) from None
        client.transport.loseConnection()
        again = await fetch(running.port, "GET", raw.url("/trickle"))
    finally:
        await running.service.stopService()
        await raw.stop()
    assert again.body == final
    assert again.header("Cache-Status") == "cacheproxy; hit"


@pytest_twisted.ensureDeferred
async def test_origin_connections_are_reused(tmp_path):
    """Sequential requests to one origin, from two clients, share one connection."""

    def script(transport, head):
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    raw = start_raw_origin(script)
    running = await start_proxy(tmp_path)
    try:
        for path in ("/a", "/b", "/c"):
            response = await fetch(running.port, "GET", raw.url(path))
            assert response.body == b"ok"
    finally:
        await running.service.stopService()
        await raw.stop()
    assert len(raw.requests) == 3
    assert len(raw.connections) == 1


@pytest_twisted.ensureDeferred
async def test_max_forwards_zero_is_answered_by_the_proxy(
    origin: Origin, proxy: RunningProxy
):
    """TRACE and OPTIONS with Max-Forwards: 0 are answered by the proxy itself."""
    url = origin.route("/echo", _echo)
    trace = await fetch(
        proxy.port, "TRACE", url, {"Max-Forwards": "0", "Authorization": "Basic eDp5"}
    )
    options = await fetch(proxy.port, "OPTIONS", url, {"Max-Forwards": "0"})
    assert trace.status == 200
    assert trace.header("Content-Type") == "message/http"
    assert trace.body.startswith(f"TRACE {url} HTTP/1.1\r\n".encode())
    assert b"Authorization" not in trace.body
    assert options.status == 200
    assert "GET" in options.header("Allow")
    assert origin.count("/echo") == 0


@pytest_twisted.ensureDeferred
async def test_max_forwards_is_decremented(origin: Origin, proxy: RunningProxy):
    """An OPTIONS with Max-Forwards above zero is forwarded with one less."""
    url = origin.route("/echo", _echo)
    response = await fetch(proxy.port, "OPTIONS", url, {"Max-Forwards": "5"})
    assert response.status == 200
    assert origin.requests[b"/echo"][0].header("Max-Forwards") == "4"
