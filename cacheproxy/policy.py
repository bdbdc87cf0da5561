"""RFC 9111 caching rules for a shared cache, as pure functions over header lists.

Rules of this module:
- It imports only the standard library and L{cacheproxy.model}: no Twisted, no store.
- It never reads the clock: every time is an argument (``now``, float seconds since
  the epoch), so every rule is a plain unit test.
- Header names are compared case-insensitively; values stay raw ``bytes``.
- Malformed input never raises (except L{cache_key}, whose callers must reject the
  request): an unparsable date or number takes the value that errs towards
  revalidation, as RFC 9111 section 4.2.1 asks.
"""

from __future__ import annotations

import calendar
import enum
import functools
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urljoin

from cacheproxy.model import (
    Entry,
    Headers,
    RequestHead,
    ResponseHead,
    header_list,
    header_value,
    header_values,
    split_list,
    without_headers,
)

HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

# RFC 9111 section 1.2.2: delta-seconds too large to represent become 2^31.
MAX_DELTA_SECONDS = 2147483648

# RFC 9110 section 15.1 (and 9111 section 4.2.2): statuses cacheable by default.
HEURISTIC_STATUSES: frozenset[int] = frozenset(
    {200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501}
)

# Final statuses RFC 9110 defines whose caching rules we implement; 206 and 304 are
# absent on purpose because we store only complete bodies (RFC 9111 sections 3, 3.3).
UNDERSTOOD_STATUSES: frozenset[int] = frozenset(
    {200, 201, 202, 203, 204, 205, 300, 301, 302, 303, 307, 308}
    | set(range(400, 418))
    | {421, 422, 426}
    | set(range(500, 506))
)

SAFE_METHODS: frozenset[bytes] = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

# RFC 9111 section 3.1: proxy-specific fields are never stored.
_NEVER_STORED: frozenset[bytes] = HOP_BY_HOP | {b"proxy-authentication-info"}

# RFC 9111 section 3.2: fields never copied from a 304 onto the stored response;
# Content-Range is processed by the recipient and would describe no stored body.
_NOT_UPDATED: frozenset[bytes] = _NEVER_STORED | {b"content-length", b"content-range"}


# ---------------------------------------------------------------------------
# Header field plumbing
# ---------------------------------------------------------------------------


def end_to_end(headers: Headers) -> Headers:
    """``headers`` less hop-by-hop fields and those named in Connection.

    RFC 9110 section 7.6.1.
    """
    named = {name.lower() for name in header_list(headers, b"connection")}
    return without_headers(headers, HOP_BY_HOP | named)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _unquote(arg: str) -> str:
    """The content of a quoted-string (RFC 9110 section 5.6.4), tolerating no close."""
    out: list[str] = []
    escaped = False
    for char in arg[1:]:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            break
        else:
            out.append(char)
    return "".join(out)


def cache_control(headers: Headers) -> dict[str, str | None]:
    """Cache-Control directives, lower-cased name to unquoted argument or None.

    RFC 9111 section 5.2; the first occurrence of a directive wins (section 4.2.1)
    and items that are not ``token [= token / quoted-string]`` are skipped.
    """
    values = header_values(headers, b"cache-control")
    if not values:
        return {}
    # The same few field values come back on every hit: parse each once.
    return dict(_parse_cache_control(tuple(values)))


@functools.lru_cache(maxsize=4096)
def _parse_cache_control(values: tuple[bytes, ...]) -> dict[str, str | None]:
    """The directives of these Cache-Control field values (see L{cache_control})."""
    directives: dict[str, str | None] = {}
    for item in (part for value in values for part in split_list(value)):
        text = item.decode("latin-1")
        name, eq, arg = text.partition("=")
        name = name.strip().lower()
        if not _TOKEN.fullmatch(name) or name in directives:
            continue
        if not eq:
            directives[name] = None
            continue
        arg = arg.strip()
        directives[name] = _unquote(arg) if arg.startswith('"') else arg
    return directives


def _delta_seconds(arg: str | None) -> int | None:
    """A delta-seconds argument capped at 2^31, or None if absent or invalid.

    RFC 9111 section 1.2.2.
    """
    if arg is None or not arg.isascii() or not arg.isdigit():
        return None
    return min(int(arg), MAX_DELTA_SECONDS)


def _names_argument(arg: str | None) -> frozenset[bytes]:
    """The lower-cased field names of a qualified no-cache or private directive."""
    if not arg:
        return frozenset()
    return frozenset(n.lower() for n in split_list(arg.encode("latin-1")))


# ---------------------------------------------------------------------------
# HTTP-date (RFC 9110 section 5.6.7)
# ---------------------------------------------------------------------------

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun")
        + ("jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}
_TIME = r"(\d\d):(\d\d):(\d\d)"
_IMF_FIXDATE = re.compile(
    r"[A-Za-z]{3}, (\d\d) ([A-Za-z]{3}) (\d{4}) " + _TIME + r" GMT", re.ASCII
)
_RFC850_DATE = re.compile(
    r"[A-Za-z]{6,9}, (\d\d)-([A-Za-z]{3})-(\d\d) " + _TIME + r" GMT", re.ASCII
)
_ASCTIME_DATE = re.compile(
    r"[A-Za-z]{3} ([A-Za-z]{3}) ([ \d]\d) " + _TIME + r" (\d{4})", re.ASCII
)


def _timestamp(
    year: int, month: str, day: int, hour: int, minute: int, sec: int
) -> float | None:
    """Seconds since the epoch for a UTC civil time, or None if it does not exist."""
    number = _MONTHS.get(month.lower())
    if number is None or not 1 <= day <= calendar.monthrange(year, number)[1]:
        return None
    # RFC 9110 section 5.6.7 allows a leap second (60) in the grammar.
    if hour > 23 or minute > 59 or sec > 60:
        return None
    return float(calendar.timegm((year, number, day, hour, minute, sec, 0, 0, 0)))


@functools.lru_cache(maxsize=4096)
def parse_http_date(value: bytes | None) -> float | None:
    """An HTTP-date as seconds since the epoch, or None if absent or invalid.

    RFC 9110 section 5.6.7: IMF-fixdate, and the obsolete rfc850 and asctime forms.
    """
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if match := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hh, mm, ss = match.groups()
        return _timestamp(int(year), month, int(day), int(hh), int(mm), int(ss))
    if match := _RFC850_DATE.fullmatch(text):
        day, month, yy, hh, mm, ss = match.groups()
        # The RFC's "50 years ahead" rule needs a clock; a fixed pivot gives the
        # same answer for every date an origin plausibly sends today.
        year = int(yy) + (2000 if int(yy) < 70 else 1900)
        return _timestamp(year, month, int(day), int(hh), int(mm), int(ss))
    if match := _ASCTIME_DATE.fullmatch(text):
        month, day, hh, mm, ss, year = match.groups()
        return _timestamp(int(year), month, int(day), int(hh), int(mm), int(ss))
    return None


def _first_date(headers: Headers, name: bytes) -> float | None:
    """The first field line of a date field, parsed (RFC 9111 section 4.2.1)."""
    values = header_values(headers, name)
    return parse_http_date(values[0]) if values else None


# ---------------------------------------------------------------------------
# Cache key (RFC 3986 section 6.2.2; RFC 9111 section 2)
# ---------------------------------------------------------------------------

_UNRESERVED = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_HEX = frozenset("0123456789abcdefABCDEF")
_PCT = re.compile(r"%[0-9a-f]{2}")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_HOST = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=]+|\[[0-9A-Fa-f:.]+\]", re.ASCII)


def _normalise_percent(text: str) -> str:
    """Upper-case percent-encoding hex and decode encoded unreserved characters.

    RFC 3986 sections 6.2.2.1 and 6.2.2.2; bytes that can never appear in a URI
    (controls, space, non-ASCII) are percent-encoded so equal URLs get equal keys.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        char, pair = text[i], text[i + 1 : i + 3]
        if char == "%" and len(pair) == 2 and set(pair) <= _HEX:
            decoded = chr(int(pair, 16))
            out.append(decoded if decoded in _UNRESERVED else "%" + pair.upper())
            i += 3
            continue
        # A lone "%" is kept: re-encoding it would merge distinct (if broken) URLs.
        out.append(f"%{ord(char):02X}" if not 0x20 < ord(char) < 0x7F else char)
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """``path`` without ``.`` and ``..`` segments (RFC 3986 sections 5.2.4, 6.2.2.3)."""
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/".join(output) if output != [""] else "/"


def _split_authority(authority: str) -> tuple[str, str]:
    """``host`` and ``port`` of an authority, raising ValueError when malformed."""
    if "@" in authority:
        raise ValueError("userinfo is not allowed in a proxied URL")
    if authority.startswith("["):
        host, bracket, rest = authority.partition("]")
        host += bracket
        if rest and not rest.startswith(":"):
            raise ValueError("junk after IPv6 host")
        port = rest[1:]
    else:
        host, _, port = authority.partition(":")
    if not host or not _HOST.fullmatch(host):
        raise ValueError("missing or invalid host")
    if port and (not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError("invalid port")
    return host, port.lstrip("0") if port else port


@functools.lru_cache(maxsize=4096)
def cache_key(url: bytes) -> str:
    """The normalised absolute http(s) URL that names a stored response.

    RFC 9111 section 2 (the target URI is the primary key), normalised per RFC 3986
    section 6.2.2 and 6.2.3; raises ValueError for URLs a proxy must not store.
    """
    text = url.decode("latin-1").strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise ValueError(f"not an absolute http or https URL: {text!r}")
    rest = rest.partition("#")[0]
    ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
    end = min(ends, default=len(rest))
    host, port = _split_authority(rest[:end])
    # Lower-casing the host must not lower-case its percent-encoding hex.
    host = _PCT.sub(lambda m: m.group().upper(), _normalise_percent(host).lower())
    path, qmark, query = rest[end:].partition("?")
    path = _remove_dot_segments(_normalise_percent(path)) if path else "/"
    netloc = host if port in ("", _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{path}{qmark}{_normalise_percent(query)}"


# ---------------------------------------------------------------------------
# Storing (RFC 9111 section 3)
# ---------------------------------------------------------------------------


def is_storable(request: RequestHead, response: ResponseHead) -> bool:
    """Whether a shared cache may store ``response`` to ``request``.

    RFC 9111 section 3 (shared cache), 3.5 (Authorization), 4.1 (Vary: *),
    5.2.1.5 and 5.2.2.5 (no-store), 5.2.2.7 (private), 5.2.2.3 (must-understand).
    """
    status = response.status
    # Only GET is understood; 206 and 304 are never stored as complete bodies.
    if request.method != b"GET" or not 200 <= status < 600 or status in (206, 304):
        return False
    req_cc = cache_control(request.headers)
    cc = cache_control(response.headers)
    if "no-store" in req_cc or "no-store" in cc:
        return False
    if "must-understand" in cc and status not in UNDERSTOOD_STATUSES:
        return False
    # A qualified private only withholds the named fields (see stored_headers).
    if "private" in cc and not cc["private"]:
        return False
    shared_ok = "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
    if header_values(request.headers, b"authorization") and not shared_ok:
        return False
    if vary_names(response) is None:
        return False
    return (
        "public" in cc
        or "s-maxage" in cc
        or "max-age" in cc
        or bool(header_values(response.headers, b"expires"))
        or status in HEURISTIC_STATUSES
    )


def stored_headers(response: ResponseHead) -> Headers:
    """The header fields of ``response`` a shared cache may keep.

    RFC 9111 section 3.1: no hop-by-hop or proxy fields, nor those named by a
    qualified private (5.2.2.7) or no-cache (5.2.2.4, so no revalidation is needed).
    """
    cc = cache_control(response.headers)
    withheld = _names_argument(cc.get("private")) | _names_argument(cc.get("no-cache"))
    return without_headers(end_to_end(response.headers), _NEVER_STORED | withheld)


# ---------------------------------------------------------------------------
# Freshness and age (RFC 9111 section 4.2)
# ---------------------------------------------------------------------------


def _lifetime(
    response: ResponseHead, date: float | None, heuristic_cap: float
) -> float:
    """Freshness lifetime given the Date to use (RFC 9111 sections 4.2.1, 4.2.2)."""
    cc = cache_control(response.headers)
    # An invalid s-maxage or max-age counts as stale rather than as absent.
    for directive in ("s-maxage", "max-age"):
        if directive in cc:
            return float(_delta_seconds(cc[directive]) or 0)
    if header_values(response.headers, b"expires"):
        expires = _first_date(response.headers, b"expires")
        if expires is None or date is None:
            return 0.0
        return max(0.0, expires - date)
    heuristic = response.status in HEURISTIC_STATUSES or "public" in cc
    last_modified = _first_date(response.headers, b"last-modified")
    if not heuristic or last_modified is None or date is None:
        return 0.0
    return min(heuristic_cap, max(0.0, (date - last_modified) / 10))


def freshness_lifetime(
    response: ResponseHead, *, heuristic_cap: float = 86400.0
) -> float:
    """Seconds ``response`` stays fresh in a shared cache.

    RFC 9111 section 4.2.1 (s-maxage, max-age, Expires - Date; invalid Expires is
    expired) and 4.2.2 (10% of Date - Last-Modified, capped).
    """
    return _lifetime(response, _first_date(response.headers, b"date"), heuristic_cap)


def entry_lifetime(entry: Entry, *, heuristic_cap: float = 86400.0) -> float:
    """Freshness lifetime of a stored response, its receipt time standing in for Date.

    RFC 9111 section 4.2.1, with RFC 9110 section 6.6.1 (a missing Date is the time
    of receipt).
    """
    if entry.local_lifetime is not None:
        # The cache's own heuristic (RFC 9111 section 4.2.2), chosen by URL.
        return entry.local_lifetime
    date = _first_date(entry.response.headers, b"date")
    return _lifetime(
        entry.response, entry.response_time if date is None else date, heuristic_cap
    )


def _age_value(headers: Headers) -> int:
    """The Age field's delta-seconds, 0 when absent or invalid (RFC 9111 5.1)."""
    values = header_values(headers, b"age")
    return (_delta_seconds(values[0].decode("latin-1").strip()) or 0) if values else 0


def corrected_initial_age(entry: Entry) -> float:
    """The stored response's age when it was received (RFC 9111 section 4.2.3)."""
    date_value = _first_date(entry.response.headers, b"date")
    apparent_age = (
        0.0 if date_value is None else max(0.0, entry.response_time - date_value)
    )
    response_delay = entry.response_time - entry.request_time
    corrected_age_value = _age_value(entry.response.headers) + response_delay
    return max(apparent_age, corrected_age_value)


def current_age(entry: Entry, now: float) -> float:
    """The stored response's age at ``now``, tolerant of a skewed Date.

    RFC 9111 section 4.2.3, exactly.
    """
    resident_time = now - entry.response_time
    return corrected_initial_age(entry) + resident_time


def age_header_value(entry: Entry, now: float) -> bytes:
    """The Age field value to send with a stored response (RFC 9111 section 5.1)."""
    return age_field(current_age(entry, now))


def age_field(age: float) -> bytes:
    """An age in seconds as an Age field value (RFC 9111 section 5.1)."""
    return b"%d" % min(int(max(0.0, age)), MAX_DELTA_SECONDS)


def is_fresh(entry: Entry, now: float, *, heuristic_cap: float = 86400.0) -> bool:
    """Whether the stored response is fresh at ``now`` (RFC 9111 section 4.2)."""
    return entry_lifetime(entry, heuristic_cap=heuristic_cap) > current_age(entry, now)


def staleness(entry: Entry, now: float, *, heuristic_cap: float = 86400.0) -> float:
    """Seconds past the freshness lifetime, negative while fresh (RFC 9111 4.2.4)."""
    lifetime = entry_lifetime(entry, heuristic_cap=heuristic_cap)
    return current_age(entry, now) - lifetime


# ---------------------------------------------------------------------------
# Secondary keys (RFC 9111 section 4.1)
# ---------------------------------------------------------------------------


def vary_names(response: ResponseHead) -> tuple[bytes, ...] | None:
    """Sorted, lower-cased, distinct Vary field names; None for ``Vary: *``.

    RFC 9111 section 4.1.
    """
    names = {name.lower() for name in header_list(response.headers, b"vary")}
    if b"*" in names:
        return None
    return tuple(sorted(names))


def _normalise_value(headers: Headers, name: bytes) -> bytes | None:
    """A field's combined value with list whitespace collapsed (RFC 9111 4.1)."""
    values = header_values(headers, name)
    if not values:
        return None
    return b", ".join(item for value in values for item in split_list(value))


def vary_values(
    names: tuple[bytes, ...], request: RequestHead
) -> tuple[tuple[bytes, bytes | None], ...]:
    """The request's normalised value (None if absent) for each nominated field.

    RFC 9111 section 4.1: values are combined, and whitespace that does not change
    the meaning (around list commas) is normalised away.
    """
    return tuple(
        (name.lower(), _normalise_value(request.headers, name)) for name in names
    )


def select_variant(entries: Sequence[Entry], request: RequestHead) -> Entry | None:
    """The most recent stored response whose Vary values match ``request``.

    RFC 9111 section 4.1; a stored ``Vary: *`` never matches.
    """
    matching = [
        entry
        for entry in entries
        if vary_names(entry.response) is not None
        and vary_values(tuple(name for name, _ in entry.vary), request) == entry.vary
    ]
    return max(matching, key=lambda entry: entry.response_time, default=None)


# ---------------------------------------------------------------------------
# Validation (RFC 9111 section 4.3)
# ---------------------------------------------------------------------------

_ENTITY_TAG = re.compile(rb'(W/)?"[^"]*"')


def _entity_tags(headers: Headers) -> list[bytes]:
    """The well-formed entity-tags of the ETag field (RFC 9110 section 8.8.3)."""
    return [
        tag
        for value in header_values(headers, b"etag")
        if _ENTITY_TAG.fullmatch(tag := value.strip())
    ]


def _is_weak(tag: bytes) -> bool:
    """Whether an entity-tag is weak (RFC 9110 section 8.8.3)."""
    return tag.startswith(b"W/")


def _opaque(tag: bytes) -> bytes:
    """An entity-tag without its weakness indicator (RFC 9110 section 8.8.3.2)."""
    return tag[2:] if _is_weak(tag) else tag


def conditional_headers(entries: Sequence[Entry]) -> Headers:
    """Validator fields for a conditional request revalidating ``entries``.

    RFC 9111 section 4.3.1: If-None-Match with every stored entity-tag, and
    If-Modified-Since with the most recent response's Last-Modified.
    """
    tags: list[bytes] = []
    for entry in entries:
        tags.extend(t for t in _entity_tags(entry.response.headers) if t not in tags)
    fields: list[tuple[bytes, bytes]] = []
    if tags:
        fields.append((b"If-None-Match", b", ".join(tags)))
    latest = max(entries, key=lambda entry: entry.response_time, default=None)
    if latest is not None:
        last_modified = header_values(latest.response.headers, b"last-modified")
        if last_modified:
            fields.append((b"If-Modified-Since", last_modified[0].strip()))
    return tuple(fields)


def validators_match(stored: ResponseHead, not_modified: ResponseHead) -> bool:
    """Whether a 304 identifies ``stored`` for freshening.

    RFC 9111 section 4.3.4 for one candidate: strong entity-tags compare strongly,
    weak ones weakly (RFC 9110 section 8.8.3.2), then Last-Modified, and a 304
    without validators matches only a stored response without validators.
    """
    new_tags = _entity_tags(not_modified.headers)
    old_tags = _entity_tags(stored.headers)
    strong = [tag for tag in new_tags if not _is_weak(tag)]
    if strong:
        return any(tag in old_tags for tag in strong)
    if new_tags:
        return bool({_opaque(t) for t in new_tags} & {_opaque(t) for t in old_tags})
    new_lm = header_value(not_modified.headers, b"last-modified")
    old_lm = header_value(stored.headers, b"last-modified")
    if new_lm is not None:
        new_date = parse_http_date(new_lm)
        return new_date is not None and new_date == parse_http_date(old_lm)
    return not old_tags and old_lm is None


def updated_response(stored: ResponseHead, not_modified: ResponseHead) -> ResponseHead:
    """``stored`` with its fields replaced by those of a 304, status kept.

    RFC 9111 section 3.2: every field of the 304 replaces the stored one, except
    Content-Length, the section 3.1 exclusions and recipient-processed fields.
    """
    fresh = without_headers(stored_headers(not_modified), _NOT_UPDATED)
    replaced = frozenset(name.lower() for name, _ in fresh)
    return ResponseHead(
        status=stored.status,
        reason=stored.reason,
        headers=without_headers(stored.headers, replaced) + fresh,
    )


# ---------------------------------------------------------------------------
# Invalidation (RFC 9111 section 4.4)
# ---------------------------------------------------------------------------


def is_invalidating(method: bytes, status: int) -> bool:
    """Whether an unsafe request's non-error response invalidates the target.

    RFC 9111 section 4.4 (unsafe per RFC 9110 section 9.2.1; non-error is 2xx/3xx).
    """
    return method not in SAFE_METHODS and 200 <= status < 400


def _origin(key: str) -> str:
    """The scheme and authority of a normalised key (RFC 9110 section 4.3.1)."""
    scheme, _, rest = key.partition("://")
    return scheme + "://" + rest.partition("/")[0].partition("?")[0]


def invalidated_keys(request_url: bytes, response: ResponseHead) -> list[str]:
    """Keys to invalidate: the target, and same-origin Location/Content-Location.

    RFC 9111 section 4.4; relative references resolve against the target and
    unparsable ones are ignored.
    """
    try:
        target = cache_key(request_url)
    except ValueError:
        return []
    keys = [target]
    base = request_url.decode("latin-1")
    for name in (b"location", b"content-location"):
        for value in header_values(response.headers, name):
            try:
                key = cache_key(
                    urljoin(base, value.decode("latin-1").strip()).encode("latin-1")
                )
            except ValueError:
                continue
            if _origin(key) == _origin(target) and key not in keys:
                keys.append(key)
    return keys


# ---------------------------------------------------------------------------
# Serving (RFC 9111 sections 4, 4.2.4, 4.3.2, 5.2.1)
# ---------------------------------------------------------------------------


class Action(enum.Enum):
    """What the exchange does with a request."""

    SERVE = "serve"
    REVALIDATE = "revalidate"
    FETCH = "fetch"
    GATEWAY_TIMEOUT = "gateway-timeout"


@dataclass(frozen=True)
class Verdict:
    """The lookup decision for one request.

    @ivar action: what to do.
    @ivar entry: the selected stored response, if any.
    @ivar stale: whether the selected stored response is stale.
    @ivar detail: a short reason for logs and Cache-Status, e.g. ``"stale"``.
    """

    action: Action
    entry: Entry | None
    stale: bool = False
    detail: str = ""


_NO_STALE = ("must-revalidate", "proxy-revalidate", "s-maxage")


def _must_revalidate(cc: dict[str, str | None]) -> bool:
    """Whether directives oblige a shared cache to revalidate once stale.

    RFC 9111 sections 4.2.4, 5.2.2.2, 5.2.2.8 and 5.2.2.10 (s-maxage implies
    proxy-revalidate).
    """
    return any(d in cc for d in _NO_STALE)


def _forbids_stale(cc: dict[str, str | None]) -> bool:
    """Whether directives forbid serving the response stale.

    L{_must_revalidate}, and unqualified no-cache (RFC 9111 5.2.2.4), which
    forbids any unvalidated use.
    """
    return _must_revalidate(cc) or ("no-cache" in cc and not cc["no-cache"])


def _request_no_cache(request: RequestHead) -> bool:
    """Whether the request demands validation.

    RFC 9111 section 5.2.1.4, and 5.4 (Pragma: no-cache only without Cache-Control).
    """
    if header_values(request.headers, b"cache-control"):
        return "no-cache" in cache_control(request.headers)
    pragma = header_list(request.headers, b"pragma")
    return any(item.lower() == b"no-cache" for item in pragma)


def _revalidation_reason(
    request: RequestHead,
    cc: dict[str, str | None],
    age: float,
    *,
    stale: bool,
    immutable: bool = False,
) -> str:
    """Why the request or stored response forces validation, or ``""``.

    RFC 9111 sections 5.2.2.4 (response no-cache), 5.2.1.4 and 5.4 (request
    no-cache) and 5.2.1.1 (request max-age).  A fresh ``immutable`` response
    (RFC 8246 section 2) is served despite the request's no-cache and max-age:
    its content cannot have changed, so a reload need not reach the origin.
    """
    if "no-cache" in cc and not cc["no-cache"]:
        return "no-cache"
    if ("immutable" in cc or immutable) and not stale:
        return ""
    if _request_no_cache(request):
        return "no-cache"
    max_age = _delta_seconds(cache_control(request.headers).get("max-age"))
    if max_age is not None and age > max_age:
        return "max-age"
    return ""


def _stale_allowed(
    req_cc: dict[str, str | None], cc: dict[str, str | None], stale_for: float
) -> bool:
    """Whether request max-stale lets a stale response be served.

    RFC 9111 sections 4.2.4 and 5.2.1.2; a bare max-stale accepts any staleness.
    """
    if "max-stale" not in req_cc or _forbids_stale(cc):
        return False
    if req_cc["max-stale"] is None:
        return True
    limit = _delta_seconds(req_cc["max-stale"])
    return limit is not None and stale_for <= limit


def decide(
    request: RequestHead,
    entries: Sequence[Entry],
    now: float,
    *,
    heuristic_cap: float = 86400.0,
) -> Verdict:
    """Serve, revalidate or fetch ``request`` given the stored ``entries``.

    RFC 9111 section 4 (reuse), 4.1 (Vary), 4.2 and 4.2.4 (fresh or allowed
    stale), 4.3.1 (validate), 5.2.1 (request directives; 5.2.1.7 only-if-cached);
    RFC 8246 (a fresh immutable response ignores request no-cache and max-age).
    """
    req_cc = cache_control(request.headers)
    only_if_cached = "only-if-cached" in req_cc
    if request.method not in (b"GET", b"HEAD"):
        return Verdict(Action.FETCH, None, detail="method")
    entry = select_variant(entries, request)
    if entry is None:
        if only_if_cached:
            return Verdict(Action.GATEWAY_TIMEOUT, None, detail="only-if-cached")
        return Verdict(
            Action.FETCH, None, detail="vary-mismatch" if entries else "miss"
        )
    cc = cache_control(entry.response.headers)
    age = current_age(entry, now)
    lifetime = entry_lifetime(entry, heuristic_cap=heuristic_cap)
    stale = lifetime <= age
    verdict = _verdict(request, req_cc, cc, entry, age, lifetime, stale)
    if only_if_cached and verdict.action is not Action.SERVE:
        return Verdict(Action.GATEWAY_TIMEOUT, entry, stale, "only-if-cached")
    return verdict


def _verdict(
    request: RequestHead,
    req_cc: dict[str, str | None],
    cc: dict[str, str | None],
    entry: Entry,
    age: float,
    lifetime: float,
    stale: bool,
) -> Verdict:
    """The decision for a selected entry (RFC 9111 sections 4.2, 4.2.4, 5.2.1)."""
    reason = _revalidation_reason(
        request, cc, age, stale=stale, immutable=entry.local_immutable
    )
    if reason:
        return Verdict(Action.REVALIDATE, entry, stale, reason)
    if not stale:
        min_fresh = _delta_seconds(req_cc.get("min-fresh"))
        if min_fresh is not None and age + min_fresh >= lifetime:
            return Verdict(Action.REVALIDATE, entry, False, "min-fresh")
        return Verdict(Action.SERVE, entry, False, "fresh")
    if _stale_allowed(req_cc, cc, age - lifetime):
        return Verdict(Action.SERVE, entry, True, "max-stale")
    return Verdict(Action.REVALIDATE, entry, True, "stale")


@dataclass(frozen=True)
class PlainReuse:
    """How a stored response answers a *plain* request, worked out once.

    A plain request is a GET or HEAD with none of the fields that change the
    decision: no Cache-Control, Pragma, preconditions, Range or Authorization
    (L{PLAIN_EXCLUDED}).  For such a request L{decide} reduces to "serve while
    ``now < fresh_until``" (RFC 9111 sections 4.2 and 4.2.3, rearranged: age =
    ``initial_age + now - response_time`` stays below the lifetime), so a hot
    path may serve the entry without deciding anew each time.

    @ivar fresh_until: the clock value at which the entry turns stale; minus
        infinity when it must always be validated (unqualified no-cache) or
        withholds fields until validated (qualified no-cache).
    @ivar initial_age: L{corrected_initial_age}, for the Age field.
    @ivar vary: the entry's Vary field names; None for ``Vary: *``.
    """

    fresh_until: float
    initial_age: float
    vary: tuple[bytes, ...] | None


PLAIN_EXCLUDED = frozenset(
    {
        b"cache-control",
        b"pragma",
        b"range",
        b"authorization",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"if-range",
    }
)
"""Request fields whose presence makes a request not plain (L{PlainReuse})."""


def plain_reuse(entry: Entry, *, heuristic_cap: float = 86400.0) -> PlainReuse:
    """L{PlainReuse} for ``entry``: when it may answer plain requests unvalidated.

    RFC 9111 sections 4.2 (fresh), 4.2.3 (age) and 5.2.2.4 (no-cache forces
    validation; a qualified one withholds fields, which the hot path does not do).
    """
    cc = cache_control(entry.response.headers)
    initial_age = corrected_initial_age(entry)
    if "no-cache" in cc:
        fresh_until = -math.inf
    else:
        lifetime = entry_lifetime(entry, heuristic_cap=heuristic_cap)
        fresh_until = entry.response_time + lifetime - initial_age
    return PlainReuse(fresh_until, initial_age, vary_names(entry.response))


def can_serve_stale_on_error(
    entry: Entry, request: RequestHead, now: float, *, heuristic_cap: float = 86400.0
) -> bool:
    """Whether a stored response may answer when the origin fails or errs.

    RFC 9111 section 4.2.4 and 4.3.3 with RFC 5861 section 4 (stale-if-error in the
    response or request), never when must-revalidate, proxy-revalidate, s-maxage
    or an unqualified no-cache forbid stale use.
    """
    cc = cache_control(entry.response.headers)
    if _forbids_stale(cc):
        return False
    stale_for = staleness(entry, now, heuristic_cap=heuristic_cap)
    limits = (
        _delta_seconds(cc.get("stale-if-error")),
        _delta_seconds(cache_control(request.headers).get("stale-if-error")),
    )
    return any(limit is not None and stale_for <= limit for limit in limits)


def stale_while_revalidate_allows(
    entry: Entry, now: float, heuristic_cap: float = 86400.0
) -> bool:
    """Whether a stale response may be served while it is revalidated behind.

    RFC 5861 section 3 (stale-while-revalidate), as RFC 9111 section 4.2.4 permits;
    never when must-revalidate, proxy-revalidate, s-maxage or no-cache forbid it.
    """
    cc = cache_control(entry.response.headers)
    limit = _delta_seconds(cc.get("stale-while-revalidate"))
    if limit is None or _forbids_stale(cc):
        return False
    stale_for = staleness(entry, now, heuristic_cap=heuristic_cap)
    return 0 <= stale_for <= limit


def is_immutable(response: ResponseHead) -> bool:
    """Whether the response declares its content will never change while fresh.

    RFC 8246 section 2 (Cache-Control: immutable).
    """
    return "immutable" in cache_control(response.headers)


def forbids_stale(response: ResponseHead) -> bool:
    """Whether a shared cache must revalidate the response once it is stale.

    RFC 9111 sections 4.2.4, 5.2.2.2 (must-revalidate), 5.2.2.8
    (proxy-revalidate) and 5.2.2.10 (s-maxage implies proxy-revalidate).
    """
    return _must_revalidate(cache_control(response.headers))


# ---------------------------------------------------------------------------
# Qualified no-cache (RFC 9111 section 5.2.2.4)
# ---------------------------------------------------------------------------


def fields_needing_validation(response: ResponseHead) -> frozenset[bytes]:
    """Lower-cased field names a qualified ``no-cache="..."`` withholds.

    RFC 9111 section 5.2.2.4: the named fields must not be sent in a response
    to another request without successful revalidation; empty when unqualified.
    """
    return _names_argument(cache_control(response.headers).get("no-cache"))


def served_headers(response: ResponseHead, *, validated: bool) -> Headers:
    """The fields to send from a stored response, less unvalidated named ones.

    RFC 9111 section 5.2.2.4 (qualified no-cache).
    """
    if validated:
        return response.headers
    return without_headers(response.headers, fields_needing_validation(response))


# ---------------------------------------------------------------------------
# Client preconditions answered from the store (RFC 9110 section 13;
# RFC 9111 section 4.3.2)
# ---------------------------------------------------------------------------

_PRECONDITIONS = (
    b"if-match",
    b"if-none-match",
    b"if-modified-since",
    b"if-unmodified-since",
    b"if-range",
)

# RFC 9110 section 15.4.5: what a 304 carries, plus Last-Modified to guide the
# recipient's cache when it selects by date (RFC 9111 section 4.3.4).
_NOT_MODIFIED_FIELDS = frozenset(
    {
        b"cache-control",
        b"content-location",
        b"date",
        b"etag",
        b"expires",
        b"last-modified",
        b"vary",
    }
)


def has_conditionals(request: RequestHead) -> bool:
    """Whether the request carries any precondition field (RFC 9110 section 13.1)."""
    return any(header_values(request.headers, name) for name in _PRECONDITIONS)


def _tag_list(headers: Headers, name: bytes) -> tuple[bool, list[bytes]]:
    """Whether an ``If-Match``/``If-None-Match`` field is ``*``, and its tags.

    RFC 9110 sections 13.1.1 and 13.1.2; malformed members are dropped.
    """
    members = header_list(headers, name)
    tags = [m for m in members if _ENTITY_TAG.fullmatch(m)]
    return b"*" in members, tags


def _strong_tag(stored: ResponseHead) -> bytes | None:
    """The stored response's entity-tag if it is strong (RFC 9110 8.8.3.2)."""
    tags = _entity_tags(stored.headers)
    return tags[0] if tags and not _is_weak(tags[0]) else None


def _if_match_holds(request: RequestHead, stored: ResponseHead) -> bool:
    """RFC 9110 section 13.1.1: ``*`` or a strong match with the stored ETag."""
    star, tags = _tag_list(request.headers, b"if-match")
    current = _strong_tag(stored)
    return star or (current is not None and current in tags)


def _if_none_match_holds(request: RequestHead, stored: ResponseHead) -> bool:
    """RFC 9110 section 13.1.2: false for ``*`` or a weak match with the ETag."""
    star, tags = _tag_list(request.headers, b"if-none-match")
    current = {_opaque(tag) for tag in _entity_tags(stored.headers)[:1]}
    return not star and not any(_opaque(tag) in current for tag in tags)


def _single_date(headers: Headers, name: bytes) -> float | None:
    """A date precondition's value; None if absent, repeated or invalid.

    RFC 9110 sections 13.1.3 and 13.1.4 (such a field is ignored).
    """
    values = header_values(headers, name)
    return parse_http_date(values[0]) if len(values) == 1 else None


def _modification_date(stored: ResponseHead, received: float | None) -> float | None:
    """Last-Modified, else Date, else the time of receipt (RFC 9111 4.3.2)."""
    for name in (b"last-modified", b"date"):
        when = _first_date(stored.headers, name)
        if when is not None:
            return when
    return received


def evaluate_conditionals(
    request: RequestHead, stored: ResponseHead, *, received: float | None = None
) -> int | None:
    """412, 304, or None (serve normally) for a request answered from ``stored``.

    RFC 9110 section 13.2.2 in its order: If-Match, else If-Unmodified-Since
    (both optional for a cache, 13.1.1 and 13.1.4; a mismatch with the selected
    fresh response is reported as 412), If-None-Match, else If-Modified-Since.
    Only for GET and HEAD over a 2xx (RFC 9110 13.2.1, RFC 9111 4.3.2);
    If-Modified-Since falls back to Date and then to ``received`` (RFC 9111
    4.3.2), If-Unmodified-Since needs Last-Modified (RFC 9110 13.1.4).
    """
    if request.method not in (b"GET", b"HEAD") or not 200 <= stored.status < 300:
        return None
    headers = request.headers
    if header_values(headers, b"if-match"):
        if not _if_match_holds(request, stored):
            return 412
    else:
        since = _single_date(headers, b"if-unmodified-since")
        modified = _first_date(stored.headers, b"last-modified")
        if since is not None and modified is not None and modified > since:
            return 412
    if header_values(headers, b"if-none-match"):
        return None if _if_none_match_holds(request, stored) else 304
    since = _single_date(headers, b"if-modified-since")
    modified = _modification_date(stored, received)
    if since is not None and modified is not None and modified <= since:
        return 304
    return None


def not_modified_headers(stored: ResponseHead) -> Headers:
    """The fields of ``stored`` that a 304 generated from it carries.

    RFC 9110 section 15.4.5: Content-Location, Date, ETag, Vary, Cache-Control,
    Expires, and Last-Modified to guide cache updates; no content metadata.
    """
    return tuple(
        (name, value)
        for name, value in stored.headers
        if name.lower() in _NOT_MODIFIED_FIELDS
    )


def if_range_allows(request: RequestHead, stored: ResponseHead) -> bool:
    """Whether If-Range (absent, or matching ``stored``) lets Range apply.

    RFC 9110 section 13.1.5: an entity-tag matches only by strong comparison; a
    date only if it equals Last-Modified and, for a cache, that Last-Modified is
    strong: the stored Date is at least one second later (section 8.8.2.2).
    """
    values = header_values(request.headers, b"if-range")
    if not values:
        return True
    if len(values) > 1:
        return False
    value = values[0].strip()
    if value[:3].count(b'"'):
        return value == _strong_tag(stored)
    when = parse_http_date(value)
    modified = _first_date(stored.headers, b"last-modified")
    date = _first_date(stored.headers, b"date")
    if when is None or modified is None or date is None:
        return False
    return when == modified and date >= modified + 1


# ---------------------------------------------------------------------------
# Byte ranges from a complete stored body (RFC 9110 section 14)
# ---------------------------------------------------------------------------

# RFC 9110 sections 14.2 and 17.15 let a server ignore egregious range sets;
# overlapping ones are coalesced instead, so only the count needs a bound.
MAX_RANGES = 100

_INT_RANGE = re.compile(rb"(\d+)-(\d*)|-(\d+)")


@dataclass(frozen=True)
class ByteRange:
    """One satisfiable byte range, as Content-Range writes it.

    @ivar start: offset of the first byte.
    @ivar end: offset of the last byte (inclusive), less than the length.
    """

    start: int
    end: int


def _range_specs(request: RequestHead) -> list[tuple[int | None, int | None]] | None:
    """``(first, last)`` per bytes range-spec (first None: suffix), or None.

    RFC 9110 section 14.1.1: None when absent, repeated, another unit, or any
    range-spec is invalid (last-pos < first-pos included), and past MAX_RANGES.
    """
    values = header_values(request.headers, b"range")
    if len(values) != 1:
        return None
    unit, eq, range_set = values[0].strip().partition(b"=")
    if not eq or unit.lower() != b"bytes":
        return None
    specs: list[tuple[int | None, int | None]] = []
    for spec in (item.strip() for item in range_set.split(b",")):
        if not spec:
            continue  # RFC 9110 section 5.6.1: empty list elements are allowed.
        match = _INT_RANGE.fullmatch(spec)
        if match is None:
            return None
        first, last, suffix = match.groups()
        if suffix is not None:
            specs.append((None, int(suffix)))
        elif last:
            if int(last) < int(first):
                return None
            specs.append((int(first), int(last)))
        else:
            specs.append((int(first), None))
    if not specs or len(specs) > MAX_RANGES:
        return None
    return specs


def _satisfiable(
    specs: list[tuple[int | None, int | None]], length: int
) -> list[ByteRange]:
    """Each satisfiable range-spec clipped to ``length`` (RFC 9110 14.1.2)."""
    ranges: list[ByteRange] = []
    for first, last in specs:
        if first is None:
            if last:
                ranges.append(ByteRange(max(0, length - last), length - 1))
        elif first < length:
            end = length - 1 if last is None else min(last, length - 1)
            ranges.append(ByteRange(first, end))
    return ranges


def _coalesced(ranges: list[ByteRange]) -> list[ByteRange]:
    """Overlapping or adjacent ranges merged, each where its first member was.

    RFC 9110 section 15.3.7.2: merged parts keep the request's order.
    """
    out: list[ByteRange] = []
    for r in ranges:
        merged, at = r, len(out)
        touching = True
        while touching:
            touching = False
            for i, other in enumerate(out):
                if other.start <= merged.end + 1 and merged.start <= other.end + 1:
                    merged = ByteRange(
                        min(merged.start, other.start), max(merged.end, other.end)
                    )
                    at = min(at, i)
                    del out[i]
                    touching = True
                    break
        out.insert(min(at, len(out)), merged)
    return out


def requested_ranges(request: RequestHead, length: int) -> list[ByteRange] | None:
    """The byte ranges to send from a body of ``length`` bytes.

    None: ignore Range and send 200 (not GET, no or invalid Range, another unit,
    too many ranges, or an empty body; RFC 9110 sections 14.1.1, 14.2); ``[]``:
    unsatisfiable, answer 416 (14.2); otherwise the satisfiable ranges clipped
    (14.1.2) and coalesced when overlapping or adjacent (15.3.7.2).
    """
    if request.method != b"GET" or length <= 0:
        return None
    specs = _range_specs(request)
    if specs is None:
        return None
    return _coalesced(_satisfiable(specs, length))


def content_range(r: ByteRange, length: int) -> bytes:
    """The Content-Range value for ``r`` (RFC 9110 section 14.4)."""
    return b"bytes %d-%d/%d" % (r.start, r.end, length)


def multipart_boundary(seed: bytes) -> bytes:
    """A boundary of safe characters derived from ``seed`` (RFC 2046 5.1.1).

    Unquoted on purpose (RFC 9110 section 14.6, note 2).
    """
    return b"cacheproxy-" + hashlib.sha256(seed).hexdigest()[:40].encode("ascii")


def multipart_content_type(boundary: bytes) -> bytes:
    """The Content-Type of a multipart/byteranges body (RFC 9110 section 14.6)."""
    return b"multipart/byteranges; boundary=" + boundary


def multipart_part_head(
    boundary: bytes, content_type: bytes | None, r: ByteRange, length: int
) -> bytes:
    """The delimiter and fields before one body part (RFC 9110 section 14.6).

    The leading CRLF ends the previous part; before the first part it is
    preamble, which RFC 9110 section 14.6 (note 1) allows.
    """
    fields = b"Content-Type: " + content_type + b"\r\n" if content_type else b""
    return (
        b"\r\n--"
        + boundary
        + b"\r\n"
        + fields
        + b"Content-Range: "
        + content_range(r, length)
        + b"\r\n\r\n"
    )


def multipart_end(boundary: bytes) -> bytes:
    """The close delimiter of a multipart body (RFC 2046 section 5.1.1)."""
    return b"\r\n--" + boundary + b"--\r\n"


def multipart_length(
    boundary: bytes,
    content_type: bytes | None,
    ranges: Sequence[ByteRange],
    length: int,
) -> int:
    """The exact byte length of the multipart/byteranges body for ``ranges``.

    RFC 9110 section 14.6, so the response can carry Content-Length (8.6).
    """
    parts = sum(
        len(multipart_part_head(boundary, content_type, r, length))
        + r.end
        - r.start
        + 1
        for r in ranges
    )
    return parts + len(multipart_end(boundary))
