"""End to end: --record a demo with the network up, replay it --offline (issue 5)."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.python import usage
from twisted.web import server

from cacheproxy import cli
from cacheproxy.options import Options
from tests.conftest import start_proxy
from tests.support import Origin, fetch, send_raw

BINARY = bytes(range(256)) * 40
DATA = json.dumps({"demo": True, "items": [1, 2, 3]}).encode()


def _resource(body: bytes, content_type: str, cache_control: str | None):
    def handler(request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", content_type.encode())
        if cache_control:
            request.setHeader(b"Cache-Control", cache_control.encode())
        request.responseHeaders.addRawHeader(b"Set-Cookie", b"session=abc")
        request.setHeader(b"Vary", b"Accept-Language")
        return body

    return handler


def _demo(origin: Origin) -> dict[str, tuple[str, bytes]]:
    """A page of resources, several of which RFC 9111 would never store."""
    resources = {
        "/app.bin": (BINARY, "application/octet-stream", "max-age=60"),
        "/api/data.json": (DATA, "application/json", "no-store"),
        "/me.json": (b'{"user": 1}', "application/json", "private"),
        "/feed": (b"feed", "text/plain", "no-cache"),
        "/plain": (b"plain", "text/plain", None),
    }
    return {
        path: (origin.route(path, _resource(body, kind, cc)), body)
        for path, (body, kind, cc) in resources.items()
    }


@pytest_twisted.ensureDeferred
async def test_recorded_demo_replays_offline(origin: Origin, tmp_path):
    """Everything fetched while recording is served offline, byte-exact, no origin."""
    demo = _demo(origin)
    recording = await start_proxy(tmp_path, record=True)
    try:
        for url, body in demo.values():
            response = await fetch(
                recording.port, "GET", url, {"Accept-Language": "en"}
            )
            assert response.body == body
    finally:
        await recording.service.stopService()
    seen = sum(len(v) for v in origin.requests.values())
    connected = origin.connections
    offline = await start_proxy(tmp_path, offline=True)
    try:
        replies = {
            path: await fetch(offline.port, "GET", url, {"Accept-Language": "fr"})
            for path, (url, _) in demo.items()
        }
        missing = await fetch(offline.port, "GET", origin.url("/never-fetched"))
        connect = await send_raw(
            offline.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        post = await fetch(offline.port, "POST", demo["/plain"][0], body=b"x")
    finally:
        await offline.service.stopService()
    for path, (_, body) in demo.items():
        reply = replies[path]
        assert reply.status == 200, path
        assert reply.body == body, path
        assert reply.header("Cache-Status") == "cacheproxy; hit; detail=offline"
        assert reply.header("Age") is not None
        assert reply.header("Set-Cookie") == "session=abc"
    assert missing.status == 504
    assert b"offline" in missing.body and b"/never-fetched" in missing.body
    assert missing.header("Cache-Status") == "cacheproxy; detail=offline"
    assert connect[0].status == 502
    assert connect[0].header("Cache-Status") is None  # a tunnel is not cached
    assert post.status == 504
    # Nothing reached the origin while offline.
    assert sum(len(v) for v in origin.requests.values()) == seen
    assert origin.connections == connected


@pytest_twisted.ensureDeferred
async def test_recorded_uncacheable_is_not_served_online(origin: Origin, tmp_path):
    """A recorded no-store response is not served to online clients."""
    url = origin.route("/secret", _resource(b"s", "text/plain", "no-store"))
    recording = await start_proxy(tmp_path, record=True)
    try:
        first = await fetch(recording.port, "GET", url)
        second = await fetch(recording.port, "GET", url)
    finally:
        await recording.service.stopService()
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert second.header("Cache-Status").startswith("cacheproxy; fwd=miss")
    assert origin.count("/secret") == 2


@pytest_twisted.ensureDeferred
async def test_status_page_says_recording(tmp_path):
    """The status page shows that recording is on."""
    running = await start_proxy(tmp_path, record=True)
    try:
        (page,) = await send_raw(running.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        await running.service.stopService()
    assert b"record mode is on" in page.body
    assert b"offline mode is on" not in page.body


def test_record_and_offline_exclude_each_other():
    """--record with --offline is a usage error."""
    with pytest.raises(usage.UsageError, match="exclude"):
        Options().parseOptions(["--record", "--offline"])


@pytest_twisted.ensureDeferred
async def test_recording_moves_between_machines_as_har(origin: Origin, tmp_path):
    """Export a recording, import it into an empty cache, replay it offline exactly."""
    demo = _demo(origin)
    recording = await start_proxy(tmp_path / "laptop-a", record=True)
    try:
        for url, _ in demo.values():
            await fetch(recording.port, "GET", url, {"Accept-Language": "en"})
    finally:
        await recording.service.stopService()
    har = tmp_path / "demo.har"
    source = str(tmp_path / "laptop-a" / "cache")
    target = str(tmp_path / "laptop-b" / "cache")
    assert cli.main(["export", str(har), "--cache-dir", source]) == 0
    assert cli.main(["import", str(har), "--cache-dir", target]) == 0
    seen = sum(len(v) for v in origin.requests.values())
    connected = origin.connections
    replay = await start_proxy(tmp_path / "laptop-b", offline=True)
    try:
        replies = {
            path: await fetch(replay.port, "GET", url, {"Accept-Language": "en"})
            for path, (url, _) in demo.items()
        }
    finally:
        await replay.service.stopService()
    for path, (_, body) in demo.items():
        assert replies[path].status == 200, path
        assert replies[path].body == body, path
    assert sum(len(v) for v in origin.requests.values()) == seen
    assert origin.connections == connected
