"""Stored entries as HAR 1.2 entries and back: pure conversions, no I/O.

HAR (HTTP Archive 1.2, http://www.softwareishard.com/blog/har-12-spec/) is what
browsers' developer tools and mitmproxy save.  Rules of this module:

- It imports only the standard library, L{cacheproxy.model} and L{cacheproxy.policy}
  (no Twisted, no store), so the command line tool starts fast and every
  conversion is a plain unit test.
- As in browsers' HAR files, ``content.text`` is the *decoded* body while the
  headers still name the ``Content-Encoding`` it travelled with.  Export therefore
  decodes gzip and deflate bodies; a body it cannot decode (br, zstd, or corrupt)
  is written as stored, base64, and marked ``"_encoded": true`` in ``content``.
  Import drops ``Content-Encoding`` (unless so marked) and ``Content-Length``, so
  the stored headers describe the stored (decoded) body.
- Text bodies are ``content.text`` only when the body is UTF-8 and its
  Content-Type is textual; everything else is base64 with ``"encoding": "base64"``.
- A HAR entry that cannot be stored as a complete GET response is not an error:
  L{entry_from_har} raises L{Skipped} with a short reason the caller counts.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cacheproxy.model import (
    Entry,
    Headers,
    RequestHead,
    ResponseHead,
    header_list,
    header_value,
    header_values,
    without_headers,
)
from cacheproxy.policy import cache_key, stored_headers, vary_names, vary_values

HAR_VERSION = "1.2"

# Reasons an entry of a HAR file is not imported (shown in the import summary).
NOT_GET = "not GET"
NOT_HTTP = "not an http(s) URL"
NO_RESPONSE = "status 0 (no response)"
PARTIAL = "partial or not-modified response"
BAD_STATUS = "status outside 200-599"
NO_BODY = "body not saved"
BAD_BODY = "undecodable content"
VARY_STAR = "Vary: *"
MALFORMED = "malformed entry"

_TEXTUAL = ("json", "xml", "javascript", "ecmascript")
# What a stored body may be encoded with and still be exported decoded.
_DECODABLE = frozenset({b"gzip", b"x-gzip", b"deflate", b"identity"})
# Dropped on import: the stored body is the decoded one and framing is the
# proxy's own business; HTTP/2 pseudo-header fields are not fields at all.
_DROPPED_ON_IMPORT = frozenset({b"content-encoding", b"content-length"})


class Skipped(Exception):
    """A HAR entry that is not imported; ``str()`` is the reason."""


class NotHar(ValueError):
    """A document that is not a HAR file."""


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def iso_time(timestamp: float) -> str:
    """``timestamp`` as an ISO 8601 UTC date-time with milliseconds."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def is_textual(content_type: str) -> bool:
    """Whether a Content-Type names a text format (text/*, JSON, XML, JavaScript)."""
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime.startswith("text/") or any(word in mime for word in _TEXTUAL)


def decoded_body(headers: Headers, body: bytes) -> bytes | None:
    """``body`` with its Content-Encoding undone, or None if that is not possible.

    RFC 9110 section 8.4: codings are listed in the order they were applied.
    """
    codings = [c.lower() for c in header_list(headers, b"content-encoding")]
    if any(coding not in _DECODABLE for coding in codings):
        return None
    try:
        for coding in reversed(codings):
            if coding in (b"gzip", b"x-gzip"):
                body = zlib.decompress(body, wbits=16 + zlib.MAX_WBITS)
            elif coding == b"deflate":
                body = _inflate(body)
    except zlib.error:
        return None
    return body


def _inflate(body: bytes) -> bytes:
    """A deflate body: zlib-wrapped as RFC 9110 section 8.4.1.2 says, or raw."""
    try:
        return zlib.decompress(body)
    except zlib.error:
        return zlib.decompress(body, wbits=-zlib.MAX_WBITS)


def _pairs(headers: Headers) -> list[dict[str, str]]:
    """Header fields as HAR name/value objects, bytes read as latin-1."""
    return [
        {"name": n.decode("latin-1"), "value": v.decode("latin-1")} for n, v in headers
    ]


def content_of(headers: Headers, body: bytes) -> dict[str, Any]:
    """The HAR ``content`` object of a stored body (see the module rules)."""
    mime = (header_value(headers, b"content-type") or b"").decode("latin-1")
    decoded = decoded_body(headers, body)
    content: dict[str, Any] = {"mimeType": mime}
    encoded = decoded is None
    if decoded is None:
        decoded = body
        content["_encoded"] = True
    content["size"] = len(decoded)
    content["compression"] = len(decoded) - len(body)
    text: str | None = None
    # A body still content-coded is compressed data, never text.
    if is_textual(mime) and not encoded:
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            text = None
    if text is None:
        content["text"] = base64.b64encode(decoded).decode("ascii")
        content["encoding"] = "base64"
    else:
        content["text"] = text
    return content


def entry_to_har(entry: Entry, body: bytes) -> dict[str, Any]:
    """A stored entry and its body as one HAR 1.2 ``entries[]`` object."""
    wait = max(0.0, (entry.response_time - entry.request_time) * 1000)
    headers = entry.response.headers
    location = header_values(headers, b"location")
    query = urlsplit(entry.url).query
    return {
        "startedDateTime": iso_time(entry.request_time),
        "time": wait,
        "request": {
            "method": "GET",
            "url": entry.url,
            "httpVersion": "HTTP/1.1",
            # Only the fields the stored variant was selected by are known.
            "headers": _pairs(tuple((n, v) for n, v in entry.vary if v is not None)),
            "queryString": [
                {"name": name, "value": value}
                for name, value in parse_qsl(query, keep_blank_values=True)
            ],
            "cookies": [],
            "headersSize": -1,
            "bodySize": 0,
        },
        "response": {
            "status": entry.response.status,
            "statusText": entry.response.reason.decode("latin-1"),
            "httpVersion": "HTTP/1.1",
            "headers": _pairs(headers),
            "cookies": [],
            "content": content_of(headers, body),
            "redirectURL": location[0].decode("latin-1") if location else "",
            "headersSize": -1,
            "bodySize": len(body),
        },
        "cache": {},
        "timings": {"send": 0, "wait": wait, "receive": 0},
    }


def har_log(version: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A complete HAR 1.2 document holding ``entries``."""
    return {
        "log": {
            "version": HAR_VERSION,
            "creator": {"name": "cacheproxy", "version": version},
            "pages": [],
            "entries": entries,
        }
    }


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------


def har_entries(document: Any) -> list[Any]:
    """The ``log.entries`` list of a parsed HAR document; NotHar if it has none."""
    log = document.get("log") if isinstance(document, dict) else None
    entries = log.get("entries") if isinstance(log, dict) else None
    if not isinstance(entries, list):
        raise NotHar("not a HAR file: no log.entries list")
    return entries


def _wire(text: str) -> bytes:
    """A HAR string as header bytes: latin-1 where possible, else UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _headers(items: Any) -> Headers:
    """HAR name/value objects as raw header fields, pseudo-fields dropped."""
    if not isinstance(items, list):
        return ()
    fields: list[tuple[bytes, bytes]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        name, value = item.get("name"), item.get("value")
        if isinstance(name, str) and isinstance(value, str) and name[:1] != ":":
            fields.append((_wire(name), _wire(value)))
    return tuple(fields)


def parse_time(text: Any) -> float:
    """An ISO 8601 ``startedDateTime`` as seconds since the epoch (UTC if naive)."""
    if not isinstance(text, str):
        raise ValueError("startedDateTime is missing")
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def body_from_content(content: Any) -> bytes:
    """The body a HAR ``content`` object holds; Skipped if it holds none."""
    if not isinstance(content, dict):
        raise Skipped(NO_BODY)
    text = content.get("text")
    size = content.get("size")
    if text is None:
        # Browsers leave the text out of bodies they did not keep; an empty
        # body (size 0, a redirect or a 204) needs no text.
        if size == 0:
            return b""
        raise Skipped(NO_BODY)
    if not isinstance(text, str):
        raise Skipped(BAD_BODY)
    if text == "" and isinstance(size, int) and size > 0:
        raise Skipped(NO_BODY)
    encoding = content.get("encoding")
    if encoding is None:
        return text.encode("utf-8")
    if encoding != "base64":
        raise Skipped(BAD_BODY)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Skipped(BAD_BODY) from None


def _checked_url(request: Mapping[str, Any]) -> tuple[str, str]:
    """The request's URL and cache key; Skipped unless a GET of an http(s) URL."""
    url = request.get("url")
    if not isinstance(url, str):
        raise Skipped(MALFORMED)
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise Skipped(NOT_HTTP)
    if request.get("method") != "GET":
        raise Skipped(NOT_GET)
    try:
        return url, cache_key(url.encode("utf-8"))
    except ValueError:
        raise Skipped(NOT_HTTP) from None


def _checked_status(response: Mapping[str, Any]) -> int:
    """The response's status; Skipped unless a complete final response."""
    status = response.get("status")
    if not isinstance(status, int) or isinstance(status, bool):
        raise Skipped(MALFORMED)
    if status == 0:
        raise Skipped(NO_RESPONSE)
    if status in (206, 304):
        # RFC 9111 section 3: only complete bodies are stored.
        raise Skipped(PARTIAL)
    if not 200 <= status < 600:
        raise Skipped(BAD_STATUS)
    return status


def _times(item: Mapping[str, Any]) -> tuple[float, float]:
    """``request_time`` and ``response_time`` from startedDateTime and time (ms)."""
    try:
        started = parse_time(item.get("startedDateTime"))
    except ValueError:
        raise Skipped(MALFORMED) from None
    elapsed = item.get("time")
    if not isinstance(elapsed, int | float) or elapsed < 0:
        elapsed = 0
    return started, started + elapsed / 1000


def entry_from_har(item: Any) -> tuple[Entry, bytes]:
    """A HAR ``entries[]`` object as a recorded Entry and its body.

    The key is L{cache_key} of the URL; ``vary`` holds the HAR request's values
    of the response's Vary fields (RFC 9111 section 4.1); a missing Date is
    added as the response time (RFC 9110 section 6.6.1).  Raises L{Skipped}.
    """
    if not isinstance(item, dict):
        raise Skipped(MALFORMED)
    request, response = item.get("request"), item.get("response")
    if not isinstance(request, dict) or not isinstance(response, dict):
        raise Skipped(MALFORMED)
    url, key = _checked_url(request)
    status = _checked_status(response)
    content = response.get("content")
    body = body_from_content(content)
    request_time, response_time = _times(item)
    received = _headers(response.get("headers"))
    dropped = set(_DROPPED_ON_IMPORT)
    if isinstance(content, dict) and content.get("_encoded") is True:
        dropped.discard(b"content-encoding")
    reason = response.get("statusText")
    head = ResponseHead(
        status=status,
        reason=_wire(reason) if isinstance(reason, str) else b"",
        headers=received,
    )
    headers = without_headers(stored_headers(head), frozenset(dropped))
    if not header_values(headers, b"date"):
        date = email.utils.formatdate(response_time, usegmt=True)
        headers += ((b"Date", date.encode("ascii")),)
    head = ResponseHead(status=status, reason=head.reason, headers=headers)
    names = vary_names(head)
    if names is None:
        raise Skipped(VARY_STAR)
    asked = RequestHead(
        method=b"GET",
        target=url.encode("utf-8"),
        headers=_headers(request.get("headers")),
    )
    entry = Entry(
        key=key,
        url=url,
        response=head,
        request_time=request_time,
        response_time=response_time,
        vary=vary_values(names, asked),
        body_length=len(body),
        recorded=True,
    )
    return entry, body
