"""End to end: identical concurrent misses share one origin fetch (issue 6)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from tests.conftest import start_proxy
from tests.support import fetch, start_raw_origin, wait_for

N = 10


class _Held:
    """A raw origin that answers each request only when the test says so."""

    def __init__(self, cache_control: bytes, vary: bytes = b"") -> None:
        self.cache_control = cache_control
        self.vary = vary
        self.transports: list = []

    def __call__(self, transport, head: bytes) -> None:
        self.transports.append(transport)

    def answer(self, index: int, body: bytes) -> None:
        vary = b"Vary: %s\r\n" % self.vary if self.vary else b""
        self.transports[index].write(
            b"HTTP/1.1 200 OK\r\nCache-Control: %s\r\n%sContent-Length: %d\r\n\r\n%s"
            % (self.cache_control, vary, len(body), body)
        )


def _many(port: int, url: str, headers=None) -> list[defer.Deferred]:
    return [defer.ensureDeferred(fetch(port, "GET", url, headers)) for _ in range(N)]


@pytest_twisted.ensureDeferred
async def test_identical_misses_share_one_fetch(tmp_path):
    """Ten simultaneous misses for one URL make one origin request and all get it."""
    held = _Held(b"max-age=60")
    raw = start_raw_origin(held)
    running = await start_proxy(tmp_path)
    try:
        url = raw.url("/popular")
        pending = _many(running.port, url)
        await wait_for(lambda: len(held.transports) == 1)
        flights = running.service.proxy.flights
        await wait_for(lambda: sum(f.followers for f in flights.values()) == N - 1)
        held.answer(0, bytes(range(256)) * 100)
        responses = await defer.gatherResults(pending)
    finally:
        await running.service.stopService()
        await raw.stop()
    assert len(raw.requests) == 1
    assert all(r.body == bytes(range(256)) * 100 for r in responses)
    statuses = sorted(r.header("Cache-Status") for r in responses)
    assert statuses.count("cacheproxy; fwd=miss; collapsed") == N - 1
    assert statuses.count("cacheproxy; fwd=miss; stored") == 1


@pytest_twisted.ensureDeferred
async def test_private_response_is_never_shared(tmp_path):
    """When the response turns out private, each waiting request fetches its own."""
    held = _Held(b"private, max-age=60")
    raw = start_raw_origin(held)
    running = await start_proxy(tmp_path)
    try:
        url = raw.url("/mine")
        pending = _many(running.port, url)
        await wait_for(lambda: len(held.transports) == 1)
        held.answer(0, b"for client 0")
        await wait_for(lambda: len(held.transports) == N)
        for index in range(1, N):
            held.answer(index, b"for client %d" % index)
        responses = await defer.gatherResults(pending)
    finally:
        await running.service.stopService()
        await raw.stop()
    bodies = sorted(r.body for r in responses)
    assert bodies == sorted(b"for client %d" % i for i in range(N))
    assert not any("collapsed" in r.header("Cache-Status") for r in responses)


@pytest_twisted.ensureDeferred
async def test_requests_with_credentials_do_not_collapse(tmp_path):
    """A request with Authorization never waits for another's fetch."""
    held = _Held(b"max-age=60")
    raw = start_raw_origin(held)
    running = await start_proxy(tmp_path)
    try:
        url = raw.url("/auth")
        first = defer.ensureDeferred(fetch(running.port, "GET", url))
        await wait_for(lambda: len(held.transports) == 1)
        second = defer.ensureDeferred(
            fetch(running.port, "GET", url, {"Authorization": "Basic eDp5"})
        )
        await wait_for(lambda: len(held.transports) == 2)
        held.answer(0, b"public")
        held.answer(1, b"personal")
        responses = [await first, await second]
    finally:
        await running.service.stopService()
        await raw.stop()
    assert [r.body for r in responses] == [b"public", b"personal"]


@pytest_twisted.ensureDeferred
async def test_vary_mismatch_fetches_alone(tmp_path):
    """A waiting request whose Vary values differ from the leader's fetches alone."""
    held = _Held(b"max-age=60", vary=b"Accept-Language")
    raw = start_raw_origin(held)
    running = await start_proxy(tmp_path)
    try:
        url = raw.url("/lang")
        english = defer.ensureDeferred(
            fetch(running.port, "GET", url, {"Accept-Language": "en"})
        )
        await wait_for(lambda: len(held.transports) == 1)
        french = defer.ensureDeferred(
            fetch(running.port, "GET", url, {"Accept-Language": "fr"})
        )
        await wait_for(
            lambda: next(iter(running.service.proxy.flights.values())).followers == 1
        )
        held.answer(0, b"hello")
        await wait_for(lambda: len(held.transports) == 2)
        held.answer(1, b"bonjour")
        responses = [await english, await french]
    finally:
        await running.service.stopService()
        await raw.stop()
    assert [r.body for r in responses] == [b"hello", b"bonjour"]


@pytest_twisted.ensureDeferred
async def test_unshareable_url_stops_collapsing(tmp_path):
    """Once a URL's response proved unshareable (no-store), its later misses go to
    the origin at once instead of waiting behind one another (hit-for-miss)."""
    held = _Held(b"no-store")
    raw = start_raw_origin(held)
    running = await start_proxy(tmp_path)
    try:
        url = raw.url("/api")
        first = defer.ensureDeferred(fetch(running.port, "GET", url))
        await wait_for(lambda: len(held.transports) == 1)
        held.answer(0, b"one")
        assert (await first).body == b"one"
        pending = _many(running.port, url)
        # All of them reach the origin while none has been answered.
        await wait_for(lambda: len(held.transports) == 1 + N)
        for index in range(1, 1 + N):
            held.answer(index, b"again")
        responses = await defer.gatherResults(pending)
    finally:
        await running.service.stopService()
        await raw.stop()
    assert all(r.body == b"again" for r in responses)
    assert all(r.header("Cache-Status") == "cacheproxy; fwd=miss" for r in responses)
