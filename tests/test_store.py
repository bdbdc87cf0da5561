"""Tests for cacheproxy.store: bodies byte-exact, visible only when committed."""

from __future__ import annotations

import ast
import hashlib
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import diskcache
import pytest

import cacheproxy.store
from cacheproxy.model import Entry, Headers, ResponseHead
from cacheproxy.store import Store

MiB = 1 << 20
KEY = "http://example.com:80/file"


def make_entry(
    key: str = KEY,
    vary: tuple[tuple[bytes, bytes | None], ...] = (),
    status: int = 200,
    headers: Headers = ((b"Content-Type", b"text/plain"),),
) -> Entry:
    """An Entry as the exchange would hand it to commit."""
    return Entry(
        key=key,
        url=key,
        response=ResponseHead(status=status, reason=b"OK", headers=headers),
        request_time=1000.25,
        response_time=1001.5,
        vary=vary,
    )


def store_body(
    store: Store, body: bytes, entry: Entry | None = None, chunk: int = 65536
) -> Entry:
    """Write ``body`` in chunks and commit it with ``entry``."""
    entry = entry or make_entry()
    writer = store.begin(entry.key)
    for start in range(0, len(body), chunk):
        writer.write(body[start : start + chunk])
    return writer.commit(entry)


def read_body(store: Store, entry: Entry) -> bytes | None:
    """The stored body of ``entry``, or None if it is gone."""
    body = store.open_body(entry)
    if body is None:
        return None
    with body:
        return body.read()


def body_files(directory: Path) -> list[Path]:
    """The files diskcache keeps values in."""
    return list(directory.rglob("*.val"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh store with room to spare."""
    opened = Store(str(tmp_path), size_limit=1 << 30)
    yield opened
    opened.close()


def test_round_trip_all_byte_values(store: Store) -> None:
    """A body of all 256 byte values and binary header bytes come back exactly."""
    body = bytes(range(256)) * 3
    headers: Headers = (
        (b"X-Raw", bytes(range(128, 256))),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=\xff\x00"),
    )
    entry = make_entry(vary=((b"accept-encoding", b"gzip\xe9"), (b"cookie", None)))
    entry = Entry(
        key=entry.key,
        url=entry.url,
        response=ResponseHead(status=203, reason=b"Fine \xe9", headers=headers),
        request_time=entry.request_time,
        response_time=entry.response_time,
        vary=entry.vary,
    )
    stored = store_body(store, body, entry)
    assert stored.body_length == len(body)
    assert stored.body_id
    [found] = store.lookup(KEY)
    assert found == stored
    assert found.response.headers == headers
    assert found.vary == entry.vary
    assert read_body(store, found) == body


def test_round_trip_10_mib_in_chunks(store: Store) -> None:
    """A 10 MiB body written in 64 KiB chunks reads back byte-exact."""
    block = hashlib.sha256(b"seed").digest() * 2048
    body = b"".join(bytes([i]) + block for i in range(160))[: 10 * MiB]
    assert len(body) == 10 * MiB
    stored = store_body(store, body)
    assert stored.body_length == 10 * MiB
    [found] = store.lookup(KEY)
    assert read_body(store, found) == body


def test_empty_body(store: Store) -> None:
    """A zero-length body commits and opens as an empty file."""
    stored = store_body(store, b"")
    [found] = store.lookup(KEY)
    assert found.body_length == 0
    assert read_body(store, found) == b""
    assert stored == found


def test_abort_leaves_nothing(store: Store, tmp_path: Path) -> None:
    """An aborted body is never visible, its temp file goes, abort is idempotent."""
    writer = store.begin(KEY)
    writer.write(b"partial")
    writer.abort()
    writer.abort()
    assert store.lookup(KEY) == []
    assert list(store.entries()) == []
    assert os.listdir(tmp_path / "tmp") == []
    with pytest.raises(ValueError):
        writer.commit(make_entry())
    assert store.lookup(KEY) == []


def test_uncommitted_body_is_invisible(store: Store, tmp_path: Path) -> None:
    """A begun body is invisible until commit, then visible with its temp file gone."""
    writer = store.begin(KEY)
    writer.write(b"x" * 100_000)
    assert writer.size == 100_000
    assert store.lookup(KEY) == []
    assert list(store.entries()) == []
    assert body_files(tmp_path) == []
    stored = writer.commit(make_entry())
    assert store.lookup(KEY) == [stored]
    assert os.listdir(tmp_path / "tmp") == []
    with pytest.raises(ValueError):
        writer.commit(make_entry())


def test_restart_sees_committed_entries(tmp_path: Path) -> None:
    """A new Store on the same directory serves what the old one committed."""
    first = Store(str(tmp_path), size_limit=1 << 30)
    stored = store_body(first, b"persisted \x00\xff" * 5000)
    first.close()
    second = Store(str(tmp_path), size_limit=1 << 30)
    assert second.lookup(KEY) == [stored]
    assert read_body(second, stored) == b"persisted \x00\xff" * 5000
    assert list(second.entries()) == [stored]
    second.close()


def test_settings_persist(tmp_path: Path) -> None:
    """The size limit and LRU eviction are saved so diskcache reopens with them."""
    Store(str(tmp_path), size_limit=123_456_789).close()
    cache = diskcache.Cache(str(tmp_path))
    assert cache.size_limit == 123_456_789
    assert cache.eviction_policy == "least-recently-used"
    cache.close()


def test_orphan_temp_files_deleted_at_open(tmp_path: Path) -> None:
    """Partial bodies left by a crash are deleted when a store opens."""
    first = Store(str(tmp_path), size_limit=1 << 30)
    writer = first.begin(KEY)
    writer.write(b"interrupted")
    (tmp_path / "tmp" / "leftover.part").write_bytes(b"old")
    assert len(os.listdir(tmp_path / "tmp")) == 2
    second = Store(str(tmp_path), size_limit=1 << 30)
    assert os.listdir(tmp_path / "tmp") == []
    assert second.lookup(KEY) == []
    second.close()
    first.close()


def test_variant_with_same_vary_is_replaced(store: Store, tmp_path: Path) -> None:
    """A commit replaces the variant with equal vary and deletes its old body."""
    gzip = ((b"accept-encoding", b"gzip"),)
    plain = ((b"accept-encoding", None),)
    first = store_body(store, b"A" * 50_000, make_entry(vary=gzip))
    other = store_body(store, b"B" * 50_000, make_entry(vary=plain))
    second = store_body(store, b"C" * 50_000, make_entry(vary=gzip, status=203))
    found = store.lookup(KEY)
    assert sorted(found, key=lambda e: e.body_id) == sorted(
        [other, second], key=lambda e: e.body_id
    )
    assert read_body(store, second) == b"C" * 50_000
    assert read_body(store, other) == b"B" * 50_000
    assert store.open_body(first) is None
    assert len(body_files(tmp_path)) == 2


def test_vary_name_change_replaces_all(store: Store, tmp_path: Path) -> None:
    """When the Vary field names change, every stored variant is replaced."""
    store_body(store, b"A" * 40_000, make_entry(vary=((b"accept", b"a"),)))
    store_body(store, b"B" * 40_000, make_entry(vary=((b"accept", b"b"),)))
    assert len(store.lookup(KEY)) == 2
    new = store_body(store, b"C" * 40_000, make_entry(vary=((b"cookie", b"c"),)))
    assert store.lookup(KEY) == [new]
    assert len(body_files(tmp_path)) == 1
    none = store_body(store, b"D" * 40_000, make_entry())
    assert store.lookup(KEY) == [none]


def test_old_body_stays_readable_after_replacement(store: Store) -> None:
    """A reader that opened a body keeps reading it after a commit replaces it."""
    old = store_body(store, b"old" * 30_000)
    body = store.open_body(old)
    assert body is not None
    store_body(store, b"new" * 30_000)
    with body:
        assert body.read() == b"old" * 30_000


def test_update_keeps_body(store: Store) -> None:
    """update() replaces head and times, keeps the body; False once it is gone."""
    stored = store_body(store, b"payload" * 10_000)
    head = ResponseHead(status=200, reason=b"OK", headers=((b"ETag", b'"v2"'),))
    refreshed = Entry(
        key=KEY,
        url=KEY,
        response=head,
        request_time=2000.0,
        response_time=2000.5,
        body_id=stored.body_id,
    )
    assert store.update(refreshed)
    [found] = store.lookup(KEY)
    assert found.response == head
    assert (found.request_time, found.response_time) == (2000.0, 2000.5)
    assert (found.body_id, found.body_length) == (stored.body_id, stored.body_length)
    assert read_body(store, found) == b"payload" * 10_000
    unknown = Entry(KEY, KEY, head, 1.0, 2.0, body_id="f" * 32)
    assert not store.update(unknown)
    store.invalidate(KEY)
    assert not store.update(refreshed)
    assert store.lookup(KEY) == []


def test_invalidate_removes_all_variants(store: Store, tmp_path: Path) -> None:
    """invalidate() removes every variant and body of a key, not other keys."""
    for value in (b"a", b"b", b"c"):
        store_body(store, value * 40_000, make_entry(vary=((b"accept", value),)))
    kept = store_body(store, b"k" * 40_000, make_entry(key="http://other/"))
    assert store.invalidate(KEY) == 3
    assert store.lookup(KEY) == []
    assert store.invalidate(KEY) == 0
    assert list(store.entries()) == [kept]
    assert len(body_files(tmp_path)) == 1


def test_concurrent_commits_stay_consistent(store: Store, tmp_path: Path) -> None:
    """Commits racing on one key leave metadata whose every body opens intact."""
    errors: list[BaseException] = []

    def commit_many(thread: int) -> None:
        """Commit bodies under a few vary values and both vary name sets."""
        try:
            for round_ in range(12):
                name = b"accept" if round_ % 5 else b"cookie"
                vary = ((name, str(round_ % 3).encode()),)
                prefix = f"{thread}:{round_}:".encode()
                entry = make_entry(vary=vary, headers=((b"X-Prefix", prefix),))
                store_body(store, prefix * 5000, entry, chunk=4096)
                for found in store.lookup(KEY):
                    read_body(store, found)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=commit_many, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    found = store.lookup(KEY)
    assert found
    assert len({tuple(n for n, _ in e.vary) for e in found}) == 1
    assert len({e.vary for e in found}) == len(found)
    for entry in found:
        body = read_body(store, entry)
        assert body is not None
        assert body == dict(entry.response.headers)[b"X-Prefix"] * 5000
    # Every superseded body was deleted: only the listed ones remain.
    assert len(body_files(tmp_path)) == len(found)


def test_eviction_never_breaks_open_body(tmp_path: Path) -> None:
    """Under a tiny size limit, open_body returns a correct body or None."""
    small = Store(str(tmp_path), size_limit=MiB)
    bodies = {f"http://host/{n}": bytes([n]) * 100_000 for n in range(30)}
    for key, body in bodies.items():
        store_body(small, body, make_entry(key=key))
    small.cull()
    served = 0
    for key, body in bodies.items():
        for entry in small.lookup(key):
            got = read_body(small, entry)
            assert got in (None, body)
            served += got is not None
    assert 0 < served < len(bodies)
    assert small.volume() > 0
    small.close()


def test_missing_body_drops_metadata(store: Store, tmp_path: Path) -> None:
    """When eviction took a body, open_body returns None and forgets the variant."""
    stored = store_body(store, b"gone" * 20_000)
    cache = diskcache.Cache(str(tmp_path))
    assert cache.delete("b:" + stored.body_id)
    cache.close()
    assert store.open_body(stored) is None
    assert store.lookup(KEY) == []


def test_metadata_is_json_text(store: Store, tmp_path: Path) -> None:
    """Metadata is stored as a JSON string, not a pickle."""
    store_body(store, b"abc", make_entry(headers=((b"X", b"\xff"),)))
    cache = diskcache.Cache(str(tmp_path))
    raw = cache.get("m:" + KEY)
    cache.close()
    assert isinstance(raw, str)
    assert '"\\u00ff"' in raw


def test_store_imports_no_twisted() -> None:
    """store.py imports only the standard library, diskcache and cacheproxy.model."""
    source = Path(cacheproxy.store.__file__).read_text()
    modules: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.append(node.module or "")
    assert not [m for m in modules if m.split(".")[0] == "twisted"]
    allowed = set(sys.stdlib_module_names) | {"diskcache"}
    assert {
        m for m in modules if m.split(".")[0] not in allowed and m != "cacheproxy.model"
    } == set()


def _data_version(connection: sqlite3.Connection) -> int:
    """SQLite's data_version: it changes when another connection commits a write."""
    return int(connection.execute("PRAGMA data_version").fetchone()[0])


def _access_times(connection: sqlite3.Connection) -> dict[str, float]:
    rows = connection.execute("SELECT key, access_time FROM Cache").fetchall()
    return {str(key): float(when) for key, when in rows}


def test_a_hit_writes_nothing_until_use_is_recorded(store: Store, tmp_path: Path):
    """Looking an entry up and opening its body commit no SQLite write; the reads
    are marked as uses later, in one batch, for LRU eviction."""
    stored = store_body(store, b"body" * 100_000)
    watcher = sqlite3.connect(str(tmp_path / "cache.db"))
    try:
        before, times = _data_version(watcher), _access_times(watcher)
        for _ in range(5):
            (entry,) = store.lookup(KEY)
            assert read_body(store, entry) == b"body" * 100_000
        assert _data_version(watcher) == before
        assert _access_times(watcher) == times
        assert store.record_use() == 2  # the metadata and the body
        assert _data_version(watcher) != before
        after = _access_times(watcher)
        for name in ("m:" + KEY, "b:" + stored.body_id):
            assert after[name] > times[name]
        assert store.record_use() == 0
    finally:
        watcher.close()


def test_recorded_use_keeps_an_entry_from_eviction(tmp_path: Path):
    """Least recently used goes first: an entry read (and its use recorded) outlives
    the ones stored after it but never read."""
    small = Store(str(tmp_path), size_limit=MiB)
    body = b"x" * 100_000
    keys = [f"http://host/{n}" for n in range(12)]
    entries = [store_body(small, body, make_entry(key=key)) for key in keys[:9]]
    (first,) = small.lookup(keys[0])
    assert read_body(small, first) == body
    small.record_use()
    for key in keys[9:]:
        store_body(small, body, make_entry(key=key))
    small.cull()
    assert read_body(small, entries[0]) == body, "the entry just used was evicted"
    assert small.lookup(keys[1]) == [], "the least recently used entry was kept"
    small.close()


def test_listing_entries_does_not_count_as_use(store: Store, tmp_path: Path):
    store_body(store, b"listed")
    assert [e.key for e in store.entries()] == [KEY]
    assert store.record_use() == 0
