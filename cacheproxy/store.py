"""The disk store: stored responses as JSON metadata plus one file per body.

Rules of this module:
- It knows nothing of HTTP: ``Entry.vary`` is an opaque tuple compared for equality.
- It imports the standard library, diskcache and L{cacheproxy.model} only (no Twisted).
- Layout in one ``diskcache.Cache``: ``"m:" + key`` holds a JSON ``str`` (never a
  pickle) listing the key's variants; ``"b:" + body_id`` holds a body, always stored
  with ``read=True`` so diskcache keeps it as a file of its own.
- A body becomes visible only together with its metadata: the body is stored first,
  then the metadata is switched in one transaction, then superseded bodies go.  A
  crash in between leaves at worst an orphan body, which eviction reclaims.
- Eviction may remove a body and keep its metadata, or the reverse; readers see a
  missing body as C{None} and the dangling metadata is dropped.
- Every method is safe to call from several threads at once.
- Reading writes nothing: lookups and body opens go through a second handle on the
  same database whose eviction policy is off in memory only, and the keys read are
  remembered.  L{Store.record_use} later marks them used, many in one short
  transaction, so least-recently-used eviction still sees them (within the interval
  the service calls it at) while a hit costs no SQLite write.
- ``"s:counters"`` holds the proxy's request counters as a JSON ``str`` object of
  counter name to integer (``{"hit": 12, "miss": 3, ...}``), merged by
  L{Store.add_counters} so several workers and processes can add to it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any, BinaryIO

import diskcache
import diskcache.core

from cacheproxy.model import Entry, Headers, ResponseHead

_META = "m:"
_BODY = "b:"
_TMP = "tmp"
_COUNTERS = "s:counters"
_CHUNK = 1 << 16
_EVICTION_POLICY = "least-recently-used"

Vary = tuple[tuple[bytes, bytes | None], ...]


class _ReceivedBody:
    """A complete body in a temporary file, to be moved (not copied) into the store."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        self.file = file
        self.path = path


class _MovingDisk(diskcache.Disk):  # type: ignore[misc]
    """diskcache's Disk, but a L{_ReceivedBody} is renamed into place, not copied.

    Copying would read and write every stored byte a second time; the temporary
    directory lies inside the cache directory, so a rename is atomic and cheap.
    """

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if not (read and isinstance(value, _ReceivedBody)):
            return super().store(value, read, key=key)
        filename, full_path = self.filename(key, value)
        for _ in range(10):
            try:
                # diskcache removes emptied directories (Disk.remove), so another
                # thread may take this one away between creating and using it.
                os.makedirs(os.path.dirname(full_path), exist_ok=True)
                os.rename(value.path, full_path)
                break
            except FileNotFoundError:
                if not os.path.exists(value.path):
                    # Another opener of this directory cleaned tmp/ meanwhile; the
                    # open handle still reads the unlinked file: copy from it.
                    value.file.seek(0)
                    return super().store(value.file, read, key=key)
        else:
            value.file.seek(0)
            return super().store(value.file, read, key=key)
        return os.path.getsize(full_path), diskcache.core.MODE_BINARY, filename, None


class Store:
    """Stored responses in a size-limited diskcache, evicting least recently used.

    @ivar directory: the diskcache directory.
    @ivar tmp_directory: where bodies being received are written until committed.
    """

    def __init__(self, directory: str, size_limit: int, *, clean: bool = True) -> None:
        """Open or create the store at ``directory``; delete orphan partial bodies.

        ``clean``: False in a worker process, whose siblings may be writing there.
        """
        self.directory = directory
        self.tmp_directory = os.path.join(directory, _TMP)
        self._cache: Any = diskcache.Cache(
            directory,
            size_limit=size_limit,
            eviction_policy=_EVICTION_POLICY,
            disk=_MovingDisk,
        )
        self._open_reader()
        os.makedirs(self.tmp_directory, exist_ok=True)
        if not clean:
            return
        # Files here were being written when a previous process died; they can
        # never be committed.  A live writer keeps its open handle, so even a
        # concurrent opener deleting its file does not break its commit.
        for item in os.scandir(self.tmp_directory):
            if item.is_file(follow_symlinks=False) or item.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(item.path)

    def _open_reader(self) -> None:
        """The handle that reads without writing (see the module's rules)."""
        # No settings passed: it takes those saved by the main handle.  The policy
        # is switched off on this handle only (update=False leaves the database's
        # setting alone), which makes diskcache's get a plain SELECT.
        self._reader: Any = diskcache.Cache(self.directory, disk=_MovingDisk)
        self._reader.reset("eviction_policy", "none", update=False)
        self._used: set[str] = set()
        self._used_lock = threading.Lock()

    def lookup(self, key: str) -> list[Entry]:
        """Every stored variant of ``key``; empty if none."""
        self._note_use(_META + key)
        return self._read(key, self._reader)

    def open_body(self, entry: Entry) -> BinaryIO | None:
        """A readable binary file of ``entry``'s body, or None if it was evicted."""
        if entry.body_length == 0:
            return io.BytesIO(b"")
        self._note_use(_BODY + entry.body_id)
        value = self._reader.get(_BODY + entry.body_id, default=None, read=True)
        if isinstance(value, bytes):
            # diskcache returns bytes for a value kept inline in SQLite (not
            # one we stored: read=True always makes a file); serve it all the same.
            body: BinaryIO = io.BytesIO(value)
            length = len(value)
        elif value is None:
            self._forget(entry.key, entry.body_id)
            return None
        else:
            body = value
            length = os.fstat(body.fileno()).st_size
        if length != entry.body_length:
            # A body that is not byte-exact must never be served.
            body.close()
            self._forget(entry.key, entry.body_id)
            self._delete_bodies([entry.body_id])
            return None
        return body

    def begin(self, key: str) -> BodyWriter:
        """Start writing a new body for ``key`` into a temporary file."""
        return BodyWriter(self, key)

    def update(self, entry: Entry) -> bool:
        """Replace the head and times of the variant with ``entry.body_id``.

        The body, its length and the variant's ``vary`` are kept.  False if the
        variant (or its body) no longer exists.
        """
        with self._cache.transact():
            variants = self._read(entry.key)
            ids = [v.body_id for v in variants]
            if entry.body_id not in ids:
                return False
            index = ids.index(entry.body_id)
            stored = variants[index]
            if not self._has_body(stored):
                del variants[index]
                self._write(entry.key, variants)
                return False
            variants[index] = replace(
                stored,
                url=entry.url,
                response=entry.response,
                request_time=entry.request_time,
                response_time=entry.response_time,
            )
            self._write(entry.key, variants)
        return True

    def invalidate(self, key: str) -> int:
        """Remove every variant of ``key`` and its body; return how many."""
        with self._cache.transact():
            variants = self._read(key)
            self._cache.delete(_META + key)
        self._delete_bodies(v.body_id for v in variants)
        return len(variants)

    def entries(self) -> Iterator[Entry]:
        """Every stored entry (listing them does not count as using them)."""
        for name in self._cache:
            if isinstance(name, str) and name.startswith(_META):
                yield from self._read(name[len(_META) :], self._reader)

    def record_use(self, batch: int = 256) -> int:
        """Mark the items read since the last call as used, for LRU eviction, in
        transactions of up to ``batch`` items; return how many were marked."""
        with self._used_lock:
            used, self._used = self._used, set()
        names = sorted(used)
        for start in range(0, len(names), batch):
            with self._cache.transact():
                for name in names[start : start + batch]:
                    # diskcache's get on the LRU handle sets the access time; a
                    # body comes back as an open file, closed at once.
                    value = self._cache.get(name, default=None, read=True)
                    if hasattr(value, "close"):
                        value.close()
        return len(names)

    def _note_use(self, name: str) -> None:
        with self._used_lock:
            self._used.add(name)

    def count(self) -> int:
        """How many URLs are stored (walks the keys; it touches no entry)."""
        return sum(1 for name in self._cache if str(name).startswith(_META))

    def volume(self) -> int:
        """Bytes the store occupies on disk, as diskcache estimates it."""
        return int(self._cache.volume())

    def cull(self) -> int:
        """Evict until within the size limit; return how many items were removed."""
        # Each write culls only a few items, so a busy store can overshoot its
        # budget; the service calls this periodically to catch up.
        return int(self._cache.cull())

    def close(self) -> None:
        """Close the calling thread's database connections."""
        self._cache.close()
        self._reader.close()

    @classmethod
    def open_existing(cls, directory: str) -> Store:
        """Open the store at ``directory`` with the settings saved in it.

        Raises FileNotFoundError if ``directory`` holds no cache (it is never
        created).  Unlike the constructor this leaves C{tmp/} alone, so a running
        proxy's bodies in progress are not touched.
        """
        if not os.path.isfile(os.path.join(directory, diskcache.core.DBNAME)):
            raise FileNotFoundError(f"{directory} is not a cache directory")
        store = cls.__new__(cls)
        store.directory = directory
        store.tmp_directory = os.path.join(directory, _TMP)
        # No settings: diskcache keeps the size limit and policy saved in the
        # directory, where passing them would overwrite the proxy's.
        store._cache = diskcache.Cache(directory, disk=_MovingDisk)
        store._open_reader()
        os.makedirs(store.tmp_directory, exist_ok=True)
        return store

    def size_limit(self) -> int:
        """The disk budget in bytes saved in the cache's settings."""
        return int(self._cache.size_limit)

    def put(self, entry: Entry, body: bytes | BinaryIO) -> Entry:
        """Store ``body`` under ``entry.key`` through L{begin} and commit.

        The body is either bytes or a readable binary file; on any error the
        partial body is aborted, so nothing half-written becomes visible.
        """
        writer = self.begin(entry.key)
        try:
            if isinstance(body, bytes):
                writer.write(body)
            else:
                while chunk := body.read(_CHUNK):
                    writer.write(chunk)
            return writer.commit(entry)
        except BaseException:
            writer.abort()
            raise

    def clear(self) -> int:
        """Remove every stored entry and its body; return how many variants.

        One short transaction per URL, so a proxy using the store meanwhile is
        never blocked for long; other keys (the counters) are kept.
        """
        keys = [
            name[len(_META) :]
            for name in list(self._cache)
            if isinstance(name, str) and name.startswith(_META)
        ]
        return sum(self.invalidate(key) for key in keys)

    def read_counters(self) -> dict[str, int] | None:
        """The counters the proxy recorded, or None if it recorded none."""
        raw = self._cache.get(_COUNTERS, default=None)
        if not isinstance(raw, str):
            return None
        try:
            items = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(items, dict):
            return None
        return {
            str(name): int(value)
            for name, value in items.items()
            if isinstance(value, int) and not isinstance(value, bool)
        }

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        """Add ``deltas`` to the recorded counters in one short transaction."""
        with self._cache.transact():
            counters = self.read_counters() or {}
            for name, delta in deltas.items():
                counters[name] = counters.get(name, 0) + delta
            self._cache.set(_COUNTERS, json.dumps(counters, sort_keys=True))

    def _commit(self, key: str, body: _ReceivedBody, size: int, entry: Entry) -> Entry:
        """Store ``body`` then switch ``key``'s metadata to include ``entry``."""
        stored = replace(entry, key=key, body_id=uuid.uuid4().hex, body_length=size)
        if size:
            body.file.flush()
            self._cache.set(_BODY + stored.body_id, body, read=True)
        try:
            with self._cache.transact():
                variants = self._read(key)
                kept, superseded = _supersede(variants, stored)
                self._write(key, [*kept, stored])
        except BaseException:
            # The metadata never named this body, so it is unreachable: reclaim it
            # now rather than wait for eviction.
            with contextlib.suppress(Exception):
                self._delete_bodies([stored.body_id])
            raise
        # Only after the switch, so no reader is ever pointed at a missing body
        # by us; readers holding an old body keep reading the unlinked file.
        self._delete_bodies(v.body_id for v in superseded)
        return stored

    def _read(self, key: str, handle: Any = None) -> list[Entry]:
        """The variants stored for ``key``, decoded from JSON; read through
        ``handle`` (default: the main handle, as inside its transactions)."""
        raw = (self._cache if handle is None else handle).get(_META + key, default=None)
        if not isinstance(raw, str):
            return []
        try:
            items = json.loads(raw)
            return [_entry_from_json(key, item) for item in items]
        except (ValueError, TypeError, KeyError, AttributeError):
            # Unreadable metadata is a miss; the next commit overwrites it.
            return []

    def _write(self, key: str, variants: list[Entry]) -> None:
        """Store ``variants`` as ``key``'s metadata, or drop it when empty."""
        if variants:
            text = json.dumps([_entry_to_json(v) for v in variants])
            self._cache.set(_META + key, text)
        else:
            self._cache.delete(_META + key)

    def _forget(self, key: str, body_id: str) -> None:
        """Drop the variant of ``key`` whose body is ``body_id``."""
        with self._cache.transact():
            variants = self._read(key)
            kept = [v for v in variants if v.body_id != body_id]
            if len(kept) != len(variants):
                self._write(key, kept)

    def _has_body(self, entry: Entry) -> bool:
        """Whether ``entry``'s body is still stored."""
        return entry.body_length == 0 or (_BODY + entry.body_id) in self._cache

    def _delete_bodies(self, body_ids: Iterable[str]) -> None:
        """Delete the bodies named ``body_ids``; missing ones are ignored."""
        for body_id in body_ids:
            self._cache.delete(_BODY + body_id)


class BodyWriter:
    """A body being received: a temporary file until committed or aborted.

    L{write} runs on the reactor thread and does only a buffered file write;
    L{commit} does the disk and database work and belongs in a worker thread.

    @ivar size: bytes written so far.
    """

    def __init__(self, store: Store, key: str) -> None:
        """Create the temporary file for a body of ``key``."""
        self.size = 0
        self._store = store
        self._key = key
        fd, self._path = tempfile.mkstemp(suffix=".part", dir=store.tmp_directory)
        self._file: BinaryIO = open(fd, "w+b")
        self._state = "open"
        # Guards only state changes, so write() never waits on a commit.
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        """The temporary file the body is being written to (readers may follow it)."""
        return self._path

    def flush(self) -> None:
        """Push written bytes to the file, for readers following it."""
        self._file.flush()

    def write(self, data: bytes) -> None:
        """Append ``data`` to the body."""
        if self._state != "open":
            raise ValueError(f"write to a body writer that is {self._state}")
        self._file.write(data)
        self.size += len(data)

    def commit(self, entry: Entry) -> Entry:
        """Make the body visible with ``entry``'s metadata; return the stored Entry.

        The returned Entry has this writer's key, a new ``body_id`` and
        ``body_length`` equal to L{size}.
        """
        with self._lock:
            if self._state != "open":
                raise ValueError(f"commit of a body writer that is {self._state}")
            self._state = "committing"
        try:
            received = _ReceivedBody(self._file, self._path)
            stored = self._store._commit(self._key, received, self.size, entry)
        except BaseException:
            self._state = "aborted"
            raise
        finally:
            self._discard_file()
        self._state = "committed"
        return stored

    def abort(self) -> None:
        """Discard the body; a no-op if already aborted or committing."""
        with self._lock:
            if self._state != "open":
                return
            self._state = "aborted"
        self._discard_file()

    def _discard_file(self) -> None:
        """Close and remove the temporary file."""
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


def _supersede(variants: list[Entry], new: Entry) -> tuple[list[Entry], list[Entry]]:
    """Split ``variants`` into those kept beside ``new`` and those it replaces."""
    names = _vary_names(new.vary)
    if any(_vary_names(v.vary) != names for v in variants):
        # The response's Vary set changed: the old variants were keyed on
        # different request fields and can no longer be matched reliably.
        return [], variants
    kept = [v for v in variants if v.vary != new.vary]
    superseded = [v for v in variants if v.vary == new.vary]
    return kept, superseded


def _vary_names(vary: Vary) -> tuple[bytes, ...]:
    """The field names of a ``vary`` tuple, in order."""
    return tuple(name for name, _ in vary)


def _text(data: bytes) -> str:
    """``data`` as a str that JSON carries losslessly (latin-1 maps every byte)."""
    return data.decode("latin-1")


def _bytes(text: str) -> bytes:
    """The bytes that L{_text} turned into ``text``."""
    if not isinstance(text, str):
        raise TypeError(f"expected a string, got {type(text).__name__}")
    return text.encode("latin-1")


def _entry_to_json(entry: Entry) -> dict[str, Any]:
    """``entry`` as a JSON-ready dict (its key is implied by where it is stored)."""
    return {
        "vary": [[_text(n), None if v is None else _text(v)] for n, v in entry.vary],
        "url": entry.url,
        "status": entry.response.status,
        "reason": _text(entry.response.reason),
        "headers": [[_text(n), _text(v)] for n, v in entry.response.headers],
        "request_time": entry.request_time,
        "response_time": entry.response_time,
        "body_length": entry.body_length,
        "body_id": entry.body_id,
        "recorded": entry.recorded,
    }


def _entry_from_json(key: str, item: dict[str, Any]) -> Entry:
    """The Entry of ``key`` that L{_entry_to_json} turned into ``item``."""
    headers: Headers = tuple((_bytes(n), _bytes(v)) for n, v in item["headers"])
    vary: Vary = tuple(
        (_bytes(n), None if v is None else _bytes(v)) for n, v in item["vary"]
    )
    return Entry(
        key=key,
        url=str(item["url"]),
        response=ResponseHead(
            status=int(item["status"]),
            reason=_bytes(item["reason"]),
            headers=headers,
        ),
        request_time=float(item["request_time"]),
        response_time=float(item["response_time"]),
        vary=vary,
        body_length=int(item["body_length"]),
        body_id=str(item["body_id"]),
        recorded=bool(item.get("recorded", False)),
    )
