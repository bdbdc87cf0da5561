"""Tables of RFC 9110/9111 cases for the pure caching policy."""

from __future__ import annotations

import ast
import math
import sys
from email.utils import formatdate
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cacheproxy import policy
from cacheproxy.model import Entry, Headers, RequestHead, ResponseHead
from cacheproxy.policy import (
    HOP_BY_HOP,
    Action,
    Verdict,
    age_header_value,
    cache_control,
    cache_key,
    can_serve_stale_on_error,
    conditional_headers,
    current_age,
    decide,
    end_to_end,
    freshness_lifetime,
    invalidated_keys,
    is_invalidating,
    is_storable,
    parse_http_date,
    select_variant,
    stale_while_revalidate_allows,
    stored_headers,
    updated_response,
    validators_match,
    vary_names,
    vary_values,
)

T0 = 1_700_000_000.0
URL = b"http://ex.com/a"


def date(t: float) -> bytes:
    """An IMF-fixdate for ``t``."""
    return formatdate(t, usegmt=True).encode("ascii")


def cc(value: bytes) -> Headers:
    """A header list holding one Cache-Control field."""
    return ((b"Cache-Control", value),)


def get(*headers: tuple[bytes, bytes], method: bytes = b"GET") -> RequestHead:
    """A request for URL with ``headers``."""
    return RequestHead(method=method, target=URL, headers=tuple(headers))


def ok(*headers: tuple[bytes, bytes], status: int = 200) -> ResponseHead:
    """A response with ``headers``."""
    return ResponseHead(status=status, reason=b"OK", headers=tuple(headers))


def stored(
    *headers: tuple[bytes, bytes],
    request_time: float = T0,
    response_time: float = T0,
    vary: tuple[tuple[bytes, bytes | None], ...] = (),
    status: int = 200,
) -> Entry:
    """An entry for URL whose response carries ``headers``."""
    return Entry(
        key=cache_key(URL),
        url=URL.decode(),
        response=ok(*headers, status=status),
        request_time=request_time,
        response_time=response_time,
        vary=vary,
    )


# --- RFC 9110 section 7.6.1: hop-by-hop fields -------------------------------

END_TO_END = [
    pytest.param(
        ((b"Connection", b"close"), (b"X-A", b"1")),
        ((b"X-A", b"1"),),
        id="9110-7.6.1-connection-dropped",
    ),
    pytest.param(
        ((b"connection", b"X-Hop, keep-alive"), (b"x-hop", b"1"), (b"X-End", b"2")),
        ((b"X-End", b"2"),),
        id="9110-7.6.1-named-in-connection-dropped",
    ),
    pytest.param(
        tuple((name.title(), b"v") for name in sorted(HOP_BY_HOP)),
        (),
        id="9110-7.6.1-every-hop-by-hop-dropped",
    ),
    pytest.param(
        ((b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")),
        ((b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")),
        id="9110-5.3-repeats-and-order-kept",
    ),
]


@pytest.mark.parametrize(("headers", "expected"), END_TO_END)
def test_end_to_end(headers: Headers, expected: Headers) -> None:
    """Hop-by-hop fields and fields named in Connection never cross the proxy."""
    assert end_to_end(headers) == expected


# --- RFC 9111 section 5.2: Cache-Control parsing ------------------------------

CACHE_CONTROL = [
    pytest.param(cc(b"max-age=60"), {"max-age": "60"}, id="9111-5.2-token-argument"),
    pytest.param(
        cc(b'private="Set-Cookie, X-A"'),
        {"private": "Set-Cookie, X-A"},
        id="9111-5.2-quoted-argument-unquoted",
    ),
    pytest.param(
        cc(b"No-Cache, PUBLIC"),
        {"no-cache": None, "public": None},
        id="9111-5.2-names-case-insensitive",
    ),
    pytest.param(
        cc(b"max-age=5") + cc(b"max-age=60, no-store"),
        {"max-age": "5", "no-store": None},
        id="9111-4.2.1-first-occurrence-wins",
    ),
    pytest.param(
        cc(b", =x, bad name, max-age = 7 ,,"),
        {"max-age": "7"},
        id="9111-5.2-junk-skipped",
    ),
    pytest.param(cc(b'x="a\\"b'), {"x": 'a"b'}, id="9110-5.6.4-escape-and-no-close"),
    pytest.param((), {}, id="9111-5.2-absent"),
]


@pytest.mark.parametrize(("headers", "expected"), CACHE_CONTROL)
def test_cache_control(headers: Headers, expected: dict[str, str | None]) -> None:
    """Directives parse to lower-cased names and unquoted arguments, junk ignored."""
    assert cache_control(headers) == expected


# --- RFC 9110 section 5.6.7: HTTP-date ----------------------------------------

DATES = [
    pytest.param(b"Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0, id="9110-5.6.7-imf"),
    pytest.param(
        b"Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0, id="9110-5.6.7-rfc850"
    ),
    pytest.param(b"Sun Nov  6 08:49:37 1994", 784111777.0, id="9110-5.6.7-asctime"),
    pytest.param(b"0", None, id="9110-5.6.7-zero-invalid"),
    pytest.param(b"Sun, 31 Feb 1994 08:49:37 GMT", None, id="9110-5.6.7-no-such-day"),
    pytest.param(b"Sun, 06 Nov 1994 08:49:37 PST", None, id="9110-5.6.7-not-gmt"),
    pytest.param(b"", None, id="9110-5.6.7-empty"),
    pytest.param(None, None, id="9110-5.6.7-absent"),
]


@pytest.mark.parametrize(("value", "expected"), DATES)
def test_parse_http_date(value: bytes | None, expected: float | None) -> None:
    """All three HTTP-date forms parse to the same instant; anything else is None."""
    assert parse_http_date(value) == expected


# --- RFC 3986 section 6.2.2 / RFC 9111 section 2: cache key -------------------

KEYS = [
    pytest.param(b"HTTP://Ex.COM:80", "http://ex.com/", id="3986-6.2.2-case-port-path"),
    pytest.param(
        b"https://ex.com:443/x", "https://ex.com/x", id="3986-6.2.3-https-port"
    ),
    pytest.param(b"http://ex.com:8080/x", "http://ex.com:8080/x", id="3986-6.2.3-port"),
    pytest.param(b"http://ex.com:/x", "http://ex.com/x", id="3986-6.2.3-empty-port"),
    pytest.param(b"http://ex.com/%7e", "http://ex.com/~", id="3986-6.2.2.2-unreserved"),
    pytest.param(
        b"http://ex.com/%2b", "http://ex.com/%2B", id="3986-6.2.2.1-hex-upper"
    ),
    pytest.param(
        b"http://ex.com/a+b", "http://ex.com/a+b", id="3986-6.2.2.2-plus-kept"
    ),
    pytest.param(
        b"http://ex.com/?q=%41%2f#frag",
        "http://ex.com/?q=A%2F",
        id="3986-6.2.2-query-kept-fragment-dropped",
    ),
    pytest.param(b"http://ex.com?x", "http://ex.com/?x", id="3986-6.2.3-query-no-path"),
    pytest.param(
        b"http://ex.com/a/./b/../c", "http://ex.com/a/c", id="3986-6.2.2.3-dot-segments"
    ),
    pytest.param(b"http://[::1]:8080/", "http://[::1]:8080/", id="3986-3.2.2-ipv6"),
    pytest.param(
        b"http://ex.com/a b", "http://ex.com/a%20b", id="3986-2.1-space-encoded"
    ),
]


@pytest.mark.parametrize(("url", "expected"), KEYS)
def test_cache_key(url: bytes, expected: str) -> None:
    """Equivalent URLs normalise to one key; reserved encodings stay distinct."""
    assert cache_key(url) == expected


def test_cache_key_keeps_reserved_distinct() -> None:
    """RFC 3986 6.2.2.2: %2B and + are different URLs, so different keys."""
    assert cache_key(b"http://ex.com/a%2Bb") != cache_key(b"http://ex.com/a+b")


BAD_KEYS = [
    pytest.param(b"ftp://ex.com/", id="9110-4.2-other-scheme"),
    pytest.param(b"ex.com/a", id="9110-4.2-not-absolute"),
    pytest.param(b"http:///a", id="9110-4.2.1-missing-host"),
    pytest.param(b"http://u:p@ex.com/", id="9110-4.2.4-userinfo"),
    pytest.param(b"http://ex.com:99999/", id="3986-3.2.3-port-range"),
    pytest.param(b"http://ex.com:8a/", id="3986-3.2.3-port-not-digits"),
]


@pytest.mark.parametrize("url", BAD_KEYS)
def test_cache_key_rejects(url: bytes) -> None:
    """URLs a proxy cannot key raise ValueError."""
    with pytest.raises(ValueError):
        cache_key(url)


# --- RFC 9111 section 3: storing ---------------------------------------------

AUTH = (b"Authorization", b"Basic eDp5")
STORABLE = [
    pytest.param(get(), ok(), True, id="9111-3-heuristic-200"),
    pytest.param(get(method=b"POST"), ok(), False, id="9111-3-method-post"),
    pytest.param(get(method=b"HEAD"), ok(), False, id="9111-3-method-head"),
    pytest.param(get(), ok(status=103), False, id="9111-3-not-final"),
    pytest.param(get(), ok(status=206), False, id="9111-3.3-partial"),
    pytest.param(get(), ok(*cc(b"max-age=9"), status=304), False, id="9111-3-304"),
    pytest.param(get(), ok(status=404), True, id="9111-4.2.2-heuristic-404"),
    pytest.param(get(), ok(status=302), False, id="9111-3-302-no-freshness"),
    pytest.param(get(), ok(status=500), False, id="9111-3-500-no-freshness"),
    pytest.param(get(), ok(*cc(b"max-age=9"), status=302), True, id="9111-3-max-age"),
    pytest.param(get(), ok(*cc(b"s-maxage=9"), status=302), True, id="9111-3-s-maxage"),
    pytest.param(
        get(), ok((b"Expires", b"0"), status=302), True, id="9111-3-expires-present"
    ),
    pytest.param(get(), ok(*cc(b"public"), status=302), True, id="9111-3-public"),
    # no-cache alone does not make a status storable (RFC 9111 section 3's list).
    pytest.param(
        get(), ok(*cc(b"no-cache"), status=302), False, id="9111-3-no-cache-302"
    ),
    pytest.param(get(), ok(*cc(b"no-cache")), True, id="9111-3-no-cache-200"),
    pytest.param(
        get(), ok(*cc(b"max-age=9"), status=299), True, id="9111-3-unknown-explicit"
    ),
    pytest.param(get(), ok(*cc(b"no-store")), False, id="9111-5.2.2.5-no-store"),
    pytest.param(get(*cc(b"no-store")), ok(), False, id="9111-5.2.1.5-req-no-store"),
    pytest.param(get(), ok(*cc(b"private")), False, id="9111-5.2.2.7-private"),
    pytest.param(get(), ok(*cc(b"PRIVATE")), False, id="9111-5.2.2.7-private-case"),
    pytest.param(
        get(),
        ok(*cc(b'private="Set-Cookie"')),
        True,
        id="9111-5.2.2.7-qualified-private",
    ),
    pytest.param(get(AUTH), ok(), False, id="9111-3.5-authorization"),
    pytest.param(
        get(AUTH), ok(*cc(b"max-age=60")), False, id="9111-3.5-auth-max-age-only"
    ),
    pytest.param(get(AUTH), ok(*cc(b"public")), True, id="9111-3.5-auth-public"),
    pytest.param(get(AUTH), ok(*cc(b"s-maxage=5")), True, id="9111-3.5-auth-s-maxage"),
    pytest.param(
        get(AUTH), ok(*cc(b"must-revalidate")), True, id="9111-3.5-auth-must-revalidate"
    ),
    pytest.param(
        get(AUTH), ok(*cc(b"public, private")), False, id="9111-3.5-auth-but-private"
    ),
    pytest.param(get(), ok((b"Vary", b"*")), False, id="9111-4.1-vary-star"),
    pytest.param(get(), ok((b"Vary", b"Accept")), True, id="9111-4.1-vary-names"),
    pytest.param(
        get(),
        ok(*cc(b"must-understand, max-age=9"), status=299),
        False,
        id="9111-5.2.2.3-must-understand-unknown",
    ),
    pytest.param(
        get(),
        ok(*cc(b"must-understand, max-age=9")),
        True,
        id="9111-5.2.2.3-must-understand-known",
    ),
]


@pytest.mark.parametrize(("request_head", "response", "expected"), STORABLE)
def test_is_storable(
    request_head: RequestHead, response: ResponseHead, expected: bool
) -> None:
    """A shared cache stores exactly the responses RFC 9111 section 3 allows."""
    assert is_storable(request_head, response) is expected


def test_stored_headers_withhold_named_fields() -> None:
    """RFC 9111 3.1: qualified private/no-cache fields and hop-by-hop are not kept."""
    response = ok(
        *cc(b'private="Set-Cookie", no-cache="X-Token"'),
        (b"Set-Cookie", b"a=1"),
        (b"X-Token", b"t"),
        (b"Keep-Alive", b"5"),
        (b"Proxy-Authentication-Info", b"x"),
        (b"ETag", b'"e"'),
    )
    assert stored_headers(response) == (
        (b"Cache-Control", b'private="Set-Cookie", no-cache="X-Token"'),
        (b"ETag", b'"e"'),
    )


# --- RFC 9111 section 4.2.1 / 4.2.2: freshness lifetime -----------------------

DATE = (b"Date", date(T0))
DAY = 86400.0
LIFETIMES = [
    pytest.param(
        ok(DATE, *cc(b"max-age=60, s-maxage=10")), DAY, 10, id="9111-4.2.1-s-maxage"
    ),
    pytest.param(ok(DATE, *cc(b"max-age=60")), DAY, 60, id="9111-4.2.1-max-age"),
    pytest.param(
        ok(DATE, *cc(b"max-age=60"), (b"Expires", date(T0 + 600))),
        DAY,
        60,
        id="9111-4.2.1-max-age-over-expires",
    ),
    pytest.param(
        ok(DATE, (b"Expires", date(T0 + 600))), DAY, 600, id="9111-4.2.1-expires-date"
    ),
    pytest.param(ok(DATE, (b"Expires", b"0")), DAY, 0, id="9111-5.3-expires-invalid"),
    pytest.param(
        ok(DATE, (b"Expires", date(T0 - 60))), DAY, 0, id="9111-5.3-expires-past"
    ),
    pytest.param(
        ok((b"Expires", date(T0 + 600))), DAY, 0, id="9111-4.2.1-expires-no-date"
    ),
    pytest.param(
        ok(DATE, *cc(b"max-age=abc"), (b"Expires", date(T0 + 600))),
        DAY,
        0,
        id="9111-4.2.1-invalid-max-age-stale",
    ),
    pytest.param(
        ok(DATE, *cc(b"max-age=99999999999")),
        DAY,
        2147483648,
        id="9111-1.2.2-delta-seconds-cap",
    ),
    pytest.param(
        ok(DATE, (b"Last-Modified", date(T0 - 1000))),
        DAY,
        100,
        id="9111-4.2.2-heuristic-10-percent",
    ),
    pytest.param(
        ok(DATE, (b"Last-Modified", date(T0 - 100 * DAY))),
        DAY,
        DAY,
        id="9111-4.2.2-heuristic-capped",
    ),
    pytest.param(
        ok(DATE, (b"Last-Modified", date(T0 - 100 * DAY))),
        3600,
        3600,
        id="9111-4.2.2-heuristic-custom-cap",
    ),
    pytest.param(
        ok(DATE, (b"Last-Modified", date(T0 - 1000)), status=302),
        DAY,
        0,
        id="9111-4.2.2-heuristic-not-for-302",
    ),
    pytest.param(
        ok(DATE, *cc(b"public"), (b"Last-Modified", date(T0 - 1000)), status=302),
        DAY,
        100,
        id="9111-4.2.2-heuristic-public-302",
    ),
    pytest.param(ok(DATE), DAY, 0, id="9111-4.2.2-no-last-modified"),
    pytest.param(
        ok(DATE, (b"Last-Modified", date(T0 + 1000))),
        DAY,
        0,
        id="9111-4.2.2-last-modified-future",
    ),
]


@pytest.mark.parametrize(("response", "cap", "expected"), LIFETIMES)
def test_freshness_lifetime(
    response: ResponseHead, cap: float, expected: float
) -> None:
    """Lifetime comes from s-maxage, max-age, Expires - Date, else 10% heuristic."""
    assert freshness_lifetime(response, heuristic_cap=cap) == expected


# --- RFC 9111 section 4.2.3: age ----------------------------------------------

AGES = [
    pytest.param(stored(DATE, request_time=T0 - 2), 10, 12, id="9111-4.2.3-delay"),
    pytest.param(
        stored((b"Date", date(T0 + 3600)), request_time=T0 - 2),
        10,
        12,
        id="9111-4.2.3-skewed-date-ahead",
    ),
    pytest.param(
        stored((b"Date", date(T0 - 3600)), request_time=T0 - 2),
        10,
        3610,
        id="9111-4.2.3-skewed-date-behind",
    ),
    pytest.param(
        stored(DATE, (b"Age", b"100"), request_time=T0 - 2),
        10,
        112,
        id="9111-4.2.3-age-header",
    ),
    pytest.param(
        stored((b"Date", date(T0 - 50)), (b"Age", b"20")),
        0,
        50,
        id="9111-4.2.3-apparent-over-age",
    ),
    pytest.param(
        stored(DATE, (b"Age", b"abc"), request_time=T0 - 2),
        10,
        12,
        id="9111-5.1-age-invalid",
    ),
    pytest.param(
        stored((b"Date", b"garbage"), request_time=T0 - 2),
        10,
        12,
        id="9111-4.2.3-date-invalid",
    ),
    pytest.param(stored(request_time=T0 - 2), 10, 12, id="9111-4.2.3-date-missing"),
]


@pytest.mark.parametrize(("entry", "elapsed", "expected"), AGES)
def test_current_age(entry: Entry, elapsed: float, expected: float) -> None:
    """current_age follows RFC 9111 4.2.3, so a skewed Date cannot shrink the age."""
    assert current_age(entry, T0 + elapsed) == expected


AGE_HEADERS = [
    pytest.param(stored(DATE), 10.9, b"10", id="9111-5.1-integer-seconds"),
    pytest.param(
        stored(DATE, (b"Age", b"99999999999")),
        0,
        b"2147483648",
        id="9111-5.1-capped",
    ),
    pytest.param(stored(DATE), -5, b"0", id="9111-5.1-never-negative"),
]


@pytest.mark.parametrize(("entry", "elapsed", "expected"), AGE_HEADERS)
def test_age_header_value(entry: Entry, elapsed: float, expected: bytes) -> None:
    """The Age field is non-negative integer seconds, capped at 2^31."""
    assert age_header_value(entry, T0 + elapsed) == expected


# --- RFC 9111 section 4.1: Vary -----------------------------------------------

VARY_NAMES = [
    pytest.param(ok(), (), id="9111-4.1-no-vary"),
    pytest.param(
        ok((b"Vary", b"Accept-Encoding, accept"), (b"vary", b"ACCEPT")),
        (b"accept", b"accept-encoding"),
        id="9111-4.1-sorted-deduplicated",
    ),
    pytest.param(ok((b"Vary", b"Accept, *")), None, id="9111-4.1-star"),
]


@pytest.mark.parametrize(("response", "expected"), VARY_NAMES)
def test_vary_names(response: ResponseHead, expected: tuple[bytes, ...] | None) -> None:
    """Vary names are lower-cased, sorted, deduplicated, and * yields None."""
    assert vary_names(response) == expected


VARY_VALUES = [
    pytest.param(
        get((b"Accept-Encoding", b"gzip,deflate")),
        get((b"accept-encoding", b"gzip ,  deflate")),
        True,
        id="9111-4.1-comma-whitespace-normalised",
    ),
    pytest.param(
        get((b"Accept-Encoding", b"gzip"), (b"Accept-Encoding", b"br")),
        get((b"Accept-Encoding", b"gzip, br")),
        True,
        id="9111-4.1-lines-combined",
    ),
    pytest.param(
        get((b"Accept-Encoding", b"gzip")),
        get((b"Accept-Encoding", b"br")),
        False,
        id="9111-4.1-different-values",
    ),
    pytest.param(
        get(), get((b"Accept-Encoding", b"")), False, id="9111-4.1-absent-vs-empty"
    ),
]


@pytest.mark.parametrize(("first", "second", "equal"), VARY_VALUES)
def test_vary_values(first: RequestHead, second: RequestHead, equal: bool) -> None:
    """Requests differing only in list whitespace give equal secondary keys."""
    names = (b"accept-encoding",)
    assert (vary_values(names, first) == vary_values(names, second)) is equal


def test_vary_values_absent_is_none() -> None:
    """RFC 9111 4.1: a nominated field absent from the request is recorded as None."""
    assert vary_values((b"accept",), get()) == ((b"accept", None),)


GZIP = ((b"accept-encoding", b"gzip"),)
VARY_AE = (b"Vary", b"Accept-Encoding")
OLD_GZIP = stored(VARY_AE, vary=GZIP, response_time=T0 - 10)
NEW_GZIP = stored(VARY_AE, vary=GZIP)
BROTLI = stored(VARY_AE, vary=((b"accept-encoding", b"br"),))
PLAIN = stored(VARY_AE, vary=((b"accept-encoding", None),))
STAR = stored((b"Vary", b"*"))
NO_VARY = stored()
VARIANTS = [
    pytest.param(
        [BROTLI, OLD_GZIP],
        get((b"Accept-Encoding", b"gzip")),
        OLD_GZIP,
        id="9111-4.1-matching-variant",
    ),
    pytest.param(
        [OLD_GZIP, NEW_GZIP, BROTLI],
        get((b"Accept-Encoding", b"gzip")),
        NEW_GZIP,
        id="9111-4.1-most-recent-of-several",
    ),
    pytest.param(
        [BROTLI], get((b"Accept-Encoding", b"gzip")), None, id="9111-4.1-mismatch"
    ),
    pytest.param([BROTLI, PLAIN], get(), PLAIN, id="9111-4.1-absent-matches-absent"),
    pytest.param([STAR], get(), None, id="9111-4.1-star-never-matches"),
    pytest.param(
        [NO_VARY], get((b"Accept-Encoding", b"gzip")), NO_VARY, id="9111-4.1-no-vary"
    ),
    pytest.param([], get(), None, id="9111-4.1-empty"),
]


@pytest.mark.parametrize(("entries", "request_head", "expected"), VARIANTS)
def test_select_variant(
    entries: list[Entry], request_head: RequestHead, expected: Entry | None
) -> None:
    """The newest entry whose recorded Vary values equal the request's is chosen."""
    assert select_variant(entries, request_head) is expected


# --- RFC 9111 section 4.3: validation -----------------------------------------

LM_OLD = (b"Last-Modified", date(T0 - 100))
LM_NEW = (b"Last-Modified", date(T0 - 50))
CONDITIONALS = [
    pytest.param([], (), id="9111-4.3.1-nothing"),
    pytest.param([stored()], (), id="9111-4.3.1-no-validators"),
    pytest.param(
        [
            stored((b"ETag", b'"a"'), LM_OLD, response_time=T0 - 10),
            stored((b"ETag", b'W/"b"'), LM_NEW),
            stored((b"ETag", b'"a"'), response_time=T0 - 20),
        ],
        ((b"If-None-Match", b'"a", W/"b"'), (b"If-Modified-Since", LM_NEW[1])),
        id="9111-4.3.1-all-etags-newest-last-modified",
    ),
    pytest.param(
        [stored((b"ETag", b"unquoted"), LM_OLD)],
        ((b"If-Modified-Since", LM_OLD[1]),),
        id="9110-8.8.3-malformed-etag-skipped",
    ),
]


@pytest.mark.parametrize(("entries", "expected"), CONDITIONALS)
def test_conditional_headers(entries: list[Entry], expected: Headers) -> None:
    """Conditional requests carry every stored ETag and the newest Last-Modified."""
    assert conditional_headers(entries) == expected


def etag(tag: bytes) -> tuple[bytes, bytes]:
    """An ETag field."""
    return (b"ETag", tag)


MATCHES = [
    pytest.param(
        ok(etag(b'"a"')), ok(etag(b'"a"')), True, id="9111-4.3.4-strong-equal"
    ),
    pytest.param(
        ok(etag(b'"a"')), ok(etag(b'"b"')), False, id="9111-4.3.4-strong-differ"
    ),
    pytest.param(
        ok(etag(b'W/"a"')), ok(etag(b'"a"')), False, id="9111-4.3.4-strong-vs-weak"
    ),
    pytest.param(
        ok(etag(b'"a"'), LM_OLD),
        ok(etag(b'"b"'), LM_OLD),
        False,
        id="9111-4.3.4-strong-mismatch-despite-date",
    ),
    pytest.param(
        ok(LM_OLD), ok(etag(b'"a"'), LM_OLD), False, id="9111-4.3.4-no-stored-tag"
    ),
    pytest.param(
        ok(etag(b'"a"')), ok(etag(b'W/"a"')), True, id="9111-4.3.4-weak-on-strong"
    ),
    pytest.param(
        ok(etag(b'W/"a"')), ok(etag(b'W/"a"')), True, id="9111-4.3.4-weak-equal"
    ),
    pytest.param(
        ok(etag(b'W/"a"')), ok(etag(b'W/"b"')), False, id="9111-4.3.4-weak-differ"
    ),
    pytest.param(
        ok(etag(b'"a"'), LM_OLD), ok(LM_OLD), True, id="9111-4.3.4-last-modified"
    ),
    pytest.param(
        ok(LM_OLD),
        ok((b"Last-Modified", b"Tue Nov 14 22:11:40 2023")),
        True,
        id="9110-5.6.7-last-modified-other-form",
    ),
    pytest.param(ok(LM_OLD), ok(LM_NEW), False, id="9111-4.3.4-last-modified-differ"),
    pytest.param(ok(), ok(), True, id="9111-4.3.4-neither-has-validators"),
    pytest.param(ok(etag(b'"a"')), ok(), False, id="9111-4.3.4-304-without-validators"),
]


@pytest.mark.parametrize(("old", "new", "expected"), MATCHES)
def test_validators_match(old: ResponseHead, new: ResponseHead, expected: bool) -> None:
    """A 304 freshens a stored response only when its validators identify it."""
    assert validators_match(old, new) is expected


def test_validators_match_asctime_fixture() -> None:
    """The asctime fixture above denotes the same instant as LM_OLD."""
    assert parse_http_date(b"Tue Nov 14 22:11:40 2023") == T0 - 100


UPDATES = [
    pytest.param(
        ok(
            (b"Date", date(T0 - 100)),
            (b"Content-Length", b"10"),
            etag(b'"a"'),
            *cc(b"max-age=60"),
            (b"X-Old", b"1"),
        ),
        ResponseHead(
            304,
            b"Not Modified",
            (
                (b"Date", date(T0)),
                *cc(b"max-age=120"),
                (b"Content-Length", b"0"),
                (b"Connection", b"X-Hop"),
                (b"X-Hop", b"1"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Proxy-Authentication-Info", b"x"),
                (b"X-New", b"2"),
            ),
        ),
        (
            (b"Content-Length", b"10"),
            etag(b'"a"'),
            (b"X-Old", b"1"),
            (b"Date", date(T0)),
            *cc(b"max-age=120"),
            (b"X-New", b"2"),
        ),
        id="9111-3.2-replace-keep-content-length",
    ),
    pytest.param(
        ok((b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"X", b"1")),
        ResponseHead(304, b"", ((b"set-cookie", b"c=3"),)),
        ((b"X", b"1"), (b"set-cookie", b"c=3")),
        id="9111-3.2-all-lines-of-field-replaced",
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), UPDATES)
def test_updated_response(
    old: ResponseHead, new: ResponseHead, expected: Headers
) -> None:
    """A 304's fields replace stored ones, except Content-Length and hop-by-hop."""
    result = updated_response(old, new)
    assert (result.status, result.reason, result.headers) == (200, b"OK", expected)


# --- RFC 9111 section 4.4: invalidation ---------------------------------------

INVALIDATING = [
    pytest.param(b"POST", 200, True, id="9111-4.4-post-2xx"),
    pytest.param(b"DELETE", 303, True, id="9111-4.4-delete-3xx"),
    pytest.param(b"PURGE", 204, True, id="9111-4.4-unknown-method-unsafe"),
    pytest.param(b"PUT", 404, False, id="9111-4.4-error-status"),
    pytest.param(b"POST", 500, False, id="9111-4.4-server-error"),
    pytest.param(b"GET", 200, False, id="9110-9.2.1-get-safe"),
    pytest.param(b"HEAD", 200, False, id="9110-9.2.1-head-safe"),
    pytest.param(b"OPTIONS", 200, False, id="9110-9.2.1-options-safe"),
    pytest.param(b"TRACE", 200, False, id="9110-9.2.1-trace-safe"),
]


@pytest.mark.parametrize(("method", "status", "expected"), INVALIDATING)
def test_is_invalidating(method: bytes, status: int, expected: bool) -> None:
    """Only unsafe methods answered with 2xx/3xx invalidate stored responses."""
    assert is_invalidating(method, status) is expected


INVALIDATED = [
    pytest.param(URL, ok(), ["http://ex.com/a"], id="9111-4.4-target"),
    pytest.param(
        URL,
        ok((b"Location", b"/new?x"), (b"Content-Location", b"HTTP://EX.COM:80/c")),
        ["http://ex.com/a", "http://ex.com/new?x", "http://ex.com/c"],
        id="9111-4.4-location-and-content-location",
    ),
    pytest.param(
        URL,
        ok((b"Location", b"b")),
        ["http://ex.com/a", "http://ex.com/b"],
        id="9111-4.4-relative-reference",
    ),
    pytest.param(
        URL,
        ok(
            (b"Location", b"http://other.com/a"),
            (b"Content-Location", b"https://ex.com/a"),
        ),
        ["http://ex.com/a"],
        id="9111-4.4-other-origin-ignored",
    ),
    pytest.param(
        URL,
        ok((b"Location", b"http://ex.com:8080/a")),
        ["http://ex.com/a"],
        id="9111-4.4-other-port-ignored",
    ),
    pytest.param(
        URL,
        ok((b"Location", b"http://u@ex.com/"), (b"Content-Location", b"/a")),
        ["http://ex.com/a"],
        id="9111-4.4-unparsable-ignored-duplicate-dropped",
    ),
    pytest.param(b"ftp://ex.com/", ok(), [], id="9111-4.4-unparsable-target"),
]


@pytest.mark.parametrize(("url", "response", "expected"), INVALIDATED)
def test_invalidated_keys(
    url: bytes, response: ResponseHead, expected: list[str]
) -> None:
    """The target and same-origin Location/Content-Location keys are invalidated."""
    assert invalidated_keys(url, response) == expected


# --- RFC 9111 sections 4, 4.2.4, 5.2.1: the lookup decision -------------------

MAX60 = cc(b"max-age=60")
MUST = cc(b"max-age=60, must-revalidate")
PRAGMA = (b"Pragma", b"no-cache")
SERVE, REVALIDATE, FETCH, TIMEOUT = (
    Action.SERVE,
    Action.REVALIDATE,
    Action.FETCH,
    Action.GATEWAY_TIMEOUT,
)
DECISIONS = [
    # (request headers, stored response headers, seconds elapsed, verdict parts)
    pytest.param((), MAX60, 10, (SERVE, False, "fresh"), id="9111-4.2-fresh"),
    pytest.param(
        (), MAX60, 60, (REVALIDATE, True, "stale"), id="9111-4.2-stale-at-lifetime"
    ),
    pytest.param(
        (), (LM_OLD,), 5, (SERVE, False, "fresh"), id="9111-4.2.2-heuristic-fresh"
    ),
    pytest.param(
        (), (), 0, (REVALIDATE, True, "stale"), id="9111-4.3.1-no-validators-stale"
    ),
    pytest.param(
        (),
        ((b"Expires", b"0"),),
        0,
        (REVALIDATE, True, "stale"),
        id="9111-5.3-expires-invalid-stale",
    ),
    pytest.param(
        cc(b"no-cache"),
        MAX60,
        10,
        (REVALIDATE, False, "no-cache"),
        id="9111-5.2.1.4-request-no-cache",
    ),
    pytest.param(
        (PRAGMA,),
        MAX60,
        10,
        (REVALIDATE, False, "no-cache"),
        id="9111-5.4-pragma-no-cache",
    ),
    pytest.param(
        (PRAGMA, *cc(b"max-stale")),
        MAX60,
        10,
        (SERVE, False, "fresh"),
        id="9111-5.4-pragma-ignored-with-cache-control",
    ),
    pytest.param(
        (),
        cc(b"max-age=60, no-cache"),
        10,
        (REVALIDATE, False, "no-cache"),
        id="9111-5.2.2.4-response-no-cache",
    ),
    pytest.param(
        (),
        cc(b'max-age=60, no-cache="Set-Cookie"'),
        10,
        (SERVE, False, "fresh"),
        id="9111-5.2.2.4-qualified-no-cache-serves",
    ),
    pytest.param(
        cc(b"max-age=5"),
        MAX60,
        10,
        (REVALIDATE, False, "max-age"),
        id="9111-5.2.1.1-request-max-age-exceeded",
    ),
    pytest.param(
        cc(b"max-age=30"),
        MAX60,
        10,
        (SERVE, False, "fresh"),
        id="9111-5.2.1.1-request-max-age-met",
    ),
    pytest.param(
        cc(b"max-age=5, max-stale"),
        MAX60,
        100,
        (REVALIDATE, True, "max-age"),
        id="9111-5.2.1.1-max-age-beats-max-stale",
    ),
    pytest.param(
        cc(b"min-fresh=60"),
        MAX60,
        10,
        (REVALIDATE, False, "min-fresh"),
        id="9111-5.2.1.3-min-fresh-unmet",
    ),
    pytest.param(
        cc(b"min-fresh=20"),
        MAX60,
        10,
        (SERVE, False, "fresh"),
        id="9111-5.2.1.3-min-fresh-met",
    ),
    pytest.param(
        cc(b"max-stale"),
        MAX60,
        9999,
        (SERVE, True, "max-stale"),
        id="9111-5.2.1.2-max-stale-any",
    ),
    pytest.param(
        cc(b"max-stale=60"),
        MAX60,
        90,
        (SERVE, True, "max-stale"),
        id="9111-5.2.1.2-max-stale-within",
    ),
    pytest.param(
        cc(b"max-stale=10"),
        MAX60,
        90,
        (REVALIDATE, True, "stale"),
        id="9111-5.2.1.2-max-stale-exceeded",
    ),
    pytest.param(
        cc(b"max-stale"),
        MUST,
        90,
        (REVALIDATE, True, "stale"),
        id="9111-5.2.2.2-must-revalidate",
    ),
    pytest.param(
        cc(b"max-stale"),
        cc(b"max-age=60, proxy-revalidate"),
        90,
        (REVALIDATE, True, "stale"),
        id="9111-5.2.2.8-proxy-revalidate",
    ),
    pytest.param(
        cc(b"max-stale"),
        cc(b"s-maxage=60"),
        90,
        (REVALIDATE, True, "stale"),
        id="9111-5.2.2.10-s-maxage-implies-proxy-revalidate",
    ),
    pytest.param(
        cc(b"only-if-cached"),
        MAX60,
        10,
        (SERVE, False, "fresh"),
        id="9111-5.2.1.7-only-if-cached-fresh",
    ),
    pytest.param(
        cc(b"only-if-cached"),
        MAX60,
        90,
        (TIMEOUT, True, "only-if-cached"),
        id="9111-5.2.1.7-only-if-cached-stale",
    ),
    pytest.param(
        cc(b"only-if-cached, max-stale"),
        MAX60,
        90,
        (SERVE, True, "max-stale"),
        id="9111-5.2.1.7-only-if-cached-max-stale",
    ),
    pytest.param(
        cc(b"no-store"),
        MAX60,
        10,
        (SERVE, False, "fresh"),
        id="9111-5.2.1.5-request-no-store-still-served",
    ),
]


@pytest.mark.parametrize(("req", "resp", "elapsed", "expected"), DECISIONS)
def test_decide_directives(
    req: Headers,
    resp: Headers,
    elapsed: float,
    expected: tuple[Action, bool, str],
) -> None:
    """decide honours freshness and request/response directives on one entry."""
    entry = stored(DATE, *resp)
    verdict = decide(get(*req), [entry], T0 + elapsed)
    assert (verdict.action, verdict.stale, verdict.detail) == expected
    assert verdict.entry is entry


LOOKUPS = [
    pytest.param(
        get(method=b"POST"),
        [NEW_GZIP],
        Verdict(FETCH, None, False, "method"),
        id="9111-4-post-fetched",
    ),
    pytest.param(get(), [], Verdict(FETCH, None, False, "miss"), id="9111-4-miss"),
    pytest.param(
        get(*cc(b"only-if-cached")),
        [],
        Verdict(TIMEOUT, None, False, "only-if-cached"),
        id="9111-5.2.1.7-only-if-cached-miss",
    ),
    pytest.param(
        get((b"Accept-Encoding", b"br")),
        [NEW_GZIP],
        Verdict(FETCH, None, False, "vary-mismatch"),
        id="9111-4.1-vary-mismatch",
    ),
    pytest.param(
        get(),
        [STAR],
        Verdict(FETCH, None, False, "vary-mismatch"),
        id="9111-4.1-vary-star",
    ),
]


@pytest.mark.parametrize(("request_head", "entries", "expected"), LOOKUPS)
def test_decide_lookup(
    request_head: RequestHead, entries: list[Entry], expected: Verdict
) -> None:
    """Unsafe methods and unmatched variants are fetched (or 504 if only-if-cached)."""
    assert decide(request_head, entries, T0) == expected


def test_decide_head_uses_stored_get() -> None:
    """RFC 9111 4 / RFC 9110 9.3.2: a HEAD is answered from a fresh stored GET."""
    entry = stored(DATE, *MAX60)
    assert decide(get(method=b"HEAD"), [entry], T0 + 1) == Verdict(
        SERVE, entry, False, "fresh"
    )


def test_decide_missing_date_is_receipt_time() -> None:
    """RFC 9110 6.6.1: without Date, Expires counts from the time of receipt."""
    entry = stored((b"Expires", date(T0 + 60)))
    assert decide(get(), [entry], T0 + 10) == Verdict(SERVE, entry, False, "fresh")


def test_decide_heuristic_cap() -> None:
    """RFC 9111 4.2.2: decide passes heuristic_cap through to the lifetime."""
    entry = stored(DATE, (b"Last-Modified", date(T0 - 100 * DAY)))
    assert decide(get(), [entry], T0 + 120, heuristic_cap=60).action is REVALIDATE
    assert decide(get(), [entry], T0 + 120).action is SERVE


# --- RFC 5861 / RFC 9111 section 4.2.4: stale extensions ----------------------

STALE_IF_ERROR = [
    pytest.param(
        cc(b"max-age=60, stale-if-error=100"), (), 150, True, id="5861-4-response"
    ),
    pytest.param(
        cc(b"max-age=60, stale-if-error=10"), (), 150, False, id="5861-4-too-stale"
    ),
    pytest.param(MAX60, cc(b"stale-if-error=100"), 150, True, id="5861-4-request"),
    pytest.param(MAX60, (), 150, False, id="9111-4.2.4-no-directive"),
    pytest.param(
        cc(b"max-age=60, stale-if-error=100, must-revalidate"),
        (),
        150,
        False,
        id="9111-5.2.2.2-must-revalidate-forbids",
    ),
    pytest.param(
        cc(b"max-age=60, stale-if-error=100, proxy-revalidate"),
        (),
        150,
        False,
        id="9111-5.2.2.8-proxy-revalidate-forbids",
    ),
    pytest.param(
        cc(b"s-maxage=60, stale-if-error=100"),
        (),
        150,
        False,
        id="9111-5.2.2.10-s-maxage-forbids",
    ),
    pytest.param(
        cc(b"max-age=60, stale-if-error=100, no-cache"),
        (),
        150,
        False,
        id="9111-5.2.2.4-no-cache-forbids",
    ),
]


@pytest.mark.parametrize(("resp", "req", "elapsed", "expected"), STALE_IF_ERROR)
def test_can_serve_stale_on_error(
    resp: Headers, req: Headers, elapsed: float, expected: bool
) -> None:
    """stale-if-error allows a stale answer to an origin error unless forbidden."""
    entry = stored(DATE, *resp)
    assert can_serve_stale_on_error(entry, get(*req), T0 + elapsed) is expected


STALE_WHILE_REVALIDATE = [
    pytest.param(
        cc(b"max-age=60, stale-while-revalidate=30"), 70, True, id="5861-3-within"
    ),
    pytest.param(
        cc(b"max-age=60, stale-while-revalidate=30"), 100, False, id="5861-3-beyond"
    ),
    pytest.param(
        cc(b"max-age=60, stale-while-revalidate=30"), 10, False, id="5861-3-fresh"
    ),
    pytest.param(MAX60, 70, False, id="5861-3-no-directive"),
    pytest.param(
        cc(b"max-age=60, stale-while-revalidate=30, must-revalidate"),
        70,
        False,
        id="9111-5.2.2.2-must-revalidate-forbids",
    ),
    pytest.param(
        cc(b"s-maxage=60, stale-while-revalidate=30"),
        70,
        False,
        id="9111-5.2.2.10-s-maxage-forbids",
    ),
]


@pytest.mark.parametrize(("resp", "elapsed", "expected"), STALE_WHILE_REVALIDATE)
def test_stale_while_revalidate_allows(
    resp: Headers, elapsed: float, expected: bool
) -> None:
    """stale-while-revalidate covers only stale entries within its window."""
    entry = stored(DATE, *resp)
    assert stale_while_revalidate_allows(entry, T0 + elapsed, 86400.0) is expected


# --- Layering -----------------------------------------------------------------


def test_policy_imports_only_stdlib_and_model() -> None:
    """policy.py imports nothing but the standard library and cacheproxy.model."""
    tree = ast.parse(Path(policy.__file__).read_text(encoding="utf-8"))
    modules: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports hide the layering"
            modules.append(node.module or "")
    foreign = [
        m
        for m in modules
        if m != "cacheproxy.model"
        and m != "__future__"
        and m.partition(".")[0] not in sys.stdlib_module_names
    ]
    assert modules and not foreign


# --- RFC 8246 / RFC 9111 section 5.2: immutable and stale-forbidding -----------

IMMUTABLE = cc(b"max-age=60, immutable")
IMMUTABLE_DECISIONS = [
    pytest.param(
        cc(b"no-cache"),
        IMMUTABLE,
        10,
        (SERVE, False, "fresh"),
        id="8246-2-request-no-cache-served",
    ),
    pytest.param(
        (PRAGMA,), IMMUTABLE, 10, (SERVE, False, "fresh"), id="8246-2-pragma-served"
    ),
    pytest.param(
        cc(b"max-age=0"),
        IMMUTABLE,
        10,
        (SERVE, False, "fresh"),
        id="8246-2-request-max-age-0-served",
    ),
    pytest.param(
        cc(b"no-cache"),
        IMMUTABLE,
        90,
        (REVALIDATE, True, "no-cache"),
        id="8246-2-stale-immutable-revalidated",
    ),
    pytest.param(
        (),
        cc(b"max-age=60, immutable, no-cache"),
        10,
        (REVALIDATE, False, "no-cache"),
        id="9111-5.2.2.4-response-no-cache-beats-immutable",
    ),
    pytest.param(
        cc(b"min-fresh=60"),
        IMMUTABLE,
        10,
        (REVALIDATE, False, "min-fresh"),
        id="9111-5.2.1.3-min-fresh-still-applies",
    ),
    pytest.param(
        cc(b"max-age=0"),
        MAX60,
        10,
        (REVALIDATE, False, "max-age"),
        id="9111-5.2.1.1-max-age-0-without-immutable",
    ),
]


@pytest.mark.parametrize(("req", "resp", "elapsed", "expected"), IMMUTABLE_DECISIONS)
def test_decide_immutable(
    req: Headers,
    resp: Headers,
    elapsed: float,
    expected: tuple[Action, bool, str],
) -> None:
    """A fresh immutable response is served despite a client reload."""
    entry = stored(DATE, *resp)
    verdict = decide(get(*req), [entry], T0 + elapsed)
    assert (verdict.action, verdict.stale, verdict.detail) == expected


FLAGS = [
    pytest.param(cc(b"max-age=60"), False, False, id="9111-4.2.4-plain"),
    pytest.param(cc(b"must-revalidate"), True, False, id="9111-5.2.2.2-must"),
    pytest.param(cc(b"proxy-revalidate"), True, False, id="9111-5.2.2.8-proxy"),
    pytest.param(cc(b"s-maxage=5"), True, False, id="9111-5.2.2.10-s-maxage"),
    pytest.param(cc(b"no-cache"), False, False, id="9111-5.2.2.4-no-cache-not-it"),
    pytest.param(cc(b"max-age=9, Immutable"), False, True, id="8246-2-immutable"),
]


@pytest.mark.parametrize(("headers", "forbids", "immutable"), FLAGS)
def test_forbids_stale_and_is_immutable(
    headers: Headers, forbids: bool, immutable: bool
) -> None:
    """forbids_stale names the must-revalidate family; is_immutable reads RFC 8246."""
    assert policy.forbids_stale(ok(*headers)) is forbids
    assert policy.is_immutable(ok(*headers)) is immutable


# --- RFC 9111 section 5.2.2.4: qualified no-cache -----------------------------

COOKIE = (b"Set-Cookie", b"a=1")
NO_CACHE_FIELDS = [
    pytest.param(
        (*cc(b'no-cache="Set-Cookie, X-A"'), COOKIE, (b"x-a", b"1"), (b"X-B", b"2")),
        frozenset({b"set-cookie", b"x-a"}),
        id="9111-5.2.2.4-qualified",
    ),
    pytest.param((*cc(b"no-cache"), COOKIE), frozenset(), id="9111-5.2.2.4-bare"),
    pytest.param((COOKIE,), frozenset(), id="9111-5.2.2.4-absent"),
]


@pytest.mark.parametrize(("headers", "names"), NO_CACHE_FIELDS)
def test_fields_needing_validation(headers: Headers, names: frozenset[bytes]) -> None:
    """Named fields are withheld until validated, and only those."""
    response = ok(*headers)
    assert policy.fields_needing_validation(response) == names
    assert policy.served_headers(response, validated=True) == headers
    assert policy.served_headers(response, validated=False) == tuple(
        (n, v) for n, v in headers if n.lower() not in names
    )


# --- RFC 9110 section 13 / RFC 9111 section 4.3.2: client preconditions -------

STRONG = etag(b'"v1"')
WEAK = etag(b'W/"v1"')
LM = (b"Last-Modified", date(T0 - 100))


def cond(*headers: tuple[bytes, bytes]) -> Headers:
    """The request fields of a conditional case."""
    return tuple(headers)


PRECONDITIONS = [
    # (request fields, stored response fields, expected status or None)
    pytest.param(
        cond((b"If-None-Match", b'"v1"')), (STRONG,), 304, id="9110-13.1.2-inm-strong"
    ),
    pytest.param(
        cond((b"If-None-Match", b'W/"v1"')),
        (STRONG,),
        304,
        id="9110-13.1.2-inm-weak-comparison",
    ),
    pytest.param(
        cond((b"If-None-Match", b'"v1"')),
        (WEAK,),
        304,
        id="9110-13.1.2-inm-stored-weak",
    ),
    pytest.param(
        cond((b"If-None-Match", b'"x", "v1"')),
        (STRONG,),
        304,
        id="9110-13.1.2-inm-list",
    ),
    pytest.param(
        cond((b"If-None-Match", b'"v2"')), (STRONG,), None, id="9110-13.1.2-inm-differs"
    ),
    pytest.param(cond((b"If-None-Match", b"*")), (), 304, id="9110-13.1.2-inm-star"),
    pytest.param(
        cond((b"If-None-Match", b'"v1"')), (), None, id="9110-13.1.2-inm-no-etag"
    ),
    pytest.param(
        cond((b"If-Match", b'"v1"')), (STRONG,), None, id="9110-13.1.1-im-matches"
    ),
    pytest.param(
        cond((b"If-Match", b'"v2"')), (STRONG,), 412, id="9110-13.1.1-im-fails"
    ),
    pytest.param(
        cond((b"If-Match", b'"v1"')),
        (WEAK,),
        412,
        id="9110-13.1.1-im-strong-comparison",
    ),
    pytest.param(
        cond((b"If-Match", b'W/"v1"')),
        (STRONG,),
        412,
        id="9110-13.1.1-im-weak-tag-never-matches",
    ),
    pytest.param(cond((b"If-Match", b"*")), (), None, id="9110-13.1.1-im-star"),
    pytest.param(
        cond((b"If-Match", b'"v2"'), (b"If-None-Match", b'"v1"')),
        (STRONG,),
        412,
        id="9110-13.2.2-im-before-inm",
    ),
    pytest.param(
        cond((b"If-Match", b'"v1"'), (b"If-None-Match", b'"v1"')),
        (STRONG,),
        304,
        id="9110-13.2.2-im-true-then-inm",
    ),
    pytest.param(
        cond((b"If-Unmodified-Since", date(T0 - 200))),
        (LM,),
        412,
        id="9110-13.1.4-ius-modified-since",
    ),
    pytest.param(
        cond((b"If-Unmodified-Since", date(T0 - 100))),
        (LM,),
        None,
        id="9110-13.1.4-ius-equal-holds",
    ),
    pytest.param(
        cond((b"If-Match", b'"v1"'), (b"If-Unmodified-Since", date(T0 - 200))),
        (STRONG, LM),
        None,
        id="9110-13.1.4-ius-ignored-with-im",
    ),
    pytest.param(
        cond((b"If-Unmodified-Since", date(T0 - 200))),
        (DATE,),
        None,
        id="9110-13.1.4-ius-needs-last-modified",
    ),
    pytest.param(
        cond((b"If-Unmodified-Since", b"yesterday")),
        (LM,),
        None,
        id="9110-13.1.4-ius-invalid-ignored",
    ),
    pytest.param(
        cond((b"If-Modified-Since", date(T0 - 100))),
        (LM,),
        304,
        id="9110-13.1.3-ims-equal-not-modified",
    ),
    pytest.param(
        cond((b"If-Modified-Since", date(T0 - 150))),
        (LM,),
        None,
        id="9110-13.1.3-ims-modified",
    ),
    pytest.param(
        cond((b"If-Modified-Since", b"garbage")),
        (LM,),
        None,
        id="9110-13.1.3-ims-invalid-ignored",
    ),
    pytest.param(
        cond((b"If-Modified-Since", date(T0)), (b"If-Modified-Since", date(T0))),
        (LM,),
        None,
        id="9110-13.1.3-ims-two-members-ignored",
    ),
    pytest.param(
        cond((b"If-None-Match", b'"v2"'), (b"If-Modified-Since", date(T0))),
        (STRONG, LM),
        None,
        id="9110-13.2.2-inm-beats-ims",
    ),
    pytest.param(
        cond((b"If-None-Match", b'"v1"'), (b"If-Modified-Since", date(T0 - 999))),
        (STRONG, LM),
        304,
        id="9110-13.2.2-inm-match-beats-old-ims",
    ),
    pytest.param(
        cond((b"If-Modified-Since", date(T0))),
        (DATE,),
        304,
        id="9111-4.3.2-ims-falls-back-to-date",
    ),
    pytest.param(
        cond((b"If-Modified-Since", date(T0 - 1))),
        (DATE,),
        None,
        id="9111-4.3.2-ims-date-later",
    ),
    pytest.param(
        cond((b"If-Modified-Since", date(T0 - 50))),
        (),
        304,
        id="9111-4.3.2-ims-falls-back-to-received",
    ),
    pytest.param(
        cond((b"If-Range", b'"v1"')), (STRONG,), None, id="9110-13.2.2-if-range-alone"
    ),
]


@pytest.mark.parametrize(("req", "resp", "expected"), PRECONDITIONS)
def test_evaluate_conditionals(
    req: Headers, resp: Headers, expected: int | None
) -> None:
    """Preconditions are evaluated against the stored response in RFC order."""
    request = get(*req)
    assert policy.has_conditionals(request)
    outcome = policy.evaluate_conditionals(request, ok(*resp), received=T0 - 60)
    assert outcome == expected


CONDITIONAL_SCOPE = [
    pytest.param(get(), ok(STRONG), None, id="9110-13.1-no-preconditions"),
    pytest.param(
        get((b"If-None-Match", b'"v1"'), method=b"HEAD"),
        ok(STRONG),
        304,
        id="9110-13.2.2-head-304",
    ),
    pytest.param(
        get((b"If-None-Match", b'"v1"'), method=b"POST"),
        ok(STRONG),
        None,
        id="9111-4.3.2-not-for-unsafe-methods",
    ),
    pytest.param(
        get((b"If-None-Match", b'"v1"')),
        ok(STRONG, status=404),
        None,
        id="9110-13.2.1-ignored-for-non-2xx",
    ),
    pytest.param(
        get((b"If-Modified-Since", date(T0))),
        ok(),
        None,
        id="9111-4.3.2-no-date-at-all",
    ),
]


@pytest.mark.parametrize(("request_head", "response", "expected"), CONDITIONAL_SCOPE)
def test_evaluate_conditionals_scope(
    request_head: RequestHead, response: ResponseHead, expected: int | None
) -> None:
    """Preconditions apply only to GET/HEAD over a 2xx stored response."""
    assert policy.evaluate_conditionals(request_head, response) == expected


def test_has_conditionals_false_without_fields() -> None:
    """RFC 9110 13.1: a request without precondition fields is unconditional."""
    assert not policy.has_conditionals(get((b"Range", b"bytes=0-1"), *cc(b"no-cache")))


def test_not_modified_headers() -> None:
    """RFC 9110 15.4.5: a 304 carries validators and caching fields, no content."""
    response = ok(
        (b"Content-Type", b"text/plain"),
        (b"Content-Length", b"10"),
        DATE,
        STRONG,
        LM,
        *cc(b"max-age=60"),
        (b"Expires", date(T0 + 60)),
        (b"Vary", b"Accept"),
        (b"Content-Location", b"/a.txt"),
        (b"Content-Encoding", b"gzip"),
        COOKIE,
    )
    assert policy.not_modified_headers(response) == (
        DATE,
        STRONG,
        LM,
        *cc(b"max-age=60"),
        (b"Expires", date(T0 + 60)),
        (b"Vary", b"Accept"),
        (b"Content-Location", b"/a.txt"),
    )


# --- RFC 9110 section 13.1.5: If-Range ----------------------------------------

STRONG_LM = (DATE, LM)  # Date is 100 s after Last-Modified: a strong date
IF_RANGES = [
    pytest.param((), (STRONG,), True, id="9110-13.1.5-absent"),
    pytest.param(((b"If-Range", b'"v1"'),), (STRONG,), True, id="9110-13.1.5-etag"),
    pytest.param(
        ((b"If-Range", b'"v2"'),), (STRONG,), False, id="9110-13.1.5-etag-differs"
    ),
    pytest.param(
        ((b"If-Range", b'W/"v1"'),), (WEAK,), False, id="9110-13.1.5-weak-sent"
    ),
    pytest.param(
        ((b"If-Range", b'"v1"'),), (WEAK,), False, id="9110-13.1.5-weak-stored"
    ),
    pytest.param(
        ((b"If-Range", date(T0 - 100)),), STRONG_LM, True, id="9110-13.1.5-date"
    ),
    pytest.param(
        ((b"If-Range", date(T0 - 99)),),
        STRONG_LM,
        False,
        id="9110-13.1.5-date-exact-match-only",
    ),
    pytest.param(
        ((b"If-Range", date(T0)),),
        ((b"Last-Modified", date(T0)), DATE),
        False,
        id="9110-8.8.2.2-date-weak-same-second",
    ),
    pytest.param(
        ((b"If-Range", date(T0 - 100)),),
        (LM,),
        False,
        id="9110-8.8.2.2-date-weak-without-date",
    ),
    pytest.param(
        ((b"If-Range", b"not a date"),), STRONG_LM, False, id="9110-13.1.5-garbage"
    ),
]


@pytest.mark.parametrize(("req", "resp", "expected"), IF_RANGES)
def test_if_range_allows(req: Headers, resp: Headers, expected: bool) -> None:
    """If-Range lets Range apply only for a strong validator match."""
    request = get((b"Range", b"bytes=0-1"), *req)
    assert policy.if_range_allows(request, ok(*resp)) is expected


# --- RFC 9110 section 14: ranges from a complete stored body ------------------

R = policy.ByteRange
RANGES = [
    # (Range field value or None, body length, expected)
    pytest.param(None, 1000, None, id="9110-14.2-absent"),
    pytest.param(b"bytes=0-499", 1000, [R(0, 499)], id="9110-14.1.2-single"),
    pytest.param(b"bytes=-500", 1000, [R(500, 999)], id="9110-14.1.2-suffix"),
    pytest.param(b"bytes=-5000", 1000, [R(0, 999)], id="9110-14.1.2-suffix-longer"),
    pytest.param(b"bytes=500-", 1000, [R(500, 999)], id="9110-14.1.2-open"),
    pytest.param(b"bytes=900-5000", 1000, [R(900, 999)], id="9110-14.1.2-clipped"),
    pytest.param(b"BYTES=0-0", 10, [R(0, 0)], id="9110-14.1-unit-case-insensitive"),
    pytest.param(
        b"bytes=0-0,-1", 10000, [R(0, 0), R(9999, 9999)], id="9110-14.1.2-first-last"
    ),
    pytest.param(
        b"bytes= 0-999, 4500-5499, -1000",
        10000,
        [R(0, 999), R(4500, 5499), R(9000, 9999)],
        id="9110-14.1.2-multiple",
    ),
    pytest.param(
        b"bytes=500-600,601-999", 10000, [R(500, 999)], id="9110-14.1.2-adjacent"
    ),
    pytest.param(
        b"bytes=500-700,601-999", 10000, [R(500, 999)], id="9110-14.1.2-overlapping"
    ),
    pytest.param(
        b"bytes=50-59,0-9,5-54",
        100,
        [R(0, 59)],
        id="9110-15.3.7.2-coalesced-chain",
    ),
    pytest.param(
        b"bytes=80-89,0-9,85-95",
        100,
        [R(80, 95), R(0, 9)],
        id="9110-15.3.7.2-request-order-kept",
    ),
    pytest.param(
        b"bytes=0-1,0-1,0-1,0-1", 100, [R(0, 1)], id="9110-17.15-overlap-coalesced"
    ),
    pytest.param(b"bytes=1000-", 1000, [], id="9110-14.1.2-unsatisfiable"),
    pytest.param(b"bytes=-0", 1000, [], id="9110-14.1.2-suffix-zero"),
    pytest.param(
        b"bytes=2000-,0-5", 1000, [R(0, 5)], id="9110-14.1.2-unsatisfiable-dropped"
    ),
    pytest.param(b"bytes=5-1", 1000, None, id="9110-14.1.1-last-before-first"),
    pytest.param(b"bytes=0-1,x", 1000, None, id="9110-14.1.1-invalid-spec"),
    pytest.param(b"bytes=", 1000, None, id="9110-14.1.1-empty-set"),
    pytest.param(b"bytes 0-1", 1000, None, id="9110-14.1.1-no-equals"),
    pytest.param(b"bytes=0x10-", 1000, None, id="9110-14.1.1-not-decimal"),
    pytest.param(b"items=0-1", 1000, None, id="9110-14.2-other-unit-ignored"),
    pytest.param(b"bytes=0-1", 0, None, id="9110-14.2-zero-length-ignored"),
    pytest.param(b"bytes=-10", 0, None, id="9110-14.2-zero-length-suffix-ignored"),
    pytest.param(
        b"bytes=0-0,,2-2", 10, [R(0, 0), R(2, 2)], id="9110-5.6.1-empty-elements"
    ),
    pytest.param(
        b"bytes=" + b",".join(b"%d-%d" % (i * 2, i * 2) for i in range(101)),
        1000,
        None,
        id="9110-14.2-too-many-ranges",
    ),
    pytest.param(
        b"bytes=99999999999999999999999-", 10, [], id="9110-14.1.2-huge-numbers"
    ),
]


@pytest.mark.parametrize(("value", "length", "expected"), RANGES)
def test_requested_ranges(
    value: bytes | None, length: int, expected: list[policy.ByteRange] | None
) -> None:
    """Range is parsed, clipped and coalesced, or ignored when it should be."""
    request = get() if value is None else get((b"Range", value))
    assert policy.requested_ranges(request, length) == expected


RANGE_SCOPE = [
    pytest.param(get((b"Range", b"bytes=0-1"), method=b"HEAD"), id="9110-14.2-head"),
    pytest.param(
        get((b"Range", b"bytes=0-1"), (b"Range", b"bytes=3-4")),
        id="9110-14.2-repeated-field",
    ),
]


@pytest.mark.parametrize("request_head", RANGE_SCOPE)
def test_requested_ranges_ignored(request_head: RequestHead) -> None:
    """Range applies to GET only, and only as one field line."""
    assert policy.requested_ranges(request_head, 100) is None


def test_content_range() -> None:
    """RFC 9110 14.4: Content-Range names the inclusive range and the length."""
    assert policy.content_range(R(0, 499), 1234) == b"bytes 0-499/1234"


def test_multipart_boundary() -> None:
    """RFC 2046 5.1.1: a deterministic boundary of safe characters, at most 70."""
    boundary = policy.multipart_boundary(b"\x00\xff seed")
    assert boundary == policy.multipart_boundary(b"\x00\xff seed")
    assert boundary != policy.multipart_boundary(b"other")
    assert 0 < len(boundary) <= 70
    assert boundary.isascii() and all(
        c.isalnum() or c in "-_" for c in boundary.decode()
    )


def test_multipart_part_head_and_end() -> None:
    """RFC 9110 14.6: each part has its delimiter, Content-Type and Content-Range."""
    head = policy.multipart_part_head(b"B", b"text/plain", R(0, 4), 10)
    assert head == (
        b"\r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-4/10\r\n\r\n"
    )
    assert policy.multipart_part_head(b"B", None, R(5, 9), 10) == (
        b"\r\n--B\r\nContent-Range: bytes 5-9/10\r\n\r\n"
    )
    assert policy.multipart_end(b"B") == b"\r\n--B--\r\n"
    assert policy.multipart_content_type(b"B") == b"multipart/byteranges; boundary=B"


BODY = bytes(range(256)) * 4
MULTIPART = [
    pytest.param(b"text/plain", [R(0, 0), R(1023, 1023)], id="9110-14.6-two-bytes"),
    pytest.param(None, [R(10, 99), R(0, 4)], id="9110-14.6-no-content-type"),
    pytest.param(
        b"application/octet-stream",
        [R(0, 99), R(200, 299), R(1000, 1023)],
        id="9110-14.6-three-parts",
    ),
    pytest.param(b"a/b", [R(0, 1023)], id="9110-14.6-one-part"),
]


@pytest.mark.parametrize(("content_type", "ranges"), MULTIPART)
def test_multipart_length(
    content_type: bytes | None, ranges: list[policy.ByteRange]
) -> None:
    """multipart_length is the exact length of the assembled multipart body."""
    boundary = policy.multipart_boundary(b"seed")
    body = b"".join(
        policy.multipart_part_head(boundary, content_type, r, len(BODY))
        + BODY[r.start : r.end + 1]
        for r in ranges
    ) + policy.multipart_end(boundary)
    assert policy.multipart_length(boundary, content_type, ranges, len(BODY)) == len(
        body
    )
    assert body.count(b"--" + boundary) == len(ranges) + 1


# -- the hot path's precomputed decision (policy.plain_reuse) --------------------

_DIRECTIVES = [
    b"max-age=0",
    b"max-age=60",
    b"max-age=3600",
    b"s-maxage=30",
    b"s-maxage=oops",
    b"no-cache",
    b'no-cache="set-cookie"',
    b"must-revalidate",
    b"public",
    b"immutable",
    b"stale-while-revalidate=30",
]


@st.composite
def _plain_cases(draw: st.DrawFn) -> tuple[Entry, float]:
    """A stored entry with assorted freshness fields, and a moment to decide at."""
    headers: list[tuple[bytes, bytes]] = []
    directives = draw(st.lists(st.sampled_from(_DIRECTIVES), max_size=3))
    if directives:
        headers.append((b"Cache-Control", b", ".join(directives)))
    skew = draw(st.integers(-600, 600))
    if draw(st.booleans()):
        headers.append((b"Date", date(T0 + skew)))
    if draw(st.booleans()):
        headers.append((b"Expires", date(T0 + draw(st.integers(-600, 7200)))))
    if draw(st.booleans()):
        headers.append((b"Last-Modified", date(T0 - draw(st.integers(0, 10**6)))))
    if draw(st.booleans()):
        headers.append((b"Age", b"%d" % draw(st.integers(0, 900))))
    delay = draw(st.integers(0, 5))
    entry = stored(
        *headers,
        request_time=T0 - delay,
        response_time=T0,
        status=draw(st.sampled_from([200, 203, 301, 404])),
    )
    # Half a second off whole seconds: never exactly on the freshness boundary.
    now = T0 + draw(st.integers(0, 10**5)) + 0.5
    return entry, now


@given(_plain_cases())
@settings(max_examples=400, deadline=None)
def test_plain_reuse_agrees_with_decide(case: tuple[Entry, float]) -> None:
    """RFC 9111 4.2: for a plain request, plain_reuse serves exactly when decide does,
    and its Age equals age_header_value's."""
    entry, now = case
    reuse = policy.plain_reuse(entry)
    for method in (b"GET", b"HEAD"):
        verdict = decide(get(method=method), [entry], now)
        served = verdict.action is Action.SERVE
        assert (now < reuse.fresh_until) == served or (
            # A qualified no-cache is served by decide with fields held back;
            # the hot path leaves that case to the full path.
            served and reuse.fresh_until == -math.inf
        )
    age = policy.age_field(reuse.initial_age + now - entry.response_time)
    assert age == age_header_value(entry, now)


def test_plain_reuse_vary() -> None:
    """RFC 9111 4.1: plain_reuse carries the Vary names; None for Vary: *."""
    assert policy.plain_reuse(stored((b"Vary", b"Accept, X-A"))).vary == (
        b"accept",
        b"x-a",
    )
    assert policy.plain_reuse(stored((b"Vary", b"*"))).vary is None


def test_plain_excluded_names_every_field_decide_reads() -> None:
    """The fields that make a request not plain include every one decide consults."""
    for name in (b"cache-control", b"pragma", b"authorization", b"range"):
        assert name in policy.PLAIN_EXCLUDED
    for name in policy._PRECONDITIONS:
        assert name in policy.PLAIN_EXCLUDED
