"""End to end: serving stale responses, and when not to (RFC 9111 section 4.2.4,
RFC 5861)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer
from twisted.web import server

from tests.conftest import RunningProxy, start_proxy
from tests.support import Origin, fetch, start_raw_origin, wait_for


def _versioned(origin: Origin, path: str, headers: dict[str, str]):
    """A route whose body and ETag are ``state["version"]``; it may be held or fail."""
    state: dict = {"version": 0, "status": 200, "hold": None}

    def handler(request: server.Request):
        version = state["version"]
        if state["status"] != 200:
            request.setResponseCode(state["status"])
            return b"origin error"
        for name, value in headers.items():
            request.setHeader(name, value)
        request.setHeader("ETag", f'"v{version}"')
        body = b"version %d" % version
        if state["hold"] is not None:
            held: defer.Deferred = state["hold"]

            def answer(_):
                request.write(body)
                request.finish()

            held.addCallback(answer)
            return server.NOT_DONE_YET
        return body

    return origin.route(path, handler), state


@pytest_twisted.ensureDeferred
async def test_stale_while_revalidate_serves_stale_and_refreshes_once(
    origin: Origin, proxy: RunningProxy
):
    """Within stale-while-revalidate, stale is served at once and refreshed behind."""
    url, state = _versioned(
        origin,
        "/swr",
        {"Cache-Control": "max-age=10, stale-while-revalidate=600", "Age": "20"},
    )
    await fetch(proxy.port, "GET", url)
    state["version"], state["hold"] = 1, defer.Deferred()
    served = [await fetch(proxy.port, "GET", url) for _ in range(3)]
    assert [r.body for r in served] == [b"version 0"] * 3
    assert all(
        r.header("Cache-Status") == "cacheproxy; hit; detail=stale-while-revalidate"
        for r in served
    )
    await wait_for(lambda: origin.count("/swr") == 2)
    assert origin.requests[b"/swr"][1].header("If-None-Match") == '"v0"'
    state["hold"].callback(None)
    state["hold"] = None
    await wait_for(lambda: not proxy.service.proxy.revalidating)
    refreshed = await fetch(proxy.port, "GET", url)
    # The refreshed copy came with Age: 20 again, so it is stale-while-revalidate
    # once more, but it is the new version.
    assert refreshed.body == b"version 1"
    assert origin.count("/swr") >= 2


@pytest_twisted.ensureDeferred
async def test_stale_if_error_covers_an_origin_5xx(origin: Origin, proxy: RunningProxy):
    """With stale-if-error, a 5xx from the origin is replaced by the stale response."""
    url, state = _versioned(
        origin, "/sie", {"Cache-Control": "max-age=0, stale-if-error=600"}
    )
    await fetch(proxy.port, "GET", url)
    state["status"] = 503
    response = await fetch(proxy.port, "GET", url)
    assert response.status == 200
    assert response.body == b"version 0"
    assert response.header("Cache-Status") == (
        "cacheproxy; fwd=stale; fwd-status=503; detail=stale-if-error"
    )


@pytest_twisted.ensureDeferred
async def test_5xx_without_stale_if_error_is_relayed(
    origin: Origin, proxy: RunningProxy
):
    """Without stale-if-error, the origin's 5xx reaches the client."""
    url, state = _versioned(origin, "/5xx", {"Cache-Control": "max-age=0"})
    await fetch(proxy.port, "GET", url)
    state["status"] = 500
    response = await fetch(proxy.port, "GET", url)
    assert response.status == 500


def _answering(cache_control: str):
    def script(transport, head):
        transport.write(
            b'HTTP/1.1 200 OK\r\nCache-Control: %s\r\nETag: "e"\r\n'
            b"Content-Length: 6\r\n\r\nstored" % cache_control.encode()
        )

    return script


async def _stale_then_origin_down(tmp_path, cache_control: str, headers=None):
    """Store a response, take its origin away, and ask again."""
    raw = start_raw_origin(_answering(cache_control))
    running = await start_proxy(tmp_path)
    try:
        url = raw.url("/down")
        first = await fetch(running.port, "GET", url)
        assert first.body == b"stored"
        await raw.stop()
        return await fetch(running.port, "GET", url, headers)
    finally:
        await running.service.stopService()


@pytest_twisted.ensureDeferred
async def test_must_revalidate_with_origin_down_is_504(tmp_path):
    """must-revalidate forbids stale: with the origin down the client gets 504."""
    response = await _stale_then_origin_down(tmp_path, "max-age=0, must-revalidate")
    assert response.status == 504


@pytest_twisted.ensureDeferred
async def test_s_maxage_with_origin_down_is_504(tmp_path):
    """s-maxage implies proxy-revalidate: with the origin down the client gets 504."""
    response = await _stale_then_origin_down(tmp_path, "s-maxage=0")
    assert response.status == 504


@pytest_twisted.ensureDeferred
async def test_stale_if_error_covers_an_unreachable_origin(tmp_path):
    """With stale-if-error, an unreachable origin is covered by the stale response."""
    response = await _stale_then_origin_down(tmp_path, "max-age=0, stale-if-error=60")
    assert response.status == 200
    assert response.body == b"stored"
    assert response.header("Cache-Status") == (
        "cacheproxy; fwd=stale; detail=stale-if-error"
    )


@pytest_twisted.ensureDeferred
async def test_disconnected_cache_serves_plain_stale(tmp_path):
    """A stale response may be served when the origin cannot be reached at all."""
    response = await _stale_then_origin_down(tmp_path, "max-age=0")
    assert response.status == 200
    assert (
        response.header("Cache-Status") == "cacheproxy; fwd=stale; detail=disconnected"
    )


@pytest_twisted.ensureDeferred
async def test_client_no_cache_with_origin_down_is_an_error(tmp_path):
    """A client that asks for validation is not given an unvalidated response."""
    response = await _stale_then_origin_down(
        tmp_path, "max-age=0", {"Cache-Control": "no-cache"}
    )
    assert response.status == 502
