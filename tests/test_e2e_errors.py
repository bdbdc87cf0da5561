"""End to end: the errors the proxy makes itself, and that one request never blocks
another (issue 2)."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import defer

from tests.conftest import RunningProxy, start_proxy
from tests.support import (
    Origin,
    fetch,
    request_bytes,
    send_raw,
    start_raw_origin,
)


@pytest_twisted.ensureDeferred
async def test_origin_form_request_for_no_page_is_404(proxy: RunningProxy):
    """An origin-form request that names none of the proxy's pages gets 404."""
    (response,) = await send_raw(proxy.port, b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.status == 404
    assert response.header("Content-Type").startswith("text/plain")
    assert response.body


@pytest_twisted.ensureDeferred
async def test_origin_form_post_is_405(proxy: RunningProxy):
    """The proxy's own pages answer GET and HEAD only."""
    (response,) = await send_raw(
        proxy.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert response.status == 405
    assert response.header("Allow") == "GET, HEAD"


@pytest_twisted.ensureDeferred
async def test_unsupported_scheme_is_400(proxy: RunningProxy):
    """An absolute URL with a scheme the proxy does not speak gets 400."""
    (response,) = await send_raw(
        proxy.port, b"GET ftp://example.com/f HTTP/1.1\r\nHost: example.com\r\n\r\n"
    )
    assert response.status == 400


@pytest_twisted.ensureDeferred
async def test_malformed_request_is_400_and_closed(proxy: RunningProxy):
    """Bytes that are not HTTP get 400 and the connection is closed."""
    responses = await send_raw(proxy.port, b"HELLO THERE\r\n\r\n")
    assert [r.status for r in responses] == [400]


@pytest_twisted.ensureDeferred
async def test_overlong_target_is_414(proxy: RunningProxy):
    """A request target over 8 KiB gets 414."""
    url = "http://127.0.0.1:1/" + "a" * 9000
    (response,) = await send_raw(proxy.port, request_bytes("GET", url))
    assert response.status == 414


@pytest_twisted.ensureDeferred
async def test_overlarge_header_block_is_431(proxy: RunningProxy):
    """A header block over 64 KiB gets 431."""
    headers = [(f"X-Fill-{i}", "v" * 1000) for i in range(70)]
    data = request_bytes("GET", "http://127.0.0.1:1/", headers)
    (response,) = await send_raw(proxy.port, data)
    assert response.status == 431


def _closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_refused_connection_is_502(proxy: RunningProxy):
    """An origin that refuses the connection makes a 502 naming it."""
    port = _closed_port()
    response = await fetch(proxy.port, "GET", f"http://127.0.0.1:{port}/x")
    assert response.status == 502
    assert f"127.0.0.1:{port}" in response.body.decode()
    # RFC 9211: the request went forward as a miss and the cache made the error.
    assert (
        response.header("Cache-Status") == "cacheproxy; fwd=miss; detail=origin-error"
    )


@pytest_twisted.ensureDeferred
async def test_origin_closing_without_response_is_502(tmp_path):
    """An origin that closes the connection before answering makes a 502."""
    raw = start_raw_origin(lambda transport, head: transport.loseConnection())
    running = await start_proxy(tmp_path)
    try:
        response = await fetch(running.port, "GET", raw.url("/gone"))
    finally:
        await running.service.stopService()
        await raw.stop()
    assert response.status == 502


@pytest_twisted.ensureDeferred
async def test_silent_origin_is_504_after_the_timeout(tmp_path):
    """An origin that accepts but never answers makes a 504 after --origin-timeout."""
    raw = start_raw_origin(lambda transport, head: None)
    running = await start_proxy(tmp_path, origin_timeout=0.5)
    try:
        response = await fetch(running.port, "GET", raw.url("/silent"))
    finally:
        await running.service.stopService()
        await raw.stop()
    assert response.status == 504
    assert response.header("Content-Type").startswith("text/plain")


@pytest_twisted.ensureDeferred
async def test_slow_origin_does_not_delay_another(origin: Origin, tmp_path):
    """While one origin has not answered, a request to another URL is served."""
    held = []
    raw = start_raw_origin(lambda transport, head: held.append(transport))
    running = await start_proxy(tmp_path)
    try:
        slow = defer.ensureDeferred(fetch(running.port, "GET", raw.url("/slow")))
        fast = await fetch(running.port, "GET", origin.static("/fast", b"quick"))
        assert fast.body == b"quick"
        assert not slow.called
        assert len(held) == 1
        held[0].write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        slow_response = await slow
        assert slow_response.body == b"slow"
    finally:
        await running.service.stopService()
        await raw.stop()
