"""The twistd plugin, run as users run it: ``twistd -n cacheproxy`` in a subprocess."""

from __future__ import annotations

import http.server
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.twistd_support import DEADLINE, TWISTD, TwistdProxy


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        body = b"hello from the origin"
        self.send_response(200)
        self.send_header("Cache-Control", "max-age=60")
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def thread_origin() -> Iterator[str]:
    """An origin in a thread, since the test blocks the reactor's thread."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_twistd_runs_the_plugin(tmp_path: Path, thread_origin: str):
    """twistd finds the plugin; the proxy relays, caches, logs, and stops on SIGTERM."""
    log = tmp_path / "log" / "access.log"
    proxy = TwistdProxy(tmp_path, "--access-log", str(log))
    port = proxy.start()
    try:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}"})
        )
        url = thread_origin + "/greeting"
        with opener.open(url, timeout=DEADLINE) as first:
            assert first.read() == b"hello from the origin"
            assert first.headers["Cache-Status"] == "cacheproxy; fwd=miss; stored"
        with opener.open(url, timeout=DEADLINE) as second:
            assert second.read() == b"hello from the origin"
            assert second.headers["Cache-Status"] == "cacheproxy; hit"
        assert _Handler.hits == 1
    finally:
        proxy.stop()
    # twistd re-raises the signal that stopped it, so its status says SIGTERM.
    assert proxy.returncode in (0, -signal.SIGTERM)
    lines = log.read_text().splitlines()
    assert [line.split()[3] for line in lines] == ["TCP_MISS/200", "TCP_MEM_HIT/200"]
    assert (tmp_path / "cache" / "proxy-id").exists()


def test_bad_option_is_a_usage_error(tmp_path: Path):
    """A bad size is reported as a usage error, without a traceback."""
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "cacheproxy", "--cache-size", "lots"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "not a size" in output
    assert "Traceback" not in output


def test_damaged_cache_database_stops_with_one_line(tmp_path: Path):
    """A cache database that is not SQLite stops the proxy at once with a clear
    message naming the directory, not a traceback (nor, with --workers, a restart
    loop)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "cache.db").write_bytes(b"this is not a database" * 1000)
    for extra in ([], ["--workers", "2"]):
        result = subprocess.run(
            [TWISTD, "-n", "--pidfile=", "cacheproxy", "--cache-dir", str(cache)]
            + ["-p", "tcp:0:interface=127.0.0.1", *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert f"cannot open the cache in {cache}" in output
        assert "Traceback" not in output
