"""The proxy's own pages: status HTML, Prometheus metrics, proxy.pac, 404."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from cacheproxy.pages import Page, ProxyInfo, proxy_address, render, size
from cacheproxy.stats import Stats

T0 = 1_700_000_000.0
INFO = ProxyInfo(
    "cacheproxy-1a2b3c",
    "0.1.0",
    (("cache-dir", "var/cache"), ("offline", "on"), ("record", "off")),
)


def traffic() -> Stats:
    """Stats after three hits (3000 bytes) and one miss (1000 bytes)."""
    stats = Stats(T0 - 3725)
    for i in range(3):
        stats.record(
            now=T0 - 60 + i,
            code="TCP_HIT",
            status=200,
            method=b"GET",
            url=b"http://deb.example/pool/a.deb",
            host="deb.example",
            client="192.168.1.20",
            bytes_sent=1000,
            elapsed=0.002,
        )
    stats.record(
        now=T0 - 5,
        code="TCP_MISS",
        status=200,
        method=b"GET",
        url=b"http://evil.example/<script>alert(1)</script>",
        host="evil.example",
        client="192.168.1.21",
        bytes_sent=1000,
        elapsed=0.3,
    )
    return stats


def page(path: bytes, stats: Stats | None = None, **overrides: Any) -> Page:
    """render() with sensible defaults."""
    arguments: dict[str, Any] = {
        "stats": stats if stats is not None else traffic(),
        "info": INFO,
        "now": T0,
        "host_header": b"proxy.lan:3128",
        "local": ("10.0.0.2", 3128),
        "store_bytes": 512 << 20,
        "store_entries": 42,
        "store_budget": 1 << 30,
    }
    arguments.update(overrides)
    return render(path, **arguments)


@pytest.mark.parametrize("path", [b"/", b"/index.html", b"/?refresh=1"])
def test_status_page_is_html(path: bytes):
    """/ and /index.html serve an uncached HTML5 page sized for phones, no scripts."""
    result = page(path)
    assert result.status == 200
    assert result.content_type == b"text/html; charset=utf-8"
    assert (b"Cache-Control", b"no-store") in result.headers
    body = result.body.decode()
    assert body.startswith("<!DOCTYPE html>")
    assert 'name="viewport"' in body
    assert "<script" not in body
    assert "src=" not in body and "<link" not in body


def test_status_page_shows_the_numbers():
    """The status page shows uptime, requests, both ratios, bytes and the store."""
    body = page(b"/").body.decode()
    assert "1h 2m" in body
    assert "<dt>requests</dt><dd>4</dd>" in body
    assert "<dt>hit ratio (requests)</dt><dd>75.0 %</dd>" in body
    assert "<dt>hit ratio (bytes)</dt><dd>75.0 %</dd>" in body
    assert "<dt>bytes from cache</dt><dd>2.9 KiB</dd>" in body
    assert "<dt>bytes fetched</dt><dd>1000 B</dd>" in body
    assert "512.0 MiB of 1.0 GiB" in body
    assert "<dt>used</dt><dd>50.0 %</dd>" in body
    assert "<dt>entries</dt><dd>42</dd>" in body


def test_status_page_lists_hosts_options_and_recent():
    """Top hosts, active options (offline banner) and recent requests are listed."""
    body = page(b"/").body.decode()
    assert '<td>deb.example</td><td class="n">3</td>' in body
    assert "<dt>cache-dir</dt><dd>var/cache</dd>" in body
    assert "offline mode is on" in body
    assert "record mode is on" not in body
    assert "TCP_HIT/200" in body and "TCP_MISS/200" in body
    assert "192.168.1.21" in body
    assert "cacheproxy-1a2b3c" in body


def test_status_page_escapes_hostile_values():
    """A URL, host or option with markup is escaped, never injected."""
    stats = traffic()
    stats.record(
        now=T0,
        code="TCP_MISS",
        status=200,
        method=b"GET",
        url=b'http://x.example/"><img onerror=alert(2)>',
        host='<b>x"',
        client="10.0.0.9",
        bytes_sent=10,
        elapsed=0.1,
    )
    info = ProxyInfo("<i>p</i>", "0.1.0", (("upstream", "<svg onload=x>"),))
    body = page(b"/", stats, info=info).body.decode()
    assert "<script>alert(1)</script>" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "<img" not in body and "&lt;img onerror=alert(2)&gt;" in body
    assert "<b>x" not in body and "&lt;b&gt;x&quot;" in body
    assert "<i>p</i>" not in body and "<svg onload" not in body


def test_status_page_charts_the_last_hour():
    """The inline SVG has one bar per active minute, titled with its counts."""
    body = page(b"/").body.decode()
    assert "<svg viewBox" in body
    assert "3 hits, 0 misses" in body
    assert "0 hits, 1 misses" in body
    assert body.count('<rect class="hit" x=') == 2


def test_status_page_before_any_traffic():
    """A fresh proxy's page renders, with undefined ratios shown as a dash."""
    body = page(b"/", Stats(T0), store_bytes=0, store_entries=0).body.decode()
    assert "<dt>hit ratio (requests)</dt><dd>-</dd>" in body
    assert "none yet" in body


def test_metrics_parse_with_the_right_values():
    """/metrics is Prometheus text that parses and carries the counters' values."""
    stats = traffic()
    stats.origin_error()
    stats.connection_opened()
    result = page(b"/metrics", stats)
    assert result.status == 200
    assert result.content_type == CONTENT_TYPE_LATEST.encode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(result.body.decode())
        for s in family.samples
    }
    requests = "cacheproxy_requests_total"
    assert samples[(requests, (("method", "GET"), ("result", "TCP_HIT")))] == 3
    assert samples[(requests, (("method", "GET"), ("result", "TCP_MISS")))] == 1
    sent = "cacheproxy_bytes_sent_total"
    assert samples[(sent, (("source", "cache"),))] == 3000
    assert samples[(sent, (("source", "origin"),))] == 1000
    assert samples[("cacheproxy_tunnel_bytes_total", ())] == 0
    assert samples[("cacheproxy_origin_errors_total", ())] == 1
    assert samples[("cacheproxy_request_duration_seconds_count", ())] == 4
    assert samples[("cacheproxy_open_connections", ())] == 1
    assert samples[("cacheproxy_store_bytes", ())] == 512 << 20
    assert samples[("cacheproxy_store_entries", ())] == 42


def test_pac_points_at_the_host_header():
    """/proxy.pac names the proxy as the client reached it: its Host header."""
    result = page(b"/proxy.pac", host_header=b"proxy.lan:8080")
    assert result.status == 200
    assert result.content_type == b"application/x-ns-proxy-autoconfig"
    text = result.body.decode()
    assert "function FindProxyForURL(url, host)" in text
    assert 'return "PROXY proxy.lan:8080; DIRECT";' in text


def test_pac_falls_back_to_the_local_address():
    """Without a Host header the PAC names the connection's local address."""
    text = page(b"/proxy.pac", host_header=None).body.decode()
    assert 'return "PROXY 10.0.0.2:3128; DIRECT";' in text


def test_pac_sends_the_lan_direct():
    """Plain names, loopback and private IP literals go DIRECT, matched without DNS."""
    text = page(b"/proxy.pac").body.decode()
    assert "isPlainHostName(host)" in text
    for network in (
        '"127.0.0.0", "255.0.0.0"',
        '"10.0.0.0", "255.0.0.0"',
        '"172.16.0.0", "255.240.0.0"',
        '"192.168.0.0", "255.255.0.0"',
    ):
        assert f"isInNet(host, {network})" in text
    # isInNet resolves names; it is only reached for an IPv4 literal.
    assert text.index(".test(host) &&") < text.index("isInNet(")
    assert 'return "DIRECT";' in text


@pytest.mark.parametrize(
    "host_header, local, expected",
    [
        (b"proxy.lan:8080", ("10.0.0.2", 3128), "proxy.lan:8080"),
        (b"proxy.lan", ("10.0.0.2", 3128), "proxy.lan:3128"),
        (b"192.168.1.5:3128", ("192.168.1.5", 3128), "192.168.1.5:3128"),
        (b"[fd00::5]:3128", ("fd00::5", 3128), "[fd00::5]:3128"),
        (None, ("fd00::5", 3128), "[fd00::5]:3128"),
        (b'x"; return "DIRECT', ("10.0.0.2", 3128), "10.0.0.2:3128"),
        (b"proxy.lan:99999", ("10.0.0.2", 3128), "proxy.lan:3128"),
        (b"", ("10.0.0.2", 3128), "10.0.0.2:3128"),
    ],
)
def test_proxy_address(
    host_header: bytes | None, local: tuple[str, int], expected: str
):
    """Host header first (port from the connection if absent); junk is not trusted."""
    assert proxy_address(host_header, local) == expected


@pytest.mark.parametrize("path", [b"/favicon.ico", b"/metrics/x", b"/admin", b""])
def test_unknown_path_is_404(path: bytes):
    """Any other path is a short plain-text 404."""
    result = page(path)
    assert result.status == 404
    assert result.content_type.startswith(b"text/plain")
    assert 0 < len(result.body) < 200


@pytest.mark.parametrize(
    "count, shown",
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 << 40, "3.0 TiB")],
)
def test_sizes_in_binary_units(count: int, shown: str):
    """Byte counts are shown in B, KiB, MiB, GiB or TiB."""
    assert size(count) == shown
