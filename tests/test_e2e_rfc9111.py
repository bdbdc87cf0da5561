"""End to end: RFC 9111 request and response directives, Authorization, Vary, the
cache key's normalisation, invalidation and Age, each observed through the proxy."""

from __future__ import annotations

from email.utils import formatdate

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.web import server

from cacheproxy import policy
from tests.conftest import RunningProxy, start_proxy
from tests.support import Origin, fetch, start_raw_origin


def _http_date(offset: float = 0.0) -> str:
    return formatdate(reactor.seconds() + offset, usegmt=True)


def _validated(origin: Origin, path: str, cache_control: str, age: int = 0) -> str:
    """A route with ETag "e" that answers a matching If-None-Match with 304."""

    def handler(request: server.Request) -> bytes:
        request.setHeader(b"Cache-Control", cache_control.encode())
        request.setHeader(b"ETag", b'"e"')
        if age:
            request.setHeader(b"Age", b"%d" % age)
        if request.getHeader(b"if-none-match") == b'"e"':
            request.setResponseCode(304)
            return b""
        return b"validated body"

    return origin.route(path, handler)


def _by_method(origin: Origin, path: str, unsafe_status: int) -> str:
    """A route: GET is a fresh stored body, other methods get ``unsafe_status``."""

    def handler(request: server.Request) -> bytes:
        if request.method == b"GET":
            request.setHeader(b"Cache-Control", b"max-age=300")
            return b"representation"
        request.setResponseCode(unsafe_status)
        return b"done"

    return origin.route(path, handler)


# -- request directives (RFC 9111 section 5.2.1) --------------------------------------


@pytest_twisted.ensureDeferred
async def test_only_if_cached_miss_is_504(origin: Origin, proxy: RunningProxy):
    """only-if-cached with nothing stored gets 504 and the origin is not contacted."""
    url = origin.static("/oic-miss", b"x", {"Cache-Control": "max-age=300"})
    response = await fetch(proxy.port, "GET", url, {"Cache-Control": "only-if-cached"})
    assert response.status == 504
    assert origin.count("/oic-miss") == 0


@pytest_twisted.ensureDeferred
async def test_only_if_cached_fresh_hit_is_served(origin: Origin, proxy: RunningProxy):
    """only-if-cached with a fresh stored response gets it, from the store."""
    url = origin.static("/oic-hit", b"stored", {"Cache-Control": "max-age=300"})
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"Cache-Control": "only-if-cached"})
    assert response.status == 200
    assert response.body == b"stored"
    assert response.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/oic-hit") == 1


@pytest_twisted.ensureDeferred
async def test_max_stale_with_value_serves_stale(origin: Origin, proxy: RunningProxy):
    """max-stale=60 accepts a response 10 s stale, served without the origin."""
    # max-age=10 with Age: 20 is 10 s stale the moment it is stored.
    url = _validated(origin, "/ms-value", "max-age=10", age=20)
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"Cache-Control": "max-stale=60"})
    assert response.status == 200
    assert response.body == b"validated body"
    assert response.header("Cache-Status") == "cacheproxy; hit"
    assert 20 <= int(response.header("Age")) < 25
    assert origin.count("/ms-value") == 1


@pytest_twisted.ensureDeferred
async def test_max_stale_value_smaller_than_staleness_revalidates(
    origin: Origin, proxy: RunningProxy
):
    """max-stale=5 does not accept a response 10 s stale: it is revalidated."""
    url = _validated(origin, "/ms-small", "max-age=10", age=20)
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"Cache-Control": "max-stale=5"})
    assert response.body == b"validated body"
    assert response.header("Cache-Status") == "cacheproxy; fwd=stale; fwd-status=304"
    assert origin.count("/ms-small") == 2
    assert origin.requests[b"/ms-small"][1].header("If-None-Match") == '"e"'


@pytest_twisted.ensureDeferred
async def test_bare_max_stale_serves_any_staleness(origin: Origin, proxy: RunningProxy):
    """A bare max-stale accepts a response stale by a day, without the origin."""
    url = _validated(origin, "/ms-bare", "max-age=10", age=86400)
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"Cache-Control": "max-stale"})
    assert response.status == 200
    assert response.body == b"validated body"
    assert response.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/ms-bare") == 1


@pytest_twisted.ensureDeferred
async def test_max_stale_does_not_override_must_revalidate(
    origin: Origin, proxy: RunningProxy
):
    """A stale must-revalidate response is revalidated even under a bare max-stale."""
    url = _validated(origin, "/ms-mr", "max-age=10, must-revalidate", age=20)
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"Cache-Control": "max-stale"})
    assert response.body == b"validated body"
    assert response.header("Cache-Status") == "cacheproxy; fwd=stale; fwd-status=304"
    assert origin.requests[b"/ms-mr"][1].header("If-None-Match") == '"e"'


@pytest_twisted.ensureDeferred
async def test_min_fresh_beyond_remaining_freshness_revalidates(
    origin: Origin, proxy: RunningProxy
):
    """min-fresh above the remaining freshness (about 50 s) forces revalidation."""
    url = _validated(origin, "/mf", "max-age=100", age=50)
    await fetch(proxy.port, "GET", url)
    within = await fetch(proxy.port, "GET", url, {"Cache-Control": "min-fresh=10"})
    beyond = await fetch(proxy.port, "GET", url, {"Cache-Control": "min-fresh=80"})
    assert within.header("Cache-Status") == "cacheproxy; hit"
    assert beyond.status == 200
    assert beyond.body == b"validated body"
    assert beyond.header("Cache-Status") == "cacheproxy; fwd=request; fwd-status=304"
    assert origin.count("/mf") == 2
    assert origin.requests[b"/mf"][1].header("If-None-Match") == '"e"'


@pytest_twisted.ensureDeferred
async def test_request_max_age_0_revalidates(origin: Origin, proxy: RunningProxy):
    """A request's max-age=0 revalidates a fresh stored response with If-None-Match."""
    url = _validated(origin, "/ma0", "max-age=300")
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"Cache-Control": "max-age=0"})
    assert response.status == 200
    assert response.body == b"validated body"
    assert response.header("Cache-Status") == "cacheproxy; fwd=request; fwd-status=304"
    assert origin.requests[b"/ma0"][1].header("If-None-Match") == '"e"'


@pytest_twisted.ensureDeferred
async def test_pragma_no_cache_without_cache_control_revalidates(
    origin: Origin, proxy: RunningProxy
):
    """Pragma: no-cache, with no Cache-Control in the request, forces revalidation."""
    url = _validated(origin, "/pragma", "max-age=300")
    await fetch(proxy.port, "GET", url)
    response = await fetch(proxy.port, "GET", url, {"Pragma": "no-cache"})
    assert response.body == b"validated body"
    assert response.header("Cache-Status") == "cacheproxy; fwd=request; fwd-status=304"
    assert origin.count("/pragma") == 2
    assert origin.requests[b"/pragma"][1].header("If-None-Match") == '"e"'


@pytest_twisted.ensureDeferred
async def test_pragma_ignored_beside_cache_control(origin: Origin, proxy: RunningProxy):
    """Pragma: no-cache is ignored when the request has Cache-Control (RFC 9111 5.4)."""
    url = _validated(origin, "/pragma-cc", "max-age=300")
    await fetch(proxy.port, "GET", url)
    response = await fetch(
        proxy.port,
        "GET",
        url,
        {"Pragma": "no-cache", "Cache-Control": "max-stale=0"},
    )
    assert response.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/pragma-cc") == 1


@pytest_twisted.ensureDeferred
async def test_request_no_store_is_not_stored(origin: Origin, proxy: RunningProxy):
    """A request's no-store keeps its response out of the store."""
    url = origin.static("/rns", b"secret", {"Cache-Control": "max-age=300"})
    first = await fetch(proxy.port, "GET", url, {"Cache-Control": "no-store"})
    second = await fetch(proxy.port, "GET", url)
    assert first.body == second.body == b"secret"
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss"
    assert second.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert origin.count("/rns") == 2


# -- response directives and freshness (RFC 9111 sections 4.2, 5.2.2) -----------------


@pytest_twisted.ensureDeferred
async def test_s_maxage_wins_over_max_age(origin: Origin, proxy: RunningProxy):
    """In a shared cache s-maxage=300 overrides max-age=0: the next request hits."""
    url = origin.static(
        "/smax", b"shared", {"Cache-Control": "s-maxage=300, max-age=0"}
    )
    await fetch(proxy.port, "GET", url)
    hit = await fetch(proxy.port, "GET", url)
    assert hit.body == b"shared"
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/smax") == 1


@pytest_twisted.ensureDeferred
async def test_invalid_expires_means_already_stale(origin: Origin, proxy: RunningProxy):
    """An invalid Expires ("0") is a time in the past: the stored response is stale."""
    url = origin.static("/exp0", b"expired", {"Expires": "0"})
    first = await fetch(proxy.port, "GET", url)
    second = await fetch(proxy.port, "GET", url)
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert second.body == b"expired"
    assert second.header("Cache-Status").startswith("cacheproxy; fwd=stale")
    assert origin.count("/exp0") == 2


@pytest_twisted.ensureDeferred
async def test_redirect_with_max_age_is_stored(origin: Origin, proxy: RunningProxy):
    """A 302 with max-age=60 is stored and replayed with its status and Location."""
    target = origin.url("/elsewhere")
    url = origin.static(
        "/moved",
        b"see elsewhere",
        {"Cache-Control": "max-age=60", "Location": target},
        status=302,
    )
    first = await fetch(proxy.port, "GET", url)
    hit = await fetch(proxy.port, "GET", url)
    assert first.status == 302
    assert hit.status == 302
    assert hit.header("Location") == target
    assert hit.body == b"see elsewhere"
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/moved") == 1
    assert origin.count("/elsewhere") == 0


@pytest_twisted.ensureDeferred
async def test_404_with_old_last_modified_is_heuristically_fresh(
    origin: Origin, proxy: RunningProxy
):
    """A 404 modified an hour ago, with no explicit freshness, is fresh for 6 min."""
    url = origin.static(
        "/gone", b"not here", {"Last-Modified": _http_date(-3600)}, status=404
    )
    await fetch(proxy.port, "GET", url)
    hit = await fetch(proxy.port, "GET", url)
    assert hit.status == 404
    assert hit.body == b"not here"
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/gone") == 1


@pytest_twisted.ensureDeferred
async def test_200_without_validator_or_freshness_is_not_reused(
    origin: Origin, proxy: RunningProxy
):
    """A 200 with no Last-Modified and no explicit freshness is not served stored."""
    url = origin.static("/bare", b"bare")
    await fetch(proxy.port, "GET", url)
    second = await fetch(proxy.port, "GET", url)
    assert second.body == b"bare"
    assert second.header("Cache-Status").startswith("cacheproxy; fwd=")
    assert origin.count("/bare") == 2


@pytest_twisted.ensureDeferred
async def test_immutable_hit_ignores_client_no_cache(
    origin: Origin, proxy: RunningProxy
):
    """A fresh immutable response is served from the store despite request no-cache."""
    url = origin.static("/imm", b"forever", {"Cache-Control": "immutable, max-age=300"})
    await fetch(proxy.port, "GET", url)
    reload = await fetch(proxy.port, "GET", url, {"Cache-Control": "no-cache"})
    assert reload.body == b"forever"
    assert reload.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/imm") == 1


# -- Authorization (RFC 9111 section 3.5) ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_authorized_response_with_only_max_age_is_not_stored(
    origin: Origin, proxy: RunningProxy
):
    """A response to a request with Authorization and only max-age is not stored."""
    url = origin.static("/auth-ma", b"mine", {"Cache-Control": "max-age=300"})
    credentials = {"Authorization": "Bearer token"}
    first = await fetch(proxy.port, "GET", url, credentials)
    second = await fetch(proxy.port, "GET", url, credentials)
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss"
    assert second.header("Cache-Status") == "cacheproxy; fwd=miss"
    assert origin.count("/auth-ma") == 2
    assert origin.requests[b"/auth-ma"][1].header("Authorization") == "Bearer token"


@pytest.mark.parametrize("directive", ["public, max-age=300", "s-maxage=300"])
@pytest_twisted.ensureDeferred
async def test_authorized_response_marked_shareable_is_stored(
    origin: Origin, proxy: RunningProxy, directive: str
):
    """With public or s-maxage, a response to an Authorization request is stored."""
    url = origin.static("/auth-ok", b"shared", {"Cache-Control": directive})
    credentials = {"Authorization": "Bearer token"}
    first = await fetch(proxy.port, "GET", url, credentials)
    hit = await fetch(proxy.port, "GET", url, credentials)
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert hit.body == b"shared"
    assert origin.count("/auth-ok") == 1


# -- Vary (RFC 9111 section 4.1) -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_vary_star_is_never_served_from_store(
    origin: Origin, proxy: RunningProxy
):
    """A response with Vary: * is never served from the store."""
    url = origin.static("/star", b"*", {"Vary": "*", "Cache-Control": "max-age=300"})
    responses = [await fetch(proxy.port, "GET", url) for _ in range(3)]
    assert [r.body for r in responses] == [b"*"] * 3
    assert all(r.header("Cache-Status") == "cacheproxy; fwd=miss" for r in responses)
    assert origin.count("/star") == 3


@pytest_twisted.ensureDeferred
async def test_changed_vary_fields_replace_old_variants(
    origin: Origin, proxy: RunningProxy
):
    """A new Vary field set drops the old variants; later requests get the new ones."""
    state = {"vary": b"Accept-Language"}

    def handler(request: server.Request) -> bytes:
        request.setHeader(b"Vary", state["vary"])
        request.setHeader(b"Cache-Control", b"max-age=300")
        value = request.getHeader(state["vary"]) or b"none"
        return state["vary"].lower() + b"=" + value

    url = origin.route("/revary", handler)
    en = {"Accept-Language": "en", "Accept-Encoding": "gzip"}
    fr = {"Accept-Language": "fr", "Accept-Encoding": "gzip"}
    en_br = {"Accept-Language": "en", "Accept-Encoding": "br"}
    assert (await fetch(proxy.port, "GET", url, en)).body == b"accept-language=en"
    state["vary"] = b"Accept-Encoding"
    switched = await fetch(proxy.port, "GET", url, fr)
    assert switched.body == b"accept-encoding=gzip"
    assert switched.header("Cache-Status") == "cacheproxy; fwd=vary-miss; stored"
    # The old Accept-Language=en variant is gone: "en" now selects by encoding.
    en_again = await fetch(proxy.port, "GET", url, en)
    assert en_again.body == b"accept-encoding=gzip"
    assert en_again.header("Cache-Status") == "cacheproxy; hit"
    br = await fetch(proxy.port, "GET", url, en_br)
    assert br.body == b"accept-encoding=br"
    assert br.header("Cache-Status") == "cacheproxy; fwd=vary-miss; stored"
    br_hit = await fetch(proxy.port, "GET", url, en_br)
    gzip_hit = await fetch(proxy.port, "GET", url, fr)
    assert (br_hit.body, gzip_hit.body) == (
        b"accept-encoding=br",
        b"accept-encoding=gzip",
    )
    assert br_hit.header("Cache-Status") == gzip_hit.header("Cache-Status")
    assert br_hit.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/revary") == 3
    stored = proxy.service.proxy.store.lookup(policy.cache_key(url.encode()))
    assert sorted(entry.vary for entry in stored) == [
        ((b"accept-encoding", b"br"),),
        ((b"accept-encoding", b"gzip"),),
    ]


# -- cache key normalisation (RFC 9111 section 2, RFC 3986 section 6.2.2) -------------


@pytest_twisted.ensureDeferred
async def test_encoded_unreserved_character_shares_an_entry(
    origin: Origin, proxy: RunningProxy
):
    """/a%7efile and /a~file are one stored entry; the origin sees the sent form."""
    encoded = origin.static("/a%7efile", b"tilde", {"Cache-Control": "max-age=300"})
    origin.static("/a~file", b"wrong", {"Cache-Control": "max-age=300"})
    first = await fetch(proxy.port, "GET", encoded)
    second = await fetch(proxy.port, "GET", origin.url("/a~file"))
    assert first.body == second.body == b"tilde"
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert origin.requests[b"/a%7efile"][0].uri == b"/a%7efile"
    assert origin.count("/a%7efile") == 1
    assert origin.count("/a~file") == 0


@pytest_twisted.ensureDeferred
async def test_percent_encoding_hex_case_shares_an_entry(
    origin: Origin, proxy: RunningProxy
):
    """/x%2bq and /x%2Bq differ only in hex case: one stored entry."""
    lower = origin.static("/x%2bq", b"plus", {"Cache-Control": "max-age=300"})
    origin.static("/x%2Bq", b"wrong", {"Cache-Control": "max-age=300"})
    await fetch(proxy.port, "GET", lower)
    second = await fetch(proxy.port, "GET", origin.url("/x%2Bq"))
    assert second.body == b"plus"
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/x%2bq") == 1
    assert origin.count("/x%2Bq") == 0


@pytest_twisted.ensureDeferred
async def test_encoded_reserved_character_is_another_entry(
    origin: Origin, proxy: RunningProxy
):
    """/y%2Bq and /y+q are different resources: two entries, two origin requests."""
    encoded = origin.static("/y%2Bq", b"encoded", {"Cache-Control": "max-age=300"})
    literal = origin.static("/y+q", b"literal", {"Cache-Control": "max-age=300"})
    first = await fetch(proxy.port, "GET", encoded)
    second = await fetch(proxy.port, "GET", literal)
    assert first.body == b"encoded"
    assert second.body == b"literal"
    assert second.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert origin.count("/y%2Bq") == origin.count("/y+q") == 1


@pytest_twisted.ensureDeferred
async def test_scheme_and_host_case_share_an_entry(origin: Origin, proxy: RunningProxy):
    """HTTP://LOCALHOST:port/p names the same entry as http://localhost:port/p."""
    origin.static("/case", b"cased", {"Cache-Control": "max-age=300"})
    port = origin.port.getHost().port
    first = await fetch(proxy.port, "GET", f"http://localhost:{port}/case")
    second = await fetch(
        proxy.port,
        "GET",
        f"HTTP://LOCALHOST:{port}/case",
        {"Host": f"LOCALHOST:{port}"},
    )
    assert first.body == second.body == b"cased"
    assert first.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert second.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/case") == 1


# -- invalidation (RFC 9111 section 4.4) ----------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_successful_put_or_delete_invalidates(
    origin: Origin, proxy: RunningProxy, method: str
):
    """A 2xx answer to PUT or DELETE drops the stored response for its target."""
    url = _by_method(origin, "/res", 204)
    await fetch(proxy.port, "GET", url)
    assert (await fetch(proxy.port, "GET", url)).header("Cache-Status") == (
        "cacheproxy; hit"
    )
    changed = await fetch(proxy.port, method, url, body=b"new")
    after = await fetch(proxy.port, "GET", url)
    assert changed.status == 204
    assert after.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert [seen.method for seen in origin.requests[b"/res"]] == [
        b"GET",
        method.encode(),
        b"GET",
    ]


@pytest_twisted.ensureDeferred
async def test_post_location_invalidates_that_url(origin: Origin, proxy: RunningProxy):
    """A POST whose 201 names a same-origin Location drops that URL's entry too."""
    listing = origin.static("/items/1", b"item one", {"Cache-Control": "max-age=300"})
    other = origin.static("/items/2", b"item two", {"Cache-Control": "max-age=300"})

    def create(request: server.Request) -> bytes:
        request.setResponseCode(201)
        request.setHeader(b"Location", listing.encode())
        return b"created"

    collection = origin.route("/items", create)
    await fetch(proxy.port, "GET", listing)
    await fetch(proxy.port, "GET", other)
    created = await fetch(proxy.port, "POST", collection, body=b"{}")
    relisted = await fetch(proxy.port, "GET", listing)
    untouched = await fetch(proxy.port, "GET", other)
    assert created.status == 201
    assert relisted.body == b"item one"
    assert relisted.header("Cache-Status") == "cacheproxy; fwd=miss; stored"
    assert untouched.header("Cache-Status") == "cacheproxy; hit"
    assert origin.count("/items/1") == 2
    assert origin.count("/items/2") == 1


@pytest_twisted.ensureDeferred
async def test_failed_post_does_not_invalidate(origin: Origin, proxy: RunningProxy):
    """A POST answered 500 leaves the stored response for its target in place."""
    url = _by_method(origin, "/fragile", 500)
    await fetch(proxy.port, "GET", url)
    failed = await fetch(proxy.port, "POST", url, body=b"change")
    after = await fetch(proxy.port, "GET", url)
    assert failed.status == 500
    assert after.body == b"representation"
    assert after.header("Cache-Status") == "cacheproxy; hit"
    assert [seen.method for seen in origin.requests[b"/fragile"]] == [b"GET", b"POST"]


# -- Age and Date (RFC 9111 sections 4.2.3, 5.1; RFC 9110 section 6.6.1) --------------


@pytest.mark.parametrize("origin_age", [0, 250, 5000])
@pytest_twisted.ensureDeferred
async def test_hit_age_grows_with_origin_age(
    origin: Origin, proxy: RunningProxy, origin_age: int
):
    """A hit's Age is the origin's Age plus the few seconds the proxy held it."""
    url = origin.static(
        "/aged",
        b"aged",
        {"Cache-Control": "max-age=6000", "Age": str(origin_age)},
    )
    await fetch(proxy.port, "GET", url)
    hit = await fetch(proxy.port, "GET", url)
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert origin_age <= int(hit.header("Age")) < origin_age + 5


@pytest_twisted.ensureDeferred
async def test_missing_date_is_added_and_kept(tmp_path):
    """An origin response without Date gets one, on the relay and on later hits."""

    def script(transport, head):
        transport.write(
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\n"
            b"Content-Length: 7\r\n\r\nundated"
        )

    raw = start_raw_origin(script)
    running = await start_proxy(tmp_path)
    try:
        before = reactor.seconds()
        first = await fetch(running.port, "GET", raw.url("/undated"))
        hit = await fetch(running.port, "GET", raw.url("/undated"))
    finally:
        await running.service.stopService()
        await raw.stop()
    assert first.body == hit.body == b"undated"
    assert hit.header("Cache-Status") == "cacheproxy; hit"
    assert len(raw.requests) == 1
    date = policy.parse_http_date(first.header("Date").encode())
    assert date is not None
    assert before - 1 <= date <= reactor.seconds() + 1
    assert hit.headers_named("Date") == first.headers_named("Date")
