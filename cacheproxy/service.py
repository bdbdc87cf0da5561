"""Builds the running proxy from a Config: store, origin client, log, listening port."""

from __future__ import annotations

import os
import secrets
import signal
import threading
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from cacheproxy.accesslog import AccessLog
from cacheproxy.exchange import Proxy
from cacheproxy.model import Config
from cacheproxy.options import Options
from cacheproxy.origin import Origin
from cacheproxy.server import ProxyFactory
from cacheproxy.stats import Stats
from cacheproxy.store import Store

__all__ = ["Options", "makeService", "ProxyService"]

log = Logger()

CULL_INTERVAL = 60.0
COUNTERS_INTERVAL = 10.0
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

    def startService(self) -> None:
        super().startService()
        self._threadpool.start()
        self._culling.start(CULL_INTERVAL, now=False)
        self._counting.start(COUNTERS_INTERVAL, now=False)

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
        yield self._origin.close()
        self._threadpool.stop()
        self._store.close()


class ProxyService(MultiService):
    """The whole proxy as one twistd service.

    @ivar proxy: the shared request-handling state.
    @ivar listening: fires with the listening port once it is bound.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        os.makedirs(config.cache_dir, exist_ok=True)
        store = Store(config.cache_dir, config.cache_size)
        origin = Origin(reactor, config.origin_timeout, upstream=config.upstream)
        threadpool = ThreadPool(minthreads=1, maxthreads=4, name="cacheproxy-store")
        access_log = AccessLog(config.access_log, reactor)
        self.proxy = Proxy(
            reactor,
            config,
            store,
            origin,
            access_log,
            proxy_pseudonym(config.cache_dir),
            threadpool,
        )
        self._resources = _Resources(
            reactor, threadpool, origin, store, self.proxy.stats
        )
        self._resources.setServiceParent(self)
        self._access_log = access_log
        access_log.setServiceParent(self)
        endpoint = serverFromString(reactor, _with_backlog(config.port))
        listener = StreamServerEndpointService(endpoint, ProxyFactory(self.proxy))
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


def makeService(options: Options) -> ProxyService:
    """twistd's entry point: the proxy service for these options."""
    from twisted.internet import reactor  # noqa: TID251 (the one place it is chosen)

    return ProxyService(options["config"], reactor)
