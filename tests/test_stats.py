"""Stats: counting finished requests by where their bytes came from."""

from __future__ import annotations

import pytest

from cacheproxy.stats import MAX_HOSTS, Stats, is_hit, method_label, source_of

T0 = 1_700_000_000.0


def record(stats: Stats, code: str, size: int = 100, **fields: object) -> None:
    """Record one request with defaults for every field the test does not care about."""
    values: dict[str, object] = {
        "now": T0,
        "status": 200,
        "method": b"GET",
        "url": b"http://example.com/",
        "host": "example.com",
        "client": "127.0.0.1",
        "elapsed": 0.01,
    }
    values.update(fields)
    stats.record(code=code, bytes_sent=size, **values)  # type: ignore[arg-type]


def sample(stats: Stats, name: str, **labels: str) -> float | None:
    """One sample's value from the stats' own registry."""
    return stats.registry.get_sample_value(name, labels)


@pytest.mark.parametrize(
    "code, source",
    [
        ("TCP_HIT", "cache"),
        ("TCP_MEM_HIT", "cache"),
        ("TCP_STALE_HIT", "cache"),
        ("TCP_OFFLINE_HIT", "cache"),
        ("TCP_REFRESH_UNMODIFIED", "cache"),
        ("TCP_REFRESH_FAIL_OLD", "cache"),
        ("TCP_MISS", "origin"),
        ("TCP_REFRESH_MODIFIED", "origin"),
        ("TCP_REFRESH_FAIL_ERR", "origin"),
        ("TCP_TUNNEL", "tunnel"),
        ("TCP_DENIED", "proxy"),
        ("NONE_NONE", "proxy"),
    ],
)
def test_each_code_has_one_source(code: str, source: str):
    """Squid codes split into cache, origin, tunnel and the proxy's own answers."""
    assert source_of(code) == source
    assert is_hit(code) == (source == "cache")


def test_ratios_by_requests_and_by_bytes():
    """Hit ratios compare hits with misses, by count and by bytes."""
    stats = Stats(T0)
    record(stats, "TCP_HIT", 300)
    record(stats, "TCP_MEM_HIT", 300)
    record(stats, "TCP_REFRESH_UNMODIFIED", 300)
    record(stats, "TCP_MISS", 900)
    assert stats.requests == 4
    assert stats.hits == 3
    assert stats.misses == 1
    assert stats.hit_ratio() == pytest.approx(0.75)
    assert stats.byte_hit_ratio() == pytest.approx(0.5)


def test_ratios_undefined_before_traffic():
    """Without hits or misses the ratios are None, not a division by zero."""
    stats = Stats(T0)
    record(stats, "TCP_DENIED")
    assert stats.hit_ratio() is None
    assert stats.byte_hit_ratio() is None


def test_tunnels_and_errors_do_not_dilute_the_ratio():
    """Tunnels and the proxy's own errors count as requests but not as misses."""
    stats = Stats(T0)
    record(stats, "TCP_HIT", 100)
    record(stats, "TCP_TUNNEL", 5000, method=b"CONNECT")
    record(stats, "NONE_NONE", 80)
    record(stats, "TCP_DENIED", 80)
    assert stats.requests == 4
    assert stats.hit_ratio() == 1.0
    assert stats.byte_hit_ratio() == 1.0


def test_byte_accounting_by_source():
    """Bytes count as from cache, fetched or tunnelled, in attributes and metrics."""
    stats = Stats(T0)
    record(stats, "TCP_HIT", 1000)
    record(stats, "TCP_STALE_HIT", 24)
    record(stats, "TCP_MISS", 500)
    record(stats, "TCP_REFRESH_MODIFIED", 12)
    record(stats, "TCP_TUNNEL", 7000, method=b"CONNECT")
    record(stats, "NONE_NONE", 99)
    assert (stats.bytes_from_cache, stats.bytes_fetched) == (1024, 512)
    assert stats.tunnel_bytes == 7000
    assert sample(stats, "cacheproxy_bytes_sent_total", source="cache") == 1024
    assert sample(stats, "cacheproxy_bytes_sent_total", source="origin") == 512
    assert sample(stats, "cacheproxy_tunnel_bytes_total") == 7000


def test_requests_counter_by_result_and_method():
    """cacheproxy_requests_total counts per Squid code and method."""
    stats = Stats(T0)
    record(stats, "TCP_HIT")
    record(stats, "TCP_HIT")
    record(stats, "TCP_MISS", method=b"HEAD")
    assert (
        sample(stats, "cacheproxy_requests_total", result="TCP_HIT", method="GET") == 2
    )
    assert (
        sample(stats, "cacheproxy_requests_total", result="TCP_MISS", method="HEAD")
        == 1
    )


def test_method_label_is_bounded():
    """Standard methods keep their name; anything else is OTHER."""
    assert method_label(b"GET") == "GET"
    assert method_label(b"PATCH") == "PATCH"
    assert method_label(b"BREW") == "OTHER"
    assert method_label(b"get") == "OTHER"
    stats = Stats(T0)
    for made_up in (b"X1", b"X2", b"X3"):
        record(stats, "TCP_MISS", method=made_up)
    assert (
        sample(stats, "cacheproxy_requests_total", result="TCP_MISS", method="OTHER")
        == 3
    )


def test_registries_are_private():
    """Two Stats in one process keep separate registries and counts."""
    first, second = Stats(T0), Stats(T0)
    record(first, "TCP_HIT")
    assert first.registry is not second.registry
    assert (
        sample(second, "cacheproxy_requests_total", result="TCP_HIT", method="GET")
        is None
    )


def test_duration_histogram_and_origin_errors():
    """Elapsed times go to the duration histogram; origin errors to their counter."""
    stats = Stats(T0)
    record(stats, "TCP_MISS", elapsed=0.2)
    record(stats, "TCP_HIT", elapsed=0.004)
    stats.origin_error()
    assert sample(stats, "cacheproxy_request_duration_seconds_count") == 2
    assert sample(stats, "cacheproxy_request_duration_seconds_sum") == pytest.approx(
        0.204
    )
    assert stats.origin_errors == 1
    assert sample(stats, "cacheproxy_origin_errors_total") == 1


def test_recent_list_is_bounded_newest_first():
    """Only the last ``recent`` requests are kept, newest first."""
    stats = Stats(T0, recent=3)
    for i in range(10):
        record(stats, "TCP_MISS", url=f"http://example.com/{i}".encode(), now=T0 + i)
    recent = stats.recent()
    assert [r.url for r in recent] == [
        b"http://example.com/9",
        b"http://example.com/8",
        b"http://example.com/7",
    ]
    assert recent[0].time == T0 + 9
    assert recent[0].code == "TCP_MISS"
    assert recent[0].client == "127.0.0.1"


def test_per_minute_counts_the_last_hour():
    """per_minute gives 60 minutes, oldest first, with hits and misses of each."""
    stats = Stats(T0)
    start = int(T0 // 60) * 60
    record(stats, "TCP_HIT", now=start + 1)
    record(stats, "TCP_HIT", now=start + 59)
    record(stats, "TCP_MISS", now=start + 30)
    record(stats, "TCP_MISS", now=start + 61)
    record(stats, "TCP_TUNNEL", now=start + 62)
    minutes = stats.per_minute(start + 65)
    assert len(minutes) == 60
    assert minutes[-1].minute == int((start + 65) // 60)
    assert (minutes[-2].hits, minutes[-2].misses) == (2, 1)
    assert (minutes[-1].hits, minutes[-1].misses) == (0, 1)
    assert sum(m.hits + m.misses for m in minutes[:-2]) == 0


def test_per_minute_ring_forgets_minutes_older_than_an_hour():
    """Over more than 60 minutes, old minutes drop out and reused slots restart at 0."""
    stats = Stats(T0)
    start = int(T0 // 60) * 60
    for minute in range(150):
        record(stats, "TCP_HIT", now=start + minute * 60 + 5)
        if minute % 2:
            record(stats, "TCP_MISS", now=start + minute * 60 + 6)
    now = start + 149 * 60 + 30
    minutes = stats.per_minute(now)
    assert [m.minute for m in minutes] == list(
        range(int(now // 60) - 59, int(now // 60) + 1)
    )
    assert all(m.hits == 1 for m in minutes)
    assert sum(m.misses for m in minutes) == 30
    # An hour of silence later, nothing is left.
    later = stats.per_minute(now + 3600)
    assert sum(m.hits + m.misses for m in later) == 0


def test_top_hosts_busiest_first():
    """top_hosts lists the busiest hosts first, at most n of them."""
    stats = Stats(T0)
    for host, count in (("a.example", 1), ("b.example", 5), ("c.example", 3)):
        for _ in range(count):
            record(stats, "TCP_MISS", host=host)
    record(stats, "NONE_NONE", host="-")
    assert stats.top_hosts(2) == [("b.example", 5), ("c.example", 3)]


def test_host_table_is_pruned():
    """Past MAX_HOSTS distinct hosts the table keeps the busiest, bounding memory."""
    stats = Stats(T0)
    for _ in range(3):
        record(stats, "TCP_MISS", host="busy.example")
    for i in range(MAX_HOSTS + 1):
        record(stats, "TCP_MISS", host=f"h{i}.example")
    assert len(stats.top_hosts(10 * MAX_HOSTS)) <= MAX_HOSTS
    assert stats.top_hosts(1) == [("busy.example", 3)]


def test_connection_gauge():
    """Opened and closed connections move the open-connections count and gauge."""
    stats = Stats(T0)
    stats.connection_opened()
    stats.connection_opened()
    stats.connection_opened()
    stats.connection_closed()
    assert stats.open_connections == 2
    assert sample(stats, "cacheproxy_open_connections") == 2


def test_store_gauges_and_uptime():
    """set_store fills the store gauges; uptime counts from the start."""
    stats = Stats(T0)
    stats.set_store(4096, 7, 1 << 30)
    assert sample(stats, "cacheproxy_store_bytes") == 4096
    assert sample(stats, "cacheproxy_store_entries") == 7
    assert sample(stats, "cacheproxy_store_budget_bytes") == 1 << 30
    assert stats.uptime(T0 + 90.5) == 90.5
