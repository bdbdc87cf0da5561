"""End to end: refresh patterns make package mirrors cacheable (issue 4).

The origin is laid out like a Debian mirror and, like Debian's mirrors, sends no
Cache-Control, Expires, ETag or Last-Modified; the requests carry apt's headers.
"""

from __future__ import annotations

import hashlib

import pytest_twisted
from twisted.web import server

from cacheproxy.refresh import builtin_rules, parse_refresh_pattern
from tests.conftest import RunningProxy, start_proxy
from tests.support import Origin, fetch

DEB = bytes(range(256)) * 300
PACKAGES = b"Package: hello\nVersion: 2.10-3\nFilename: pool/main/h/hello/hello.deb\n"
APT = {"User-Agent": "Debian APT-HTTP/1.3 (2.6.1)"}


def _bare(body: bytes):
    """A handler that sends only the body: no caching headers at all."""

    def handler(request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/octet-stream")
        return body

    return handler


def _mirror(origin: Origin) -> dict[str, str]:
    digest = hashlib.sha256(PACKAGES).hexdigest()
    paths = {
        "deb": "/debian/pool/main/h/hello/hello_2.10-3_amd64.deb",
        "by-hash": f"/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/{digest}",
        "inrelease": "/debian/dists/bookworm/InRelease",
        "other": "/debian/README.txt",
    }
    bodies = {"deb": DEB, "by-hash": PACKAGES, "inrelease": b"Origin: Debian\n"}
    return {
        name: origin.route(path, _bare(bodies.get(name, b"readme")))
        for name, path in paths.items()
    }


@pytest_twisted.ensureDeferred
async def test_deb_without_caching_headers_is_served_from_store(
    origin: Origin, proxy: RunningProxy
):
    """A .deb from pool/ with no caching headers is a hit the second time."""
    urls = _mirror(origin)
    first = await fetch(proxy.port, "GET", urls["deb"], APT)
    second = await fetch(proxy.port, "GET", urls["deb"], APT)
    assert first.body == second.body == DEB
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/debian/pool/main/h/hello/hello_2.10-3_amd64.deb") == 1


@pytest_twisted.ensureDeferred
async def test_by_hash_is_immutable_even_with_max_age_0(
    origin: Origin, proxy: RunningProxy
):
    """apt's Cache-Control: max-age=0 on a by-hash index does not force a refetch."""
    urls = _mirror(origin)
    headers = {**APT, "Cache-Control": "max-age=0"}
    await fetch(proxy.port, "GET", urls["by-hash"], headers)
    again = await fetch(proxy.port, "GET", urls["by-hash"], headers)
    reload = await fetch(
        proxy.port, "GET", urls["by-hash"], {"Cache-Control": "no-cache"}
    )
    assert again.body == reload.body == PACKAGES
    assert again.header("Cache-Status") == "cacheproxy; hit"
    assert reload.header("Cache-Status") == "cacheproxy; hit"
    path = "/" + urls["by-hash"].split("/", 3)[3]
    assert origin.count(path) == 1


@pytest_twisted.ensureDeferred
async def test_index_files_are_not_immutable(origin: Origin, proxy: RunningProxy):
    """InRelease is an index: apt's max-age=0 sends it back to the origin."""
    urls = _mirror(origin)
    await fetch(proxy.port, "GET", urls["inrelease"], APT)
    forced = await fetch(
        proxy.port, "GET", urls["inrelease"], {**APT, "Cache-Control": "max-age=0"}
    )
    assert forced.header("Cache-Status").startswith("cacheproxy; fwd=")
    assert origin.count("/debian/dists/bookworm/InRelease") == 2


@pytest_twisted.ensureDeferred
async def test_unmatched_url_keeps_rfc_heuristics(origin: Origin, proxy: RunningProxy):
    """A URL no rule matches, without Last-Modified, is not served from store."""
    urls = _mirror(origin)
    await fetch(proxy.port, "GET", urls["other"])
    await fetch(proxy.port, "GET", urls["other"])
    assert origin.count("/debian/README.txt") == 2


@pytest_twisted.ensureDeferred
async def test_user_refresh_pattern_comes_first(origin: Origin, tmp_path):
    """A --refresh-pattern rule gives freshness to the URLs it matches."""
    url = origin.route("/assets/app.js", _bare(b"js"))
    rules = (parse_refresh_pattern(r"/assets/ 10 20% 60"),) + builtin_rules()
    running = await start_proxy(tmp_path, refresh_rules=rules)
    try:
        await fetch(running.port, "GET", url)
        second = await fetch(running.port, "GET", url)
    finally:
        await running.service.stopService()
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/assets/app.js") == 1
