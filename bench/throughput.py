"""Throughput of cacheproxy next to Squid: hits, pass-through, big bodies, collapsing.

nginx on 127.0.0.1 is the origin. It serves 1 KiB, 64 KiB and 1 MiB files and a
sparse 1 GiB file with ``Cache-Control: max-age=3600``, and a 1 KiB file under
``/nostore/`` with ``Cache-Control: no-store``. A small origin thread in this process
answers ``/slow/...`` after 1 s and counts its requests. Each proxy runs in turn
(cacheproxy with --workers 1 and 2 when it has that option, then Squid 5.7 with a
memory and a disk cache), and is driven by wrk for the small bodies and curl for the
1 GiB one. A hit scenario is only reported if nginx's access log did not grow while it
ran; otherwise it is INVALID.

    .venv/bin/python bench/run [--proxies cacheproxy,squid] [--duration 10]
        [--only hit-1k,big-hit] [--markdown]

Progress goes to stderr; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import http.client
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

try:
    from bench import common
except ImportError:  # run as a script: bench/ itself is sys.path[0]
    import common  # type: ignore[no-redef]

HOST = common.HOST
WRK = "wrk"
CURL = "curl"
WRK_THREADS = 2
WRK_TIMEOUT = "2s"  # wrk's default: a response slower than this counts as timeout
MAX_LOAD = 15  # seconds of load per scenario, at most
LOG_SETTLE = 1.2  # cacheproxy flushes its access log every second
SLOW_DELAY = 1.0  # the slow origin's delay per request
COLLAPSE_CLIENTS = 100
BIG = 1 << 30
MAX_AGE = "max-age=3600"
FILES = {"1k.bin": 1 << 10, "64k.bin": 64 << 10, "1m.bin": 1 << 20}
NGINX_EXTRA = 'location /nostore/ { add_header Cache-Control "no-store"; }'
SQUID_EXTRA = """cache_mem 256 MB
maximum_object_size_in_memory 2 MB
max_filedescriptors 16384
"""
SQUID_CACHE_MIB = 4096
CACHEPROXY_ARGS = ["--max-object-size", "2G", "--cache-size", "4G"]

# wrk sends "GET <wrk.path>": with the absolute-form URL as the path, that is a
# proxy request. done() prints the summary in a form that is easy to parse.
WRK_LUA = """\
wrk.method = "GET"
wrk.path = os.getenv("BENCH_URL")
wrk.headers["Host"] = os.getenv("BENCH_HOST")
wrk.headers["User-Agent"] = "cacheproxy-bench/throughput"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d bytes=%d duration_us=%d connect=%d read=%d write=%d "
    .. "status=%d timeout=%d p50_us=%d p99_us=%d\\n",
    summary.requests, summary.bytes, summary.duration, e.connect, e.read,
    e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- what is measured ------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    unit: str


SCENARIOS = [
    Scenario("hit-1k", "1 KiB hit, 50 conn", "req/s"),
    Scenario("hit-1k-c1000", "1 KiB hit, 1000 conn", "req/s"),
    Scenario("hit-64k", "64 KiB hit, 50 conn", "req/s"),
    Scenario("hit-1m", "1 MiB hit, 50 conn", "MiB/s"),
    Scenario("nostore-1k", "1 KiB no-store pass-through, 50 conn", "req/s"),
    Scenario("big-miss", "1 GiB cold miss, curl", "MiB/s"),
    Scenario("big-hit", "1 GiB hit, curl", "MiB/s"),
    Scenario("collapse", "100 identical misses, 1 s origin", "origin reqs"),
]
BY_KEY = {s.key: s for s in SCENARIOS}
# Rows that show the peak RSS of the proxy's processes as well.
RSS_ROWS = ["hit-1k-c1000", "big-miss", "big-hit"]


@dataclass
class Outcome:
    """One scenario through one proxy."""

    value: float | None = None  # the scenario's figure, in its unit
    errors: int = 0
    detail: str = ""  # wrk's errors: connect/read/write/timeout/status
    rss: int = 0  # peak RSS of the proxy's processes while it ran
    rss_start: int = 0  # their RSS just before it started
    invalid: str = ""  # why the figure does not measure what it claims
    failed: str = ""

    def cell(self, unit: str) -> str:
        if self.failed:
            return f"FAILED ({self.failed})"
        if self.invalid:
            return f"INVALID ({self.invalid})"
        if self.value is None:
            return "-"
        text = f"{self.value:.0f}" if unit != "MiB/s" else f"{self.value:.1f}"
        if self.errors:
            text += f" ({self.errors} err)"
        return text

    def figure(self) -> float | None:
        """The value a ratio may use: none for failed or invalid runs."""
        if self.failed or self.invalid:
            return None
        return self.value


@dataclass
class Variant:
    """A column of the table: one proxy configuration."""

    key: str
    label: str
    start: Callable[[Path], common.Server] | None
    missing: str = ""  # why it is not run, shown in its cells
    results: dict[str, Outcome] = field(default_factory=dict)


@dataclass
class Context:
    tmp: Path
    origin: common.Server
    origin_host: str
    slow: SlowOrigin
    duration: int
    lua: Path


# -- the slow origin ---------------------------------------------------------------


class SlowOrigin:
    """An HTTP origin in a thread: 1 KiB, cacheable, after ``delay`` s; counts the
    requests per path."""

    def __init__(self, delay: float = SLOW_DELAY) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        lock = threading.Lock()
        counts = self.counts
        body = b"s" * 1024

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    counts[self.path] += 1
                time.sleep(delay)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", MAX_AGE)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024

        self.httpd = Server((HOST, 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def __enter__(self) -> SlowOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5.0)


# -- clients ------------------------------------------------------------------------


def get(port: int, url: str, host: str, timeout: float = 15.0) -> tuple[int, int]:
    """GET ``url`` through the proxy on ``port``: (status, body bytes)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", url, headers={"Host": host})
        response = conn.getresponse()
        return response.status, len(response.read())
    finally:
        conn.close()


def warm(port: int, url: str, host: str, size: int) -> None:
    """Two requests, so the object is stored (and, for Squid, in memory)."""
    for _ in range(2):
        status, got = get(port, url, host)
        if status != 200 or got != size:
            raise RuntimeError(f"warm-up of {url}: status {status}, {got} bytes")
    time.sleep(LOG_SETTLE)


def run_wrk(
    ctx: Context, port: int, url: str, connections: int, duration: int
) -> dict[str, int]:
    env = dict(os.environ, BENCH_URL=url, BENCH_HOST=ctx.origin_host)
    argv = [
        WRK,
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        f"-d{duration}s",
        f"--timeout={WRK_TIMEOUT}",
        "-s",
        str(ctx.lua),
        f"http://{HOST}:{port}/",
    ]
    done = subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=duration + 30,
    )
    match = re.search(r"^BENCH (.*)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or not match:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split())}


def run_curl(port: int, url: str, max_time: int) -> tuple[int, int, float, str]:
    """(status, bytes, bytes/s, error) of one curl download through the proxy."""
    argv = [
        CURL,
        "-sS",
        "-x",
        f"http://{HOST}:{port}",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download} %{speed_download}",
        "--max-time",
        str(max_time),
        url,
    ]
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=max_time + 30,
    )
    status, size, speed = done.stdout.split()
    error = done.stderr.strip() if done.returncode else ""
    return int(status), int(size), float(speed), error


def proxy_codes(server: common.Server, before: int) -> str:
    """The access log's result codes after line ``before``, with their counts."""
    if server.access_log is None:
        return ""
    try:
        lines = server.access_log.read_text(errors="replace").splitlines()[before:]
    except OSError:
        return ""
    codes = collections.Counter(
        fields[3] if len(fields) > 3 else "?" for fields in map(str.split, lines)
    )
    return ", ".join(f"{code} x{n}" for code, n in codes.most_common(4))


# -- scenarios ------------------------------------------------------------------------


def wrk_scenario(
    ctx: Context,
    server: common.Server,
    path: str,
    size: int,
    connections: int,
    unit: str,
    hit: bool,
) -> Outcome:
    url = f"http://{ctx.origin_host}{path}"
    if hit:
        warm(server.port, url, ctx.origin_host, size)
    origin_before = common.access_lines(ctx.origin)
    proxy_before = common.access_lines(server)
    rss_start = server.rss()
    with server.sampler(0.25) as sampler:
        stats = run_wrk(ctx, server.port, url, connections, ctx.duration)
        time.sleep(LOG_SETTLE)  # let the last requests reach the logs
    origin_seen = common.access_lines(ctx.origin) - origin_before
    out = Outcome(rss=sampler.peak, rss_start=rss_start)
    requests = stats["requests"]
    seconds = stats["duration_us"] / 1e6
    kinds = ["connect", "read", "write", "timeout", "status"]
    out.errors = sum(stats[k] for k in kinds)
    out.detail = "/".join(str(stats[k]) for k in kinds)
    if unit == "MiB/s":
        out.value = common.mib(stats["bytes"]) / seconds
    else:
        out.value = requests / seconds
    log(
        f"    {requests} requests in {seconds:.1f} s: {requests / seconds:.0f} req/s, "
        f"{common.mib(stats['bytes']) / seconds:.1f} MiB/s, errors c/r/w/t/s "
        f"{out.detail}, p50 {stats['p50_us'] / 1000:.1f} ms, "
        f"p99 {stats['p99_us'] / 1000:.1f} ms, peak RSS "
        f"{common.mib(out.rss):.1f} MiB"
    )
    log(f"    origin saw {origin_seen}; proxy log: {proxy_codes(server, proxy_before)}")
    if requests and stats["bytes"] / requests < size:
        out.invalid = f"{stats['bytes'] // requests} bytes per response"
    elif hit and origin_seen:
        out.invalid = f"origin saw {origin_seen}"
    elif not hit and origin_seen < requests:
        out.invalid = f"origin saw {origin_seen} of {requests}"
    if not server.alive():
        out.failed = "the proxy exited"
    return out


def big_scenario(ctx: Context, server: common.Server, hit: bool) -> Outcome:
    url = f"http://{ctx.origin_host}/big.bin"
    origin_before = common.access_lines(ctx.origin)
    proxy_before = common.access_lines(server)
    rss_start = server.rss()
    with server.sampler(0.1) as sampler:
        status, size, speed, error = run_curl(server.port, url, MAX_LOAD)
        # Let the proxy finish (log the request, commit the stored body).
        common.next_access_line(server, proxy_before, "/big.bin", timeout=10.0)
        time.sleep(1.0)
    origin_seen = common.access_lines(ctx.origin) - origin_before
    out = Outcome(value=speed / (1 << 20), rss=sampler.peak, rss_start=rss_start)
    log(
        f"    status {status}, {size} bytes at {out.value:.1f} MiB/s, peak RSS "
        f"{common.mib(out.rss):.1f} MiB; origin saw {origin_seen}; proxy log: "
        f"{proxy_codes(server, proxy_before)}" + (f"; curl: {error}" if error else "")
    )
    if error or status != 200 or size != BIG:
        out.failed = error or f"status {status}, {size} bytes"
    elif hit and origin_seen:
        out.invalid = f"origin saw {origin_seen}"
    if not server.alive():
        out.failed = "the proxy exited"
    return out


def collapse_scenario(ctx: Context, server: common.Server, name: str) -> Outcome:
    """100 clients ask for one fresh URL at once; how many reach the origin?"""
    path = f"/slow/{name}.bin"
    url = f"http://{HOST}:{ctx.slow.port}{path}"
    host = f"{HOST}:{ctx.slow.port}"
    barrier = threading.Barrier(COLLAPSE_CLIENTS)
    results: list[object] = [None] * COLLAPSE_CLIENTS

    def one(i: int) -> None:
        conn = http.client.HTTPConnection(HOST, server.port, timeout=MAX_LOAD)
        try:
            conn.connect()
            barrier.wait(MAX_LOAD)
            conn.request("GET", url, headers={"Host": host})
            response = conn.getresponse()
            results[i] = (response.status, len(response.read()))
        except Exception as error:  # reported as a failed request
            results[i] = error
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(COLLAPSE_CLIENTS)]
    started = time.monotonic()
    rss_start = server.rss()
    with server.sampler(0.1) as sampler:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(MAX_LOAD + 10)
    seconds = time.monotonic() - started
    good = sum(1 for r in results if r == (200, 1024))
    out = Outcome(value=ctx.slow.counts[path], rss=sampler.peak, rss_start=rss_start)
    out.errors = COLLAPSE_CLIENTS - good
    failures = collections.Counter(
        type(r).__name__ if isinstance(r, BaseException) else repr(r)
        for r in results
        if r != (200, 1024)
    )
    log(
        f"    {good} of {COLLAPSE_CLIENTS} got 200 with 1 KiB in {seconds:.1f} s; "
        f"origin requests: {out.value:.0f}"
        + (f"; failures: {dict(failures)}" if failures else "")
    )
    return out


def run_scenario(
    ctx: Context, server: common.Server, key: str, name: str, state: dict[str, bool]
) -> Outcome:
    scenario = BY_KEY[key]
    if key == "hit-1k":
        return wrk_scenario(ctx, server, "/1k.bin", 1 << 10, 50, scenario.unit, True)
    if key == "hit-1k-c1000":
        return wrk_scenario(ctx, server, "/1k.bin", 1 << 10, 1000, scenario.unit, True)
    if key == "hit-64k":
        return wrk_scenario(ctx, server, "/64k.bin", 64 << 10, 50, scenario.unit, True)
    if key == "hit-1m":
        return wrk_scenario(ctx, server, "/1m.bin", 1 << 20, 50, scenario.unit, True)
    if key == "nostore-1k":
        path = "/nostore/1k.bin"
        return wrk_scenario(ctx, server, path, 1 << 10, 50, scenario.unit, False)
    if key == "big-miss":
        out = big_scenario(ctx, server, hit=False)
        state["big-stored"] = not (out.failed or out.invalid)
        return out
    if key == "big-hit":
        if not state.get("big-stored"):
            log("    (warming: one untimed 1 GiB fetch first)")
            big_scenario(ctx, server, hit=False)
        return big_scenario(ctx, server, hit=True)
    if key == "collapse":
        return collapse_scenario(ctx, server, name)
    raise ValueError(key)


def run_variant(ctx: Context, variant: Variant, keys: list[str]) -> None:
    assert variant.start is not None
    log(f"== {variant.label}")
    with variant.start(ctx.tmp) as server:
        server.tree = True  # count worker or helper processes too
        log(f"   on {HOST}:{server.port} (pid {server.pid})")
        state: dict[str, bool] = {}
        for key in keys:
            log(f"  {key}: {BY_KEY[key].label}")
            if not server.alive():
                variant.results[key] = Outcome(failed="the proxy exited")
                continue
            try:
                variant.results[key] = run_scenario(
                    ctx, server, key, variant.key, state
                )
            except (
                OSError,
                RuntimeError,
                ValueError,
                KeyError,
                http.client.HTTPException,
                subprocess.SubprocessError,
            ) as e:
                log(f"    FAILED: {type(e).__name__}: {e}")
                variant.results[key] = Outcome(failed=type(e).__name__)
            time.sleep(1.0)  # let connections close before the next scenario
    # Free the disk the stored 1 GiB body takes.
    shutil.rmtree(ctx.tmp / variant.key, ignore_errors=True)


# -- the proxies -------------------------------------------------------------------


def cacheproxy_options() -> set[str]:
    """The long options ``twistd cacheproxy --help`` lists."""
    done = subprocess.run(
        [str(common.VENV_BIN / "twistd"), "cacheproxy", "--help"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=common.ROOT,
    )
    return set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", done.stdout, re.MULTILINE))


def variants(proxies: list[str]) -> tuple[list[Variant], str]:
    """The table's three columns, and how the proxies that run are configured."""
    found: list[Variant] = []
    settings: list[str] = []
    if "cacheproxy" in proxies:
        options = cacheproxy_options()
        extra = list(CACHEPROXY_ARGS)
        if "--memory-cache" in options:
            extra += ["--memory-cache", "64M"]
        try:
            version = importlib.metadata.version("cacheproxy")
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        workers = "" if "--workers" in options else " (no --workers option)"
        settings.append(f"cacheproxy {version} with {' '.join(extra)}{workers}")

        def variant(workers: int, missing: str = "") -> Variant:
            key = f"cacheproxy-w{workers}"
            # Without --workers, one default process stands in for w1.
            more = ["--workers", str(workers)] if "--workers" in options else []

            def start(tmp: Path) -> common.Server:
                return common.start_cacheproxy(tmp, extra + more, name=key)

            if missing:
                return Variant(key, f"cacheproxy w{workers}", None, missing)
            return Variant(key, f"cacheproxy w{workers}", start)

        found.append(variant(1))
        if "--workers" in options:
            found.append(variant(2))
        else:
            found.append(variant(2, "n/a (no --workers yet)"))
    else:
        found.append(Variant("cacheproxy-w1", "cacheproxy w1", None, "not run"))
        found.append(Variant("cacheproxy-w2", "cacheproxy w2", None, "not run"))
    if "squid" not in proxies:
        found.append(Variant("squid", "squid", None, "not run"))
    elif not common.squid_available():
        found.append(Variant("squid", "squid", None, "n/a (squid not installed)"))
    else:
        found.append(
            Variant(
                "squid",
                "squid",
                lambda tmp: common.start_squid(
                    tmp, cache_mib=SQUID_CACHE_MIB, extra=SQUID_EXTRA, name="squid"
                ),
            )
        )
        squid = ", ".join(line for line in SQUID_EXTRA.splitlines() if line)
        settings.append(
            f"squid with {squid}, ufs cache_dir {SQUID_CACHE_MIB} MB, "
            "maximum_object_size 2 GB"
        )
    return found, "; ".join(settings)


# -- the table ----------------------------------------------------------------------


def ratio(a: Outcome | None, b: Outcome | None) -> str:
    x = a.figure() if a else None
    y = b.figure() if b else None
    if x is None or y is None or y == 0:
        return "n/a"
    return f"{x / y:.2f}"


def table(columns: list[Variant], keys: list[str]) -> list[list[str]]:
    w1, w2, squid = columns
    header = [
        "scenario",
        w1.label,
        w2.label,
        squid.label,
        "ratio w1/squid",
        "ratio w2/squid",
    ]
    rows = [header]

    def cells(key: str, show: Callable[[Outcome], str]) -> list[str]:
        out = []
        for variant in columns:
            result = variant.results.get(key)
            out.append(variant.missing or (show(result) if result else "-"))
        return out

    for key in keys:
        scenario = BY_KEY[key]
        unit = scenario.unit
        rows.append(
            [f"{scenario.label} ({unit})"]
            + cells(key, lambda r, u=unit: r.cell(u))
            + [
                ratio(w1.results.get(key), squid.results.get(key)),
                ratio(w2.results.get(key), squid.results.get(key)),
            ]
        )
        if key == "hit-1k-c1000":
            rows.append(
                ["  wrk errors connect/read/write/timeout/status"]
                + cells(key, lambda r: r.detail or "-")
                + ["", ""]
            )
        if key in RSS_ROWS:

            def rss(r: Outcome) -> Outcome:
                return Outcome(value=common.mib(r.rss) if r.rss else None)

            def rss_ratio(a: Outcome | None, b: Outcome | None) -> str:
                return ratio(rss(a) if a else None, rss(b) if b else None)

            rows.append(
                ["  peak RSS, MiB (+ growth in the scenario)"]
                + cells(key, rss_cell)
                + [
                    rss_ratio(w1.results.get(key), squid.results.get(key)),
                    rss_ratio(w2.results.get(key), squid.results.get(key)),
                ]
            )
    return rows


def rss_cell(r: Outcome) -> str:
    if not r.rss:
        return "-"
    return f"{common.mib(r.rss):.1f} (+{common.mib(max(0, r.rss - r.rss_start)):.1f})"


def render(rows: list[list[str]], markdown: bool) -> str:
    if markdown:

        def md(row: list[str]) -> str:
            # Markdown drops leading spaces: mark the sub-rows instead.
            first = "↳ " + row[0].strip() if row[0].startswith("  ") else row[0]
            return "| " + " | ".join([first, *row[1:]]) + " |"

        lines = [md(rows[0])]
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + "|")
        lines += [md(row) for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    text = [line(rows[0]), "-" * len(line(rows[0]))]
    text += [line(row) for row in rows[1:]]
    return "\n".join(text)


def first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        twisted = importlib.metadata.version("twisted")
    except importlib.metadata.PackageNotFoundError:
        twisted = "?"
    nginx = first_line([common.NGINX, "-v"]).split("/")[-1]
    squid = first_line([common.SQUID, "-v"]).replace("Squid Cache: Version ", "")
    wrk = first_line([WRK, "-v"]).split()[1]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now}; nproc {len(os.sched_getaffinity(0))}; CPU {cpu}; "
        f"Python {sys.version.split()[0]}, Twisted {twisted}, nginx {nginx}, "
        f"Squid {squid}, wrk {wrk}"
    )


# -- main ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--proxies",
        default="cacheproxy,squid",
        help="comma list of cacheproxy, squid (default both)",
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=10,
        help=f"seconds of wrk load per scenario (default 10, at most {MAX_LOAD})",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma list of scenarios: " + ",".join(s.key for s in SCENARIOS),
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print the table as markdown"
    )
    args = parser.parse_args(argv)
    proxies = [p.strip() for p in args.proxies.split(",") if p.strip()]
    unknown = set(proxies) - {"cacheproxy", "squid"}
    if unknown:
        parser.error(f"unknown proxies: {', '.join(sorted(unknown))}")
    keys = [s.key for s in SCENARIOS]
    if args.only:
        wanted = [k.strip() for k in args.only.split(",") if k.strip()]
        bad = [k for k in wanted if k not in BY_KEY]
        if bad:
            parser.error(f"unknown scenarios: {', '.join(bad)}")
        keys = [k for k in keys if k in wanted]
    if not 1 <= args.duration <= MAX_LOAD:
        parser.error(f"--duration must be 1..{MAX_LOAD}")
    for tool in (WRK, CURL):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install {tool})")
    # SIGTERM unwinds like Ctrl-C, so every server started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    columns, settings = variants(proxies)
    about = machine() + (f"\n{settings}" if settings else "")
    log(about)
    with tempfile.TemporaryDirectory(prefix="cacheproxy-bench-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)  # nginx workers and squid may run as other users
        www = tmp / "www"
        (www / "nostore").mkdir(parents=True)
        for name, size in FILES.items():
            (www / name).write_bytes(os.urandom(size))
        (www / "nostore" / "1k.bin").write_bytes(os.urandom(1 << 10))
        big = www / "big.bin"
        big.touch()
        os.truncate(big, BIG)  # sparse: costs no disk
        for path in [www, www / "nostore"]:
            path.chmod(0o755)
        for path in [*www.glob("*.bin"), *www.glob("nostore/*.bin")]:
            path.chmod(0o644)
        lua = tmp / "proxy.lua"
        lua.write_text(WRK_LUA)

        with (
            common.start_nginx(tmp, www, extra=NGINX_EXTRA) as origin,
            SlowOrigin() as slow,
        ):
            ctx = Context(
                tmp, origin, f"{HOST}:{origin.port}", slow, args.duration, lua
            )
            log(f"nginx on {ctx.origin_host}, slow origin on {HOST}:{slow.port}")
            check_origin(ctx)
            for variant in columns:
                if variant.start is not None:
                    run_variant(ctx, variant, keys)
                else:
                    log(f"== {variant.label}: {variant.missing}")

    rows = table(columns, keys)
    if args.markdown:
        print(about.replace("\n", "\n\n") + "\n")
        print(render(rows, markdown=True))
    else:
        print(about)
        print(render(rows, markdown=False))
    broken = [
        (v.label, k, r.failed)
        for v in columns
        for k, r in v.results.items()
        if r.failed
    ]
    invalid = [
        (v.label, k, r.invalid)
        for v in columns
        for k, r in v.results.items()
        if r.invalid and not r.failed
    ]
    for label, key, why in broken:
        print(f"FAILED: {label} {key}: {why} (details on stderr)", file=sys.stderr)
    for label, key, why in invalid:
        print(f"INVALID: {label} {key}: {why}", file=sys.stderr)
    return 2 if broken else 1 if invalid else 0


def check_origin(ctx: Context) -> None:
    """The origin sends the Cache-Control each scenario relies on."""
    expect = {"/1k.bin": MAX_AGE, "/nostore/1k.bin": "no-store"}
    for path, want in expect.items():
        conn = http.client.HTTPConnection(HOST, ctx.origin.port, timeout=10)
        try:
            conn.request("HEAD", path)
            response = conn.getresponse()
            response.read()
            got = response.getheader("Cache-Control")
        finally:
            conn.close()
        if response.status != 200 or got != want:
            raise RuntimeError(
                f"origin {path}: status {response.status}, Cache-Control {got!r}"
            )


if __name__ == "__main__":
    sys.exit(main())
