"""Tests for cacheproxy.har: stored entries to HAR 1.2 objects and back."""

from __future__ import annotations

import ast
import base64
import gzip
import sys
from pathlib import Path
from typing import Any

import pytest

from cacheproxy import har
from cacheproxy.har import Skipped, entry_from_har, entry_to_har, har_entries
from cacheproxy.model import Entry, Headers, ResponseHead, header_value

URL = "http://example.com/data?x=1&y="
T0 = 1_700_000_000.0


def make_entry(
    headers: Headers = ((b"Content-Type", b"application/json"),),
    url: str = URL,
    vary: tuple[tuple[bytes, bytes | None], ...] = (),
    status: int = 200,
) -> Entry:
    """An entry as the store returns it."""
    return Entry(
        key=url,
        url=url,
        response=ResponseHead(status=status, reason=b"OK", headers=headers),
        request_time=T0,
        response_time=T0 + 0.25,
        vary=vary,
        body_length=0,
        body_id="x",
    )


def har_item(
    url: str = URL,
    method: str = "GET",
    status: int = 200,
    content: dict[str, Any] | None = None,
    headers: list[dict[str, str]] | None = None,
    request_headers: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """A browser-shaped HAR entry."""
    return {
        "startedDateTime": "2023-11-14T22:13:20.000Z",
        "time": 250,
        "_initiator": {"type": "parser"},
        "_resourceType": "fetch",
        "request": {
            "method": method,
            "url": url,
            "httpVersion": "h2",
            "headers": request_headers or [],
        },
        "response": {
            "status": status,
            "statusText": "OK",
            "headers": headers or [{"name": "content-type", "value": "text/plain"}],
            "content": content
            if content is not None
            else {"size": 5, "mimeType": "text/plain", "text": "hello"},
        },
    }


def test_har_imports_no_twisted_or_store() -> None:
    """har.py imports only the standard library and the pure modules."""
    tree = ast.parse(Path(har.__file__).read_text())
    allowed = {"cacheproxy.model", "cacheproxy.policy"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert (
                node.module in allowed
                or node.module.split(".")[0] in sys.stdlib_module_names
            )


def test_export_shape_follows_har_1_2() -> None:
    """An entry becomes a HAR entry with request, response, cache and timings."""
    entry = make_entry(vary=((b"accept", b"application/json"), (b"cookie", None)))
    item = entry_to_har(entry, b'{"a": 1}')
    assert item["startedDateTime"] == "2023-11-14T22:13:20.000+00:00"
    assert item["time"] == item["timings"]["wait"] == 250.0
    assert item["timings"]["send"] == item["timings"]["receive"] == 0
    assert item["cache"] == {}
    request = item["request"]
    assert request["method"] == "GET" and request["url"] == URL
    assert request["headers"] == [{"name": "accept", "value": "application/json"}]
    assert request["queryString"] == [
        {"name": "x", "value": "1"},
        {"name": "y", "value": ""},
    ]
    assert (request["headersSize"], request["bodySize"]) == (-1, 0)
    response = item["response"]
    assert response["status"] == 200 and response["statusText"] == "OK"
    assert response["content"]["text"] == '{"a": 1}'
    assert "encoding" not in response["content"]
    assert response["bodySize"] == 8 and response["redirectURL"] == ""


def test_export_binary_body_is_base64() -> None:
    """A body that is not textual UTF-8 is base64 with encoding "base64"."""
    body = bytes(range(256))
    headers = ((b"Content-Type", b"application/octet-stream"),)
    content = entry_to_har(make_entry(headers), body)["response"]["content"]
    assert content["encoding"] == "base64"
    assert base64.b64decode(content["text"]) == body


def test_export_utf8_of_non_text_type_is_base64() -> None:
    """UTF-8 bytes under a non-textual Content-Type are still base64."""
    headers = ((b"Content-Type", b"image/png"),)
    content = entry_to_har(make_entry(headers), b"plain")["response"]["content"]
    assert content["encoding"] == "base64"


def test_export_decodes_gzip_like_browsers() -> None:
    """A gzip body is exported decoded, its header kept, sizes showing compression."""
    raw = gzip.compress(b"hello " * 100)
    headers = ((b"Content-Type", b"text/plain"), (b"Content-Encoding", b"gzip"))
    item = entry_to_har(make_entry(headers), raw)
    content = item["response"]["content"]
    assert content["text"] == "hello " * 100
    assert content["size"] == 600 and item["response"]["bodySize"] == len(raw)
    assert "_encoded" not in content


def test_export_undecodable_encoding_is_marked() -> None:
    """A br body is exported as stored, base64, marked _encoded."""
    headers = ((b"Content-Type", b"text/plain"), (b"Content-Encoding", b"br"))
    content = entry_to_har(make_entry(headers), b"\x0b\x02")["response"]["content"]
    assert content["_encoded"] is True
    assert base64.b64decode(content["text"]) == b"\x0b\x02"


def test_export_redirect_url_from_location() -> None:
    """redirectURL is the Location field."""
    headers = ((b"Location", b"http://example.com/new"),)
    item = entry_to_har(make_entry(headers, status=301), b"")
    assert item["response"]["redirectURL"] == "http://example.com/new"


def test_round_trip_keeps_head_and_body() -> None:
    """entry_to_har then entry_from_har gives the same URL, status, vary and body."""
    body = bytes(range(256))
    headers = (
        (b"Content-Type", b"application/octet-stream"),
        (b"Vary", b"Accept"),
        (b"Date", b"Tue, 14 Nov 2023 22:13:20 GMT"),
    )
    entry = make_entry(headers, vary=((b"accept", b"*/*"),))
    imported, data = entry_from_har(entry_to_har(entry, body))
    assert data == body
    assert imported.key == entry.key and imported.url == URL
    assert imported.response == entry.response
    assert imported.vary == entry.vary
    assert imported.recorded
    assert imported.request_time == pytest.approx(T0)
    assert imported.response_time == pytest.approx(T0 + 0.25)


def test_import_browser_entry() -> None:
    """A browser entry's text is the UTF-8 body; key is the normalised URL."""
    item = har_item(url="HTTP://Example.COM:80/a/../b")
    entry, body = entry_from_har(item)
    assert body == b"hello"
    assert entry.key == "http://example.com/b"
    assert entry.body_length == 5 and entry.recorded


def test_import_drops_content_encoding_and_length() -> None:
    """Content-Encoding and Content-Length go: the HAR body is the decoded one."""
    headers = [
        {"name": "content-type", "value": "text/plain"},
        {"name": "content-encoding", "value": "gzip"},
        {"name": "content-length", "value": "25"},
        {"name": "connection", "value": "keep-alive"},
        {"name": ":status", "value": "200"},
    ]
    entry, _ = entry_from_har(har_item(headers=headers))
    names = [name.lower() for name, _ in entry.response.headers]
    assert names == [b"content-type", b"date"]


def test_import_keeps_encoding_marked_by_export() -> None:
    """An _encoded body keeps its Content-Encoding, stored byte for byte."""
    content = {"size": 2, "text": "CwI=", "encoding": "base64", "_encoded": True}
    headers = [{"name": "Content-Encoding", "value": "br"}]
    entry, body = entry_from_har(har_item(content=content, headers=headers))
    assert body == b"\x0b\x02"
    assert header_value(entry.response.headers, b"content-encoding") == b"br"


def test_import_adds_missing_date() -> None:
    """A response without Date gets one from its response time."""
    entry, _ = entry_from_har(har_item())
    date = header_value(entry.response.headers, b"date")
    assert date == b"Tue, 14 Nov 2023 22:13:20 GMT"


def test_import_vary_values_from_har_request() -> None:
    """vary holds the HAR request's normalised values of the Vary fields."""
    headers = [{"name": "Vary", "value": "Accept-Encoding, Accept-Language"}]
    request_headers = [{"name": "accept-encoding", "value": "gzip,  br"}]
    entry, _ = entry_from_har(
        har_item(headers=headers, request_headers=request_headers)
    )
    assert entry.vary == ((b"accept-encoding", b"gzip, br"), (b"accept-language", None))


def test_import_empty_body_without_text() -> None:
    """A 204 whose content has size 0 and no text is stored with an empty body."""
    entry, body = entry_from_har(har_item(status=204, content={"size": 0}))
    assert body == b"" and entry.response.status == 204


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (har_item(method="POST"), har.NOT_GET),
        (har_item(url="data:text/plain,hi"), har.NOT_HTTP),
        (har_item(url="chrome-extension://abc/x.js"), har.NOT_HTTP),
        (har_item(url="ws://example.com/socket"), har.NOT_HTTP),
        (har_item(status=0), har.NO_RESPONSE),
        (har_item(status=304), har.PARTIAL),
        (har_item(status=206), har.PARTIAL),
        (har_item(status=101), har.BAD_STATUS),
        (har_item(content={"size": 120, "mimeType": "image/png"}), har.NO_BODY),
        (har_item(content={"size": 3, "text": ""}), har.NO_BODY),
        (har_item(content={"size": 3, "text": "!!", "encoding": "base64"}), "un"),
        (har_item(headers=[{"name": "Vary", "value": "*"}]), har.VARY_STAR),
        ({"request": {}}, har.MALFORMED),
        ("not an object", har.MALFORMED),
    ],
)
def test_import_skips_what_cannot_be_stored(item: Any, reason: str) -> None:
    """Entries that are not complete GET responses are skipped with a reason."""
    with pytest.raises(Skipped) as raised:
        entry_from_har(item)
    assert str(raised.value).startswith(reason)


@pytest.mark.parametrize("document", [[], {}, {"log": {}}, {"log": {"entries": {}}}])
def test_har_entries_requires_log_entries(document: Any) -> None:
    """A document without a log.entries list is not a HAR file."""
    with pytest.raises(har.NotHar):
        har_entries(document)
