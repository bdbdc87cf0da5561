"""The memory tier: hot small responses kept in RAM, so a hit touches no disk.

Rules of this module:
- It holds two things, both LRU-bounded by one byte budget: each URL's stored
  variants as last read from the store (a *snapshot*), and small bodies by body id
  with their header block pre-encoded.
- Snapshots may use an eighth of the budget, bodies the rest, so that many URLs
  seen once (misses) cannot push the hot bodies out.
- Coherence: this process tells the tier of every change it makes to the store
  (commit, 304 update, invalidation, purge): the URL's snapshot is dropped.  Changes
  made by other processes on the same cache directory (other workers, the
  ``cacheproxy`` command) are seen within ``2 * ttl`` seconds (one second): a
  snapshot older than ``ttl`` is read again from the store behind the request
  that finds it, and one older than ``2 * ttl`` before the request is answered.
  A body never changes under its id, so bodies need no such check.
- Per kept body it also keeps what serving it needs besides the bytes (L{Hot}):
  the encoded header block and the entry's L{policy.PlainReuse}, worked out once
  per entry as read from the store, so a hit repeats no parsing.
- It imports only the standard library, L{cacheproxy.model} and the pure
  L{cacheproxy.policy}; no I/O at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from cacheproxy import policy
from cacheproxy.model import Entry, header_value

# What a snapshot or a body costs beyond its bytes: dicts, tuples, the entry.
_OVERHEAD = 512


@dataclass(frozen=True)
class Hot:
    """A kept body with everything else needed to send it.

    @ivar entry: the stored entry this was worked out for (compared by identity).
    @ivar body: the body bytes.
    @ivar block: the stored header fields, encoded, less Age.
    @ivar reuse: when the entry answers plain requests (L{policy.plain_reuse}).
    @ivar content_type: the Content-Type value, for the access log.
    """

    entry: Entry
    body: bytes
    block: bytes
    reuse: policy.PlainReuse
    content_type: bytes | None


class MemoryTier:
    """URL snapshots and small bodies in RAM, least recently used evicted first.

    @ivar capacity: the byte budget for snapshots and bodies together.
    @ivar max_item: bodies larger than this are not kept.
    @ivar ttl: seconds a snapshot is trusted before the store is asked again.
    """

    SNAPSHOT_SHARE = 8

    def __init__(
        self,
        capacity: int,
        max_item: int = 256 * 1024,
        ttl: float = 0.5,
        *,
        heuristic_cap: float = 86400.0,
    ):
        self.capacity = capacity
        self.max_item = max_item
        self.ttl = ttl
        self.heuristic_cap = heuristic_cap
        self._snapshot_bytes = 0
        self._body_bytes = 0
        self._snapshots: OrderedDict[str, tuple[float, tuple[Entry, ...], int]] = (
            OrderedDict()
        )
        self._bodies: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
        self._hot: dict[str, Hot] = {}

    @property
    def enabled(self) -> bool:
        """Whether the tier has any room at all (``--memory-cache 0`` turns it off)."""
        return self.capacity > 0

    def snapshot(self, key: str, now: float) -> tuple[Entry, ...] | None:
        """The URL's variants if they were read from the store within ``ttl``."""
        found = self.last_snapshot(key, now)
        if found is None or not found[1]:
            return None
        return found[0]

    def last_snapshot(
        self, key: str, now: float
    ) -> tuple[tuple[Entry, ...], bool] | None:
        """The URL's variants as last read, and whether that was within ``ttl``.

        A snapshot older than twice ``ttl`` is not returned at all: only a URL in
        steady use may be answered from a snapshot while it is read again behind.
        """
        slot = self._snapshots.get(key)
        if slot is None:
            return None
        age = now - slot[0]
        if age > 2 * self.ttl:
            return None
        self._snapshots.move_to_end(key)
        return slot[1], age <= self.ttl

    def remember(self, key: str, entries: Sequence[Entry], now: float) -> None:
        """Keep the URL's variants as just read from the store."""
        if not self.enabled:
            return
        self.forget(key)
        cost = _OVERHEAD + sum(_entry_cost(entry) for entry in entries)
        self._snapshots[key] = (now, tuple(entries), cost)
        self._snapshot_bytes += cost
        self._evict()

    def forget(self, key: str) -> None:
        """Drop the URL's snapshot: this process changed what the store holds."""
        slot = self._snapshots.pop(key, None)
        if slot is not None:
            self._snapshot_bytes -= slot[2]

    def body(self, body_id: str) -> bytes | None:
        """A kept body, or None."""
        kept = self._bodies.get(body_id)
        if kept is None:
            return None
        self._bodies.move_to_end(body_id)
        return kept[0]

    def keep_body(self, body_id: str, body: bytes) -> None:
        """Keep a small body under its id."""
        if not self.enabled or len(body) > self.max_item or body_id in self._bodies:
            return
        cost = _OVERHEAD + len(body)
        self._bodies[body_id] = (body, cost)
        self._body_bytes += cost
        self._evict()

    def header_block(self, entry: Entry) -> bytes:
        """``entry``'s stored header fields, encoded once per entry and reused."""
        hot = self.hot(entry)
        return _encoded(entry) if hot is None else hot.block

    def hot(self, entry: Entry) -> Hot | None:
        """``entry`` ready to send, if its body is kept (and then kept with it)."""
        cached = self._hot.get(entry.body_id)
        if cached is not None and cached.entry is entry:
            self._bodies.move_to_end(entry.body_id)
            return cached
        body = self.body(entry.body_id)
        if body is None:
            return None
        hot = Hot(
            entry,
            body,
            _encoded(entry),
            policy.plain_reuse(entry, heuristic_cap=self.heuristic_cap),
            header_value(entry.response.headers, b"content-type"),
        )
        self._hot[entry.body_id] = hot
        return hot

    @property
    def size(self) -> int:
        """Bytes in use now (an estimate)."""
        return self._snapshot_bytes + self._body_bytes

    def _evict(self) -> None:
        """Drop least recently used snapshots and bodies, each within its share."""
        snapshot_room = self.capacity // self.SNAPSHOT_SHARE
        while self._snapshot_bytes > snapshot_room and self._snapshots:
            _, (_, _, cost) = self._snapshots.popitem(last=False)
            self._snapshot_bytes -= cost
        body_room = self.capacity - snapshot_room
        while self._body_bytes > body_room and self._bodies:
            body_id, (_, cost) = self._bodies.popitem(last=False)
            self._hot.pop(body_id, None)
            self._body_bytes -= cost


def _entry_cost(entry: Entry) -> int:
    """The bytes an entry's head roughly takes in memory."""
    return _OVERHEAD + sum(len(n) + len(v) + 64 for n, v in entry.response.headers)


def _encoded(entry: Entry) -> bytes:
    """The stored header fields as sent, less Age (the one that changes per use)."""
    return b"".join(
        b"%s: %s\r\n" % (name, value)
        for name, value in entry.response.headers
        if name.lower() != b"age"
    )
