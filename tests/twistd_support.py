"""``twistd -n cacheproxy`` in a subprocess, for the tests where a process boundary
matters: the plugin as users run it, ``--workers``, SIGKILL, a fuzzer that must not
take the test process down with it.

Its output is read by a thread into a list; tests wait for lines matching a pattern,
each wait bounded by L{DEADLINE}.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

TWISTD = str(Path(sys.executable).with_name("twistd"))
HOST = "127.0.0.1"
DEADLINE = 30.0
LISTENING = r"listening on 127\.0\.0\.1:(\d+)"


class TwistdProxy:
    """``twistd -n cacheproxy`` on 127.0.0.1, its port read from its log line
    ``listening on 127.0.0.1:PORT``.

    @ivar directory: the working directory; holds ``cache/`` and ``access.log``.
    @ivar options: extra command-line options (a later ``--access-log`` wins).
    @ivar port: the port of the running process, 0 before it listens.
    """

    def __init__(self, directory: Path, *options: str) -> None:
        self.directory = directory
        self.options = options
        self.port = 0
        self._process: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._cursor = 0
        self._changed = threading.Condition()

    @property
    def cache_dir(self) -> Path:
        return self.directory / "cache"

    @property
    def returncode(self) -> int | None:
        """The exit status once the process ended (``-N``: killed by signal N)."""
        return None if self._process is None else self._process.poll()

    def start(self, listening: str = LISTENING) -> int:
        """Start the process and wait for ``listening``; return the port it names."""
        self._lines, self._cursor = [], 0
        self._process = subprocess.Popen(
            [
                TWISTD,
                "-n",
                "--pidfile=",
                "cacheproxy",
                "-p",
                f"tcp:0:interface={HOST}",
                "--cache-dir",
                str(self.cache_dir),
                "--access-log",
                str(self.directory / "access.log"),
                *self.options,
            ],
            cwd=self.directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Each process's reader appends to that process's own list: a reader still
        # draining a killed process cannot slip its old lines into the new one's.
        threading.Thread(
            target=self._pump, args=(self._process, self._lines), daemon=True
        ).start()
        try:
            self.port = int(self.wait_for(listening)[1])
        except AssertionError:
            self.kill()
            raise
        return self.port

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The next line (after those matched before) that matches ``pattern``."""
        with self._changed:
            while True:
                while self._cursor < len(self._lines):
                    line = self._lines[self._cursor]
                    self._cursor += 1
                    match = re.search(pattern, line)
                    if match:
                        return match
                ended = self._process is None or self._process.poll() is not None
                if ended or not self._changed.wait(DEADLINE):
                    raise AssertionError(f"no {pattern!r} in:\n" + self.output())

    def _pump(self, process: subprocess.Popen[str], lines: list[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self._changed:
                lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        """Everything the process logged so far."""
        return "".join(self._lines)

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=DEADLINE)

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not stop in time."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.kill()

    @contextlib.contextmanager
    def running(self) -> Iterator[TwistdProxy]:
        """Started on entry, stopped on exit."""
        self.start()
        try:
            yield self
        finally:
            self.stop()
