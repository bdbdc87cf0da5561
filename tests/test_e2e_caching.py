"""End to end: what is stored, served, revalidated and replaced (issue 2)."""

from __future__ import annotations

import sqlite3
from email.utils import formatdate

import pytest_twisted
from twisted.internet import reactor
from twisted.web import server

from tests.conftest import RunningProxy, start_proxy
from tests.support import (
    Origin,
    fetch,
    request_bytes,
    send_raw,
    start_raw_origin,
    wait_for,
)


def _http_date(offset: float = 0.0) -> str:
    return formatdate(reactor.seconds() + offset, usegmt=True)


@pytest_twisted.ensureDeferred
async def test_no_store_and_private_are_not_stored(origin: Origin, proxy: RunningProxy):
    """Responses marked no-store or private go to the origin every time."""
    for path, directive in (("/ns", "no-store"), ("/pr", "private, max-age=60")):
        url = origin.static(path, b"x", {"Cache-Control": directive})
        first = await fetch(proxy.port, "GET", url)
        second = await fetch(proxy.port, "GET", url)
        assert first.header("Cache-Status") == "cacheproxy; fwd=miss"
        assert second.header("Cache-Status") == "cacheproxy; fwd=miss"
        assert origin.count(path) == 2


def _etag_route(origin: Origin, path: str, cache_control: str, bodies: list[bytes]):
    """A route answering 304 to a matching If-None-Match, else the next body."""
    state = {"version": 0}

    def handler(request: server.Request) -> bytes:
        etag = b'"v%d"' % state["version"]
        request.setHeader(b"Cache-Control", cache_control.encode())
        request.setHeader(b"ETag", etag)
        request.setHeader(b"X-Version", b"%d" % state["version"])
        if request.getHeader(b"if-none-match") == etag:
            request.setResponseCode(304)
            return b""
        return bodies[state["version"]]

    return origin.route(path, handler), state


@pytest_twisted.ensureDeferred
async def test_no_cache_is_stored_and_revalidated(origin: Origin, proxy: RunningProxy):
    """A no-cache response is stored; each use is revalidated, a 304 serves the body."""
    url, _ = _etag_route(origin, "/nc", "no-cache", [b"stored body"])
    first = await fetch(proxy.port, "GET", url)
    second = await fetch(proxy.port, "GET", url)
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert second.status == 200
    assert second.body == b"stored body"
    assert "fwd-status=304" in second.header("Cache-Status")
    seen = origin.requests[b"/nc"]
    assert len(seen) == 2
    assert seen[1].header("If-None-Match") == '"v0"'


@pytest_twisted.ensureDeferred
async def test_stale_entry_refreshed_by_304_updates_headers(
    origin: Origin, proxy: RunningProxy
):
    """A 304 whose ETag matches refreshes the stored headers and the freshness."""
    state = {"calls": 0}

    def handler(request: server.Request) -> bytes:
        state["calls"] += 1
        request.setHeader(b"ETag", b'"same"')
        if state["calls"] == 1:
            request.setHeader(b"Cache-Control", b"max-age=0")
            request.setHeader(b"X-Note", b"first")
            return b"the body"
        assert request.getHeader(b"if-none-match") == b'"same"'
        request.setResponseCode(304)
        request.setHeader(b"Cache-Control", b"max-age=300")
        request.setHeader(b"X-Note", b"refreshed")
        return b""

    url = origin.route("/r", handler)
    await fetch(proxy.port, "GET", url)
    refreshed = await fetch(proxy.port, "GET", url)
    hit = await fetch(proxy.port, "GET", url)
    assert refreshed.body == hit.body == b"the body"
    assert refreshed.header("X-Note") == "refreshed"
    assert refreshed.header("Content-Length") == "8"
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert hit.header("X-Note") == "refreshed"
    assert origin.count("/r") == 2


@pytest_twisted.ensureDeferred
async def test_stale_entry_replaced_by_new_200(origin: Origin, proxy: RunningProxy):
    """When revalidation brings a new body, it is relayed and replaces the old one."""
    url, state = _etag_route(origin, "/v", "max-age=0", [b"old", b"new"])
    await fetch(proxy.port, "GET", url)
    state["version"] = 1
    changed = await fetch(proxy.port, "GET", url)
    assert changed.body == b"new"
    assert changed.header("X-Version") == "1"
    state["version"] = 1
    again = await fetch(proxy.port, "GET", url)
    assert again.body == b"new"
    assert origin.requests[b"/v"][2].header("If-None-Match") == '"v1"'


@pytest_twisted.ensureDeferred
async def test_last_modified_revalidation(origin: Origin, proxy: RunningProxy):
    """Without an ETag, revalidation sends If-Modified-Since with Last-Modified."""
    modified = _http_date(-3600)

    def handler(request: server.Request) -> bytes:
        request.setHeader(b"Last-Modified", modified.encode())
        request.setHeader(b"Cache-Control", b"max-age=0")
        if request.getHeader(b"if-modified-since") == modified.encode():
            request.setResponseCode(304)
            return b""
        return b"dated"

    url = origin.route("/lm", handler)
    await fetch(proxy.port, "GET", url)
    second = await fetch(proxy.port, "GET", url)
    assert second.body == b"dated"
    assert origin.requests[b"/lm"][1].header("If-Modified-Since") == modified


@pytest_twisted.ensureDeferred
async def test_vary_keeps_one_variant_per_request_value(
    origin: Origin, proxy: RunningProxy
):
    """Responses that Vary on a field are stored and served per value of it."""

    def handler(request: server.Request) -> bytes:
        request.setHeader(b"Vary", b"Accept-Language")
        request.setHeader(b"Cache-Control", b"max-age=300")
        return b"lang=" + (request.getHeader(b"accept-language") or b"none")

    url = origin.route("/vary", handler)
    en = await fetch(proxy.port, "GET", url, {"Accept-Language": "en"})
    fr = await fetch(proxy.port, "GET", url, {"Accept-Language": "fr"})
    en2 = await fetch(proxy.port, "GET", url, {"Accept-Language": "en"})
    fr2 = await fetch(proxy.port, "GET", url, {"Accept-Language": "fr"})
    none = await fetch(proxy.port, "GET", url)
    assert (en.body, fr.body) == (b"lang=en", b"lang=fr")
    assert (en2.body, fr2.body) == (b"lang=en", b"lang=fr")
    assert en2.header("Cache-Status") == fr2.header("Cache-Status") == "cacheproxy; hit"
    assert none.body == b"lang=none"
    assert none.header("Cache-Status").startswith("cacheproxy; fwd=vary-miss")
    assert origin.count("/vary") == 3


@pytest_twisted.ensureDeferred
async def test_age_counts_the_origins_age(origin: Origin, proxy: RunningProxy):
    """A stored response's Age includes the Age the origin reported (RFC 9111 4.2.3)."""
    url = origin.static("/aged", b"a", {"Cache-Control": "max-age=600", "Age": "100"})
    await fetch(proxy.port, "GET", url)
    hit = await fetch(proxy.port, "GET", url)
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert 100 <= int(hit.header("Age")) < 110


@pytest_twisted.ensureDeferred
async def test_expired_response_goes_back_to_the_origin(
    origin: Origin, proxy: RunningProxy
):
    """An Expires in the past makes a stored response stale, so it is fetched again."""
    url = origin.static("/exp", b"e", {"Expires": _http_date(-60)})
    await fetch(proxy.port, "GET", url)
    second = await fetch(proxy.port, "GET", url)
    assert second.header("Cache-Status").startswith("cacheproxy; fwd=stale")
    assert origin.count("/exp") == 2


@pytest_twisted.ensureDeferred
async def test_large_object_relayed_not_stored(origin: Origin, tmp_path):
    """A response over --max-object-size reaches the client whole but is not stored."""
    running = await start_proxy(tmp_path, max_object_size=1000)
    try:
        url = origin.static("/huge", b"h" * 5000, {"Cache-Control": "max-age=60"})
        first = await fetch(running.port, "GET", url)
        second = await fetch(running.port, "GET", url)
    finally:
        await running.service.stopService()
    assert first.body == second.body == b"h" * 5000
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss"
    assert origin.count("/huge") == 2


@pytest_twisted.ensureDeferred
async def test_chunked_body_without_length_stored_whole(tmp_path):
    """A chunked origin body (no Content-Length) is relayed and stored complete."""

    def script(transport, head):
        transport.write(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"
        )

    raw = start_raw_origin(script)
    running = await start_proxy(tmp_path)
    try:
        first = await fetch(running.port, "GET", raw.url("/c"))
        second = await fetch(running.port, "GET", raw.url("/c"))
    finally:
        await running.service.stopService()
        await raw.stop()
    assert first.body == second.body == b"abcdefg"
    assert first.header("Transfer-Encoding") == "chunked"
    assert second.header("Content-Length") == "7"
    assert len(raw.requests) == 1


@pytest_twisted.ensureDeferred
async def test_close_delimited_body_relayed(tmp_path):
    """An origin body that ends when the connection closes reaches the client whole."""

    def script(transport, head):
        transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        transport.write(b"until the end")
        transport.loseConnection()

    raw = start_raw_origin(script)
    running = await start_proxy(tmp_path)
    try:
        response = await fetch(running.port, "GET", raw.url("/close"))
        as_10 = await send_raw(
            running.port, request_bytes("GET", raw.url("/close"), version="1.0")
        )
    finally:
        await running.service.stopService()
        await raw.stop()
    assert response.body == b"until the end"
    assert as_10[0].body == b"until the end"


@pytest_twisted.ensureDeferred
async def test_truncated_body_is_never_stored(tmp_path):
    """A body cut short is passed on truncated, not stored, and refetched next time."""

    def script(transport, head):
        transport.write(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n"
            b"Content-Length: 1000\r\n\r\n" + b"x" * 500
        )
        transport.loseConnection()

    raw = start_raw_origin(script)
    running = await start_proxy(tmp_path)
    try:
        first = await fetch(running.port, "GET", raw.url("/cut"))
        second = await fetch(running.port, "GET", raw.url("/cut"))
    finally:
        await running.service.stopService()
        await raw.stop()
    assert len(first.body) < 1000
    assert len(second.body) < 1000
    assert len(raw.requests) == 2
    assert not list((running.cache_dir / "tmp").iterdir())


@pytest_twisted.ensureDeferred
async def test_unsafe_method_invalidates_stored_response(
    origin: Origin, proxy: RunningProxy
):
    """A successful POST to a URL drops its stored GET response (RFC 9111 4.4)."""
    url = origin.static("/doc", b"doc", {"Cache-Control": "max-age=300"})
    await fetch(proxy.port, "GET", url)
    await fetch(proxy.port, "POST", url, body=b"change")
    after = await fetch(proxy.port, "GET", url)
    assert after.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert origin.count("/doc") == 3


@pytest_twisted.ensureDeferred
async def test_head_answered_from_stored_get(origin: Origin, proxy: RunningProxy):
    """A HEAD for a stored GET response is answered from the store, without a body."""
    url = origin.static("/h", b"0123456789", {"Cache-Control": "max-age=300"})
    await fetch(proxy.port, "GET", url)
    head = await fetch(proxy.port, "HEAD", url)
    assert head.status == 200
    assert head.header("Content-Length") == "10"
    assert head.header("Cache-Status") == "cacheproxy; hit"
    assert head.body == b""
    assert origin.count("/h") == 1


@pytest_twisted.ensureDeferred
async def test_head_miss_forwarded_with_length(origin: Origin, proxy: RunningProxy):
    """A HEAD miss goes to the origin and keeps the origin's Content-Length."""
    url = origin.static("/hm", b"abcdef", {"Cache-Control": "max-age=300"})
    head = await fetch(proxy.port, "HEAD", url)
    assert head.status == 200
    assert origin.requests[b"/hm"][0].method == b"HEAD"
    get = await fetch(proxy.port, "GET", url)
    assert get.body == b"abcdef"


@pytest_twisted.ensureDeferred
async def test_vary_miss_asks_with_stored_etags(origin: Origin, proxy: RunningProxy):
    """On a Vary miss the origin gets the stored ETags; its 304 picks one to serve."""

    def handler(request: server.Request) -> bytes:
        request.setHeader(b"Vary", b"Accept-Language")
        request.setHeader(b"Cache-Control", b"max-age=300")
        # English and anything else share one representation.
        french = request.getHeader(b"accept-language") == b"fr"
        etag = b'"fr"' if french else b'"en"'
        request.setHeader(b"ETag", etag)
        if etag in (request.getHeader(b"if-none-match") or b""):
            request.setResponseCode(304)
            return b""
        return b"bonjour" if french else b"hello"

    url = origin.route("/lang", handler)
    await fetch(proxy.port, "GET", url, {"Accept-Language": "en"})
    await fetch(proxy.port, "GET", url, {"Accept-Language": "fr"})
    other = await fetch(proxy.port, "GET", url, {"Accept-Language": "de"})
    assert other.status == 200
    assert other.body == b"hello"
    assert other.header("Cache-Status") == "cacheproxy; fwd=vary-miss; fwd-status=304"
    sent = origin.requests[b"/lang"][2].header("If-None-Match")
    assert '"en"' in sent and '"fr"' in sent


@pytest_twisted.ensureDeferred
async def test_memory_hit_then_disk_hit_without_memory_tier(origin: Origin, tmp_path):
    """Small hits come from RAM; with --memory-cache 0 they come from the disk."""
    url = origin.static("/small", b"tiny", {"Cache-Control": "max-age=300"})
    running = await start_proxy(tmp_path / "mem")
    try:
        await fetch(running.port, "GET", url)
        from_memory = await fetch(running.port, "GET", url)
    finally:
        await running.service.stopService()
    without = await start_proxy(tmp_path / "disk", memory_cache=0)
    try:
        await fetch(without.port, "GET", url)
        from_disk = await fetch(without.port, "GET", url)
        await wait_for(lambda: without.access_log.exists(), timeout=3)
        await wait_for(lambda: "TCP_HIT/200" in without.access_log.read_text(), 3)
    finally:
        await without.service.stopService()
    assert from_memory.body == from_disk.body == b"tiny"
    assert from_memory.header("Cache-Status") == "cacheproxy; hit"
    assert from_disk.header("Cache-Status") == "cacheproxy; hit"


@pytest_twisted.ensureDeferred
async def test_disk_hits_write_nothing_and_count_for_eviction(origin: Origin, tmp_path):
    """Disk hits commit no SQLite write while they are served; the proxy marks
    them used for LRU eviction afterwards (at the latest when it stops)."""
    url = origin.static("/disk", b"d" * 1000, {"Cache-Control": "max-age=300"})
    running = await start_proxy(tmp_path, memory_cache=0)
    database = sqlite3.connect(str(running.cache_dir / "cache.db"))
    try:
        await fetch(running.port, "GET", url)
        stored = dict(database.execute("SELECT key, access_time FROM Cache"))
        version = database.execute("PRAGMA data_version").fetchone()
        hits = [await fetch(running.port, "GET", url) for _ in range(3)]
        assert database.execute("PRAGMA data_version").fetchone() == version
    finally:
        await running.service.stopService()
    assert [hit.header("Cache-Status") for hit in hits] == ["cacheproxy; hit"] * 3
    used = dict(database.execute("SELECT key, access_time FROM Cache"))
    database.close()
    bodies = [key for key in stored if key.startswith("b:")]
    assert bodies and all(used[key] > stored[key] for key in bodies)


@pytest_twisted.ensureDeferred
async def test_memory_tier_follows_purge_and_replacement(origin: Origin, tmp_path):
    """What the memory tier serves never outlives a purge or a newer response."""
    state = {"body": b"one"}

    def handler(request: server.Request) -> bytes:
        request.setHeader(b"Cache-Control", b"max-age=300")
        return state["body"]

    url = origin.route("/mem", handler)
    running = await start_proxy(tmp_path)
    try:
        await fetch(running.port, "GET", url)
        assert (await fetch(running.port, "GET", url)).body == b"one"
        state["body"] = b"two"
        purged = await fetch(running.port, "PURGE", url)
        after_purge = await fetch(running.port, "GET", url)
        state["body"] = b"three"
        reloaded = await fetch(running.port, "GET", url, {"Cache-Control": "no-cache"})
        latest = await fetch(running.port, "GET", url)
    finally:
        await running.service.stopService()
    assert purged.status == 200
    assert after_purge.body == b"two"
    assert reloaded.body == b"three"
    assert latest.body == b"three"
