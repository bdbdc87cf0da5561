"""End to end: the load-balanced origin of the project's brief.

One URL is served in turn (round robin) by three backends that disagree: each has its
own ETag and ``X-Served-By``, their clocks are an hour ahead, right and an hour
behind, and the third is a replica still serving older content.  Through the proxy a
client must never get one backend's headers with another's body, and freshness must
follow RFC 9111 section 4.2.3 despite the skewed Date fields.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from email.utils import formatdate

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web import server

from cacheproxy import policy
from tests.conftest import RunningProxy
from tests.support import Origin, Response, fetch


@dataclass(frozen=True)
class Backend:
    """One replica behind the balancer: its identity, clock skew and content."""

    name: str
    etag: str
    skew: float
    body: bytes


AHEAD, CORRECT, BEHIND = (
    Backend("backend-1", '"a"', +3600, b"<p>served by backend-1: catalogue v2</p>"),
    Backend("backend-2", '"b"', 0, b"<p>served by backend-2: catalogue v2</p>"),
    Backend(
        "backend-3", '"c"', -3600, b"<p>served by backend-3: catalogue v1 (old)</p>"
    ),
)
BACKENDS = (AHEAD, CORRECT, BEHIND)
_MARKER = re.compile(rb"served by (backend-\d)")


@dataclass
class Balancer:
    """The round robin: ``turn`` is the index of the backend that answers next.

    @ivar served: per origin request, the backend that answered and its status.
    """

    url: str
    turn: int
    served: list[tuple[Backend, int]]

    def skip(self, count: int) -> None:
        """Let ``count`` requests from other clients of the balancer go by."""
        self.turn += count


def _balanced(origin: Origin, path: str, cache_control: str, first: Backend):
    """Serve ``path`` from the three backends in turn, starting with ``first``."""
    balancer = Balancer("", BACKENDS.index(first), [])

    def handler(request: server.Request) -> bytes:
        backend = BACKENDS[balancer.turn % len(BACKENDS)]
        balancer.turn += 1
        date = formatdate(reactor.seconds() + backend.skew, usegmt=True)
        request.setHeader(b"Date", date.encode())
        request.setHeader(b"ETag", backend.etag.encode())
        request.setHeader(b"X-Served-By", backend.name.encode())
        request.setHeader(b"Cache-Control", cache_control.encode())
        if request.getHeader(b"if-none-match") == backend.etag.encode():
            request.setResponseCode(304)
            balancer.served.append((backend, 304))
            return b""
        balancer.served.append((backend, 200))
        return backend.body

    balancer.url = origin.route(path, handler)
    return balancer


def _assert_one_backend(response: Response) -> Backend:
    """Check headers and body come from the same backend, and return it."""
    assert response.status == 200
    match = _MARKER.search(response.body)
    assert match, response.body
    backend = next(b for b in BACKENDS if b.name == match.group(1).decode())
    assert response.body == backend.body
    assert response.header("X-Served-By") == backend.name
    assert response.header("ETag") == backend.etag
    assert response.header("Content-Length") == str(len(backend.body))
    return backend


@pytest_twisted.ensureDeferred
async def test_headers_and_body_always_from_one_backend(
    origin: Origin, proxy: RunningProxy
):
    """Over 30 revalidated requests, each response's headers and body match."""
    # max-age=0: every request revalidates.  Other clients' traffic (skip) moves
    # the round robin, so some revalidations reach the backend that stored the
    # entry (304, merged) and some reach another (200, replaces the entry).
    balancer = _balanced(origin, "/lb", "max-age=0", AHEAD)
    skips = random.Random(9111).choices(range(3), k=30)
    expected: list[Backend] = []
    statuses: list[str] = []
    for index, skip in enumerate(skips):
        if index:
            balancer.skip(skip)
        response = await fetch(proxy.port, "GET", balancer.url)
        backend = _assert_one_backend(response)
        answered, status = balancer.served[-1]
        assert backend == answered
        if status == 304:
            # Only the backend whose ETag was stored answers 304.
            assert backend == expected[-1]
        expected.append(backend)
        statuses.append(response.header("Cache-Status"))
    assert origin.count("/lb") == 30
    assert statuses[0] == "cacheproxy; fwd=miss; stored"
    assert set(statuses[1:]) == {
        "cacheproxy; fwd=stale; stored",
        "cacheproxy; fwd=stale; fwd-status=304",
    }
    assert {b.name for b in expected} == {"backend-1", "backend-2", "backend-3"}
    seen = origin.requests[b"/lb"]
    for previous, request in zip(expected[:-1], seen[1:], strict=True):
        assert request.header("If-None-Match") == previous.etag


@pytest_twisted.ensureDeferred
async def test_date_ahead_gives_age_zero_and_stays_fresh(
    origin: Origin, proxy: RunningProxy
):
    """A Date an hour in the future counts as age 0: max-age=60 stays a hit."""
    # RFC 9111 4.2.3: apparent_age = max(0, response_time - date_value) is 0 for a
    # future Date, corrected_age_value = Age (absent, 0) + response_delay (under a
    # second), so current_age is about 0 s, well inside max-age=60.
    balancer = _balanced(origin, "/ahead", "max-age=60", AHEAD)
    first = await fetch(proxy.port, "GET", balancer.url)
    hit = await fetch(proxy.port, "GET", balancer.url)
    assert _assert_one_backend(first) == AHEAD
    assert _assert_one_backend(hit) == AHEAD
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert hit.header("Age") == "0"
    assert hit.header("Date") == first.header("Date")
    assert origin.count("/ahead") == 1


@pytest_twisted.ensureDeferred
async def test_date_behind_is_stale_at_once(origin: Origin, proxy: RunningProxy):
    """A Date an hour in the past counts as age 3600: max-age=60 is stale at once."""
    # RFC 9111 4.2.3: apparent_age = response_time - date_value = 3600 (plus the
    # fraction of a second formatdate drops), which exceeds the corrected Age value
    # (about 0), so current_age is about 3600 s > max-age=60 from the start.
    balancer = _balanced(origin, "/behind", "max-age=60", BEHIND)
    first = await fetch(proxy.port, "GET", balancer.url)
    assert _assert_one_backend(first) == BEHIND
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    # Only with max-stale may it be served as is; its Age shows the hour.
    stale = await fetch(proxy.port, "GET", balancer.url, {"Cache-Control": "max-stale"})
    assert _assert_one_backend(stale) == BEHIND
    assert stale.header("Cache-Status") == "cacheproxy; hit"
    assert 3600 <= int(stale.header("Age")) <= 3602
    assert origin.count("/behind") == 1
    # A plain request revalidates it; the round robin sends that to backend-1.
    again = await fetch(proxy.port, "GET", balancer.url)
    assert origin.count("/behind") == 2
    assert origin.requests[b"/behind"][1].header("If-None-Match") == BEHIND.etag
    assert again.header("Cache-Status") == "cacheproxy; fwd=stale; stored"
    assert _assert_one_backend(again) == AHEAD


@pytest_twisted.ensureDeferred
async def test_burst_after_store_gets_one_consistent_answer(
    origin: Origin, proxy: RunningProxy
):
    """30 simultaneous requests after a fresh store all get the same stored answer."""
    balancer = _balanced(origin, "/burst", "max-age=60", CORRECT)
    first = await fetch(proxy.port, "GET", balancer.url)
    assert _assert_one_backend(first) == CORRECT
    burst = await defer.gatherResults(
        [
            defer.ensureDeferred(fetch(proxy.port, "GET", balancer.url))
            for _ in range(30)
        ]
    )
    assert len(burst) == 30
    for response in burst:
        assert _assert_one_backend(response) == CORRECT
        assert response.header("Cache-Status") == "cacheproxy; hit"
        assert response.header("Date") == first.header("Date")
    assert origin.count("/burst") == 1


@pytest_twisted.ensureDeferred
async def test_revalidation_against_other_etag_stores_new_response_whole(
    origin: Origin, proxy: RunningProxy
):
    """A revalidation answered by another backend brings and stores its full 200."""
    # backend-3's entry is stale at once (its Date is an hour behind); the round
    # robin then sends the revalidation to backend-1, whose ETag differs, so it
    # answers 200; its future Date keeps that response fresh for max-age=60.
    balancer = _balanced(origin, "/swap", "max-age=60", BEHIND)
    await fetch(proxy.port, "GET", balancer.url)
    replaced = await fetch(proxy.port, "GET", balancer.url)
    hit = await fetch(proxy.port, "GET", balancer.url)
    assert balancer.served == [
        (BEHIND, 200),
        (AHEAD, 200),
    ]
    assert origin.requests[b"/swap"][1].header("If-None-Match") == BEHIND.etag
    assert _assert_one_backend(replaced) == AHEAD
    assert replaced.header("Cache-Status") == "cacheproxy; fwd=stale; stored"
    assert _assert_one_backend(hit) == AHEAD
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert hit.header("Date") == replaced.header("Date")
    assert hit.header("Cache-Control") == "max-age=60"
    stored = proxy.service.proxy.store.lookup(policy.cache_key(balancer.url.encode()))
    assert len(stored) == 1
    assert stored[0].body_length == len(AHEAD.body)
    assert origin.count("/swap") == 2
