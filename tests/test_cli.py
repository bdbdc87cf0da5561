"""Tests for the ``cacheproxy`` command line tool, run in-process on temp dirs."""

from __future__ import annotations

import ast
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cacheproxy import cli
from cacheproxy.cli import main
from cacheproxy.model import Entry, Headers, ResponseHead
from cacheproxy.store import Store

BINARY = bytes(range(256))
JSON_URL = "http://example.com/api?id=7"
BIN_URL = "http://example.com/blob.bin"
TEXT_URL = "http://other.example/readme.txt"


def make_entry(
    url: str,
    headers: Headers,
    vary: tuple[tuple[bytes, bytes | None], ...] = (),
    age: float = 0.0,
) -> Entry:
    """An entry for ``url`` received ``age`` seconds ago."""
    now = time.time()
    return Entry(
        key=url,
        url=url,
        response=ResponseHead(status=200, reason=b"OK", headers=headers),
        request_time=now - age - 0.1,
        response_time=now - age,
        vary=vary,
    )


def put(store: Store, entry: Entry, body: bytes) -> Entry:
    """Store ``entry`` with ``body`` through begin/write/commit."""
    writer = store.begin(entry.key)
    writer.write(body)
    return writer.commit(entry)


@pytest.fixture
def cache(tmp_path: Path) -> str:
    """A cache dir holding a fresh JSON entry, a stale binary one in two variants,
    and a text entry."""
    directory = str(tmp_path / "cache")
    store = Store(directory, size_limit=50 << 20)
    put(
        store,
        make_entry(
            JSON_URL,
            (
                (b"Content-Type", b"application/json"),
                (b"Cache-Control", b"max-age=600"),
            ),
        ),
        b'{"id": 7, "name": "caf\xc3\xa9"}',
    )
    for encoding in (b"gzip", b"identity"):
        headers = (
            (b"Content-Type", b"application/octet-stream"),
            (b"Vary", b"Accept-Encoding"),
            (b"Cache-Control", b"max-age=60"),
        )
        put(
            store,
            make_entry(BIN_URL, headers, ((b"accept-encoding", encoding),), 3600),
            BINARY,
        )
    put(
        store,
        make_entry(TEXT_URL, ((b"Content-Type", b"text/plain; charset=utf-8"),)),
        b"read me\n",
    )
    store.close()
    return directory


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)``'s exit status, stdout and stderr."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def stored(directory: str) -> dict[str, list[tuple[Entry, bytes]]]:
    """Every stored entry and its body, by URL."""
    store = Store.open_existing(directory)
    found: dict[str, list[tuple[Entry, bytes]]] = {}
    for entry in store.entries():
        body = store.open_body(entry)
        assert body is not None
        with body:
            found.setdefault(entry.url, []).append((entry, body.read()))
    store.close()
    return found


def browser_har() -> dict[str, Any]:
    """A HAR file shaped like Chrome's, with entries that cannot be imported."""

    def item(url: str, **response: Any) -> dict[str, Any]:
        method = response.pop("method", "GET")
        base = {
            "status": 200,
            "statusText": "",
            "httpVersion": "h2",
            "headers": [{"name": "content-type", "value": "text/html"}],
            "content": {"size": 4, "mimeType": "text/html", "text": "<p/>"},
        }
        return {
            "pageref": "page_1",
            "_initiator": {"type": "other"},
            "_resourceType": "document",
            "startedDateTime": "2024-03-01T10:00:00.123Z",
            "time": 12.5,
            "request": {"method": method, "url": url, "headers": []},
            "response": {**base, **response},
            "timings": {"send": 0, "wait": 12.5, "receive": 0},
        }

    return {
        "log": {
            "version": "1.2",
            "creator": {"name": "WebInspector", "version": "537.36"},
            "pages": [{"id": "page_1", "title": "x", "startedDateTime": "x"}],
            "entries": [
                item("https://site.example/"),
                item(
                    "https://site.example/logo.png",
                    content={
                        "size": 3,
                        "mimeType": "image/png",
                        "encoding": "base64",
                        "text": base64.b64encode(b"PNG").decode(),
                    },
                ),
                item(
                    "https://site.example/big.js",
                    content={"size": 9000, "mimeType": "text/javascript"},
                ),
                item("https://site.example/failed", status=0, content={}),
                item("data:image/png;base64,AAAA"),
                item("https://site.example/form", method="POST"),
            ],
        }
    }


# ---------------------------------------------------------------------------
# ls
# ---------------------------------------------------------------------------


def test_ls_prints_one_line_per_variant(cache: str, capsys: Any) -> None:
    """ls prints status, size, time, age, freshness and URL for each variant."""
    status, out, _ = run(capsys, "ls", "--cache-dir", cache)
    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 4
    json_line = next(line for line in lines if JSON_URL in line)
    assert json_line.split()[:2] == ["200", "26"]
    assert " fresh " in json_line
    bin_lines = [line for line in lines if BIN_URL in line]
    assert len(bin_lines) == 2
    assert all(" stale " in line and " 1h " in line for line in bin_lines)
    assert any("[accept-encoding=gzip]" in line for line in bin_lines)


def test_ls_json_is_an_array_for_scripts(cache: str, capsys: Any) -> None:
    """ls --json prints a JSON array with url, status, size, age and freshness."""
    status, out, _ = run(capsys, "ls", "--cache-dir", cache, "--json")
    assert status == 0
    items = json.loads(out)
    assert len(items) == 4
    by_url = {item["url"]: item for item in items}
    assert by_url[JSON_URL]["fresh"] is True
    assert by_url[JSON_URL]["size"] == 26 and by_url[JSON_URL]["status"] == 200
    assert by_url[BIN_URL]["fresh"] is False
    assert by_url[BIN_URL]["age"] == pytest.approx(3600.1, abs=5)
    assert by_url[BIN_URL]["recorded"] is False
    assert by_url[TEXT_URL]["stored"].endswith("Z")


def test_ls_applies_builtin_refresh_rules(tmp_path: Path, capsys: Any) -> None:
    """A .deb in a pool/ path without explicit freshness is fresh by the rules."""
    directory = str(tmp_path / "c")
    store = Store(directory, size_limit=1 << 20)
    url = "http://deb.example/debian/pool/main/h/hello/hello_2.10-3_amd64.deb"
    put(store, make_entry(url, (), age=86400 * 30), b"deb")
    store.close()
    _, out, _ = run(capsys, "ls", "--cache-dir", directory, "--json")
    assert json.loads(out)[0]["fresh"] is True


def test_ls_empty_cache_says_so(tmp_path: Path, capsys: Any) -> None:
    """ls of an empty cache prints one line saying there is nothing stored."""
    Store(str(tmp_path), size_limit=1 << 20).close()
    status, out, _ = run(capsys, "ls", "--cache-dir", str(tmp_path))
    assert status == 0 and out.startswith("no entries stored")


# ---------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------


def test_stats_reports_entries_bytes_and_budget(cache: str, capsys: Any) -> None:
    """stats prints URL count, bytes stored, the saved budget; counters absent."""
    status, out, _ = run(capsys, "stats", "--cache-dir", cache)
    assert status == 0
    assert "entries: 3 URLs" in out
    assert f"of {50 << 20} bytes budget" in out
    assert "hits/misses: not recorded" in out


def test_stats_reads_recorded_counters(cache: str, capsys: Any) -> None:
    """stats shows the hits and misses the proxy added under s:counters."""
    store = Store.open_existing(cache)
    store.add_counters({"hit": 3, "miss": 1})
    store.add_counters({"hit": 1, "store": 1})
    store.close()
    _, out, _ = run(capsys, "stats", "--cache-dir", cache)
    assert "hits/misses: 4/1 (hit ratio 80.0%)" in out
    assert "store=1" in out
    _, out, _ = run(capsys, "stats", "--cache-dir", cache, "--json")
    report = json.loads(out)
    assert report["counters"] == {"hit": 4, "miss": 1, "store": 1}
    assert report["urls"] == 3 and report["size_limit"] == 50 << 20


def test_opening_keeps_saved_size_limit(cache: str, capsys: Any) -> None:
    """The tool opens the cache without overwriting the proxy's settings."""
    run(capsys, "ls", "--cache-dir", cache)
    store = Store.open_existing(cache)
    assert store.size_limit() == 50 << 20
    store.close()


# ---------------------------------------------------------------------------
# purge
# ---------------------------------------------------------------------------


def test_purge_url_removes_all_variants(cache: str, capsys: Any) -> None:
    """purge URL drops every variant of the normalised URL and nothing else."""
    status, out, _ = run(
        capsys, "purge", "HTTP://EXAMPLE.com:80/blob.bin", "--cache-dir", cache
    )
    assert status == 0
    assert out == f"purged 2 variants of {BIN_URL}\n"
    assert set(stored(cache)) == {JSON_URL, TEXT_URL}


def test_purge_unknown_url_fails(cache: str, capsys: Any) -> None:
    """purge of a URL that is not stored exits 1 with an error line."""
    status, out, err = run(
        capsys, "purge", "http://nope.example/", "--cache-dir", cache
    )
    assert status == 1 and out == ""
    assert err == "cacheproxy: error: nothing stored for http://nope.example/\n"


def test_purge_all_empties_the_store(cache: str, capsys: Any) -> None:
    """purge --all removes every entry."""
    status, out, _ = run(capsys, "purge", "--all", "--cache-dir", cache)
    assert status == 0 and out == f"purged all 4 entries from {cache}\n"
    assert stored(cache) == {}


def test_purge_needs_url_or_all(cache: str, capsys: Any) -> None:
    """purge with neither or both of URL and --all is a usage error (exit 2)."""
    assert run(capsys, "purge", "--cache-dir", cache)[0] == 2
    assert run(capsys, "purge", JSON_URL, "--all", "--cache-dir", cache)[0] == 2


# ---------------------------------------------------------------------------
# export and import
# ---------------------------------------------------------------------------


def test_export_writes_valid_har(cache: str, tmp_path: Path, capsys: Any) -> None:
    """export writes HAR 1.2: log, creator, entries with the required keys."""
    out_file = tmp_path / "out.har"
    status, out, err = run(capsys, "export", str(out_file), "--cache-dir", cache)
    assert status == 0 and out == f"exported 4 entries to {out_file}\n"
    assert err == ""
    log = json.loads(out_file.read_text())["log"]
    assert log["version"] == "1.2"
    assert log["creator"]["name"] == "cacheproxy"
    assert len(log["entries"]) == 4
    for item in log["entries"]:
        assert set(item) >= {"startedDateTime", "time", "request", "response"}
        assert item["cache"] == {}
        assert set(item["request"]) >= {
            "method",
            "url",
            "httpVersion",
            "headers",
            "queryString",
            "cookies",
            "headersSize",
            "bodySize",
        }
        assert set(item["response"]) >= {
            "status",
            "statusText",
            "httpVersion",
            "headers",
            "cookies",
            "content",
            "redirectURL",
            "headersSize",
            "bodySize",
        }
        assert {"send", "wait", "receive"} <= set(item["timings"])
    contents = {i["request"]["url"]: i["response"]["content"] for i in log["entries"]}
    assert contents[JSON_URL]["text"] == '{"id": 7, "name": "café"}'
    assert contents[TEXT_URL] == {
        "mimeType": "text/plain; charset=utf-8",
        "size": 8,
        "compression": 0,
        "text": "read me\n",
    }
    assert contents[BIN_URL]["encoding"] == "base64"
    assert base64.b64decode(contents[BIN_URL]["text"]) == BINARY


def test_export_url_prefix_filters(cache: str, tmp_path: Path, capsys: Any) -> None:
    """export --url-prefix keeps only entries whose URL starts with the prefix."""
    out_file = tmp_path / "some.har"
    status, out, _ = run(
        capsys,
        "export",
        str(out_file),
        "--url-prefix",
        "http://other.example/",
        "--cache-dir",
        cache,
    )
    assert status == 0 and out.startswith("exported 1 entries")
    entries = json.loads(out_file.read_text())["log"]["entries"]
    assert [e["request"]["url"] for e in entries] == [TEXT_URL]


def test_export_then_import_is_byte_exact(
    cache: str, tmp_path: Path, capsys: Any
) -> None:
    """Importing an export into an empty dir stores the same bodies and variants."""
    out_file = tmp_path / "out.har"
    run(capsys, "export", str(out_file), "--cache-dir", cache)
    fresh = str(tmp_path / "imported")
    status, out, _ = run(capsys, "import", str(out_file), "--cache-dir", fresh)
    assert status == 0 and out == f"imported 4 entries from {out_file}\n"
    before, after = stored(cache), stored(fresh)
    assert set(before) == set(after)
    for url, variants in before.items():
        old = sorted((e.vary, body, e.response.status) for e, body in variants)
        new = sorted((e.vary, body, e.response.status) for e, body in after[url])
        assert old == new
        assert all(entry.recorded for entry, _ in after[url])


def test_import_browser_har_counts_skips(tmp_path: Path, capsys: Any) -> None:
    """A browser HAR imports complete GETs and names why each other entry was not."""
    har_file = tmp_path / "browser.har"
    har_file.write_text(json.dumps(browser_har()))
    directory = str(tmp_path / "c")
    status, out, _ = run(capsys, "import", str(har_file), "--cache-dir", directory)
    assert status == 0
    assert out.startswith(f"imported 2 entries from {har_file}; skipped 4: ")
    for reason in (
        "1 body not saved",
        "1 status 0 (no response)",
        "1 not an http(s) URL",
        "1 not GET",
    ):
        assert reason in out
    found = stored(directory)
    assert found["https://site.example/"][0][1] == b"<p/>"
    assert found["https://site.example/logo.png"][0][1] == b"PNG"


def test_import_into_existing_cache_keeps_its_budget(
    cache: str, tmp_path: Path, capsys: Any
) -> None:
    """import into an existing cache adds entries and keeps its size limit."""
    har_file = tmp_path / "browser.har"
    har_file.write_text(json.dumps(browser_har()))
    assert run(capsys, "import", str(har_file), "--cache-dir", cache)[0] == 0
    assert len(stored(cache)) == 5
    store = Store.open_existing(cache)
    assert store.size_limit() == 50 << 20
    store.close()


def test_commands_leave_a_running_proxys_writes_alone(
    cache: str, tmp_path: Path, capsys: Any
) -> None:
    """A body being written by an open store survives ls, import and stats."""
    proxy = Store(cache, size_limit=50 << 20)
    writer = proxy.begin("http://example.com/late")
    writer.write(b"in progress")
    har_file = tmp_path / "browser.har"
    har_file.write_text(json.dumps(browser_har()))
    for command in (["ls"], ["import", str(har_file)], ["stats"]):
        assert run(capsys, *command, "--cache-dir", cache)[0] == 0
    assert len(list(Path(cache, "tmp").iterdir())) == 1
    writer.commit(make_entry("http://example.com/late", ()))
    proxy.close()
    assert stored(cache)["http://example.com/late"][0][1] == b"in progress"


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["ls"], ["stats"], ["purge", "--all"], ["export", "x.har"]]
)
def test_not_a_cache_dir_is_an_error(
    command: list[str], tmp_path: Path, capsys: Any
) -> None:
    """Commands other than import refuse a directory without a cache, creating none."""
    missing = tmp_path / "missing"
    status, out, err = run(capsys, *command, "--cache-dir", str(missing))
    assert status == 1 and out == ""
    assert err == f"cacheproxy: error: {missing} is not a cache directory\n"
    assert not missing.exists()


def test_import_refuses_non_cache_directory(tmp_path: Path, capsys: Any) -> None:
    """import refuses a non-empty directory that holds no cache."""
    (tmp_path / "data.txt").write_text("mine")
    har_file = tmp_path / "x.har"
    har_file.write_text(json.dumps(browser_har()))
    status, _, err = run(capsys, "import", str(har_file), "--cache-dir", str(tmp_path))
    assert status == 1 and "is not a cache directory" in err


def test_import_missing_file(tmp_path: Path, capsys: Any) -> None:
    """import of a file that does not exist exits 1 naming the file."""
    missing = tmp_path / "nope.har"
    status, _, err = run(capsys, "import", str(missing), "--cache-dir", str(tmp_path))
    assert status == 1
    assert err.startswith("cacheproxy: error: ") and str(missing) in err
    assert err.count("\n") == 1


def test_import_invalid_json(tmp_path: Path, capsys: Any) -> None:
    """import of a file that is not JSON exits 1 saying so."""
    bad = tmp_path / "bad.har"
    bad.write_text("{not json")
    status, _, err = run(capsys, "import", str(bad), "--cache-dir", str(tmp_path / "c"))
    assert status == 1 and "is not valid JSON" in err
    assert not (tmp_path / "c").exists()


def test_import_json_without_log_entries(tmp_path: Path, capsys: Any) -> None:
    """import of JSON without log.entries exits 1: not a HAR file."""
    bad = tmp_path / "bad.har"
    bad.write_text('{"log": {"version": "1.2"}}')
    status, _, err = run(capsys, "import", str(bad), "--cache-dir", str(tmp_path / "c"))
    assert status == 1
    assert err == f"cacheproxy: error: {bad} is not a HAR file: no log.entries list\n"


def test_export_to_missing_directory(cache: str, tmp_path: Path, capsys: Any) -> None:
    """export into a directory that does not exist exits 1 and writes nothing."""
    target = tmp_path / "no" / "out.har"
    status, _, err = run(capsys, "export", str(target), "--cache-dir", cache)
    assert status == 1
    assert err.startswith(f"cacheproxy: error: cannot write {target}: ")
    assert not target.parent.exists()


def test_usage_errors_exit_2(capsys: Any) -> None:
    """No subcommand or an unknown one is a usage error with exit status 2."""
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert "usage: cacheproxy" in capsys.readouterr().err


class _Terminal(io.StringIO):
    """A text stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal() -> None:
    """Progress draws done/total on a terminal and stays silent on a pipe."""
    terminal, pipe = _Terminal(), io.StringIO()
    for stream in (terminal, pipe):
        progress = cli.Progress("importing", 2, stream)
        progress.step(1)
        progress.step(2)
        progress.finish()
    assert terminal.getvalue().startswith("\rimporting 1/2")
    assert terminal.getvalue().endswith("\rimporting 2/2\n")
    assert pipe.getvalue() == ""


# ---------------------------------------------------------------------------
# Packaging
# ---------------------------------------------------------------------------


def test_cli_imports_no_twisted() -> None:
    """cli.py imports no Twisted, so the tool starts fast."""
    tree = ast.parse(Path(cli.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
            )
            assert not any(name.startswith("twisted") for name in names)


def test_console_script_runs(cache: str) -> None:
    """The installed ``cacheproxy`` script runs a command in a new process."""
    script = Path(sys.executable).with_name("cacheproxy")
    result = subprocess.run(
        [str(script), "stats", "--cache-dir", cache],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "entries: 3 URLs" in result.stdout
    result = subprocess.run(
        [str(script), "ls", "--cache-dir", cache + "-missing"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "not a cache directory" in result.stderr
