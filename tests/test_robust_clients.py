"""Fault injection: hostile or broken clients.  Each gets a clear 4xx or a closed
connection, nothing reaches an origin that should not, and the proxy goes on serving
a normal request on a new connection."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httptools
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import threads

from tests.conftest import RunningProxy
from tests.support import (
    Origin,
    fetch,
    request_bytes,
    send_raw,
    wait_for,
)
from tests.twistd_support import TwistdProxy

HOST = "127.0.0.1"


async def _still_serves(proxy: RunningProxy, origin: Origin) -> None:
    """A normal request on a new connection is relayed."""
    url = origin.static("/normal", b"all is well")
    response = await fetch(proxy.port, "GET", url)
    assert response.status == 200
    assert response.body == b"all is well"


async def _rejected(proxy: RunningProxy, origin: Origin, data: bytes) -> int | None:
    """Send ``data``; the status the proxy answered (None: it only closed)."""
    responses = await send_raw(proxy.port, data)
    await _still_serves(proxy, origin)
    return responses[0].status if responses else None


def _authority(origin: Origin) -> str:
    return f"{HOST}:{origin.port.getHost().port}"


# -- request lines -----------------------------------------------------------------

BAD_REQUEST_LINES = {
    "bad method": b"G@T {url} HTTP/1.1",
    "lower-case method": b"get {url} HTTP/1.1",
    "tab separator": b"GET\t{url} HTTP/1.1",
    "space in target": b"GET {url}a b HTTP/1.1",
    "HTTP/1.x": b"GET {url} HTTP/1.x",
    "HTTP/1.2": b"GET {url} HTTP/1.2",
    "HTTP/3.0": b"GET {url} HTTP/3.0",
    "lower-case version": b"GET {url} http/1.1",
    "no target": b"GET HTTP/1.1",
    "TLS hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
}


@pytest.mark.parametrize(
    "line", BAD_REQUEST_LINES.values(), ids=list(BAD_REQUEST_LINES)
)
@pytest_twisted.ensureDeferred
async def test_malformed_request_line_is_400(
    line: bytes, proxy: RunningProxy, origin: Origin
):
    """A request line llhttp cannot parse gets 400; the proxy serves on."""
    url = origin.static("/line", b"should not be served").encode()
    data = line.replace(b"{url}", url) + b"\r\nHost: x\r\n\r\n"
    assert await _rejected(proxy, origin, data) == 400
    assert origin.count("/line") == 0


UNSUPPORTED_VERSIONS = {
    "HTTP/2.0": b"GET {url} HTTP/2.0",
    "HTTP/0.9 named": b"GET {url} HTTP/0.9",
    "no version": b"GET {url}",
}


@pytest.mark.parametrize(
    "line", UNSUPPORTED_VERSIONS.values(), ids=list(UNSUPPORTED_VERSIONS)
)
@pytest_twisted.ensureDeferred
async def test_unsupported_http_version_is_refused(
    line: bytes, proxy: RunningProxy, origin: Origin
):
    """A request line naming no HTTP/1.x version is refused with 400 or 505."""
    url = origin.static("/version", b"should not be served").encode()
    data = line.replace(b"{url}", url) + b"\r\nHost: x\r\n\r\n"
    status = await _rejected(proxy, origin, data)
    assert origin.count("/version") == 0
    assert status in (400, 505)


# -- request targets ---------------------------------------------------------------

BAD_TARGETS = {
    "asterisk": "*",
    "authority-form": "{authority}",
    "relative path": "line/relative",
    "https absolute": "https://{authority}/",
    "ftp scheme": "ftp://{authority}/file",
    "file scheme": "file:///etc/passwd",
    "gopher scheme": "gopher://{authority}/1",
    "userinfo": "http://user:pw@{authority}/normal",
    "port too large": "http://127.0.0.1:99999/",
    "port not a number": "http://127.0.0.1:abc/",
    "port zero": "http://127.0.0.1:0/",
    "empty host": "http:///normal",
    "unclosed IPv6 literal": "http://[::1/",
    "IPv6 zone id": "http://[fe80::1%25eth0]:80/",
}


@pytest.mark.parametrize("target", BAD_TARGETS.values(), ids=list(BAD_TARGETS))
@pytest_twisted.ensureDeferred
async def test_target_that_cannot_be_proxied_is_400(
    target: str, proxy: RunningProxy, origin: Origin
):
    """A target that is not origin-form nor a usable http:// URL gets 400."""
    origin.static("/normal", b"all is well")
    data = (
        f"GET {target.format(authority=_authority(origin))} HTTP/1.1\r\nHost: x\r\n\r\n"
    ).encode()
    assert await _rejected(proxy, origin, data) == 400
    assert origin.count("/normal") == 1


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        body = b"fine"
        self.send_response(200)
        self.send_header("Cache-Control", "max-age=600")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest_twisted.ensureDeferred
async def test_ipv6_literal_url_reaches_an_ipv6_origin(proxy: RunningProxy):
    """``http://[::1]:PORT/`` is relayed to an origin listening on ::1."""
    try:
        v6 = _V6Server(("::1", 0), _Quiet)
    except OSError:
        pytest.skip("this host cannot listen on ::1")
    v6.daemon_threads = True
    thread = threading.Thread(target=v6.serve_forever, daemon=True)
    thread.start()
    _Quiet.hits = 0
    try:
        url = f"http://[::1]:{v6.server_address[1]}/six"
        first = await fetch(proxy.port, "GET", url)
        second = await fetch(proxy.port, "GET", url)
    finally:
        await threads.deferToThread(v6.shutdown)
        v6.server_close()
    assert first.status == second.status == 200
    assert first.body == second.body == b"fine"
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert _Quiet.hits == 1


# -- header fields -----------------------------------------------------------------

BAD_FIELDS = {
    "space in name": b"Bad Name: v",
    "space before colon": b"Bad : v",
    "control character in name": b"Ba\x01d: v",
    "DEL in name": b"Ba\x7fd: v",
    "empty name": b": v",
    "no colon": b"NoColonHere",
    "control character in value": b"X-Bad: v\x01v",
    "obs-fold": b"X-Folded: first\r\n  continued",
    "obs-fold with a tab": b"X-Folded: first\r\n\tcontinued",
    "NUL in name": b"X\x00A: v",
    "NUL in value": b"X-A: v\x00v",
    "bare CR in value": b"X-A: v\rv",
}


@pytest.mark.parametrize("field", BAD_FIELDS.values(), ids=list(BAD_FIELDS))
@pytest_twisted.ensureDeferred
async def test_malformed_header_field_is_400(
    field: bytes, proxy: RunningProxy, origin: Origin
):
    """A header field that breaks RFC 9110's grammar gets 400 and is not forwarded."""
    url = origin.static("/field", b"should not be served")
    data = request_bytes("GET", url)[:-2] + field + b"\r\n\r\n"
    assert await _rejected(proxy, origin, data) == 400
    assert origin.count("/field") == 0


@pytest_twisted.ensureDeferred
async def test_nul_byte_in_target_is_400(proxy: RunningProxy, origin: Origin):
    """A NUL byte in the request target gets 400."""
    url = origin.static("/nul", b"should not be served").encode()
    data = b"GET " + url + b"\x00 HTTP/1.1\r\nHost: x\r\n\r\n"
    assert await _rejected(proxy, origin, data) == 400
    assert origin.count("/nul") == 0


@pytest_twisted.ensureDeferred
async def test_too_many_header_fields_is_431(proxy: RunningProxy, origin: Origin):
    """More header fields than the proxy counts (each tiny) gets 431."""
    url = origin.static("/many", b"should not be served")
    headers = [(f"X-{i}", "v") for i in range(300)]
    assert await _rejected(proxy, origin, request_bytes("GET", url, headers)) == 431
    assert origin.count("/many") == 0


# -- request smuggling -------------------------------------------------------------


def _smuggled(authority: str) -> bytes:
    return (
        f"GET http://{authority}/smuggled HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    ).encode()


SMUGGLING = {
    "CL and TE": (
        [("Content-Length", "{cl}"), ("Transfer-Encoding", "chunked")],
        b"0\r\n\r\n{smuggled}",
    ),
    "TE and CL": (
        [("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
        b"0\r\n\r\n{smuggled}",
    ),
    "two differing CL": (
        [("Content-Length", "5"), ("Content-Length", "{cl}")],
        b"hello{smuggled}",
    ),
    "CL list": ([("Content-Length", "5, {cl}")], b"hello{smuggled}"),
    "CL with sign": ([("Content-Length", "+5")], b"hello{smuggled}"),
    "TE gzip": ([("Transfer-Encoding", "gzip")], b"{smuggled}"),
    "TE chunked then gzip": (
        [("Transfer-Encoding", "chunked, gzip")],
        b"0\r\n\r\n{smuggled}",
    ),
    "TE xchunked": ([("Transfer-Encoding", "xchunked")], b"0\r\n\r\n{smuggled}"),
    "two TE fields": (
        [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "identity")],
        b"0\r\n\r\n{smuggled}",
    ),
    "invalid chunk size": (
        [("Transfer-Encoding", "chunked")],
        b"zz\r\n{smuggled}0\r\n\r\n",
    ),
    "chunk size overflow": (
        [("Transfer-Encoding", "chunked")],
        b"10000000000000000\r\n{smuggled}\r\n0\r\n\r\n",
    ),
    "chunk without CRLF": (
        [("Transfer-Encoding", "chunked")],
        b"3\r\nabcX{smuggled}0\r\n\r\n",
    ),
}


@pytest.mark.parametrize("fields,body", SMUGGLING.values(), ids=list(SMUGGLING))
@pytest_twisted.ensureDeferred
async def test_ambiguous_framing_is_never_two_requests(
    fields: list[tuple[str, str]], body: bytes, proxy: RunningProxy, origin: Origin
):
    """Bad body framing is refused and closed; a request hidden in it is never sent."""
    url = origin.static("/target", b"target")
    origin.static("/smuggled", b"smuggled")
    smuggled = _smuggled(_authority(origin))
    body = body.replace(b"{smuggled}", smuggled)
    cl = str(len(body))
    headers = [(n, v.replace("{cl}", cl)) for n, v in fields]
    # No body argument: request_bytes adds no framing field of its own.
    data = request_bytes("POST", url, headers) + body
    responses = await send_raw(proxy.port, data, expected=2)
    await wait_for(lambda: proxy.service.proxy.active == 0)
    await _still_serves(proxy, origin)
    assert origin.count("/smuggled") == 0
    assert origin.count("/target") == 0
    assert [r.status for r in responses] in ([], [400])


@pytest.mark.parametrize(
    "name", ["TE gzip", "TE xchunked", "invalid chunk size", "chunk without CRLF"]
)
@pytest_twisted.ensureDeferred
async def test_framing_error_after_the_head_is_answered_400(
    name: str, proxy: RunningProxy, origin: Origin
):
    """A body framing error the proxy finds is answered 400 before the close."""
    fields, body = SMUGGLING[name]
    url = origin.static("/target", b"target")
    body = body.replace(b"{smuggled}", _smuggled(_authority(origin)))
    data = request_bytes("POST", url, fields) + body
    responses = await send_raw(proxy.port, data, expected=2)
    assert [r.status for r in responses] == [400]


@pytest_twisted.ensureDeferred
async def test_http10_chunked_request_closes_after_it(
    proxy: RunningProxy, origin: Origin
):
    """HTTP/1.0 with Transfer-Encoding closes after it (RFC 9112 section 6.1)."""
    url = origin.static("/target", b"target")
    origin.static("/smuggled", b"smuggled")
    data = request_bytes(
        "POST",
        url,
        [("Connection", "keep-alive"), ("Transfer-Encoding", "chunked")],
        b"0\r\n\r\n" + _smuggled(_authority(origin)),
        version="1.0",
    )
    responses = await send_raw(proxy.port, data, expected=2)
    await wait_for(lambda: proxy.service.proxy.active == 0)
    await _still_serves(proxy, origin)
    assert origin.count("/smuggled") == 0
    assert len(responses) <= 1


# -- generated input against a proxy in its own process ----------------------------


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory) -> Iterator[tuple[int, str]]:
    """A ``twistd cacheproxy`` subprocess with short timeouts, and a thread origin."""
    origin = http.server.ThreadingHTTPServer((HOST, 0), _Quiet)
    origin.daemon_threads = True
    thread = threading.Thread(target=origin.serve_forever, daemon=True)
    thread.start()
    tmp = tmp_path_factory.mktemp("fuzz")
    proxy = TwistdProxy(
        tmp,
        "--header-timeout",
        "0.5",
        "--idle-timeout",
        "0.5",
        "--origin-timeout",
        "2",
        # Every origin request goes to the thread origin, whatever host a
        # mutation names: the proxy never reaches past 127.0.0.1.
        "--upstream",
        f"http://{HOST}:{origin.server_address[1]}",
    )
    try:
        with proxy.running():
            yield proxy.port, f"http://{HOST}:{origin.server_address[1]}"
            assert proxy.alive(), "the proxy process died:\n" + proxy.output()
    finally:
        origin.shutdown()
        origin.server_close()


# Long enough for the header timeout, an origin timeout and the close behind them.
ANSWER_BOUND = 6.0
SPECIAL = [b"\x00", b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\xff", b"%", b"@"]


@st.composite
def _mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a few bytes flipped, inserted, deleted or repeated."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "cut"]))
        if how == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif how == "insert":
            data[at:at] = draw(st.sampled_from(SPECIAL) | st.binary(max_size=8))
        elif how == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif how == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 40))]
        elif how == "cut":
            del data[at:]
    return bytes(data)


def _requests(base: str) -> st.SearchStrategy[bytes]:
    """Random bytes, and mutations of valid GET, POST and chunked POST requests."""
    get = request_bytes("GET", base + "/fuzz", {"Accept": "*/*"})
    post = request_bytes("POST", base + "/post", body=b"0123456789")
    chunked = request_bytes(
        "POST",
        base + "/chunk",
        {"Transfer-Encoding": "chunked"},
        b"5\r\nhello\r\n0\r\n\r\n",
    )
    return st.one_of(
        st.binary(max_size=300),
        st.sampled_from([get, post, chunked]).flatmap(_mutated),
        st.lists(
            st.sampled_from([get, post, chunked]).flatmap(_mutated), max_size=3
        ).map(b"".join),
    )


def _answers_or_closes(port: int, data: bytes) -> None:
    """Send ``data``; the proxy must end a response or close within the bound."""
    with socket.create_connection((HOST, port), timeout=ANSWER_BOUND) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(data)
        parser = _ResponseEnd()
        try:
            while not parser.ended:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                parser.feed(chunk)
        except ConnectionResetError:
            return
        except TimeoutError:
            raise AssertionError(
                f"no answer and no close within {ANSWER_BOUND} s for {data!r}"
            ) from None


class _ResponseEnd:
    """Tells when the first complete response (or garbage) has been read."""

    def __init__(self) -> None:
        self.ended = False
        self._parser: Any = httptools.HttpResponseParser(self)

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as reason:
            raise AssertionError(f"the proxy sent malformed HTTP: {data!r}") from reason

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() != 100:
            self.ended = True


def _served(port: int, base: str) -> None:
    """A normal request on a new connection is answered 200."""
    with socket.create_connection((HOST, port), timeout=ANSWER_BOUND) as sock:
        sock.sendall(request_bytes("GET", base + "/normal"))
        data = b""
        while b"\r\n\r\nfine" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed without a full answer: {data!r}"
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 "), data


def test_generated_requests_are_answered_or_closed(fuzz_target):
    """Any bytes are answered or closed in bounded time; then a request is served."""
    port, base = fuzz_target

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(_requests(base))
    def check(data: bytes) -> None:
        _answers_or_closes(port, data)
        _served(port, base)

    check()
