"""Fault injection on the disk: a cache directory on a full filesystem, two proxy
processes on one cache directory, and the ``cacheproxy`` command run against a live
proxy.  A body is relayed whole whatever the disk does; the store holds complete
bodies or nothing."""

from __future__ import annotations

import base64
import collections
import errno
import http.client
import http.server
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from cacheproxy.cli import main
from tests.conftest import start_proxy
from tests.support import Origin, fetch
from tests.test_robust_crash import TwistdProxy

HOST = "127.0.0.1"
DEADLINE = 30.0
MB = 1 << 20
CACHEABLE = {"Cache-Control": "max-age=600", "Content-Type": "application/octet-stream"}
STORED = "cacheproxy; fwd=miss; stored"


def _body(size: int, seed: int) -> bytes:
    """``size`` bytes that differ by ``seed`` and are not one repeated byte."""
    block = bytes((i * 7 + seed) % 256 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


def _path(url: str) -> str:
    """The path of an absolute ``http://host:port/path`` URL."""
    return "/" + url.split("/", 3)[3]


def _partials(cache_dir: Path) -> list[Path]:
    """Bodies being received (or left behind) in the store's ``tmp/``."""
    tmp = cache_dir / "tmp"
    return [p for p in tmp.iterdir() if p.is_file()] if tmp.exists() else []


def _ls(cache_dir: Path, capsys: Any) -> list[dict[str, Any]]:
    """``cacheproxy ls --json`` of ``cache_dir``."""
    capsys.readouterr()
    assert main(["ls", "--json", "--cache-dir", str(cache_dir)]) == 0
    listed: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return listed


# -- a cache directory on a full filesystem --------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test, always unmounted after it."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as reason:
        pytest.skip(f"cannot mount a 4 MiB tmpfs (root needed): {reason}")
    try:
        yield mount_point
    finally:
        done = subprocess.run(["umount", str(mount_point)], timeout=10, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], timeout=10, check=False)


def _fill(filesystem: Path, leave: int) -> Path:
    """Fill ``filesystem`` with a file until ``leave`` bytes are free (0: full)."""
    stat = os.statvfs(filesystem)
    want = max(0, stat.f_bavail * stat.f_frsize - leave)
    filler = filesystem / "filler"
    chunk = b"\xa5" * (64 * 1024)
    with filler.open("wb", buffering=0) as file:
        written = 0
        while leave == 0 or written < want:
            try:
                written += file.write(chunk[: (want - written) if leave else None])
            except OSError as reason:
                assert reason.errno == errno.ENOSPC
                break
    return filler


@dataclass
class _Logged:
    """Log events the proxy emits during a test (in this process)."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def disk_full(self) -> list[dict[str, Any]]:
        """Logged events whose cause is ENOSPC (a failure or a warning's error)."""
        causes = (
            event["log_failure"].value if "log_failure" in event else event.get("error")
            for event in self.events
        )
        return [
            event
            for event, cause in zip(self.events, causes, strict=True)
            if isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        ]


@pytest.fixture
def logged() -> Iterator[_Logged]:
    observer = _Logged()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


@pytest_twisted.ensureDeferred
async def test_body_larger_than_the_free_space_is_relayed_not_stored(
    origin: Origin, small_fs: Path, tmp_path: Path, logged: _Logged
):
    """On a disk with 1 MiB free, 6 MB and 1.5 MB bodies reach the client whole and
    are not stored (tmp/ empty, ENOSPC logged); freed space is used again."""
    cache_dir = small_fs / "cache"
    big, medium, small = _body(6 * MB, 1), _body(1536 * 1024, 2), _body(4096, 3)
    big_url = origin.static("/big.iso", big, CACHEABLE)
    medium_url = origin.static("/medium.bin", medium, CACHEABLE)
    small_url = origin.static("/small.bin", small, CACHEABLE)
    running = await start_proxy(tmp_path, cache_dir=str(cache_dir))
    try:
        filler = _fill(small_fs, leave=MB)
        for url, body in ((big_url, big), (big_url, big), (medium_url, medium)):
            response = await fetch(running.port, "GET", url)
            assert response.status == 200
            assert response.body == body
            assert _partials(cache_dir) == []
        assert origin.count("/big.iso") == 2
        # One warning for the whole outage, not one per response.
        assert len(logged.disk_full()) == 1
        await fetch(running.port, "GET", small_url)
        fits = await fetch(running.port, "GET", small_url)
        assert fits.header("Cache-Status").startswith("cacheproxy; hit")
        assert fits.body == small
        filler.unlink()
        stored = await fetch(running.port, "GET", medium_url)
        hit = await fetch(running.port, "GET", medium_url)
    finally:
        await running.service.stopService()
    assert stored.header("Cache-Status") == STORED
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert hit.body == medium
    assert origin.count("/medium.bin") == 2
    assert _partials(cache_dir) == []


@pytest_twisted.ensureDeferred
async def test_full_disk_at_commit_is_a_miss_and_the_proxy_serves_on(
    origin: Origin, small_fs: Path, tmp_path: Path, logged: _Logged
):
    """With no byte free, a 2 KiB body (buffered until the commit) is relayed, the
    commit fails and is logged, nothing is stored; once space returns it is."""
    cache_dir = small_fs / "cache"
    body = _body(2048, 4)
    url = origin.static("/tiny.bin", body, CACHEABLE)
    running = await start_proxy(tmp_path, cache_dir=str(cache_dir))
    try:
        filler = _fill(small_fs, leave=0)
        first = await fetch(running.port, "GET", url)
        second = await fetch(running.port, "GET", url)
        assert (first.body, second.body) == (body, body)
        # Sent before the commit, "stored" only announces the attempt; fwd=miss
        # says the second request was not served from the store.
        assert second.header("Cache-Status") == STORED
        assert origin.count("/tiny.bin") == 2
        assert _partials(cache_dir) == []
        assert logged.disk_full()
        filler.unlink()
        stored = await fetch(running.port, "GET", url)
        hit = await fetch(running.port, "GET", url)
    finally:
        await running.service.stopService()
    assert stored.header("Cache-Status") == STORED
    assert hit.header("Cache-Status").startswith("cacheproxy; hit")
    assert hit.body == body
    assert origin.count("/tiny.bin") == 3


# -- two processes on one cache directory ----------------------------------------------


@dataclass
class _ThreadOrigin:
    """An origin in a thread (the proxies are other processes): fixed bodies by
    path, hits counted; a path in ``stalls`` stops at that offset until released.
    """

    bodies: dict[str, bytes] = field(default_factory=dict)
    hits: collections.Counter[str] = field(default_factory=collections.Counter)
    stalls: dict[str, int] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    def add(self, path: str, body: bytes) -> str:
        self.bodies[path] = body
        return f"http://{HOST}:{self.port}{path}"


@pytest.fixture
def thread_origin() -> Iterator[_ThreadOrigin]:
    state = _ThreadOrigin()
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            with lock:
                state.hits[self.path] += 1
            body = state.bodies.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            for name, value in CACHEABLE.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            stall = state.stalls.get(self.path, -1)
            step = 64 * 1024
            try:
                for offset in range(0, len(body), step):
                    if offset == stall:
                        state.release.wait(DEADLINE)
                    self.wfile.write(body[offset : offset + step])
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


def _get(
    port: int, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` through the proxy at ``port``; raises if the body is cut short."""
    connection = http.client.HTTPConnection(HOST, port, timeout=DEADLINE)
    try:
        connection.request("GET", url, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, dict(response.getheaders()), body
    finally:
        connection.close()


def _hit(port: int, url: str, timeout: float = 3.0) -> tuple[dict[str, str], bytes]:
    """Ask with only-if-cached until the proxy has ``url`` stored (504 until then)."""
    deadline = time.monotonic() + timeout
    while True:
        status, headers, body = _get(port, url, {"Cache-Control": "only-if-cached"})
        if status == 200:
            return headers, body
        assert status == 504, status
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} not a hit on port {port} within {timeout} s")
        time.sleep(0.05)


def _wait_until(predicate: Any, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def test_two_processes_store_concurrently_and_serve_each_others(
    tmp_path: Path, thread_origin: _ThreadOrigin, capsys: Any
):
    """Two proxies on one cache dir store different URLs at once; each then serves
    the other's as hits, byte-exact, and ``cacheproxy ls`` lists every one."""
    sizes = [10_000, MB, 100, 300_000, 2 * MB, 0]
    wanted = {
        thread_origin.add(f"/{side}{i}", _body(size, i + (50 if side == "b" else 0))): (
            side
        )
        for side in "ab"
        for i, size in enumerate(sizes)
    }
    a, b = TwistdProxy(tmp_path), TwistdProxy(tmp_path)
    with a.running(), b.running():
        ports = {"a": a.port, "b": b.port}
        with ThreadPoolExecutor(len(wanted)) as pool:
            futures = {
                url: pool.submit(_get, ports[side], url) for url, side in wanted.items()
            }
            first = {url: future.result(DEADLINE) for url, future in futures.items()}
        for url, (status, headers, body) in first.items():
            assert status == 200
            assert headers["Cache-Status"] == STORED
            assert body == thread_origin.bodies[_path(url)]
        for url, side in wanted.items():
            other = ports["b" if side == "a" else "a"]
            headers, body = _hit(other, url)
            assert headers["Cache-Status"].startswith("cacheproxy; hit")
            assert body == thread_origin.bodies[_path(url)]
        listed = _ls(a.cache_dir, capsys)
    assert sorted(item["url"] for item in listed) == sorted(wanted)
    for item in listed:
        assert item["size"] == len(thread_origin.bodies[_path(item["url"])])
    assert all(count == 1 for count in thread_origin.hits.values())
    assert _partials(a.cache_dir) == []
    assert "Traceback" not in a.output() + b.output()


def test_second_process_starting_mid_store_does_not_break_it(
    tmp_path: Path, thread_origin: _ThreadOrigin
):
    """A proxy opened on the cache dir while another stores a body cleans tmp/; the
    first one's body is still stored whole and both serve it as a hit."""
    body = _body(4 * MB, 9)
    url = thread_origin.add("/moving.iso", body)
    thread_origin.stalls["/moving.iso"] = 2 * MB
    a, b = TwistdProxy(tmp_path), TwistdProxy(tmp_path)
    with a.running(), ThreadPoolExecutor(1) as pool:
        transfer = pool.submit(_get, a.port, url)
        _wait_until(
            lambda: any(p.stat().st_size >= MB for p in _partials(a.cache_dir)),
            "the partial body reached tmp/",
        )
        with b.running():
            assert _partials(a.cache_dir) == []
            thread_origin.release.set()
            status, headers, relayed = transfer.result(DEADLINE)
            assert (status, headers["Cache-Status"]) == (200, STORED)
            assert relayed == body
            for proxy in (b, a):
                hit_headers, hit_body = _hit(proxy.port, url)
                assert hit_body == body
    assert thread_origin.hits["/moving.iso"] == 1
    assert "Traceback" not in a.output() + b.output()


# -- the cacheproxy command beside a running proxy -------------------------------------


def _har_bodies(path: Path) -> dict[str, bytes]:
    """URL to body of every entry of the HAR file at ``path``."""
    entries = json.loads(path.read_text())["log"]["entries"]
    bodies = {}
    for entry in entries:
        content = entry["response"]["content"]
        text = content.get("text", "")
        if content.get("encoding") == "base64":
            bodies[entry["request"]["url"]] = base64.b64decode(text)
        else:
            bodies[entry["request"]["url"]] = text.encode("utf-8")
    return bodies


def test_export_while_the_proxy_stores_is_valid_har(
    tmp_path: Path, thread_origin: _ThreadOrigin, capsys: Any
):
    """``cacheproxy export`` run again and again while the proxy stores 24 URLs
    writes valid HAR files of complete bodies; the last one has all of them."""
    urls = {
        thread_origin.add(f"/e{i}", _body(200_000 + i * 1000, i)): i for i in range(24)
    }
    proxy = TwistdProxy(tmp_path)
    exports = 0
    with proxy.running(), ThreadPoolExecutor(1) as pool:

        def store_all() -> None:
            for url in urls:
                assert _get(proxy.port, url)[1]["Cache-Status"] == STORED

        storing = pool.submit(store_all)
        while True:
            finished = storing.done()
            har = tmp_path / f"export{exports}.har"
            assert main(["export", str(har), "--cache-dir", str(proxy.cache_dir)]) == 0
            exports += 1
            for url, body in _har_bodies(har).items():
                assert body == thread_origin.bodies[_path(url)]
            if finished:
                break
        storing.result(DEADLINE)
    capsys.readouterr()
    assert exports >= 2
    assert sorted(_har_bodies(har)) == sorted(urls)
    assert "Traceback" not in proxy.output()


def test_purge_while_serving_a_hit_then_refetched(
    tmp_path: Path, thread_origin: _ThreadOrigin, capsys: Any
):
    """``cacheproxy purge`` during a 4 MB hit: that client still gets every byte,
    and the next request goes to the origin and stores the URL again."""
    body = _body(4 * MB, 11)
    url = thread_origin.add("/served.iso", body)
    with TwistdProxy(tmp_path).running() as proxy:
        assert _get(proxy.port, url)[1]["Cache-Status"] == STORED
        connection = http.client.HTTPConnection(HOST, proxy.port, timeout=DEADLINE)
        try:
            connection.request("GET", url)
            response = connection.getresponse()
            assert response.getheader("Cache-Status") == "cacheproxy; hit"
            received = response.read(MB)
            assert main(["purge", url, "--cache-dir", str(proxy.cache_dir)]) == 0
            received += response.read()
        finally:
            connection.close()
        assert received == body
        status, headers, again = _get(proxy.port, url)
        assert (status, headers["Cache-Status"], again) == (200, STORED, body)
        assert _hit(proxy.port, url)[1] == body
    capsys.readouterr()
    assert thread_origin.hits["/served.iso"] == 2
    assert "Traceback" not in proxy.output()


def test_purged_small_entry_is_refetched_within_seconds(
    tmp_path: Path, thread_origin: _ThreadOrigin, capsys: Any
):
    """A small hot entry (its body in the memory tier) purged by the command is
    fetched from the origin again within 3 s."""
    body = _body(5000, 12)
    url = thread_origin.add("/hot.txt", body)
    with TwistdProxy(tmp_path).running() as proxy:
        assert _get(proxy.port, url)[1]["Cache-Status"] == STORED
        assert _get(proxy.port, url)[1]["Cache-Status"].startswith("cacheproxy; hit")
        assert main(["purge", url, "--cache-dir", str(proxy.cache_dir)]) == 0
        deadline = time.monotonic() + 3.0
        while True:
            status, headers, got = _get(proxy.port, url)
            assert (status, got) == (200, body)
            if headers["Cache-Status"] == STORED:
                break
            assert time.monotonic() < deadline, "the purge was not seen within 3 s"
            time.sleep(0.05)
    capsys.readouterr()
    assert thread_origin.hits["/hot.txt"] == 2


def test_purge_by_the_command_is_seen_after_the_memory_ttl(
    tmp_path: Path, thread_origin: _ThreadOrigin, capsys: Any
):
    """Once the memory tier's ttl (1 s) has passed since a purge by the command, the
    first request for the purged URL goes to the origin (memory.py's coherence)."""
    body = _body(5000, 13)
    url = thread_origin.add("/stale-snapshot.txt", body)
    with TwistdProxy(tmp_path).running() as proxy:
        assert _get(proxy.port, url)[1]["Cache-Status"] == STORED
        assert _get(proxy.port, url)[1]["Cache-Status"].startswith("cacheproxy; hit")
        assert main(["purge", url, "--cache-dir", str(proxy.cache_dir)]) == 0
        time.sleep(1.5)  # the ttl passing is the condition under test
        status, headers, got = _get(proxy.port, url)
    capsys.readouterr()
    assert headers["Cache-Status"] == STORED
    assert thread_origin.hits["/stale-snapshot.txt"] == 2
