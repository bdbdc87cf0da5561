"""Fault injection at the process boundary: a proxy killed with SIGKILL while it
stores a body, and body files changed behind a running proxy's back.  The store never
serves a truncated body: a URL is a miss or a complete hit."""

from __future__ import annotations

import http.client
import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import diskcache
import pytest

from cacheproxy.policy import cache_key
from cacheproxy.store import Store
from tests.twistd_support import DEADLINE, HOST, TwistdProxy

MB = 1 << 20


def _get(port: int, url: str) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` through the proxy at ``port``; raises if the body is cut short."""
    connection = http.client.HTTPConnection(HOST, port, timeout=DEADLINE)
    try:
        connection.request("GET", url)
        response = connection.getresponse()
        body = response.read()
        return response.status, dict(response.getheaders()), body
    finally:
        connection.close()


def _body_files(cache_dir: Path) -> list[Path]:
    """The bodies diskcache keeps as files of their own (``*/*/*.val``)."""
    return sorted(
        path for path in cache_dir.glob("*/*/*.val") if path.parts[-3] != "tmp"
    )


def _big_body(size: int) -> bytes:
    """``size`` bytes that are not one repeated byte, so a misplaced piece shows."""
    block = bytes(range(256)) * 4096
    return (block * (size // len(block) + 1))[:size]


class _Slow(http.server.BaseHTTPRequestHandler):
    """Serves a 50 MB body in 256 KiB chunks; the first time it stops half-way
    until ``release`` is set (or the client goes away)."""

    protocol_version = "HTTP/1.1"
    size = 50 * MB
    body = b""
    hits = 0
    stall_at = 10 * MB
    release = threading.Event()

    def do_GET(self) -> None:
        cls = type(self)
        cls.hits += 1
        first = cls.hits == 1
        self.send_response(200)
        self.send_header("Cache-Control", "max-age=600")
        self.send_header("Content-Length", str(cls.size))
        self.end_headers()
        step = 256 * 1024
        try:
            for offset in range(0, cls.size, step):
                if first and offset == cls.stall_at:
                    cls.release.wait(DEADLINE)
                self.wfile.write(cls.body[offset : offset + step])
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_origin() -> Iterator[str]:
    """The 50 MB origin, in a thread (the test blocks the reactor's thread)."""
    _Slow.hits = 0
    _Slow.body = _big_body(_Slow.size)
    _Slow.release = threading.Event()
    origin = http.server.ThreadingHTTPServer((HOST, 0), _Slow)
    origin.daemon_threads = True
    thread = threading.Thread(target=origin.serve_forever, daemon=True)
    thread.start()
    yield f"http://{HOST}:{origin.server_address[1]}"
    _Slow.release.set()
    origin.shutdown()
    origin.server_close()


def _wait_until(predicate, what: str, timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` until it holds, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def _read_until(port: int, url: str, count: int) -> http.client.HTTPConnection:
    """Start a GET through the proxy and read at least ``count`` body bytes; the
    connection is returned open, its transfer under way."""
    connection = http.client.HTTPConnection(HOST, port, timeout=DEADLINE)
    connection.request("GET", url)
    response = connection.getresponse()
    assert response.status == 200
    received = 0
    while received < count:
        chunk = response.read1(1 << 16)
        assert chunk, "the body ended early"
        received += len(chunk)
    return connection


def _partial_bodies(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "tmp").iterdir() if p.is_file()]


def test_sigkill_while_storing_leaves_a_miss_not_a_truncated_hit(
    tmp_path: Path, slow_origin: str
):
    """SIGKILL mid-store of 50 MB: restart cleans tmp/ and the URL is a whole miss."""
    url = slow_origin + "/big.iso"
    proxy = TwistdProxy(tmp_path)
    port = proxy.start()
    transfer = None
    try:
        transfer = _read_until(port, url, 8 * MB)
        _wait_until(
            lambda: any(
                p.stat().st_size >= 8 * MB for p in _partial_bodies(proxy.cache_dir)
            ),
            "the partial body reached the disk",
        )
    finally:
        proxy.kill()
        if transfer is not None:
            transfer.close()
    assert _partial_bodies(proxy.cache_dir), "a partial body should be left behind"
    _Slow.release.set()

    with proxy.running():
        assert _partial_bodies(proxy.cache_dir) == []
        status, headers, body = _get(proxy.port, url)
        assert status == 200
        assert headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
        assert body == _Slow.body
        assert _Slow.hits == 2
        status, headers, body = _get(proxy.port, url)
        assert headers["Cache-Status"].startswith("cacheproxy; hit")
        assert body == _Slow.body
        assert _Slow.hits == 2
    assert "Traceback" not in proxy.output()
    store = Store.open_existing(str(proxy.cache_dir))
    try:
        (entry,) = store.lookup(cache_key(url.encode()))
        assert entry.body_length == _Slow.size
    finally:
        store.close()


def test_sigkill_after_storing_keeps_a_complete_hit(tmp_path: Path, slow_origin: str):
    """A body committed before a SIGKILL is a complete hit after the restart."""
    _Slow.release.set()
    url = slow_origin + "/kept.iso"
    proxy = TwistdProxy(tmp_path)
    port = proxy.start()
    try:
        status, headers, body = _get(port, url)
        assert headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    finally:
        proxy.kill()
    with proxy.running():
        status, headers, body = _get(proxy.port, url)
    assert status == 200
    assert headers["Cache-Status"].startswith("cacheproxy; hit")
    assert body == _Slow.body
    assert _Slow.hits == 1
    assert "Traceback" not in proxy.output()


class _Counting(http.server.BaseHTTPRequestHandler):
    """Serves a 1 MiB cacheable body (past the memory tier's per-item limit)."""

    protocol_version = "HTTP/1.1"
    body = _big_body(MB)
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Cache-Control", "max-age=600")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def counting_origin() -> Iterator[str]:
    _Counting.hits = 0
    origin = http.server.ThreadingHTTPServer((HOST, 0), _Counting)
    origin.daemon_threads = True
    thread = threading.Thread(target=origin.serve_forever, daemon=True)
    thread.start()
    yield f"http://{HOST}:{origin.server_address[1]}"
    origin.shutdown()
    origin.server_close()


def _delete(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _grow(path: Path) -> None:
    with path.open("ab") as file:
        file.write(b"extra bytes")


def _empty(path: Path) -> None:
    os.truncate(path, 0)


def _stored_again(proxy: TwistdProxy, url: str, headers: dict[str, str]) -> None:
    """The response with ``headers`` was fetched and stored anew; the next request
    for ``url`` is a hit with the right bytes."""
    assert headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
    status, headers, body = _get(proxy.port, url)
    assert headers["Cache-Status"].startswith("cacheproxy; hit")
    assert (status, body) == (200, _Counting.body)


@pytest.mark.parametrize(
    "damage",
    [_delete, _truncate, _grow, _empty],
    ids=["deleted", "truncated", "grown", "emptied"],
)
def test_damaged_body_file_is_a_miss(tmp_path: Path, counting_origin: str, damage):
    """A body file changed behind the proxy's back is a miss, fetched and stored."""
    url = counting_origin + "/file.bin"
    with TwistdProxy(tmp_path).running() as proxy:
        status, headers, body = _get(proxy.port, url)
        assert headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
        status, headers, body = _get(proxy.port, url)
        assert headers["Cache-Status"].startswith("cacheproxy; hit")
        (stored,) = _body_files(proxy.cache_dir)
        damage(stored)
        status, headers, body = _get(proxy.port, url)
        assert status == 200
        assert body == _Counting.body
        assert _Counting.hits == 2
        _stored_again(proxy, url, headers)
    assert _Counting.hits == 2
    assert "Traceback" not in proxy.output()


def _damage_metadata(cache_dir: Path, url: str, text: str) -> None:
    """Overwrite the stored metadata of ``url`` with ``text``, as a damaged row
    or another program writing into the cache directory would leave it."""
    key = "m:" + cache_key(url.encode())
    with diskcache.Cache(str(cache_dir)) as cache:
        assert isinstance(cache.get(key), str), "the test must damage a stored row"
        cache.set(key, text)


@pytest.mark.parametrize(
    "text",
    [
        "not json {",
        "42",
        "{}",
        '[{"url": 1}]',
        '[{"vary": [], "url": "u", "status": "OK", "reason": "", "headers": [],'
        ' "request_time": 0, "response_time": 0, "body_length": 1, "body_id": "x"}]',
        '[{"vary": [], "url": "u", "status": 200, "reason": "", "headers": [[1, 2]],'
        ' "request_time": 0, "response_time": 0, "body_length": 1, "body_id": "x"}]',
    ],
    ids=["not-json", "number", "object", "missing-fields", "bad-status", "bad-headers"],
)
def test_damaged_metadata_is_a_miss(tmp_path: Path, counting_origin: str, text: str):
    """Metadata that cannot be read is a miss: the URL is fetched and stored again,
    never answered with a 500 or wrong bytes, and the proxy keeps running."""
    url = counting_origin + "/meta.bin"
    with TwistdProxy(tmp_path).running() as proxy:
        _get(proxy.port, url)
        status, headers, _ = _get(proxy.port, url)
        assert headers["Cache-Status"].startswith("cacheproxy; hit")
        _damage_metadata(proxy.cache_dir, url, text)
        # The proxy trusts what it read of a URL's metadata for up to a second
        # (docs/caching.md); until it reads the damaged row it answers from the
        # intact copy, which is still right.
        deadline = time.monotonic() + DEADLINE
        while True:
            status, headers, body = _get(proxy.port, url)
            assert (status, body) == (200, _Counting.body)
            if not headers["Cache-Status"].startswith("cacheproxy; hit"):
                break
            assert time.monotonic() < deadline, "the damaged row was never read"
            time.sleep(0.05)
        _stored_again(proxy, url, headers)
    assert _Counting.hits == 2
    assert "Traceback" not in proxy.output()
