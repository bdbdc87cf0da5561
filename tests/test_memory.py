"""The memory tier: snapshots, bodies, budget and coherence (pure unit tests)."""

from __future__ import annotations

from cacheproxy.memory import MemoryTier
from cacheproxy.model import Entry, ResponseHead


def _entry(body_id: str, headers=((b"Age", b"5"), (b"X-A", b"1"))) -> Entry:
    return Entry(
        key="http://h/",
        url="http://h/",
        response=ResponseHead(200, b"OK", headers),
        request_time=0.0,
        response_time=0.0,
        body_id=body_id,
        body_length=3,
    )


def test_snapshot_is_trusted_for_ttl_only():
    """A snapshot is used within its ttl and read again from the store after it."""
    tier = MemoryTier(1 << 20, ttl=1.0)
    tier.remember("k", [_entry("b")], now=100.0)
    assert tier.snapshot("k", now=100.5) is not None
    assert tier.snapshot("k", now=101.5) is None


def test_forget_drops_the_snapshot_but_not_bodies():
    """After this process changes the store, the snapshot goes; bodies by id stay."""
    tier = MemoryTier(1 << 20)
    tier.remember("k", [_entry("b")], now=0.0)
    tier.keep_body("b", b"abc")
    tier.forget("k")
    assert tier.snapshot("k", now=0.0) is None
    assert tier.body("b") == b"abc"


def test_budget_evicts_least_recently_used_bodies():
    """Past the budget the least recently used body is dropped first."""
    tier = MemoryTier(24000, max_item=2000)
    for name in "abcdefghijklmnop":
        tier.keep_body(name, b"x" * 1500)
    assert tier.body("a") is None
    assert tier.body("p") is not None
    assert tier.size <= tier.capacity


def test_large_bodies_are_not_kept():
    """Bodies over max_item stay on disk only."""
    tier = MemoryTier(1 << 20, max_item=10)
    tier.keep_body("big", b"x" * 11)
    assert tier.body("big") is None


def test_disabled_tier_keeps_nothing():
    """--memory-cache 0 turns the tier off."""
    tier = MemoryTier(0)
    tier.remember("k", [_entry("b")], now=0.0)
    tier.keep_body("b", b"abc")
    assert tier.snapshot("k", now=0.0) is None
    assert tier.body("b") is None


def test_header_block_leaves_out_age():
    """The pre-encoded header block has every stored field but Age."""
    tier = MemoryTier(1 << 20)
    entry = _entry("b")
    tier.keep_body("b", b"abc")
    assert tier.header_block(entry) == b"X-A: 1\r\n"
    assert tier.header_block(entry) is tier.header_block(entry)
