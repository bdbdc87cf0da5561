"""End to end: clients' conditional and range requests answered from the store, and HEAD
freshening stored responses (RFC 9110 sections 13 and 14, RFC 9111 sections 4.3.2 and
4.3.5)."""

from __future__ import annotations

import re
from email.utils import formatdate

import pytest_twisted
from twisted.internet import reactor
from twisted.web import server

from tests.conftest import RunningProxy
from tests.support import Origin, fetch

BODY = bytes(range(256)) * 4  # 1024 bytes
LAST_MODIFIED = formatdate(reactor.seconds() - 86400, usegmt=True)


def _stored(origin: Origin, path: str = "/doc") -> str:
    return origin.static(
        path,
        BODY,
        {
            "Cache-Control": "max-age=300",
            "ETag": '"abc"',
            "Last-Modified": LAST_MODIFIED,
            "Content-Type": "application/x-test",
        },
    )


@pytest_twisted.ensureDeferred
async def test_matching_if_none_match_is_304_from_store(
    origin: Origin, proxy: RunningProxy
):
    """A client's If-None-Match that matches the stored ETag gets 304 from the store."""
    url = _stored(origin)
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"If-None-Match": 'W/"x", "abc"'})
    assert response.status == 304
    assert response.body == b""
    assert response.header("ETag") == '"abc"'
    assert response.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/doc") == 1


@pytest_twisted.ensureDeferred
async def test_other_if_none_match_gets_the_full_response(
    origin: Origin, proxy: RunningProxy
):
    """An If-None-Match naming another tag gets the stored response in full."""
    url = _stored(origin)
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"If-None-Match": '"other"'})
    assert response.status == 200
    assert response.body == BODY
    assert origin.count("/doc") == 1


@pytest_twisted.ensureDeferred
async def test_if_modified_since_is_304_from_store(origin: Origin, proxy: RunningProxy):
    """If-Modified-Since at or after Last-Modified gets 304 from the store."""
    url = _stored(origin)
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"If-Modified-Since": LAST_MODIFIED})
    assert response.status == 304
    assert origin.count("/doc") == 1


@pytest_twisted.ensureDeferred
async def test_failed_if_match_is_412(origin: Origin, proxy: RunningProxy):
    """An If-Match that the stored response fails gets 412."""
    url = _stored(origin)
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"If-Match": '"nope"'})
    assert response.status == 412


@pytest_twisted.ensureDeferred
async def test_conditional_miss_is_forwarded(origin: Origin, proxy: RunningProxy):
    """On a miss, the client's validators go to the origin, and its 304 comes back."""

    def handler(request: server.Request) -> bytes:
        if request.getHeader(b"if-none-match") == b'"abc"':
            request.setResponseCode(304)
            return b""
        return BODY

    url = origin.route("/cond", handler)
    response = await fetch(proxy.port, "GET", url, {"If-None-Match": '"abc"'})
    assert response.status == 304
    assert origin.requests[b"/cond"][0].header("If-None-Match") == '"abc"'


@pytest_twisted.ensureDeferred
async def test_single_range_from_store(origin: Origin, proxy: RunningProxy):
    """A Range request on a stored body gets 206 with exactly those bytes."""
    url = _stored(origin)
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"Range": "bytes=100-199"})
    assert response.status == 206
    assert response.body == BODY[100:200]
    assert response.header("Content-Range") == "bytes 100-199/1024"
    assert response.header("Content-Length") == "100"
    suffix = await fetch(proxy.port, "GET", url, {"Range": "bytes=-24"})
    assert suffix.body == BODY[-24:]
    assert suffix.header("Content-Range") == "bytes 1000-1023/1024"
    assert origin.count("/doc") == 1


@pytest_twisted.ensureDeferred
async def test_multiple_ranges_are_multipart(origin: Origin, proxy: RunningProxy):
    """Several ranges come back as multipart/byteranges, each part with its bytes."""
    url = _stored(origin)
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"Range": "bytes=0-9,500-509"})
    assert response.status == 206
    content_type = response.header("Content-Type")
    match = re.match(r"multipart/byteranges; boundary=(\S+)$", content_type)
    assert match, content_type
    assert int(response.header("Content-Length")) == len(response.body)
    boundary = match.group(1).encode()
    parts = response.body.split(b"--" + boundary)
    assert parts[-1].strip() == b"--"
    bodies = []
    for part in parts[1:-1]:
        head, _, data = part.partition(b"\r\n\r\n")
        assert b"Content-Type: application/x-test" in head
        bodies.append((head, data[:-2] if data.endswith(b"\r\n") else data))
    assert b"Content-Range: bytes 0-9/1024" in bodies[0][0]
    assert bodies[0][1] == BODY[0:10]
    assert b"Content-Range: bytes 500-509/1024" in bodies[1][0]
    assert bodies[1][1] == BODY[500:510]


@pytest_twisted.ensureDeferred
async def test_unsatisfiable_range_is_416(origin: Origin, proxy: RunningProxy):
    """A range wholly past the end gets 416 with the length in Content-Range."""
    url = _stored(origin)
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"Range": "bytes=5000-6000"})
    assert response.status == 416
    assert response.header("Content-Range") == "bytes */1024"


@pytest_twisted.ensureDeferred
async def test_if_range_decides_between_part_and_whole(
    origin: Origin, proxy: RunningProxy
):
    """If-Range with the current ETag gets the range; with another, the whole body."""
    url = _stored(origin)
    await fetch(proxy.port, "GET", url)
    part = await fetch(
        proxy.port, "GET", url, {"Range": "bytes=0-3", "If-Range": '"abc"'}
    )
    whole = await fetch(
        proxy.port, "GET", url, {"Range": "bytes=0-3", "If-Range": '"old"'}
    )
    assert (part.status, part.body) == (206, BODY[:4])
    assert (whole.status, whole.body) == (200, BODY)


@pytest_twisted.ensureDeferred
async def test_range_miss_is_forwarded(origin: Origin, proxy: RunningProxy):
    """A Range request for something not stored goes to the origin with its Range."""
    url = _stored(origin, "/fresh")
    response = await fetch(proxy.port, "GET", url, {"Range": "bytes=0-9"})
    assert origin.requests[b"/fresh"][0].header("Range") == "bytes=0-9"
    assert response.status in (200, 206)


def _head_route(origin: Origin, path: str, state: dict) -> str:
    def handler(request: server.Request) -> bytes:
        request.setHeader(b"Last-Modified", state["last_modified"].encode())
        request.setHeader(b"Cache-Control", state["cache_control"].encode())
        request.setHeader(b"X-Note", state["note"].encode())
        return BODY  # twisted.web sends only the length for HEAD

    return origin.route(path, handler)


@pytest_twisted.ensureDeferred
async def test_head_with_matching_validators_freshens_stored_get(
    origin: Origin, proxy: RunningProxy
):
    """A HEAD 200 whose validators match updates the stored GET response's fields."""
    state = {"last_modified": LAST_MODIFIED, "cache_control": "max-age=0", "note": "1"}
    url = _head_route(origin, "/fh", state)
    await fetch(proxy.port, "GET", url)
    state.update(cache_control="max-age=300", note="2")
    head = await fetch(proxy.port, "HEAD", url)
    assert head.status == 200
    hit = await fetch(proxy.port, "GET", url)
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert hit.header("X-Note") == "2"
    assert hit.body == BODY
    assert origin.count("/fh") == 2


@pytest_twisted.ensureDeferred
async def test_head_with_other_validators_drops_stored_get(
    origin: Origin, proxy: RunningProxy
):
    """A HEAD 200 whose Last-Modified differs makes the stored GET response unusable."""
    state = {
        "last_modified": LAST_MODIFIED,
        "cache_control": "max-age=300",
        "note": "1",
    }
    url = _head_route(origin, "/dh", state)
    await fetch(proxy.port, "GET", url)
    state["last_modified"] = formatdate(reactor.seconds(), usegmt=True)
    head = await fetch(proxy.port, "HEAD", url, {"Cache-Control": "no-cache"})
    assert head.status == 200
    after = await fetch(proxy.port, "GET", url)
    assert after.header("Cache-Status").startswith("cacheproxy; fwd=")
    assert origin.count("/dh") == 3


@pytest_twisted.ensureDeferred
async def test_revalidation_asks_for_the_whole_body(
    origin: Origin, proxy: RunningProxy
):
    """A Range request on a stale entry revalidates without Range, so the answer
    can be stored whole."""
    state = {"etag": b'"one"'}

    def handler(request: server.Request) -> bytes:
        request.setHeader(b"ETag", state["etag"])
        request.setHeader(b"Cache-Control", b"max-age=0")
        return BODY

    url = origin.route("/whole", handler)
    await fetch(proxy.port, "GET", url)
    state["etag"] = b'"two"'
    ranged = await fetch(proxy.port, "GET", url, {"Range": "bytes=0-3"})
    seen = origin.requests[b"/whole"][1]
    assert seen.header("Range") is None
    assert seen.header("If-None-Match") == '"one"'
    assert ranged.status == 200
    assert ranged.body == BODY
    ranged_again = await fetch(
        proxy.port, "GET", url, {"Range": "bytes=0-3", "Cache-Control": "max-stale"}
    )
    assert (ranged_again.status, ranged_again.body) == (206, BODY[:4])
    assert ranged_again.header("ETag") == '"two"'
