"""A slow client fetches a large body through a proxy; the proxy's RSS must stay low.

nginx serves a sparse file (default 1 GiB) on 127.0.0.1; a client with a 64 KiB
receive buffer fetches it through cacheproxy (which also writes it to its store,
--max-object-size 2G) reading at a fixed rate (default 64 MiB/s), while a thread
samples the proxy's VmRSS every 0.1 s. Then the same through Squid for comparison,
and a fast (unthrottled) second fetch of the same URL through each.

Exits 1 if cacheproxy's peak RSS reaches --limit (default 100 MiB), 2 if a transfer
went wrong (wrong status, byte count or content).

    .venv/bin/python bench/slow_client.py [--size 1G --rate 64M]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    from bench import common
except ImportError:  # run as a script: bench/ itself is sys.path[0]
    import common  # type: ignore[no-redef]

CHUNK = 64 * 1024
HEAD_LIMIT = 64 * 1024
RECV_TIMEOUT = 30.0


class TransferError(Exception):
    """The response was not the expected body."""


@dataclass
class Fetched:
    status: int
    head: bytes
    body_bytes: int
    seconds: float


class _Reader:
    """Reads a socket at most ``rate`` bytes/s (0: unlimited), before a deadline."""

    def __init__(self, sock: socket.socket, rate: float, deadline: float) -> None:
        self.sock = sock
        self.rate = rate
        self.deadline = deadline
        self.buf = bytearray()
        self.scratch = bytearray(CHUNK)
        self.received = 0
        self.t0 = time.monotonic()

    def _recv_into(self, view: memoryview) -> int:
        now = time.monotonic()
        if now > self.deadline:
            raise TimeoutError("the transfer overran its deadline")
        if self.rate:
            ahead = self.t0 + self.received / self.rate - now
            if ahead > 0:
                time.sleep(ahead)
        n = self.sock.recv_into(view)
        self.received += n
        return n

    def _fill(self) -> int:
        n = self._recv_into(memoryview(self.scratch))
        self.buf += memoryview(self.scratch)[:n]
        return n

    def until(self, marker: bytes, limit: int) -> bytes:
        """Bytes up to and including ``marker``."""
        while True:
            at = self.buf.find(marker)
            if at >= 0:
                out = bytes(self.buf[: at + len(marker)])
                del self.buf[: at + len(marker)]
                return out
            if len(self.buf) > limit:
                raise TransferError(f"no {marker!r} within {limit} bytes")
            if not self._fill():
                raise TransferError("connection closed early")

    def body(self, length: int | None, zeros: bool) -> int:
        """Consume ``length`` bytes (None: until EOF); returns how many came."""
        got = 0
        while length is None or got < length:
            if self.buf:
                take = len(self.buf) if length is None else min(len(self.buf), length)
                chunk = bytes(self.buf[:take])
                del self.buf[:take]
                if zeros and chunk.count(0) != take:
                    raise TransferError(f"non-zero byte within bytes {got}..")
                got += take
                continue
            want = CHUNK if length is None else min(CHUNK, length - got)
            n = self._recv_into(memoryview(self.scratch)[:want])
            if n == 0:
                if length is None:
                    break
                raise TransferError(f"connection closed after {got} of {length}")
            if zeros and self.scratch.count(0, 0, n) != n:
                raise TransferError(f"non-zero byte within bytes {got}..")
            got += n
        return got

    def chunked(self, zeros: bool) -> int:
        got = 0
        while True:
            line = self.until(b"\r\n", HEAD_LIMIT)
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while self.until(b"\r\n", HEAD_LIMIT) != b"\r\n":
                    pass  # a trailer field
                return got
            got += self.body(size, zeros)
            if self.until(b"\r\n", 2) != b"\r\n":
                raise TransferError("bad chunk framing")


def fetch(
    proxy_port: int,
    url: str,
    host: str,
    rate: float,
    rcvbuf: int,
    timeout: float,
    zeros: bool = True,
) -> Fetched:
    """GET ``url`` through the proxy on 127.0.0.1:``proxy_port`` at ``rate`` B/s."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if rcvbuf:
            # Before connect, so the advertised window is small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(RECV_TIMEOUT)
        sock.connect((common.HOST, proxy_port))
        request = (
            f"GET {url} HTTP/1.1\r\nHost: {host}\r\n"
            "User-Agent: cacheproxy-bench/slow_client\r\nConnection: close\r\n\r\n"
        ).encode()
        start = time.monotonic()
        sock.sendall(request)
        reader = _Reader(sock, rate, start + timeout)
        head = reader.until(b"\r\n\r\n", HEAD_LIMIT)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        fields: dict[str, str] = {}
        for line in lines:
            if ":" in line:
                name, value = line.split(":", 1)
                fields[name.strip().lower()] = value.strip()
        if status != 200:
            raise TransferError(f"status {status}: {bytes(reader.buf[:200])!r}")
        if "chunked" in fields.get("transfer-encoding", "").lower():
            got = reader.chunked(zeros)
        elif "content-length" in fields:
            got = reader.body(int(fields["content-length"]), zeros)
        else:
            got = reader.body(None, zeros)
        return Fetched(status, head, got, time.monotonic() - start)


@dataclass
class Row:
    proxy: str
    client: str
    result: str = ""  # the access log's result code, e.g. TCP_MISS/200
    start: int = 0
    peak: int = 0
    final: int = 0
    seconds: float = 0.0
    body: int = 0
    error: str = ""
    samples: list[tuple[float, int]] | None = None


def run_one(
    server: common.Server,
    client: str,
    url: str,
    host: str,
    size: int,
    rate: float,
    rcvbuf: int,
    interval: float,
) -> Row:
    row = Row(server.name, client)
    timeout = (size / rate if rate else 0) * 2 + 120
    before = common.access_lines(server)
    row.start = server.rss()
    with server.sampler(interval) as sampler:
        try:
            fetched = fetch(server.port, url, host, rate, rcvbuf, timeout)
            row.seconds, row.body = fetched.seconds, fetched.body_bytes
            if fetched.body_bytes != size:
                row.error = f"{fetched.body_bytes} body bytes, expected {size}"
        except (OSError, TransferError, ValueError, IndexError) as error:
            row.error = f"{type(error).__name__}: {error}"
        # Let the proxy finish the request (log it, commit the store) and settle.
        line = common.next_access_line(server, before, url)
        time.sleep(0.5)
        row.final = server.rss()
    row.peak = max(sampler.peak, row.final)
    row.samples = sampler.samples
    row.result = next((f for f in line.split() if "/" in f and "_" in f), "?")
    if not server.alive():
        row.error = row.error or "the proxy exited"
    return row


def timeline(row: Row, step: float = 1.0) -> str:
    """Max RSS per ``step`` seconds, in MiB."""
    buckets: dict[int, int] = {}
    for t, rss in row.samples or []:
        buckets[int(t / step)] = max(buckets.get(int(t / step), 0), rss)
    return " ".join(f"{k * step:.0f}s:{common.mib(v):.0f}" for k, v in buckets.items())


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'proxy':<11} {'client':<6} {'result':<18} {'start':>7} {'peak':>7} "
        f"{'final':>7} {'seconds':>8} {'MiB/s':>8}"
    )
    print()
    print("RSS in MiB; peak = highest VmRSS sampled every 0.1 s during the fetch,")
    print("final = 0.5 s after the access log recorded the request")
    print(header)
    print("-" * len(header))
    for r in rows:
        speed = common.mib(r.body) / r.seconds if r.seconds else 0.0
        print(
            f"{r.proxy:<11} {r.client:<6} {r.result:<18} "
            f"{common.mib(r.start):>7.1f} {common.mib(r.peak):>7.1f} "
            f"{common.mib(r.final):>7.1f} {r.seconds:>8.1f} {speed:>8.1f}"
            + (f"  FAILED: {r.error}" if r.error else "")
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="body size (default 1G)")
    parser.add_argument(
        "--rate", default="64M", help="slow client's read rate per second (64M)"
    )
    parser.add_argument(
        "--rcvbuf", default="64K", help="slow client's SO_RCVBUF (default 64K)"
    )
    parser.add_argument(
        "--limit", default="100M", help="fail if cacheproxy's peak RSS reaches this"
    )
    parser.add_argument("--interval", type=float, default=0.1, help="RSS sampling s")
    parser.add_argument("--no-squid", action="store_true", help="skip Squid")
    parser.add_argument("--no-fast", action="store_true", help="skip the fast rows")
    parser.add_argument(
        "--timeline", action="store_true", help="print RSS per second of each run"
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    size = common.parse_size(args.size)
    rate = float(common.parse_size(args.rate))
    rcvbuf = common.parse_size(args.rcvbuf)
    limit = common.parse_size(args.limit)

    print(
        f"body {common.mib(size):.0f} MiB, slow client {common.mib(rate):.0f} MiB/s "
        f"with SO_RCVBUF {rcvbuf // 1024} KiB, {os.cpu_count()} CPUs"
    )
    clients = [("slow", rate, rcvbuf)] + ([] if args.no_fast else [("fast", 0.0, 0)])
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cacheproxy-bench-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)  # nginx workers and squid may run as other users
        www = tmp / "www"
        www.mkdir()
        www.chmod(0o755)
        big = www / "big.bin"
        big.touch()
        os.truncate(big, size)  # sparse: costs no disk
        big.chmod(0o644)

        with common.start_nginx(tmp, www) as origin:
            host = f"{common.HOST}:{origin.port}"
            url = f"http://{host}/big.bin"
            print(f"nginx on {host}")

            # A disk budget with room for the body, so it is stored, not evicted.
            cache_size = f"{max(2048, int(common.mib(size) * 2))}M"
            starters = [
                (
                    "cacheproxy",
                    lambda: common.start_cacheproxy(
                        tmp, ["--max-object-size", "2G", "--cache-size", cache_size]
                    ),
                )
            ]
            if args.no_squid:
                pass
            elif not common.squid_available():
                print("squid is not installed: skipping it (apt-get install squid)")
            else:
                cache_mib = max(256, int(common.mib(size) * 1.25) + 64)
                starters.append(
                    ("squid", lambda: common.start_squid(tmp, cache_mib=cache_mib))
                )

            for name, start in starters:
                with start() as server:
                    print(f"{name} on 127.0.0.1:{server.port} (pid {server.pid})")
                    for client, client_rate, client_buf in clients:
                        row = run_one(
                            server,
                            client,
                            url,
                            host,
                            size,
                            client_rate,
                            client_buf,
                            args.interval,
                        )
                        rows.append(row)
                        print(
                            f"  {client}: {row.result} peak "
                            f"{common.mib(row.peak):.1f} MiB in {row.seconds:.1f} s"
                            + (f" FAILED: {row.error}" if row.error else "")
                        )
                        if args.timeline:
                            print(f"    RSS MiB by second: {timeline(row)}")

    print_table(rows)
    failed = [r for r in rows if r.error]
    over = [r for r in rows if r.proxy == "cacheproxy" and r.peak >= limit]
    for r in over:
        print(
            f"\nFAIL: cacheproxy peak RSS {common.mib(r.peak):.1f} MiB >= "
            f"{common.mib(limit):.0f} MiB ({r.client} client)\n"
            f"  RSS MiB by second: {timeline(r)}"
        )
    if failed:
        print(f"\nFAIL: {len(failed)} transfer(s) went wrong")
        return 2
    if over:
        return 1
    print(f"\nOK: cacheproxy peak RSS below {common.mib(limit):.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
