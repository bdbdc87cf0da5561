"""--workers: one listening socket, several processes, restarted when they die."""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from pathlib import Path

from tests.test_plugin import _Handler, thread_origin
from tests.twistd_support import DEADLINE, TwistdProxy

__all__ = ["thread_origin"]


def test_workers_share_the_port_and_come_back(tmp_path: Path, thread_origin: str):
    """Two workers serve one port; a killed worker is restarted; SIGTERM stops all."""
    proxy = TwistdProxy(tmp_path, "--workers", "2")
    port = proxy.start(r"listening on 127\.0\.0\.1:(\d+) with 2")
    pids: list[int] = []
    try:
        pids.append(int(proxy.wait_for(r"started worker \d \(pid (\d+)\)")[1]))
        pids.append(int(proxy.wait_for(r"started worker \d \(pid (\d+)\)")[1]))
        # Both workers are ready once each has said it listens.
        proxy.wait_for(r"worker \d: .*listening on")
        proxy.wait_for(r"worker \d: .*listening on")
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}"})
        )
        url = thread_origin + "/shared"
        bodies = [opener.open(url, timeout=DEADLINE).read() for _ in range(6)]
        assert bodies == [b"hello from the origin"] * 6
        assert _Handler.hits >= 1
        os.kill(pids[0], signal.SIGKILL)
        proxy.wait_for(r"worker \d ended .*starting it again")
        proxy.wait_for(r"started worker \d \(pid \d+\)")
        again = [opener.open(url, timeout=DEADLINE).read() for _ in range(4)]
        assert again == [b"hello from the origin"] * 4
    finally:
        proxy.stop()
    assert proxy.returncode in (0, -signal.SIGTERM)
    for pid in pids[1:]:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_pages_say_which_worker_answered(tmp_path: Path):
    """With --workers, the status page and /metrics name the process that answered,
    since their figures are that process's own."""
    proxy = TwistdProxy(tmp_path, "--workers", "2")
    port = proxy.start(r"listening on 127\.0\.0\.1:(\d+) with 2")
    try:
        pids = {
            int(proxy.wait_for(r"started worker \d \(pid (\d+)\)")[1]) for _ in "12"
        }
        proxy.wait_for(r"worker \d: .*listening on")
        proxy.wait_for(r"worker \d: .*listening on")
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        base = f"http://127.0.0.1:{port}"
        page = direct.open(base + "/", timeout=DEADLINE).read().decode()
        match = re.search(r"answered by worker ([12]) of 2 \(pid (\d+)\)", page)
        assert match is not None, page
        assert int(match[2]) in pids
        metrics = direct.open(base + "/metrics", timeout=DEADLINE).read().decode()
        match = re.search(
            r'^cacheproxy_worker\{pid="(\d+)",worker="([12])",workers="2"\} 1\.0$',
            metrics,
            re.MULTILINE,
        )
        assert match is not None, metrics
        assert int(match[1]) in pids
    finally:
        proxy.stop()


def test_a_single_process_names_no_worker(tmp_path: Path):
    proxy = TwistdProxy(tmp_path)
    port = proxy.start()
    try:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        base = f"http://127.0.0.1:{port}"
        page = direct.open(base + "/", timeout=DEADLINE).read().decode()
        assert "cacheproxy" in page
        assert "answered by worker" not in page
        metrics = direct.open(base + "/metrics", timeout=DEADLINE).read().decode()
        assert "cacheproxy_requests_total" in metrics
        assert "cacheproxy_worker" not in metrics
    finally:
        proxy.stop()
