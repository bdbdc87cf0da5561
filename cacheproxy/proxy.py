"""The proxy's shared state, and where the server hands each request over.

Rules of this module:
- One L{Proxy} per process holds what every exchange shares: the configuration, the
  store and its thread pool, the origin client, the memory tier, in-flight fetches
  for collapsing, statistics and the access log.
- Each request becomes one L{cacheproxy.exchange.Exchange}; a plain memory hit is
  answered on the spot (L{Exchange.serve_hot}), anything else runs as a coroutine.
- Store calls that touch SQLite run in the store's thread pool, never on the reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from cacheproxy import __version__, pages
from cacheproxy.accesslog import AccessLog
from cacheproxy.collapse import Flight
from cacheproxy.intercept import Interceptor
from cacheproxy.memory import MemoryTier
from cacheproxy.model import (
    Config,
    Entry,
    RequestHead,
    is_allowed,
)
from cacheproxy.origin import Origin
from cacheproxy.refresh import with_rules
from cacheproxy.server import RequestBody, ResponseWriter
from cacheproxy.stats import Stats
from cacheproxy.store import Store

if TYPE_CHECKING:
    from cacheproxy.server import ProxyProtocol

from cacheproxy.exchange import Exchange

log = Logger()

T = TypeVar("T")


class Proxy:
    """What all client connections share: the store, the origin client, the log.

    @ivar reactor: the reactor everything runs on.
    @ivar config: the validated command line.
    @ivar store: the disk store.
    @ivar origin: the pooled origin client.
    @ivar access_log: where one line per request goes.
    @ivar via: this proxy's ``Via`` member (RFC 9110 section 7.6.3).
    @ivar revalidating: body ids of stored responses being revalidated in the
        background, so that each is revalidated once at a time.
    @ivar memory: the memory tier (hot small bodies, URL snapshots).
    @ivar flights: misses being fetched that identical misses may join, by key.
    @ivar stats: counters for the status page and /metrics.
    @ivar info: what the status page says about this proxy.
    @ivar active: requests in flight (graceful shutdown waits for them).
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        store: Store,
        origin: Origin,
        access_log: AccessLog,
        pseudonym: str,
        threadpool: ThreadPool,
        interceptor: Interceptor | None = None,
    ) -> None:
        self.reactor = reactor
        self.interceptor = interceptor
        self.config = config
        self.store = store
        self.origin = origin
        self.access_log = access_log
        self.pseudonym = pseudonym
        self.via = b"1.1 " + pseudonym.encode("ascii")
        self.revalidating: set[str] = set()
        self.memory = MemoryTier(
            config.memory_cache, heuristic_cap=config.heuristic_cap
        )
        self.flights: dict[str, Flight] = {}
        # URLs whose last fetch could not be shared, until when: their misses go to
        # the origin at once instead of queueing behind one another (Varnish calls
        # this hit-for-miss).  Bounded: cleared when it grows past UNSHARED_LIMIT.
        self.unshared: dict[str, float] = {}
        self._allowed: dict[str, bool] = {}
        self.store_health = StoreHealth()
        self._reading: dict[str, defer.Deferred[Sequence[Entry]]] = {}
        self.active = 0
        self.stats = Stats(reactor.seconds())
        self.info = pages.ProxyInfo(pseudonym, __version__, _shown_options(config))
        self._figures = (0, 0)
        self._figures_at = -1e9
        self._drained: list[defer.Deferred[None]] = []
        self._threadpool = threadpool

    def handle(
        self,
        request: RequestHead,
        body: RequestBody,
        writer: ResponseWriter,
        channel: ProxyProtocol,
    ) -> None:
        """Answer one request that arrived on ``channel`` through ``writer``."""
        exchange = Exchange(
            self,
            request,
            body,
            writer,
            channel.client,
            channel.local,
            secure=channel.secure_origin is not None,
        )
        try:
            if exchange.serve_hot():
                return
        except Exception:
            log.failure("error on the hot path for {url}", url=request.target[:200])
            if writer.started:
                writer.abort()
                return
        defer.ensureDeferred(exchange.run())

    def reject(
        self,
        request: RequestHead,
        writer: ResponseWriter,
        channel: ProxyProtocol,
        status: int,
        message: str,
    ) -> None:
        """Answer a request refused before it was parsed whole."""
        exchange = Exchange(
            self, request, RequestBody(None, False), writer, channel.client
        )
        exchange.fail(status, message)
        exchange.log_access()

    def connect(
        self,
        request: RequestHead,
        first: bytes,
        writer: ResponseWriter,
        channel: ProxyProtocol,
    ) -> None:
        """Open a CONNECT tunnel for ``channel`` (RFC 9110 section 9.3.6)."""
        exchange = Exchange(
            self,
            request,
            RequestBody(None, False),
            writer,
            channel.client,
            channel.local,
        )
        defer.ensureDeferred(exchange.run_tunnel(channel, first))

    async def store_figures(self) -> tuple[int, int]:
        """The store's bytes and entry count, counted at most every 30 seconds."""
        now = self.reactor.seconds()
        if now - self._figures_at > 30:
            try:
                volume = await self.in_thread(self.store.volume)
                entries = await self.in_thread(self.store.count)
            except Exception:
                log.failure("cannot read the store's size")
                return self._figures
            self._figures, self._figures_at = (volume, entries), now
        return self._figures

    def read_variants(self, key: str) -> defer.Deferred[Sequence[Entry]]:
        """Read the URL's variants from the store into the memory tier, once at a
        time per URL however many requests ask (annotated with the refresh rules)."""
        pending = self._reading.get(key)
        if pending is None:
            pending = defer.ensureDeferred(self._read(key))
            if not pending.called:
                self._reading[key] = pending
        result: defer.Deferred[Sequence[Entry]] = defer.Deferred()

        def deliver(value: Sequence[Entry] | Failure) -> Sequence[Entry] | Failure:
            if isinstance(value, Failure):
                result.errback(value)
            else:
                result.callback(value)
            return value

        pending.addBoth(deliver)
        return result

    async def _read(self, key: str) -> Sequence[Entry]:
        try:
            now = self.reactor.seconds()
            stored = await self.in_thread(self.store.lookup, key)
            rules = self.config.refresh_rules
            entries = [with_rules(entry, rules) for entry in stored]
            self.memory.remember(key, entries, now)
            return entries
        finally:
            self._reading.pop(key, None)

    def allows(self, client: str) -> bool:
        """Whether ``client`` is inside ``--allow`` (remembered per address)."""
        allowed = self._allowed.get(client)
        if allowed is None:
            if len(self._allowed) > 4096:
                self._allowed.clear()
            allowed = self._allowed[client] = is_allowed(client, self.config.allow)
        return allowed

    UNSHARED_LIMIT = 4096
    UNSHARED_SECONDS = 120.0

    def mark_unshared(self, key: str) -> None:
        """Remember that the URL's response could not be shared, for a while."""
        if len(self.unshared) >= self.UNSHARED_LIMIT:
            self.unshared.clear()
        self.unshared[key] = self.reactor.seconds() + self.UNSHARED_SECONDS

    def is_unshared(self, key: str) -> bool:
        """Whether the URL's last response could not be shared, recently."""
        until = self.unshared.get(key)
        if until is None:
            return False
        if until <= self.reactor.seconds():
            del self.unshared[key]
            return False
        return True

    def exchange_started(self) -> None:
        """Count a request in flight."""
        self.active += 1

    def exchange_ended(self) -> None:
        """Count a request done; wake L{drain} waiters when none is left."""
        self.active -= 1
        if self.active == 0:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                waiter.callback(None)

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """Fire when no request is in flight, or after ``timeout`` seconds."""
        if self.active == 0:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._drained.append(waiter)
        waiter.addTimeout(timeout, self.reactor, onTimeoutCancel=lambda *_: None)
        return waiter

    def in_thread(self, function: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run a blocking store call in the store's thread pool."""
        return threads.deferToThreadPool(
            self.reactor, self._threadpool, function, *args
        )


def _shown_options(config: Config) -> tuple[tuple[str, str], ...]:
    """The options the status page lists."""
    upstream = config.upstream
    return (
        ("port", config.port),
        ("cache-dir", config.cache_dir),
        ("cache-size", f"{config.cache_size >> 20} MiB"),
        ("max-object-size", f"{config.max_object_size >> 20} MiB"),
        ("upstream", f"http://{upstream[0]}:{upstream[1]}" if upstream else "none"),
        ("allow", ", ".join(str(n) for n in config.allow)),
        ("connect-ports", ",".join(str(p) for p in sorted(config.connect_ports))),
        ("log-format", config.log_format),
        ("offline", "on" if config.offline else "off"),
        ("record", "on" if config.record else "off"),
    )


class StoreHealth:
    """Tells the log once when storing starts failing (a full disk, say) and once
    when it works again, instead of once per response.

    @ivar failing: the last attempt to store failed.
    """

    def __init__(self) -> None:
        self.failing = False

    def failed(self, what: str, error: OSError) -> None:
        """An attempt to store failed; the response is still relayed."""
        if not self.failing:
            self.failing = True
            log.warn(
                "cannot store responses ({what}: {error}); relaying them without "
                "storing until the store works again",
                what=what,
                error=error,
            )

    def succeeded(self) -> None:
        """A body was stored."""
        if self.failing:
            self.failing = False
            log.info("storing responses again")
