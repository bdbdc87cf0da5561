"""Fault injection: origins that break mid-answer.  The client gets a clear error or
a visibly cut response, nothing partial is stored, and the next request goes to the
origin again."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor

from tests.conftest import RunningProxy, start_proxy
from tests.support import (
    RawOrigin,
    Response,
    fetch,
    request_bytes,
    send_raw,
    start_raw_origin,
)

HEAD_1000 = (
    b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 1000\r\n\r\n"
)


def _nothing_partial(running: RunningProxy) -> None:
    """No body in progress is left in the store's ``tmp`` directory."""
    assert not list((running.cache_dir / "tmp").iterdir())


async def _get(port: int, url: str) -> Response | None:
    """GET ``url`` through the proxy; None if the connection ended with no response
    at all (a reset that discarded what was queued for the client)."""
    responses = await send_raw(port, request_bytes("GET", url))
    return responses[0] if responses else None


async def _twice(tmp_path: Path, script, path: str, **overrides: object):
    """Fetch ``path`` from a raw origin twice through a fresh proxy."""
    raw = start_raw_origin(script)
    running = await start_proxy(tmp_path, **overrides)
    try:
        first = await _get(running.port, raw.url(path))
        second = await _get(running.port, raw.url(path))
        _nothing_partial(running)
    finally:
        await running.service.stopService()
        await raw.stop()
    return raw, first, second


def _later(transport, head: bytes, *steps: bytes | None) -> None:
    """Write ``steps`` on successive reactor turns; None resets the connection."""
    if not steps:
        return
    step, rest = steps[0], steps[1:]
    if step is None:
        transport.abortConnection()
        return
    transport.write(step)
    reactor.callLater(0.01, _later, transport, head, *rest)


@pytest_twisted.ensureDeferred
async def test_unresolvable_host_is_502_naming_it(tmp_path):
    """A host name that cannot resolve (RFC 6761 ``.invalid``) is a 502 naming it."""
    running = await start_proxy(tmp_path)
    try:
        url = "http://no-such-origin.invalid/page"
        response = await fetch(running.port, "GET", url)
        again = await fetch(running.port, "GET", url)
    finally:
        await running.service.stopService()
    assert response.status == again.status == 502
    assert "no-such-origin.invalid" in response.body.decode()
    assert response.header("Content-Type").startswith("text/plain")


@pytest_twisted.ensureDeferred
async def test_reset_in_the_middle_of_the_body(tmp_path):
    """A reset mid-body reaches the client as a cut response and stores nothing."""

    def script(transport, head):
        _later(transport, head, HEAD_1000 + b"a" * 300, b"b" * 300, None)

    raw, first, second = await _twice(tmp_path, script, "/reset")
    assert first is not None and second is not None
    for response in (first, second):
        assert response.status == 200
        assert response.header("Content-Length") == "1000"
        assert len(response.body) < 1000
    assert len(raw.requests) == 2


@pytest_twisted.ensureDeferred
async def test_large_body_shorter_than_its_length(tmp_path):
    """A body past the memory tier's size that ends early is cut off, not stored."""
    size = 1 << 20
    head = (
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n"
        b"Content-Length: %d\r\n\r\n" % size
    )

    def script(transport, head_seen):
        chunk = b"z" * (64 * 1024)
        _later(transport, head_seen, head, *[chunk] * 8)
        reactor.callLater(0.5, transport.loseConnection)

    raw, first, second = await _twice(tmp_path, script, "/short")
    assert first is not None and second is not None
    assert first.header("Content-Length") == str(size)
    assert len(first.body) < size and len(second.body) < size
    assert len(raw.requests) == 2


@pytest_twisted.ensureDeferred
async def test_invalid_chunked_encoding_is_cut_not_stored(tmp_path):
    """A chunk size that is not hex ends the relayed body and nothing is stored."""

    def script(transport, head):
        transport.write(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\nfirst\r\nzz-not-hex\r\nsecond\r\n0\r\n\r\n"
        )

    raw, first, second = await _twice(tmp_path, script, "/badchunk")
    for response in (first, second):
        # The whole answer came in one segment, so the proxy may reset the client
        # before the head it queued went out; either way nothing looks complete.
        assert response is None or b"second" not in response.body
    assert len(raw.requests) == 2


@pytest_twisted.ensureDeferred
async def test_chunked_body_cut_before_the_last_chunk(tmp_path):
    """A chunked body whose connection closes before the zero chunk is not stored."""

    def script(transport, head):
        transport.write(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
        )
        reactor.callLater(0.05, transport.loseConnection)

    raw, first, second = await _twice(tmp_path, script, "/nolast")
    assert first is not None and second is not None
    assert first.body == second.body == b"first"
    assert len(raw.requests) == 2


@pytest_twisted.ensureDeferred
async def test_garbage_instead_of_a_status_line_is_502(tmp_path):
    """Bytes that are not an HTTP status line make a 502 and nothing is stored."""

    def script(transport, head):
        transport.write(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02 garbage\r\n\r\n")
        transport.loseConnection()

    raw, first, second = await _twice(tmp_path, script, "/garbage")
    assert first is not None and second is not None
    assert first.status == second.status == 502
    assert len(raw.requests) == 2


@pytest_twisted.ensureDeferred
async def test_interim_100_continue_before_the_real_response(tmp_path):
    """A ``100 Continue`` before the final response is skipped, the final relayed."""

    def script(transport, head):
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        transport.write(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n"
            b"Content-Length: 5\r\n\r\nfinal"
        )

    raw = start_raw_origin(script)
    running = await start_proxy(tmp_path)
    try:
        first = await fetch(running.port, "GET", raw.url("/interim"))
        second = await fetch(running.port, "GET", raw.url("/interim"))
    finally:
        await running.service.stopService()
        await raw.stop()
    assert first.status == second.status == 200
    assert first.body == second.body == b"final"
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert len(raw.requests) == 1


@pytest_twisted.ensureDeferred
async def test_unannounced_body_over_the_object_size_is_relayed_not_stored(tmp_path):
    """A chunked body that outgrows --max-object-size is relayed whole, not stored."""
    body = bytes(range(256)) * 64

    def script(transport, head):
        chunks = [
            b"%x\r\n%s\r\n" % (1024, body[i : i + 1024]) for i in range(0, 16384, 1024)
        ]
        _later(
            transport,
            head,
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            *chunks,
            b"0\r\n\r\n",
        )

    raw, first, second = await _twice(tmp_path, script, "/big", max_object_size=4096)
    assert first is not None and second is not None
    assert first.body == second.body == body
    assert second.header("Cache-Status").startswith("cacheproxy; fwd=miss")
    assert len(raw.requests) == 2


@pytest_twisted.ensureDeferred
async def test_stale_if_error_covers_a_reset_before_the_response(tmp_path):
    """A stale response with stale-if-error answers for an origin that resets."""
    answers = iter([True])

    def script(transport, head):
        if next(answers, False):
            transport.write(
                b"HTTP/1.1 200 OK\r\nCache-Control: max-age=0, stale-if-error=600\r\n"
                b'ETag: "s"\r\nContent-Length: 6\r\n\r\nstored'
            )
        else:
            transport.abortConnection()

    raw: RawOrigin = start_raw_origin(script)
    running = await start_proxy(tmp_path)
    try:
        first = await fetch(running.port, "GET", raw.url("/sie"))
        second: Response = await fetch(running.port, "GET", raw.url("/sie"))
        _nothing_partial(running)
    finally:
        await running.service.stopService()
        await raw.stop()
    assert first.body == b"stored"
    assert second.status == 200
    assert second.body == b"stored"
    assert second.header("Cache-Status") == (
        "cacheproxy; fwd=stale; detail=stale-if-error"
    )
    assert len(raw.requests) >= 2


@pytest_twisted.ensureDeferred
async def test_origin_that_never_accepts_is_504(tmp_path):
    """An origin whose accept queue is full never completes the TCP handshake:
    after --origin-timeout the client gets 504, and nothing is stored."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    # Fill the accept queue without accepting: further SYNs go unanswered.
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    running = await start_proxy(tmp_path, origin_timeout=0.5)
    try:
        response = await fetch(running.port, "GET", f"http://127.0.0.1:{port}/x")
    finally:
        await running.service.stopService()
        for filler in fillers:
            filler.close()
        listener.close()
    assert response.status == 504
    assert not list((running.cache_dir / "tmp").iterdir())


@pytest_twisted.ensureDeferred
async def test_origin_stalling_mid_body_is_cut_off(tmp_path):
    """An origin that stops sending mid-body is given up after --origin-timeout:
    the client sees the body cut short, nothing is stored, the next request
    goes to the origin again."""

    def script(transport, head_seen):
        transport.write(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\n"
            b"Content-Length: 1000\r\n\r\n" + b"s" * 100
        )
        # ...and nothing more, with the connection left open.

    raw, first, second = await _twice(tmp_path, script, "/stall", origin_timeout=0.5)
    assert first is not None and second is not None
    assert first.status == 200
    assert first.header("Content-Length") == "1000"
    assert first.body == b"s" * 100
    assert len(raw.requests) == 2
