"""--workers: one listening socket, several processes, restarted when they die."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

from tests.test_plugin import DEADLINE, TWISTD, _Handler, _lines, thread_origin

__all__ = ["thread_origin"]


def _wait_for(lines: queue.Queue[str], pattern: str, seen: list[str]) -> re.Match[str]:
    """The first log line matching ``pattern``, within the deadline."""
    while True:
        try:
            line = lines.get(timeout=DEADLINE)
        except queue.Empty:
            raise AssertionError(f"no {pattern!r} in:\n" + "".join(seen)) from None
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


def test_workers_share_the_port_and_come_back(tmp_path: Path, thread_origin: str):
    """Two workers serve one port; a killed worker is restarted; SIGTERM stops all."""
    process = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "cacheproxy",
            "--workers",
            "2",
            "-p",
            "tcp:0:interface=127.0.0.1",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--access-log",
            str(tmp_path / "access.log"),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    try:
        lines = _lines(process)
        port = int(_wait_for(lines, r"listening on 127\.0\.0\.1:(\d+) with 2", seen)[1])
        pids = [int(_wait_for(lines, r"started worker \d \(pid (\d+)\)", seen)[1])]
        pids.append(int(_wait_for(lines, r"started worker \d \(pid (\d+)\)", seen)[1]))
        # Both workers are ready once each has said it listens.
        _wait_for(lines, r"worker \d: .*listening on", seen)
        _wait_for(lines, r"worker \d: .*listening on", seen)
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}"})
        )
        url = thread_origin + "/shared"
        bodies = [opener.open(url, timeout=DEADLINE).read() for _ in range(6)]
        assert bodies == [b"hello from the origin"] * 6
        assert _Handler.hits >= 1
        os.kill(pids[0], signal.SIGKILL)
        _wait_for(lines, r"worker \d ended .*starting it again", seen)
        _wait_for(lines, r"started worker \d \(pid \d+\)", seen)
        again = [opener.open(url, timeout=DEADLINE).read() for _ in range(4)]
        assert again == [b"hello from the origin"] * 4
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=DEADLINE)
    assert process.returncode in (0, -signal.SIGTERM)
    for pid in pids[1:]:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
