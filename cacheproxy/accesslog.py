"""The access log: one line per request in Squid's native format, buffered.

Squid's ``logformat squid``, field by field:
``time.ms elapsed_ms client code/status bytes method URL - hierarchy/peer type``.
Lines are collected in memory and written at most a second later (and at shutdown),
so a response never waits for the disk.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cacheproxy.model import RequestHead, header_value

log = Logger()


def squid_line(
    *,
    now: float,
    elapsed: float,
    client: str,
    code: str,
    status: int,
    size: int,
    method: bytes,
    url: bytes,
    hierarchy: str,
    content_type: bytes | None,
) -> str:
    """One access-log line in Squid's native format, without the newline."""
    millis = int(now * 1000)
    elapsed_ms = int(elapsed * 1000)
    # %-formatting: about twice as fast as the f-string, on every request.
    return "%d.%03d %6d %s %s/%03d %d %s %s - %s %s" % (  # noqa: UP031
        millis // 1000,
        millis % 1000,
        elapsed_ms if elapsed_ms > 0 else 0,
        client,
        code,
        status,
        size,
        _token(method),
        _token(url),
        hierarchy,
        _token(content_type) if content_type else "-",
    )


_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()


def combined_line(
    *, now: float, client: str, request: RequestHead, status: int, size: int
) -> str:
    """One line in the Apache/NCSA combined format, without the newline.

    ``client - - [day/Mon/year:H:M:S +0000] "METHOD URL HTTP/v" status bytes
    "referer" "user-agent"``, times in UTC.
    """
    t = time.gmtime(now)
    stamp = (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )
    line = b"%s %s HTTP/%s" % (request.method, request.target, request.version)
    referer = header_value(request.headers, b"referer") or b"-"
    agent = header_value(request.headers, b"user-agent") or b"-"
    return (
        f'{client} - - [{stamp}] "{_quoted(line)}" {status:03d} {size} '
        f'"{_quoted(referer)}" "{_quoted(agent)}"'
    )


def _quoted(value: bytes) -> str:
    """A field for inside double quotes: quotes, backslashes, controls escaped."""
    text = value.decode("latin-1")
    return "".join(
        f"\\x{ord(c):02x}" if c in '"\\' or not " " <= c < "\x7f" else c for c in text
    )


@functools.lru_cache(maxsize=4096)
def _token(value: bytes) -> str:
    """A log field from raw bytes; spaces and control characters are escaped."""
    text = value.decode("latin-1")
    if text.isascii() and text.isprintable() and " " not in text:
        return text or "-"
    return "".join(c if " " < c < "\x7f" else f"%{ord(c):02X}" for c in text) or "-"


class AccessLog(Service):
    """Buffers access-log lines and flushes them every second and at stop.

    @ivar path: the log file, or ``"-"`` for standard output.
    """

    def __init__(self, path: str, reactor: Any, interval: float = 1.0) -> None:
        self.path = path
        self._lines: list[str] = []
        self._file: IO[str] | None = None
        self._loop = LoopingCall(self.flush)
        self._loop.clock = reactor
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._open()
        self._loop.start(self._interval, now=False)

    def _open(self) -> None:
        if self.path == "-":
            # twistd points sys.stdout at its own log; the access log wants the
            # process's real standard output, one plain line per request.
            self._file = sys.__stdout__ or sys.stdout
            return
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def reopen(self) -> None:
        """Flush, close and open the file again (after logrotate moved it)."""
        self.flush()
        if self._file is not None and self.path != "-":
            self._file.close()
        try:
            self._open()
        except OSError:
            log.failure("cannot reopen the access log {path}", path=self.path)
            self._file = None

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self.flush()
        if self._file is not None and self.path != "-":
            self._file.close()
        self._file = None

    def write(self, line: str) -> None:
        """Queue one line."""
        self._lines.append(line)

    def flush(self) -> None:
        """Write the queued lines."""
        if not self._lines or self._file is None:
            return
        lines, self._lines = self._lines, []
        try:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
        except OSError:
            log.failure("cannot write the access log {path}", path=self.path)
