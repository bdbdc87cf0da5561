"""Builds the running proxy from a Config: store, origin client, log, listening port."""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import socket
import sqlite3
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from cacheproxy.accesslog import AccessLog
from cacheproxy.ca import load_ca
from cacheproxy.intercept import Interceptor, origin_tls_policy
from cacheproxy.model import Config
from cacheproxy.options import Options
from cacheproxy.origin import Origin
from cacheproxy.proxy import Proxy
from cacheproxy.server import ProxyFactory
from cacheproxy.stats import Stats
from cacheproxy.store import Store

__all__ = ["Options", "makeService", "ProxyService"]

log = Logger()

CULL_INTERVAL = 60.0
COUNTERS_INTERVAL = 10.0
USE_INTERVAL = 10.0
"""Seconds between marking the entries read meanwhile as used (Store.record_use):
how coarse least-recently-used eviction sees hits."""
DRAIN_SECONDS = 10.0


def proxy_pseudonym(cache_dir: str) -> str:
    """This cache's ``Via`` pseudonym, ``cacheproxy-<id>``, kept in the cache dir."""
    path = os.path.join(cache_dir, "proxy-id")
    try:
        with open(path, encoding="ascii") as file:
            ident = file.read().strip()
        if ident:
            return f"cacheproxy-{ident}"
    except FileNotFoundError:
        pass
    ident = secrets.token_hex(4)
    with open(path, "w", encoding="ascii") as file:
        file.write(ident + "\n")
    return f"cacheproxy-{ident}"


def _with_backlog(description: str) -> str:
    """A TCP endpoint with a listen backlog for a LAN's bursts (Twisted's is 50)."""
    if description.startswith(("tcp:", "tcp6:")) and "backlog=" not in description:
        return description + ":backlog=1024"
    return description


class _Resources(Service):
    """Starts the store's threads; at stop closes the threads, origins and store."""

    def __init__(
        self,
        reactor: Any,
        threadpool: ThreadPool,
        origin: Origin,
        store: Store,
        stats: Stats,
    ) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._origin = origin
        self._store = store
        self._stats = stats
        self._written = {"hit": 0, "miss": 0}
        self._culling = LoopingCall(self._cull)
        self._culling.clock = reactor
        self._counting = LoopingCall(self._write_counters)
        self._counting.clock = reactor
        self._marking = LoopingCall(self._record_use)
        self._marking.clock = reactor

    def startService(self) -> None:
        super().startService()
        self._threadpool.start()
        self._culling.start(CULL_INTERVAL, now=False)
        self._counting.start(COUNTERS_INTERVAL, now=False)
        self._marking.start(USE_INTERVAL, now=False)

    def _write_counters(self) -> defer.Deferred[None] | None:
        """Add this process's new hits and misses to the store's counters, which
        ``cacheproxy stats`` reads (several workers add up there)."""
        now = {"hit": self._stats.hits, "miss": self._stats.misses}
        deltas = {name: now[name] - self._written[name] for name in now}
        if not any(deltas.values()):
            return None
        self._written = now
        written: defer.Deferred[None] = threads.deferToThreadPool(
            self._reactor, self._threadpool, self._store.add_counters, deltas
        )
        written.addErrback(lambda f: log.failure("writing counters failed", f))
        return written

    def _record_use(self) -> defer.Deferred[int]:
        """Tell the store's LRU bookkeeping which entries were read, off the
        reactor thread and in batches, so that no hit writes to SQLite."""
        marked = threads.deferToThreadPool(
            self._reactor, self._threadpool, self._store.record_use
        )
        marked.addErrback(lambda f: log.failure("recording store use failed", f))
        return marked

    def _cull(self) -> defer.Deferred[int]:
        # diskcache culls a few entries per write only, so a busy store can overrun
        # its budget; this catches up, off the reactor thread.
        culled = threads.deferToThreadPool(
            self._reactor, self._threadpool, self._store.cull
        )
        culled.addErrback(lambda f: log.failure("culling the store failed", f))
        return culled

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self._culling.running:
            self._culling.stop()
        if self._counting.running:
            self._counting.stop()
            yield self._write_counters()
        if self._marking.running:
            self._marking.stop()
            yield self._record_use()
        yield self._origin.close()
        self._threadpool.stop()
        self._store.close()


class _Adopted(Service):
    """Listens on a socket inherited from the parent process (``--workers``).

    @ivar waiting: fires with the port once it listens.
    """

    def __init__(self, reactor: Any, fd: int, factory: ProxyFactory) -> None:
        self._reactor = reactor
        self._fd = fd
        self._factory = factory
        self._port: IListeningPort | None = None
        self._waitingForPort: defer.Deferred[IListeningPort] | None = None

    def startService(self) -> None:
        super().startService()
        family = socket.socket(fileno=os.dup(self._fd)).family
        # adoptStreamPort duplicates the descriptor; the inherited one can go.
        port = self._reactor.adoptStreamPort(self._fd, family, self._factory)
        os.close(self._fd)
        self._port = port
        self._waitingForPort = defer.succeed(port)

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._port is None:
            return None
        stopped: defer.Deferred[None] | None = self._port.stopListening()
        return stopped


class ProxyService(MultiService):
    """The whole proxy as one twistd service.

    @ivar proxy: the shared request-handling state.
    @ivar listening: fires with the listening port once it is bound.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        listen_fd: int | None = None,
        worker: tuple[int, int] | None = None,
    ) -> None:
        """``listen_fd``: a worker adopts its parent's listening socket instead of
        binding ``config.port``; ``worker`` (its number, and how many there are)
        names it on the status page and in /metrics."""
        super().__init__()
        os.makedirs(config.cache_dir, exist_ok=True)
        store = Store(config.cache_dir, config.cache_size, clean=listen_fd is None)
        upstream_ca = None if config.upstream_ca is None else Path(config.upstream_ca)
        pseudonym = proxy_pseudonym(config.cache_dir)
        origin = Origin(
            reactor,
            config.origin_timeout,
            upstream=config.upstream,
            tls=origin_tls_policy(upstream_ca),
            via=b"1.1 " + pseudonym.encode("ascii"),
        )
        threadpool = ThreadPool(minthreads=1, maxthreads=4, name="cacheproxy-store")
        access_log = AccessLog(config.access_log, reactor)
        self.proxy = Proxy(
            reactor,
            config,
            store,
            origin,
            access_log,
            pseudonym,
            threadpool,
            interceptor=_interceptor(config),
        )
        self._resources = _Resources(
            reactor, threadpool, origin, store, self.proxy.stats
        )
        self._resources.setServiceParent(self)
        if worker is not None:
            number, workers = worker
            self.proxy.stats.worker = (number, workers, os.getpid())
            self.proxy.info = dataclasses.replace(
                self.proxy.info,
                options=self.proxy.info.options
                + (("worker", f"{number} of {workers}"),),
            )
        self._access_log = access_log
        access_log.setServiceParent(self)
        factory = ProxyFactory(self.proxy)
        listener: _Adopted | StreamServerEndpointService
        if listen_fd is not None:
            listener = _Adopted(reactor, listen_fd, factory)
        else:
            endpoint = serverFromString(reactor, _with_backlog(config.port))
            listener = StreamServerEndpointService(endpoint, factory)
            listener._raiseSynchronously = True
        listener.setServiceParent(self)
        self._listener = listener
        self._reactor = reactor
        self._previous_usr1: Any = None

    @property
    def listening(self) -> defer.Deferred[IListeningPort]:
        """The bound port (read ``getHost().port`` after listening on port 0)."""
        waiting: defer.Deferred[IListeningPort] | None = self._listener._waitingForPort
        assert waiting is not None, "listening is known once the service started"
        return waiting

    def startService(self) -> None:
        super().startService()
        self.listening.addCallback(self._announce)
        self._install_reopen_signal()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Stop accepting, let requests in flight finish (10 s at most), then close.

        The order matters, so the children are stopped one after another rather
        than all at once as MultiService would.
        """
        Service.stopService(self)
        self._restore_reopen_signal()
        yield self._listener.stopService()
        yield self.proxy.drain(DRAIN_SECONDS)
        self._access_log.stopService()
        yield self._resources.stopService()

    def _install_reopen_signal(self) -> None:
        """SIGUSR1 reopens the access log, after logrotate moved it."""
        if threading.current_thread() is not threading.main_thread():
            return

        def reopen(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(self._access_log.reopen)
            # twistd rotates its own log on SIGUSR1 too: keep that working.
            if callable(previous):
                previous(signum, frame)

        previous = signal.getsignal(signal.SIGUSR1)
        self._previous_usr1 = previous
        signal.signal(signal.SIGUSR1, reopen)

    def _restore_reopen_signal(self) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None

    def _announce(self, port: IListeningPort) -> IListeningPort:
        address = port.getHost()
        log.info(
            "cacheproxy {pseudonym} listening on {host}:{port}, cache in {cache}",
            pseudonym=self.proxy.pseudonym,
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
            cache=self.proxy.config.cache_dir,
        )
        return port


def makeService(options: Options) -> Service:
    """twistd's entry point: the proxy service for these options."""
    from twisted.internet import reactor  # noqa: TID251 (the one place it is chosen)

    config: Config = options["config"]
    _check_cache(config)
    if config.workers > 1:
        return Workers(config, reactor, options.raw)
    return ProxyService(config, reactor)


def _check_cache(config: Config) -> None:
    """Open the store once before anything starts, so that a cache that cannot be
    opened (a damaged database, a directory without permission) stops the proxy
    with one clear line instead of a traceback, or a worker restarted forever."""
    try:
        os.makedirs(config.cache_dir, exist_ok=True)
        Store(config.cache_dir, config.cache_size).close()
    except (sqlite3.DatabaseError, OSError) as reason:
        raise SystemExit(
            f"cacheproxy: cannot open the cache in {config.cache_dir}: {reason} "
            "(move the directory away to start with an empty cache)"
        ) from None


class _Child(ProcessProtocol):
    """One worker process: its output goes to the parent's log."""

    def __init__(self, parent: Workers, number: int) -> None:
        self._parent = parent
        self.number = number
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            log.info(
                "worker {number}: {line}",
                number=self.number,
                line=line.decode("utf-8", "replace"),
            )

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self._parent.child_ended(self, reason)


class Workers(Service):
    """``--workers N``: bind the port once, run N processes that adopt it.

    The parent accepts no connections itself; the kernel hands each new connection
    to one of the workers.  A worker that dies is started again; SIGTERM to the
    parent stops every worker (each drains its requests) and then the parent.

    @ivar listening: fires with the bound port.
    """

    RESTART_DELAY = 1.0
    STOP_TIMEOUT = 20.0

    def __init__(self, config: Config, reactor: Any, arguments: list[str]) -> None:
        self._config = config
        self._reactor = reactor
        self._arguments = arguments
        self._children: dict[int, tuple[_Child, Any]] = {}
        self._port: IListeningPort | None = None
        self._previous_usr1: Any = None
        self.listening: defer.Deferred[IListeningPort] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        os.makedirs(self._config.cache_dir, exist_ok=True)
        # Create the store and its settings once, and clean orphans, before any
        # worker opens it (DESIGN.md: initialise the cache before forking).
        Store(self._config.cache_dir, self._config.cache_size).close()
        proxy_pseudonym(self._config.cache_dir)
        endpoint = serverFromString(self._reactor, _with_backlog(self._config.port))
        listening = endpoint.listen(Factory())
        listening.addCallback(self._listened)
        listening.addErrback(self._failed)

    def _failed(self, reason: Failure) -> None:
        log.failure("cannot listen on {port}", reason, port=self._config.port)
        self._reactor.stop()

    def _listened(self, port: IListeningPort) -> None:
        port.stopReading()  # type: ignore[attr-defined]
        self._port = port
        address = port.getHost()
        log.info(
            "cacheproxy listening on {host}:{port} with {n} workers",
            host=getattr(address, "host", "?"),
            port=getattr(address, "port", "?"),
            n=self._config.workers,
        )
        for number in range(1, self._config.workers + 1):
            self._spawn(number)
        self._install_signal()
        self.listening.callback(port)

    def _spawn(self, number: int) -> None:
        assert self._port is not None
        child = _Child(self, number)
        argv = [
            sys.executable,
            "-m",
            "cacheproxy.worker",
            "--listen-fd",
            "3",
            "--worker",
            f"{number}/{self._config.workers}",
            "--",
            *self._arguments,
        ]
        fd = self._port.fileno()  # type: ignore[attr-defined]
        process = self._reactor.spawnProcess(
            child,
            sys.executable,
            argv,
            env=os.environ.copy(),
            childFDs={0: "w", 1: "r", 2: "r", 3: fd},
        )
        self._children[number] = (child, process)
        log.info("started worker {number} (pid {pid})", number=number, pid=process.pid)

    def child_ended(self, child: _Child, reason: Failure) -> None:
        """A worker exited: start it again unless the parent is stopping."""
        current = self._children.get(child.number)
        if current is None or current[0] is not child:
            return
        del self._children[child.number]
        if not self.running:
            return
        log.warn(
            "worker {number} ended ({reason}); starting it again",
            number=child.number,
            reason=reason.getErrorMessage(),
        )
        self._reactor.callLater(self.RESTART_DELAY, self._restart, child.number)

    def _restart(self, number: int) -> None:
        if self.running and number not in self._children:
            self._spawn(number)

    def _install_signal(self) -> None:
        """SIGUSR1 to the parent reaches every worker (access log reopening)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def forward(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(self._signal_children, signal.SIGUSR1)
            if callable(previous):
                previous(signum, frame)

        previous = signal.getsignal(signal.SIGUSR1)
        self._previous_usr1 = previous
        signal.signal(signal.SIGUSR1, forward)

    def _signal_children(self, signum: int) -> None:
        for _, process in list(self._children.values()):
            try:
                process.signalProcess(signum)
            except ProcessExitedAlready:
                pass

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """Stop every worker (SIGTERM, then SIGKILL after a bound), then listening."""
        super().stopService()
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)
        children = list(self._children.values())
        self._signal_children(signal.SIGTERM)
        ended = defer.DeferredList([child.ended for child, _ in children])
        ended.addTimeout(self.STOP_TIMEOUT, self._reactor)
        try:
            yield ended
        except defer.TimeoutError:
            self._signal_children(signal.SIGKILL)
        if self._port is not None:
            yield self._port.stopListening()


def _interceptor(config: Config) -> Interceptor | None:
    """The TLS interceptor for ``--intercept``, with the CA from ``--ca-dir``."""
    if not config.intercept:
        return None
    return Interceptor(
        load_ca(Path(config.ca_dir)),
        lambda: datetime.now(UTC),
        patterns=config.intercept,
    )
