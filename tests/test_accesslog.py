"""The access log: Squid's format, one line per request, flushed within a second."""

from __future__ import annotations

import re

import pytest_twisted

from cacheproxy.accesslog import squid_line
from tests.conftest import RunningProxy
from tests.support import Origin, fetch, wait_for

LINE = re.compile(
    r"^(\d+)\.(\d{3}) +(\d+) (\S+) ([A-Z_]+)/(\d{3}) (\d+) (\S+) (\S+) - (\S+) (\S+)$"
)


def test_line_has_squids_fields():
    """A line carries time.ms, elapsed ms, client, code/status, bytes, method, URL."""
    line = squid_line(
        now=1700000000.1234,
        elapsed=0.045,
        client="10.0.0.7",
        code="TCP_HIT",
        status=200,
        size=1234,
        method=b"GET",
        url=b"http://example.com/a b",
        hierarchy="HIER_NONE/-",
        content_type=b"text/html",
    )
    assert line == (
        "1700000000.123     45 10.0.0.7 TCP_HIT/200 1234 GET "
        "http://example.com/a%20b - HIER_NONE/- text/html"
    )


@pytest_twisted.ensureDeferred
async def test_miss_and_hit_are_logged(origin: Origin, proxy: RunningProxy):
    """A miss and a hit each write one line, reaching the file within about a second."""
    url = origin.static(
        "/logged", b"x", {"Cache-Control": "max-age=60", "Content-Type": "text/plain"}
    )
    first = await fetch(proxy.port, "GET", url)
    await fetch(proxy.port, "GET", url)

    def two_lines() -> bool:
        return (
            proxy.access_log.exists()
            and len(proxy.access_log.read_text().splitlines()) >= 2
        )

    await wait_for(two_lines, timeout=3.0)
    miss, hit = (LINE.match(line) for line in proxy.access_log.read_text().splitlines())
    assert miss and hit
    assert miss.group(4) == "127.0.0.1"
    assert (miss.group(5), miss.group(6)) == ("TCP_MISS", "200")
    # A small body stored a moment ago is served from the memory tier.
    assert (hit.group(5), hit.group(6)) == ("TCP_MEM_HIT", "200")
    assert miss.group(8) == "GET" and miss.group(9) == url
    assert miss.group(10).startswith("HIER_DIRECT/127.0.0.1")
    assert hit.group(10) == "HIER_NONE/-"
    assert miss.group(11) == "text/plain"
    assert int(miss.group(7)) > len(first.body)
