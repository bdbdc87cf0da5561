"""Security of a shared cache, each case with two clients: what one client made the
proxy store never reaches another when RFC 9111 says it must not, the proxy never
lets request fields other than the URL choose the cache key or the origin, and its
own pages obey ``--allow``."""

from __future__ import annotations

import ipaddress
from email.utils import formatdate
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web import server

from cacheproxy.model import Entry, ResponseHead
from cacheproxy.policy import cache_key
from cacheproxy.store import Store
from tests.conftest import RunningProxy, start_proxy
from tests.support import Origin, fetch, send_raw

TEN = (ipaddress.ip_network("10.0.0.0/8"),)
STORED = "cacheproxy; fwd=miss; stored"
HIT = "cacheproxy; hit"


def _numbered(origin: Origin, path: str, headers: dict[str, str]) -> str:
    """A route answering ``response N`` to its Nth request, with ``headers``."""

    def handler(request: server.Request) -> bytes:
        for name, value in headers.items():
            request.setHeader(name, value)
        return b"response %d" % origin.count(path)

    return origin.route(path, handler)


def _reflecting(origin: Origin, path: str, field: str, headers: dict[str, str]) -> str:
    """A route whose body is the request's value of ``field`` (or ``none``)."""

    def handler(request: server.Request) -> bytes:
        for name, value in headers.items():
            request.setHeader(name, value)
        return request.getHeader(field.lower().encode()) or b"none"

    return origin.route(path, handler)


def _stored_urls(cache_dir: Path) -> list[str]:
    """The URLs the store under ``cache_dir`` holds, one per variant."""
    store = Store.open_existing(str(cache_dir))
    try:
        return sorted(entry.url for entry in store.entries())
    finally:
        store.close()


def _http_date(offset: float) -> str:
    return formatdate(reactor.seconds() + offset, usegmt=True)


# -- what must not be shared (RFC 9111 sections 3, 3.5, 4.1, 5.2.2.7) ----------------


@pytest_twisted.ensureDeferred
async def test_private_response_reaches_only_its_client(
    origin: Origin, proxy: RunningProxy
):
    """Cache-Control: private: client B gets its own origin response, not A's."""
    url = _numbered(origin, "/account", {"Cache-Control": "private, max-age=600"})
    a = await fetch(proxy.port, "GET", url, {"Cookie": "user=a"})
    b = await fetch(proxy.port, "GET", url, {"Cookie": "user=b"})
    assert (a.body, b.body) == (b"response 1", b"response 2")
    assert b.header("Cache-Status") == "cacheproxy; fwd=miss"
    assert origin.count("/account") == 2
    assert _stored_urls(proxy.cache_dir) == []


@pytest.mark.parametrize(
    "directive",
    ['max-age=600, private="Set-Cookie"', 'max-age=600, no-cache="Set-Cookie"'],
)
@pytest_twisted.ensureDeferred
async def test_fields_named_by_private_or_no_cache_stay_with_their_client(
    origin: Origin, proxy: RunningProxy, directive: str
):
    """A qualified private or no-cache stores the response without the named field:
    client A gets its Set-Cookie, client B the stored body without it."""
    headers = {"Cache-Control": directive, "Set-Cookie": "session=a-secret"}
    url = origin.static("/welcome", b"hello", headers)
    a = await fetch(proxy.port, "GET", url)
    b = await fetch(proxy.port, "GET", url)
    assert a.header("Set-Cookie") == "session=a-secret"
    assert b.header("Cache-Status").startswith(HIT)
    assert b.body == b"hello"
    assert b.header("Set-Cookie") is None
    assert origin.count("/welcome") == 1


@pytest.mark.parametrize(
    "freshness",
    [
        {"Cache-Control": "max-age=600"},
        {"Cache-Control": "max-age=600, proxy-revalidate"},
        {"Expires": "far future"},
        {"Last-Modified": "an hour ago"},
    ],
    ids=["max-age", "proxy-revalidate", "expires", "heuristic"],
)
@pytest_twisted.ensureDeferred
async def test_response_to_credentials_is_not_served_without_them(
    origin: Origin, proxy: RunningProxy, freshness: dict[str, str]
):
    """A response to a request with Authorization and no public, s-maxage or
    must-revalidate is not stored: client B without credentials gets its own."""
    dates = {"far future": _http_date(3600), "an hour ago": _http_date(-3600)}
    headers = {name: dates.get(value, value) for name, value in freshness.items()}
    url = _reflecting(origin, "/inbox", "Authorization", headers)
    a = await fetch(proxy.port, "GET", url, {"Authorization": "Bearer alice"})
    b = await fetch(proxy.port, "GET", url)
    assert a.body == b"Bearer alice"
    assert a.header("Cache-Status") == "cacheproxy; fwd=miss"
    assert b.body == b"none"
    assert origin.count("/inbox") == 2
    assert origin.requests[b"/inbox"][1].header("Authorization") is None


@pytest_twisted.ensureDeferred
async def test_vary_cookie_keeps_each_cookie_its_own_response(
    origin: Origin, proxy: RunningProxy
):
    """Vary: Cookie: another cookie (or none) gets its own response; the same
    cookie gets the stored one."""
    headers = {"Cache-Control": "max-age=600", "Vary": "Cookie"}
    url = _reflecting(origin, "/profile", "Cookie", headers)
    a = await fetch(proxy.port, "GET", url, {"Cookie": "session=a"})
    b = await fetch(proxy.port, "GET", url, {"Cookie": "session=b"})
    anonymous = await fetch(proxy.port, "GET", url)
    upper = await fetch(proxy.port, "GET", url, {"Cookie": "session=A"})
    same = await fetch(proxy.port, "GET", url, {"Cookie": "session=a"})
    assert a.header("Cache-Status") == STORED
    assert (b.body, anonymous.body, upper.body) == (b"session=b", b"none", b"session=A")
    assert b.header("Cache-Status") == "cacheproxy; fwd=vary-miss; stored"
    assert same.header("Cache-Status").startswith(HIT)
    assert same.body == b"session=a"
    assert origin.count("/profile") == 4


# -- cache poisoning: only the URL chooses the key and the target ---------------------


@pytest.mark.parametrize(
    "field",
    [
        ("X-Forwarded-Host", "evil.example"),
        ("X-Host", "evil.example"),
        ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("X-Forwarded-Scheme", "https"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "host=evil.example;proto=https"),
    ],
    ids=lambda field: field[0],
)
@pytest_twisted.ensureDeferred
async def test_unkeyed_fields_choose_neither_key_nor_target(
    origin: Origin, proxy: RunningProxy, field: tuple[str, str]
):
    """A request for /public with a rewriting field reaches the origin as /public on
    the URL's host and is stored under /public only; B without it gets that entry."""
    name, value = field
    admin = origin.static("/admin", b"admin only", {"Cache-Control": "max-age=600"})
    url = origin.static("/public", b"public page", {"Cache-Control": "max-age=600"})
    a = await fetch(proxy.port, "GET", url, {name: value})
    b = await fetch(proxy.port, "GET", url)
    (seen,) = origin.requests[b"/public"]
    assert seen.uri == b"/public"
    assert seen.header("Host") == url.split("/")[2]
    assert a.header("Cache-Status") == STORED
    assert (b.header("Cache-Status"), b.body) == (HIT, b"public page")
    assert origin.count("/admin") == 0
    assert _stored_urls(proxy.cache_dir) == [url]
    assert (await fetch(proxy.port, "GET", admin)).header("Cache-Status") == STORED


@pytest_twisted.ensureDeferred
async def test_method_override_field_does_not_purge_or_invalidate(
    origin: Origin, proxy: RunningProxy
):
    """A GET carrying X-HTTP-Method-Override: PURGE (or DELETE) is a GET: the stored
    response stays and is served to the next client."""
    url = origin.static("/kept", b"kept", {"Cache-Control": "max-age=600"})
    await fetch(proxy.port, "GET", url)
    for method in ("PURGE", "DELETE"):
        override = await fetch(
            proxy.port, "GET", url, {"X-HTTP-Method-Override": method}
        )
        assert override.header("Cache-Status").startswith(HIT)
    after = await fetch(proxy.port, "GET", url)
    assert (after.header("Cache-Status"), after.body) == (HIT, b"kept")
    assert origin.count("/kept") == 1


@pytest_twisted.ensureDeferred
async def test_absolute_url_wins_over_a_disagreeing_host(
    origin: Origin, proxy: RunningProxy
):
    """Host: evil.example beside an absolute URL: the origin sees the URL's authority
    in Host, the response is stored under the URL and B's plain request hits it
    (RFC 9112 section 3.2.2)."""
    url = origin.static("/page", b"the page", {"Cache-Control": "max-age=600"})
    authority = url.split("/")[2]
    a = await fetch(proxy.port, "GET", url, {"Host": "evil.example"})
    b = await fetch(proxy.port, "GET", url)
    (seen,) = origin.requests[b"/page"]
    assert seen.header("Host") == authority
    assert a.header("Cache-Status") == STORED
    assert (b.header("Cache-Status"), b.body) == (HIT, b"the page")
    assert _stored_urls(proxy.cache_dir) == [url]


@pytest_twisted.ensureDeferred
async def test_origin_form_with_an_origins_host_is_not_proxied(
    origin: Origin, proxy: RunningProxy
):
    """``GET /page`` with Host naming an origin is a request for the proxy's own
    pages (404), never a fetch from the host the client named."""
    url = origin.static("/page", b"the page", {"Cache-Control": "max-age=600"})
    data = f"GET /page HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n\r\n".encode()
    (response,) = await send_raw(proxy.port, data)
    assert response.status == 404
    assert origin.count("/page") == 0
    assert _stored_urls(proxy.cache_dir) == []


@pytest_twisted.ensureDeferred
async def test_two_host_fields_are_400(origin: Origin, proxy: RunningProxy):
    """A request with two Host fields is answered 400 (RFC 9110 section 7.2)."""
    url = origin.static("/twice", b"x", {"Cache-Control": "max-age=600"})
    data = (
        f"GET {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\nHost: evil.example\r\n\r\n"
    ).encode()
    (response,) = await send_raw(proxy.port, data)
    assert response.status == 400
    assert origin.count("/twice") == 0


@pytest_twisted.ensureDeferred
async def test_http11_request_without_host_is_400(origin: Origin, proxy: RunningProxy):
    """An HTTP/1.1 request without Host is answered 400 (RFC 9112 section 3.2);
    HTTP/1.0 needs none."""
    url = origin.static("/nohost", b"x", {"Cache-Control": "max-age=600"})
    (refused,) = await send_raw(proxy.port, f"GET {url} HTTP/1.1\r\n\r\n".encode())
    assert refused.status == 400
    assert origin.count("/nohost") == 0
    (old,) = await send_raw(proxy.port, f"GET {url} HTTP/1.0\r\n\r\n".encode())
    assert (old.status, old.body) == (200, b"x")


# -- the proxy's own pages and PURGE obey --allow -------------------------------------


@pytest.mark.parametrize(
    "request_line",
    [
        "GET / HTTP/1.1",
        "HEAD / HTTP/1.1",
        "GET /metrics HTTP/1.1",
        "GET /proxy.pac HTTP/1.1",
    ],
)
@pytest_twisted.ensureDeferred
async def test_own_pages_refuse_clients_outside_allow(
    tmp_path: Path, request_line: str
):
    """With --allow 10.0.0.0/8, a client on 127.0.0.1 gets 403 for every own page."""
    running = await start_proxy(tmp_path, allow=TEN)
    try:
        data = f"{request_line}\r\nHost: 127.0.0.1:{running.port}\r\n\r\n".encode()
        (response,) = await send_raw(
            running.port, data, head_only=request_line.startswith("HEAD")
        )
    finally:
        await running.service.stopService()
    assert response.status == 403
    if not request_line.startswith("HEAD"):
        assert b"access denied" in response.body
        assert b"hit ratio" not in response.body.lower()
        assert b"cacheproxy_" not in response.body
        assert b"FindProxyForURL" not in response.body


@pytest_twisted.ensureDeferred
async def test_purge_refuses_clients_outside_allow(tmp_path: Path):
    """With --allow 10.0.0.0/8, PURGE from 127.0.0.1 is 403 and the entry stays."""
    url = "http://127.0.0.1:9/stored"
    store = Store(str(tmp_path / "cache"), size_limit=1 << 30)
    try:
        store.put(
            Entry(
                key=cache_key(url.encode()),
                url=url,
                response=ResponseHead(
                    200, b"OK", ((b"Cache-Control", b"max-age=600"),)
                ),
                request_time=reactor.seconds(),
                response_time=reactor.seconds(),
            ),
            b"stored body",
        )
    finally:
        store.close()
    running = await start_proxy(tmp_path, allow=TEN)
    try:
        response = await fetch(running.port, "PURGE", url)
    finally:
        await running.service.stopService()
    assert response.status == 403
    assert _stored_urls(running.cache_dir) == [url]
