"""The hot path (Exchange.serve_hot): plain memory hits answered without a coroutine
answer exactly as the full path does, and only when the full path would serve."""

from __future__ import annotations

import pytest
import pytest_twisted

from cacheproxy.exchange import Exchange
from tests.conftest import RunningProxy
from tests.support import Origin, Response, fetch


@pytest.fixture
def hot_answers(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The targets the hot path answered, in order."""
    answered: list[bytes] = []
    original = Exchange.serve_hot

    def serve_hot(self: Exchange) -> bool:
        done = original(self)
        if done:
            answered.append(self.request.target)
        return done

    monkeypatch.setattr(Exchange, "serve_hot", serve_hot)
    return answered


def _without_age(response: Response) -> list[tuple[bytes, bytes]]:
    return sorted((n.lower(), v) for n, v in response.headers if n.lower() != b"age")


@pytest_twisted.ensureDeferred
async def test_hot_and_full_path_answer_alike(
    origin: Origin, proxy: RunningProxy, hot_answers: list[bytes]
):
    """A plain hit from the hot path has the full path's status, fields and body."""
    url = origin.static(
        "/alike",
        b"hello" * 50,
        {"Cache-Control": "max-age=600", "ETag": '"v1"', "Content-Type": "text/x"},
    )
    await fetch(proxy.port, "GET", url)  # miss
    await fetch(proxy.port, "GET", url)  # hit: the body comes into memory
    hot = await fetch(proxy.port, "GET", url)
    assert hot_answers == [url.encode()]
    # Via from a client is off the hot path (loop detection), nothing else changes.
    full = await fetch(proxy.port, "GET", url, {"Via": "1.1 elsewhere"})
    assert hot_answers == [url.encode()]
    assert (hot.status, hot.body) == (full.status, full.body) == (200, b"hello" * 50)
    assert _without_age(hot) == _without_age(full)
    assert hot.header("Cache-Status") == "cacheproxy; hit"
    assert hot.header("Age") is not None
    head = await fetch(proxy.port, "HEAD", url)
    assert head.body == b""
    assert head.header("Content-Length") == "250"
    assert origin.count("/alike") == 1


@pytest_twisted.ensureDeferred
async def test_hot_path_never_serves_stale(
    origin: Origin, proxy: RunningProxy, hot_answers: list[bytes]
):
    """RFC 9111 4.2: a stored response that is not fresh goes to the origin."""
    url = origin.static("/stale", b"x", {"Cache-Control": "max-age=0"})
    for _ in range(3):
        await fetch(proxy.port, "GET", url)
    assert origin.count("/stale") == 3
    assert hot_answers == []


@pytest_twisted.ensureDeferred
async def test_request_directives_leave_the_hot_path(
    origin: Origin, proxy: RunningProxy, hot_answers: list[bytes]
):
    """RFC 9111 5.2.1.4: a request's no-cache is honoured though the body is hot."""
    url = origin.static("/nc", b"x", {"Cache-Control": "max-age=600"})
    await fetch(proxy.port, "GET", url)
    await fetch(proxy.port, "GET", url)
    await fetch(proxy.port, "GET", url)
    assert len(hot_answers) == 1
    await fetch(proxy.port, "GET", url, {"Cache-Control": "no-cache"})
    await fetch(proxy.port, "GET", url, {"Pragma": "no-cache"})
    assert origin.count("/nc") == 3
    assert len(hot_answers) == 1


@pytest_twisted.ensureDeferred
async def test_hot_path_picks_the_vary_variant(
    origin: Origin, proxy: RunningProxy, hot_answers: list[bytes]
):
    """RFC 9111 4.1: each request gets the variant its Vary fields select."""

    def handler(request):  # type: ignore[no-untyped-def]
        language = request.getHeader(b"accept-language") or b"none"
        request.setHeader(b"Cache-Control", b"max-age=600")
        request.setHeader(b"Vary", b"Accept-Language")
        return b"lang=" + language

    url = origin.route("/v", handler)
    for language in ("en", "de", "en", "de", "en", "de"):
        reply = await fetch(proxy.port, "GET", url, {"Accept-Language": language})
        assert reply.body == b"lang=" + language.encode()
    assert origin.count("/v") == 2
    assert hot_answers  # the later rounds came from the hot path
