"""OriginClient: the httptools HTTP/1.1 origin client, against real local origins."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import (
    RequestGenerationFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from cacheproxy.client import (
    OriginClient,
    OriginProtocolError,
    OriginResponse,
    OriginStalled,
)
from cacheproxy.intercept import describe_tls_failure, origin_tls_policy
from cacheproxy.origin import _Endpoints
from cacheproxy.server import RequestBody
from tests.support import TIMEOUT, Origin, start_origin, start_raw_origin, wait_for
from tests.tls_support import issue_server_cert, make_test_ca, start_https_origin


@dataclass
class Body(Protocol):
    """Collects a response body; ``done`` fires when it ends, ``reason`` says how."""

    pause_at_first: bool = False
    chunks: list[bytes] = field(default_factory=list)
    done: defer.Deferred[None] = field(default_factory=defer.Deferred)
    reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        if not self.chunks and self.pause_at_first:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.done.callback(None)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def _client(tls: Any = None, **kw: Any) -> OriginClient:
    endpoints = _Endpoints(reactor, 10, tls or BrowserLikePolicyForHTTPS())
    return OriginClient(reactor, endpoints, **kw)


@pytest_twisted.async_yield_fixture
async def client() -> AsyncIterator[OriginClient]:
    """A client with the default pool settings, closed at teardown."""
    running = _client()
    yield running
    await running.close()


@pytest_twisted.async_yield_fixture
async def origin() -> AsyncIterator[Origin]:
    """A counting twisted.web origin."""
    server = start_origin()
    yield server
    await defer.maybeDeferred(server.port.stopListening)


def _bounded(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    return d.addTimeout(TIMEOUT, reactor)


async def _head(
    client: OriginClient,
    url: str,
    method: bytes = b"GET",
    headers: tuple[tuple[bytes, bytes], ...] = (),
    body: RequestBody | None = None,
) -> OriginResponse:
    return await _bounded(client.request(method, url.encode(), headers, body))


async def _get(
    client: OriginClient, url: str, method: bytes = b"GET", **kw: Any
) -> tuple[OriginResponse, bytes, Failure]:
    """A whole response: head, body and the reason the body ended."""
    response = await _head(client, url, method, **kw)
    receiver = Body()
    response.deliverBody(receiver)
    await _bounded(receiver.done)
    assert receiver.reason is not None
    return response, receiver.data, receiver.reason


async def _turns(n: int = 5) -> None:
    """Let the reactor run ``n`` times round (no time passes on purpose)."""
    for _ in range(n):
        await task.deferLater(reactor, 0, lambda: None)


def _raw(responses: Callable[[bytes], bytes | None]):
    """A raw origin answering each request head with ``responses(head)``; None
    closes the connection instead."""

    def script(transport: Any, head: bytes) -> None:
        answer = responses(head)
        if answer is None:
            transport.loseConnection()
        else:
            transport.write(answer)

    return start_raw_origin(script)


OK_2 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest_twisted.ensureDeferred
async def test_content_length_body(client: OriginClient, origin: Origin):
    """A Content-Length body arrives whole and ends with ResponseDone."""
    url = origin.static("/a", b"x" * 1024, {"Content-Type": "text/plain"})
    response, data, reason = await _get(client, url)
    assert (response.code, response.phrase, response.version) == (
        200,
        b"OK",
        (b"HTTP", 1, 1),
    )
    assert response.length == 1024 and data == b"x" * 1024
    assert response.headers.getRawHeaders(b"content-type") == [b"text/plain"]
    assert reason.check(ResponseDone)


@pytest_twisted.ensureDeferred
async def test_chunked_body(client: OriginClient):
    """A chunked body is decoded, its length unknown (RFC 9112 section 7.1)."""
    raw = _raw(
        lambda head: (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
    )
    try:
        response, data, reason = await _get(client, raw.url("/"))
        assert response.length is UNKNOWN_LENGTH and data == b"abcde"
        assert reason.check(ResponseDone)
        assert response.headers.getRawHeaders(b"transfer-encoding") is None
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_close_delimited_body_is_potential_data_loss(client: OriginClient):
    """A body ended by the origin closing ends with PotentialDataLoss (6.3 item 8)."""

    def script(transport: Any, head: bytes) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
        transport.loseConnection()

    raw = start_raw_origin(script)
    try:
        response, data, reason = await _get(client, raw.url("/"))
        assert response.length is UNKNOWN_LENGTH and data == b"until close"
        assert reason.check(PotentialDataLoss)
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_head_then_get_on_one_connection(client: OriginClient):
    """A HEAD response's Content-Length announces no body; a GET follows on the
    same connection and gets its body (RFC 9112 section 6.3 item 1)."""

    def answer(head: bytes) -> bytes:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

    raw = _raw(answer)
    try:
        head, data, reason = await _get(client, raw.url("/"), b"HEAD")
        assert head.length == 0 and data == b"" and reason.check(ResponseDone)
        assert head.headers.getRawHeaders(b"content-length") == [b"5"]
        response, data, reason = await _get(client, raw.url("/"))
        assert data == b"hello" and reason.check(ResponseDone)
        assert len(raw.connections) == 1 and len(raw.requests) == 2
    finally:
        await raw.stop()


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
@pytest_twisted.ensureDeferred
async def test_no_body_statuses(client: OriginClient, status: bytes):
    """204 and 304 have no body whatever Content-Length says; the connection is
    reused for the next request (RFC 9112 section 6.3 item 1)."""

    def answer(head: bytes) -> bytes:
        if b"/empty" in head:
            return b"HTTP/1.1 " + status + b"\r\nContent-Length: 5\r\n\r\n"
        return OK_2

    raw = _raw(answer)
    try:
        response, data, reason = await _get(client, raw.url("/empty"))
        assert response.length == 0 and data == b"" and reason.check(ResponseDone)
        _, data, _ = await _get(client, raw.url("/next"))
        assert data == b"ok" and len(raw.connections) == 1
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_interim_100_is_skipped(client: OriginClient):
    """A 100 Continue before the response is ignored (RFC 9110 section 15.2)."""
    raw = _raw(lambda head: b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\n" + OK_2)
    try:
        response, data, _ = await _get(client, raw.url("/"))
        assert response.code == 200 and data == b"ok"
        assert response.headers.getRawHeaders(b"x-a") is None
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_truncated_content_length_body_fails(client: OriginClient):
    """A body shorter than its Content-Length ends with ResponseFailed."""

    def script(transport: Any, head: bytes) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        transport.loseConnection()

    raw = start_raw_origin(script)
    try:
        response, data, reason = await _get(client, raw.url("/"))
        assert data == b"abc" and reason.check(ResponseFailed)
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_broken_chunked_body_fails(client: OriginClient):
    """A malformed chunk size ends the body with ResponseFailed and closes."""
    raw = _raw(
        lambda head: (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nzz\r\n"
        )
    )
    try:
        _, data, reason = await _get(client, raw.url("/"))
        assert data == b"ab" and reason.check(ResponseFailed)
        assert reason.value.reasons[0].check(OriginProtocolError)
        assert (
            client.idle_connections(b"http", b"127.0.0.1", raw.port.getHost().port) == 0
        )
    finally:
        await raw.stop()


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["status-line", "obs-fold", "field", "two-lengths", "version"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_head_fails(client: OriginClient, answer: bytes):
    """A head that is not valid HTTP/1.1 fails the request with ResponseFailed."""
    raw = _raw(lambda head: answer)
    try:
        with pytest.raises(ResponseFailed) as caught:
            await _head(client, raw.url("/"))
        assert caught.value.reasons[0].check(OriginProtocolError)
    finally:
        await raw.stop()


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "many-writes"])
@pytest_twisted.ensureDeferred
async def test_oversize_head_fails(client: OriginClient, split: bool):
    """A response head over 64 KiB fails the request."""
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))

    def script(transport: Any, head: bytes) -> None:
        data = b"HTTP/1.1 200 OK\r\n" + fields
        if split:
            for i in range(0, len(data), 8192):
                reactor.callLater(0, transport.write, data[i : i + 8192])
        else:
            transport.write(data + b"Content-Length: 0\r\n\r\n")

    raw = start_raw_origin(script)
    try:
        with pytest.raises(ResponseFailed) as caught:
            await _head(client, raw.url("/"))
        assert caught.value.reasons[0].check(OriginProtocolError)
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_connection_field_is_kept(client: OriginClient):
    """Connection stays in the headers (the proxy drops what it names); the
    framing fields do not, as with Agent."""
    raw = _raw(
        lambda head: (
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
            b"Keep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok"
        )
    )
    try:
        response, _, _ = await _get(client, raw.url("/"))
        assert response.headers.getRawHeaders(b"connection") == [b"X-Hop"]
        assert response.headers.getRawHeaders(b"x-hop") == [b"1"]
        assert response.headers.getRawHeaders(b"keep-alive") is None
        assert response.headers.getRawHeaders(b"content-length") is None
        assert response.length == 2
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_sequential_requests_reuse_one_connection(
    client: OriginClient, origin: Origin
):
    """Three sequential requests travel over one TCP connection."""
    url = origin.static("/r", b"reused")
    for _ in range(3):
        _, data, reason = await _get(client, url)
        assert data == b"reused" and reason.check(ResponseDone)
    assert origin.connections == 1 and origin.count("/r") == 3
    port = origin.port.getHost().port
    assert client.idle_connections(b"http", b"127.0.0.1", port) == 1


@pytest_twisted.ensureDeferred
async def test_host_field_added_without_default_port(
    client: OriginClient, origin: Origin
):
    """Host comes from the URL when absent, and is sent as given otherwise."""
    url = origin.static("/h", b"h")
    await _get(client, url + "?q=1")
    await _get(client, url, headers=((b"Host", b"example.test"),))
    first, second = origin.requests[b"/h"]
    assert first.header("host") == f"127.0.0.1:{origin.port.getHost().port}"
    assert first.uri == b"/h?q=1"
    assert second.header("host") == "example.test"


@pytest_twisted.ensureDeferred
async def test_connection_close_is_not_reused(client: OriginClient):
    """A response with Connection: close is not followed on its connection."""
    raw = _raw(
        lambda head: (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        )
    )
    try:
        for _ in range(2):
            _, data, reason = await _get(client, raw.url("/"))
            assert data == b"ok" and reason.check(ResponseDone)
        assert len(raw.connections) == 2
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_http10_without_keep_alive_is_not_reused(client: OriginClient):
    """An HTTP/1.0 response without keep-alive ends its connection (9112 9.3)."""
    raw = _raw(lambda head: b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    try:
        for _ in range(2):
            response, data, _ = await _get(client, raw.url("/"))
            assert data == b"ok" and response.version == (b"HTTP", 1, 0)
        assert len(raw.connections) == 2
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_retry_when_pooled_connection_was_closed(client: OriginClient):
    """A GET on a pooled connection the origin closed unseen is retried once."""
    served: list[int] = []

    def script(transport: Any, head: bytes) -> None:
        served.append(id(transport))
        if served.count(id(transport)) == 2:
            transport.loseConnection()  # closed "while idle", as the GET arrives
        else:
            transport.write(OK_2)

    raw = start_raw_origin(script)
    try:
        for _ in range(2):
            _, data, reason = await _get(client, raw.url("/"))
            assert data == b"ok" and reason.check(ResponseDone)
        assert len(raw.connections) == 2 and len(raw.requests) == 3
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_no_retry_for_post(client: OriginClient):
    """A POST on a connection closed unseen is not resent: ResponseNeverReceived."""
    served: list[int] = []

    def script(transport: Any, head: bytes) -> None:
        served.append(id(transport))
        if served.count(id(transport)) == 2:
            transport.loseConnection()
        else:
            transport.write(OK_2)

    raw = start_raw_origin(script)
    try:
        await _get(client, raw.url("/"))
        with pytest.raises(ResponseNeverReceived):
            await _head(client, raw.url("/"), b"POST")
        assert len(raw.requests) == 2
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_cancel_before_head_aborts(client: OriginClient):
    """Cancelling before the head fails with CancelledError and drops the
    connection."""
    raw = start_raw_origin(lambda transport, head: None)
    try:
        d = client.request(b"GET", raw.url("/").encode(), (), None)
        await wait_for(lambda: len(raw.requests) == 1)
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        await wait_for(lambda: not raw.connections[0].transport.connected)
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_post_with_known_length_streams(client: OriginClient, origin: Origin):
    """A body of known length is sent with Content-Length as it streams in."""
    url = origin.route("/p", lambda request: request.content.read())
    body = RequestBody(11, present=True)
    body.feed(b"hello ")
    d = _bounded(client.request(b"POST", url.encode(), (), body))
    await _turns()
    body.feed(b"world")
    body.end()
    response = await d
    receiver = Body()
    response.deliverBody(receiver)
    await receiver.done
    assert receiver.data == b"hello world"
    seen = origin.requests[b"/p"][0]
    assert seen.header("content-length") == "11" and seen.body == b"hello world"


@pytest_twisted.ensureDeferred
async def test_post_with_unknown_length_is_chunked(
    client: OriginClient, origin: Origin
):
    """A body of unknown length is sent chunked (RFC 9112 section 7.1)."""
    url = origin.route("/c", lambda request: request.content.read())
    body = RequestBody(None, present=True)
    d = _bounded(client.request(b"POST", url.encode(), (), body))
    for piece in (b"one ", b"", b"two"):
        await _turns(1)
        body.feed(piece)
    body.end()
    response = await d
    receiver = Body()
    response.deliverBody(receiver)
    await receiver.done
    assert receiver.data == b"one two"
    seen = origin.requests[b"/c"][0]
    assert seen.header("transfer-encoding") == "chunked"


@pytest_twisted.ensureDeferred
async def test_empty_post_sends_content_length_zero(
    client: OriginClient, origin: Origin
):
    """A POST without a body says Content-Length: 0, as Agent does."""
    url = origin.static("/z", b"z")
    await _get(client, url, b"POST", body=RequestBody(0, present=False))
    assert origin.requests[b"/z"][0].header("content-length") == "0"


@pytest_twisted.ensureDeferred
async def test_client_abandoning_body_fails_request(client: OriginClient):
    """A client leaving mid-body fails the request and aborts the connection."""
    raw = start_raw_origin(lambda transport, head: None)
    try:
        body = RequestBody(100, present=True)
        d = client.request(b"POST", raw.url("/").encode(), (), body)
        await wait_for(lambda: len(raw.requests) == 1)
        body.abandon()
        with pytest.raises(RequestGenerationFailed):
            await _bounded(d)
        await wait_for(lambda: not raw.connections[0].transport.connected)
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_pause_stops_reading_and_resume_continues(client: OriginClient):
    """Pausing the body's transport stops reading from the origin; resuming
    delivers the rest."""
    transports: list[Any] = []

    def script(transport: Any, head: bytes) -> None:
        transports.append(transport)
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + b"a" * 10)

    raw = start_raw_origin(script)
    try:
        response = await _head(client, raw.url("/"))
        receiver = Body(pause_at_first=True)
        response.deliverBody(receiver)
        await wait_for(lambda: receiver.chunks != [])
        tcp = response._connection.tcp  # type: ignore[union-attr]
        assert tcp not in reactor.getReaders()
        transports[0].write(b"b" * 10)
        await wait_for(lambda: not transports[0].dataBuffer)
        await _turns()
        assert receiver.data == b"a" * 10
        receiver.transport.resumeProducing()
        await _bounded(receiver.done)
        assert receiver.data == b"a" * 10 + b"b" * 10
        assert receiver.reason and receiver.reason.check(ResponseDone)
        assert tcp in reactor.getReaders()  # back in the pool, reading again
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_body_before_deliver_body_is_buffered(client: OriginClient):
    """Body bytes that arrive before deliverBody are kept and delivered."""
    raw = _raw(lambda head: OK_2)
    port = raw.port.getHost().port
    try:
        response = await _head(client, raw.url("/"))
        await wait_for(lambda: client.idle_connections(b"http", b"127.0.0.1", port))
        receiver = Body()
        response.deliverBody(receiver)
        assert receiver.data == b"ok" and receiver.done.called
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_stop_producing_abandons_the_response(client: OriginClient):
    """stopProducing closes the connection; the body ends with a failure."""
    raw = _raw(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    port = raw.port.getHost().port
    try:
        response = await _head(client, raw.url("/"))
        receiver = Body()
        response.deliverBody(receiver)
        receiver.transport.stopProducing()
        await _bounded(receiver.done)
        assert receiver.reason and receiver.reason.check(ResponseFailed)
        assert client.idle_connections(b"http", b"127.0.0.1", port) == 0
    finally:
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_idle_connections_close_after_timeout(origin: Origin):
    """An idle pooled connection is closed after idle_timeout."""
    client = _client(idle_timeout=0.1)
    url = origin.static("/i", b"i")
    port = origin.port.getHost().port
    try:
        await _get(client, url)
        assert client.idle_connections(b"http", b"127.0.0.1", port) == 1
        await wait_for(
            lambda: client.idle_connections(b"http", b"127.0.0.1", port) == 0
        )
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_connect_error_propagates_unchanged(client: OriginClient):
    """A refused connection fails with the endpoint's ConnectError."""
    from twisted.internet.error import ConnectError

    raw = start_raw_origin(lambda transport, head: None)
    url = raw.url("/")
    await raw.stop()
    with pytest.raises(ConnectError):
        await _head(client, url)


@pytest_twisted.ensureDeferred
async def test_https_origin_through_tls_wrapping(tmp_path: Path):
    """An https origin with a trusted certificate answers over TLS."""
    ca = make_test_ca(tmp_path / "ca")
    server = start_https_origin(issue_server_cert(ca, tmp_path / "cert"))
    url = server.static("/s", b"secure")
    client = _client(origin_tls_policy(ca.pem))
    try:
        for _ in range(2):
            _, data, reason = await _get(client, url)
            assert data == b"secure" and reason.check(ResponseDone)
        assert server.connections == 1
    finally:
        await client.close()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_untrusted_certificate_is_recognised(tmp_path: Path):
    """An untrusted origin certificate fails the request in a way that
    describe_tls_failure recognises."""
    ca = make_test_ca(tmp_path / "ca")
    rogue = issue_server_cert(None, tmp_path / "rogue", stem="rogue")
    server = start_https_origin(rogue)
    url = server.static("/s", b"secure")
    client = _client(origin_tls_policy(ca.pem))
    try:
        with pytest.raises(ResponseNeverReceived) as caught:
            await _head(client, url)
        described = describe_tls_failure(caught.value)
        assert described is not None and "verif" in described
    finally:
        await client.close()
        await server.stop()


@pytest.mark.parametrize(
    ("url", "host", "target"),
    [
        (b"http://example.test/a?b=1#frag", b"example.test", b"/a?b=1"),
        (b"http://example.test:80", b"example.test", b"/"),
        (b"https://example.test:443?q", b"example.test", b"/?q"),
        (b"https://example.test:8443/x", b"example.test:8443", b"/x"),
        (b"http://[::1]:8080/v6", b"[::1]:8080", b"/v6"),
    ],
)
def test_origin_form_and_host(url: bytes, host: bytes, target: bytes):
    """The request-target is origin-form, "/" when empty; Host omits a default
    port (RFC 9112 section 3.2.1, RFC 9110 section 7.2)."""
    origin, parsed = _client()._parse(url)
    assert (origin.host, parsed) == (host, target)


@pytest_twisted.ensureDeferred
async def test_line_break_in_field_is_refused(client: OriginClient):
    """A CR or LF inside a field fails the request before anything is sent."""
    with pytest.raises(ValueError):
        await _head(client, "http://127.0.0.1:9/", headers=((b"X", b"a\r\nY: b"),))


@pytest_twisted.ensureDeferred
async def test_stalled_body_fails_after_the_body_timeout():
    """A body that stops arriving while read fails once body_timeout passes
    without a byte; the connection is not pooled."""
    client = _client(body_timeout=0.2)
    raw = _raw(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    port = raw.port.getHost().port
    try:
        response = await _head(client, raw.url("/"))
        receiver = Body()
        response.deliverBody(receiver)
        await _bounded(receiver.done)
        assert receiver.data == b"abc"
        assert receiver.reason and receiver.reason.check(ResponseFailed)
        reasons = receiver.reason.value.reasons  # type: ignore[union-attr]
        assert reasons[0].check(OriginStalled)
        assert client.idle_connections(b"http", b"127.0.0.1", port) == 0
    finally:
        await client.close()
        await raw.stop()


@pytest_twisted.ensureDeferred
async def test_a_paused_body_is_not_stalled():
    """While the consumer pauses the body (a slow client), the origin's silence
    does not count against it."""
    client = _client(body_timeout=0.2)
    transports: list[Any] = []

    def script(transport: Any, head: bytes) -> None:
        transports.append(transport)
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")

    raw = start_raw_origin(script)
    try:
        response = await _head(client, raw.url("/"))
        receiver = Body(pause_at_first=True)
        response.deliverBody(receiver)
        await wait_for(lambda: receiver.chunks != [])
        connection = response._connection  # type: ignore[union-attr]
        connection._last_read -= 60  # long silent, but paused by us
        connection._check_stall()
        assert not receiver.done.called
        assert connection._stall_timer is not None  # still watching
        transports[0].write(b"def")
        receiver.transport.resumeProducing()
        await _bounded(receiver.done)
        assert receiver.data == b"abcdef"
        assert receiver.reason and receiver.reason.check(ResponseDone)
    finally:
        await client.close()
        await raw.stop()
