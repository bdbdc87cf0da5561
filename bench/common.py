"""Shared parts of the benchmarks: servers on free loopback ports, RSS sampling.

Every server is started in its own process group and stopped by ``Server.stop``
(SIGTERM to the group, then SIGKILL after a bounded wait). Use them as context
managers so they stop even when the benchmark fails::

    with tempfile.TemporaryDirectory() as tmp, start_nginx(Path(tmp)) as origin:
        ...
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
NGINX = "/usr/sbin/nginx"
SQUID = "/usr/sbin/squid"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``1G`` -> 1073741824; binary units K, M, G, T (an optional trailing B/iB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512K, 64M, 1G)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def mib(n: float) -> float:
    return n / (1 << 20)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for(
    check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool]
) -> None:
    """Poll ``check`` until true; fail after ``timeout`` s or if ``alive`` fails."""
    deadline = time.monotonic() + timeout
    while not check():
        if not alive():
            raise RuntimeError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# -- processes and their memory -------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc/*/stat's ppid field."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The name field is parenthesised and may hold spaces: split after it.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (None if gone): with the pid, it
    names one process even if the pid is reused later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[19])


def rss_bytes(pid: int) -> int:
    """VmRSS of one process in bytes (0 if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


class RssSampler:
    """Samples a process tree's summed VmRSS every ``interval`` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.1, tree: bool = False) -> None:
        self.pid = pid
        self.interval = interval
        self.tree = tree
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = 0.0

    def rss(self) -> int:
        pids = descendants(self.pid) if self.tree else [self.pid]
        return sum(rss_bytes(p) for p in pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, self.rss()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


@dataclass
class Server:
    """A server process started in its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int = 0
    log: Path | None = None
    access_log: Path | None = None
    tree: bool = False  # sum RSS over child processes too
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        pids = descendants(self.pid) if self.tree else [self.pid]
        return sum(rss_bytes(p) for p in pids)

    def sampler(self, interval: float = 0.1) -> RssSampler:
        return RssSampler(self.pid, interval, self.tree)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it if it outlives STOP_TIMEOUT."""
        for hook in self.on_stop:
            try:
                hook()
            except Exception as error:  # stopping must go on
                print(f"{self.name}: stop hook failed: {error}", file=sys.stderr)
        pgid = self.proc.pid  # start_new_session=True: the group is the pid
        # Helpers may leave the group (squid's pinger calls setsid): note them now.
        helpers = [(p, start_time(p)) for p in descendants(pgid) if p != pgid]
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        # Kill whatever is left of the group (helpers that outlived the leader too).
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid, started in helpers:
            if started is not None and start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"{self.name}: pid {pgid} did not exit", file=sys.stderr)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(name: str, argv: list[str], log: Path, **kwargs: object) -> Server:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name, proc, log=log, **kwargs)  # type: ignore[arg-type]


def _started(server: Server, ready: Callable[[], bool]) -> Server:
    """Wait for ``ready``; stop the server and raise with its log if it fails."""
    try:
        wait_for(ready, START_TIMEOUT, server.name, server.alive)
    except BaseException as error:
        server.stop()
        log = tail(server.log) if server.log else ""
        raise RuntimeError(f"{server.name} did not start: {error}\n{log}") from error
    return server


# -- nginx ------------------------------------------------------------------------


def start_nginx(
    tmp: Path, root: Path, extra: str = "", tries: int = 3, name: str = "nginx"
) -> Server:
    """nginx serving ``root`` on a free loopback port, all its files under ``tmp``.

    Responses carry ``Cache-Control: max-age=3600`` so proxies may store them.
    ``extra`` is added to the ``server`` block (an ``add_header`` in a ``location``
    there replaces this server-level one for that location). The server's
    ``access_log`` is nginx's access log, one line per request, so
    ``access_lines(origin)`` counts the requests that reached the origin.
    """
    home = tmp / name
    home.mkdir(exist_ok=True)
    for attempt in range(tries):
        port = free_port()
        conf = home / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"""{user}daemon off;
master_process on;
worker_processes 1;
pid {home}/nginx.pid;
error_log {home}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format timed '$remote_addr [$time_local] "$request" $status '
                     '$body_bytes_sent $request_time';
    access_log {home}/access.log timed;
    client_body_temp_path {home}/client_body;
    proxy_temp_path {home}/proxy;
    fastcgi_temp_path {home}/fastcgi;
    uwsgi_temp_path {home}/uwsgi;
    scgi_temp_path {home}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen {HOST}:{port};
        root {root};
        add_header Cache-Control "max-age=3600";
        {extra}
    }}
}}
"""
        )
        server = spawn(
            name,
            [NGINX, "-p", str(home), "-e", str(home / "error.log"), "-c", str(conf)],
            home / "stdout.log",
            port=port,
            access_log=home / "access.log",
            tree=True,
        )
        try:
            return _started(server, lambda p=port: port_open(p))
        except RuntimeError:
            if attempt == tries - 1 or "Address already in use" not in tail(
                home / "error.log"
            ):
                raise
    raise AssertionError("unreachable")


# -- cacheproxy -------------------------------------------------------------------


def start_cacheproxy(
    tmp: Path, args: list[str] | None = None, name: str = "cacheproxy"
) -> Server:
    """cacheproxy via twistd on a port the kernel picks, read back from its log."""
    home = tmp / name
    home.mkdir(exist_ok=True)
    log = home / "twistd.log"
    access = home / "access.log"
    argv = [
        str(VENV_BIN / "twistd"),
        "-n",
        "--pidfile=",
        "cacheproxy",
        "-p",
        f"tcp:0:interface={HOST}",
        "--cache-dir",
        str(home / "cache"),
        "--access-log",
        str(access),
        *(args or []),
    ]
    server = spawn(name, argv, log, access_log=access)
    pattern = re.compile(rf"listening on {re.escape(HOST)}:(\d+)")

    def ready() -> bool:
        match = pattern.search(log.read_text(errors="replace"))
        if match:
            server.port = int(match.group(1))
        return match is not None

    return _started(server, ready)


# -- squid ------------------------------------------------------------------------


def squid_available() -> bool:
    return os.access(SQUID, os.X_OK) or shutil.which("squid") is not None


def start_squid(
    tmp: Path,
    cache_mib: int = 0,
    max_object: str = "2 GB",
    extra: str = "",
    tries: int = 3,
    name: str = "squid",
) -> Server:
    """Squid in the foreground (``-N``) on a free loopback port, files under ``tmp``.

    ``cache_mib`` > 0 gives it a ufs cache_dir of that many MiB (so it stores what
    it relays, like cacheproxy does); 0 means ``cache deny all``.
    """
    binary = SQUID if os.access(SQUID, os.X_OK) else shutil.which("squid")
    assert binary, "squid is not installed"
    home = tmp / name
    home.mkdir(exist_ok=True)
    (home / "cache").mkdir(exist_ok=True)
    effective = ""
    if os.geteuid() == 0:
        # Squid drops root for cache_effective_user: let that user write here.
        user = "proxy"
        entry = pwd.getpwnam(user)
        effective = f"cache_effective_user {user}\n"
        tmp.chmod(0o755)
        for path in [home, home / "cache"]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
    if cache_mib > 0:
        store = f"cache_dir ufs {home}/cache {cache_mib} 16 256\n"
    else:
        store = "cache deny all\n"
    for attempt in range(tries):
        port = free_port()
        conf = home / "squid.conf"
        conf.write_text(
            f"""http_port {HOST}:{port}
{effective}acl localsrc src 127.0.0.1/32
http_access allow localsrc
http_access deny all
{store}maximum_object_size {max_object}
pid_filename {home}/squid.pid
cache_log {home}/cache.log
access_log stdio:{home}/access.log squid
cache_store_log none
coredump_dir {home}
visible_hostname cacheproxy-bench
shutdown_lifetime 1 seconds
pinger_enable off
{extra}
"""
        )
        if cache_mib > 0:
            init = subprocess.run(
                [binary, "-z", "-N", "-f", str(conf)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
                start_new_session=True,
            )
            if init.returncode != 0:
                raise RuntimeError(
                    f"squid -z failed: {init.stdout.decode()}{init.stderr.decode()}"
                )
        server = spawn(
            name,
            [binary, "-N", "-f", str(conf)],
            home / "stdout.log",
            port=port,
            access_log=home / "access.log",
            tree=True,
        )
        try:
            return _started(server, lambda p=port: port_open(p))
        except RuntimeError:
            if attempt == tries - 1 or "Address already in use" not in tail(
                home / "cache.log"
            ):
                raise
    raise AssertionError("unreachable")


def access_lines(server: Server) -> int:
    """How many lines the server's access log holds now."""
    if server.access_log is None:
        return 0
    try:
        return len(server.access_log.read_bytes().splitlines())
    except OSError:
        return 0


def next_access_line(
    server: Server, before: int, contains: str = "", timeout: float = 3.0
) -> str:
    """The first access-log line after the ``before`` lines that holds ``contains``
    (probes of the port log lines too), waiting briefly for it."""
    if server.access_log is None:
        return ""
    deadline = time.monotonic() + timeout
    while True:
        try:
            lines = server.access_log.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        found = [line for line in lines[before:] if contains in line]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            return ""
        time.sleep(0.1)
