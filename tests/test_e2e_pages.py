"""End to end: the proxy's own pages, asked for in origin form (issue 4)."""

from __future__ import annotations

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningProxy
from tests.support import Origin, fetch, send_raw


async def _page(port: int, path: str, host: str | None = None):
    # HTTP/1.1 requires Host (RFC 9112 section 3.2): the proxy's own address by default.
    host = host or f"127.0.0.1:{port}"
    data = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    (response,) = await send_raw(port, data)
    return response


@pytest_twisted.ensureDeferred
async def test_status_page_shows_traffic(origin: Origin, proxy: RunningProxy):
    """GET / is an HTML status page with the proxy's requests and hit ratio."""
    url = origin.static("/seen", b"x", {"Cache-Control": "max-age=60"})
    await fetch(proxy.port, "GET", url)
    await fetch(proxy.port, "GET", url)
    page = await _page(proxy.port, "/", f"127.0.0.1:{proxy.port}")
    assert page.status == 200
    assert page.header("Content-Type").startswith("text/html")
    text = page.body.decode()
    assert "<svg" in text
    assert url in text
    assert "50" in text  # one hit out of two requests


@pytest_twisted.ensureDeferred
async def test_metrics_are_prometheus_text(origin: Origin, proxy: RunningProxy):
    """GET /metrics parses as Prometheus text and counts hits and misses."""
    url = origin.static("/m", b"x", {"Cache-Control": "max-age=60"})
    await fetch(proxy.port, "GET", url)
    await fetch(proxy.port, "GET", url)
    page = await _page(proxy.port, "/metrics")
    assert page.status == 200
    families = {f.name: f for f in text_string_to_metric_families(page.body.decode())}
    requests = {
        s.labels["result"]: s.value
        for s in families["cacheproxy_requests"].samples
        if s.name == "cacheproxy_requests_total"
    }
    assert requests["TCP_MISS"] == 1
    assert requests["TCP_MEM_HIT"] == 1


@pytest_twisted.ensureDeferred
async def test_pac_points_at_the_address_clients_used(proxy: RunningProxy):
    """GET /proxy.pac names the proxy as the client reached it."""
    page = await _page(proxy.port, "/proxy.pac", f"cache.lan:{proxy.port}")
    assert page.status == 200
    assert page.header("Content-Type") == "application/x-ns-proxy-autoconfig"
    text = page.body.decode()
    assert "function FindProxyForURL(url, host)" in text
    assert f"PROXY cache.lan:{proxy.port}; DIRECT" in text


@pytest_twisted.ensureDeferred
async def test_unknown_page_is_404(proxy: RunningProxy):
    """An origin-form request for anything else is 404."""
    page = await _page(proxy.port, "/nothing-here")
    assert page.status == 404
    # The proxy's own pages are not cached responses: no Cache-Status.
    assert page.header("Cache-Status") is None
    post = await send_raw(
        proxy.port, f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode()
    )
    assert post[0].status == 405
    assert post[0].header("Cache-Status") is None
