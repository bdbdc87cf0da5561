"""What the proxy has done since it started: counters for the operator's pages.

Rules of this module:
- It imports no Twisted; the clock comes in as ``now`` on every call that needs it.
- Every finished request is recorded once, by its Squid result code, and falls in
  exactly one class (L{source_of}): served from the cache, fetched from an origin,
  carried through a CONNECT tunnel, or answered by the proxy itself (denials and
  errors).  Hit ratios compare the first two classes only, so tunnels and refusals
  neither raise nor dilute them.
- Memory is bounded whatever the traffic: the recent list and the per-minute ring
  have fixed sizes, the per-host table is pruned to its busiest hosts, and the
  Prometheus labels take values from small fixed sets.
- Each L{Stats} has its own Prometheus registry, never the global one, so several
  proxies can run in one process.  The registry reads the plain counters when it
  is scraped (L{_Collector}); recording a request takes no locks.
"""

from __future__ import annotations

import bisect
import collections
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

Source = Literal["cache", "origin", "tunnel", "proxy"]

# Codes that mean "served from the cache" although their name has no _HIT: a 304
# from the origin confirmed the stored body, or the stored body stood in for a
# failed origin.
_HIT_CODES = frozenset({"TCP_REFRESH_UNMODIFIED", "TCP_REFRESH_FAIL_OLD"})
# Answers the proxy made up itself, with no stored or fetched body.
_PROXY_CODES = frozenset({"TCP_DENIED"})
# The method label's values; anything else is "OTHER" so a client cannot create
# unbounded label sets with made-up methods.
STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
MINUTES = 60
# Past this many distinct hosts the table keeps only the busiest half.
MAX_HOSTS = 2000


def is_hit(code: str) -> bool:
    """Whether a response with this Squid code was served from the cache."""
    return code.endswith("_HIT") or code in _HIT_CODES


@functools.lru_cache(maxsize=128)
def source_of(code: str) -> Source:
    """Where the bytes of a response with this Squid code came from."""
    if is_hit(code):
        return "cache"
    if code == "TCP_TUNNEL":
        return "tunnel"
    if code in _PROXY_CODES or code.startswith("NONE"):
        return "proxy"
    return "origin"


@functools.lru_cache(maxsize=64)
def method_label(method: bytes) -> str:
    """The method as a bounded Prometheus label value."""
    name = method.decode("latin-1")
    return name if name in STANDARD_METHODS else "OTHER"


@dataclass(frozen=True)
class Recent:
    """One finished request, as the status page lists it.

    @ivar time: clock when it finished.
    @ivar client: the client's address.
    @ivar code: the Squid result code.
    @ivar status: the status sent to the client.
    @ivar method: the request method.
    @ivar url: the request target as received.
    @ivar bytes_sent: bytes sent to the client, head included.
    """

    time: float
    client: str
    code: str
    status: int
    method: bytes
    url: bytes
    bytes_sent: int


@dataclass(frozen=True)
class Minute:
    """Hits and misses finished within one clock minute.

    @ivar minute: ``int(now // 60)`` of that minute.
    @ivar hits: requests served from the cache.
    @ivar misses: requests fetched from an origin.
    """

    minute: int
    hits: int = 0
    misses: int = 0


DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0)
"""Upper bounds of the request-duration histogram (Prometheus' defaults) below
+Inf, in seconds."""


class _Collector(Collector):
    """The Prometheus view of a L{Stats}, built when scraped.

    Counting stays plain integer arithmetic in L{Stats.record}; only a scrape
    turns the counts into metric families, so a request pays no locks or label
    lookups for the metrics.
    """

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        requests = CounterMetricFamily(
            "cacheproxy_requests",
            "Finished requests by Squid result code and method.",
            labels=["result", "method"],
        )
        for (code, method), count in sorted(stats.by_code_and_method.items()):
            requests.add_metric([code, method], count)
        yield requests
        sent = CounterMetricFamily(
            "cacheproxy_bytes_sent",
            "Bytes sent to clients, by where the response came from.",
            labels=["source"],
        )
        sent.add_metric(["cache"], stats.bytes_from_cache)
        sent.add_metric(["origin"], stats.bytes_fetched)
        yield sent
        yield CounterMetricFamily(
            "cacheproxy_tunnel_bytes",
            "Bytes carried by CONNECT tunnels.",
            value=stats.tunnel_bytes,
        )
        yield CounterMetricFamily(
            "cacheproxy_origin_errors",
            "Origins that could not be reached, timed out or broke off.",
            value=stats.origin_errors,
        )
        cumulative, buckets = 0, []
        for bound, count in zip(
            (*(str(b) for b in DURATION_BUCKETS), "+Inf"),
            stats.duration_counts,
            strict=True,
        ):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "cacheproxy_request_duration_seconds",
            "Time from a request's arrival to its last byte.",
            buckets=buckets,
            sum_value=stats.duration_sum,
        )
        yield GaugeMetricFamily(
            "cacheproxy_open_connections",
            "Open client connections.",
            value=stats.open_connections,
        )
        for name, doc, value in (
            ("cacheproxy_store_bytes", "Bytes the store occupies on disk.", 0),
            ("cacheproxy_store_entries", "Responses in the store.", 1),
            ("cacheproxy_store_budget_bytes", "The store's disk budget.", 2),
        ):
            yield GaugeMetricFamily(name, doc, value=stats.store_figures[value])
        yield GaugeMetricFamily(
            "cacheproxy_start_time_seconds",
            "When the proxy started.",
            value=stats.started,
        )
        if stats.worker is not None:
            worker = GaugeMetricFamily(
                "cacheproxy_worker",
                "Which of the --workers processes answered this scrape (always 1);"
                " every other figure here is that process's own.",
                labels=["worker", "workers", "pid"],
            )
            worker.add_metric([str(part) for part in stats.worker], 1)
            yield worker


class Stats:
    """Counts of everything the proxy has served since ``started``.

    @ivar started: clock when the proxy started.
    @ivar requests: finished requests of every kind.
    @ivar hits: requests served from the cache (L{is_hit}).
    @ivar misses: requests fetched from an origin.
    @ivar bytes_from_cache: bytes sent in responses served from the cache.
    @ivar bytes_fetched: bytes sent in responses fetched from an origin.
    @ivar tunnel_bytes: bytes carried by CONNECT tunnels, both ways.
    @ivar origin_errors: origins that failed (connect, timeout, broken response).
    @ivar open_connections: client connections open now.
    @ivar worker: with ``--workers``, which process this is: its number, the
        number of workers and its pid (every other figure is this process's own).
    @ivar registry: the Prometheus registry holding this proxy's metrics.
    """

    def __init__(self, started: float, *, recent: int = 20) -> None:
        self.started = started
        self.requests = 0
        self.by_code_and_method: dict[tuple[str, str], int] = {}
        self.duration_counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.hits = 0
        self.misses = 0
        self.bytes_from_cache = 0
        self.bytes_fetched = 0
        self.tunnel_bytes = 0
        self.origin_errors = 0
        self.open_connections = 0
        self.store_figures = (0, 0, 0)
        self.worker: tuple[int, int, int] | None = None
        self._hosts: collections.Counter[str] = collections.Counter()
        # Plain tuples and lists: cheap to write on every request, read rarely.
        self._recent: collections.deque[tuple[float, str, str, int, bytes, bytes, int]]
        self._recent = collections.deque(maxlen=recent)
        self._minutes = [[-1, 0, 0] for _ in range(MINUTES)]
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))

    # -- write side ------------------------------------------------------------

    def record(
        self,
        *,
        now: float,
        code: str,
        status: int,
        method: bytes,
        url: bytes,
        host: str,
        client: str,
        bytes_sent: int,
        elapsed: float,
    ) -> None:
        """Count one finished request (on every request: kept to plain arithmetic)."""
        source = source_of(code)
        self.requests += 1
        if source == "cache" or source == "origin":
            hit = source == "cache"
            if hit:
                self.hits += 1
                self.bytes_from_cache += bytes_sent
            else:
                self.misses += 1
                self.bytes_fetched += bytes_sent
            minute = int(now // 60)
            slot = self._minutes[minute % MINUTES]
            if slot[0] != minute:
                slot[:] = [minute, 0, 0]
            slot[1 if hit else 2] += 1
        elif source == "tunnel":
            self.tunnel_bytes += bytes_sent
        if host and host != "-":
            hosts = self._hosts
            hosts[host] = hosts.get(host, 0) + 1
            if len(hosts) > MAX_HOSTS:
                self._prune_hosts()
        self._recent.append((now, client, code, status, method, url[:2048], bytes_sent))
        # Both label values come from small fixed sets: codes are the proxy's own.
        labels = (code, method_label(method))
        counts = self.by_code_and_method
        counts[labels] = counts.get(labels, 0) + 1
        if elapsed < 0.0:
            elapsed = 0.0
        self.duration_counts[bisect.bisect_left(DURATION_BUCKETS, elapsed)] += 1
        self.duration_sum += elapsed

    def origin_error(self) -> None:
        """Count an origin that could not be reached, timed out or broke off."""
        self.origin_errors += 1

    def connection_opened(self) -> None:
        """Count a client connection that opened."""
        self.open_connections += 1

    def connection_closed(self) -> None:
        """Count a client connection that closed."""
        self.open_connections -= 1

    def set_store(self, size: int, entries: int, budget: int) -> None:
        """Set the store's figures (the store is asked just before rendering)."""
        self.store_figures = (size, entries, budget)

    def _prune_hosts(self) -> None:
        """Keep the busiest half of the hosts once there are too many."""
        self._hosts = collections.Counter(dict(self._hosts.most_common(MAX_HOSTS // 2)))

    # -- read side -------------------------------------------------------------

    def hit_ratio(self) -> float | None:
        """Hits over hits and misses, or None before the first of either."""
        total = self.hits + self.misses
        return self.hits / total if total else None

    def byte_hit_ratio(self) -> float | None:
        """Bytes from the cache over bytes from cache and origins, or None if none."""
        total = self.bytes_from_cache + self.bytes_fetched
        return self.bytes_from_cache / total if total else None

    def top_hosts(self, n: int = 10) -> list[tuple[str, int]]:
        """The ``n`` hosts with the most requests, busiest first."""
        return self._hosts.most_common(n)

    def recent(self) -> list[Recent]:
        """The last finished requests, newest first."""
        return [Recent(*recent) for recent in reversed(self._recent)]

    def per_minute(self, now: float) -> list[Minute]:
        """Hits and misses in each of the last 60 minutes, oldest first."""
        current = int(now // 60)
        minutes = []
        for minute in range(current - MINUTES + 1, current + 1):
            at, hits, misses = self._minutes[minute % MINUTES]
            minutes.append(
                Minute(minute, hits, misses) if at == minute else Minute(minute)
            )
        return minutes

    def uptime(self, now: float) -> float:
        """Seconds since the proxy started."""
        return max(0.0, now - self.started)
