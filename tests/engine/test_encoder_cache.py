"""EncoderCache: byte-bounded LRU with hit/miss counters."""

from __future__ import annotations

import pytest

from glmv.engine.encoder_cache import EncoderCache


def test_get_put_and_counters() -> None:
    cache = EncoderCache(100)
    assert cache.get("a:1") is None
    assert (cache.hits, cache.misses) == (0, 1)
    value = object()
    assert cache.put("a:1", value, 40)
    assert cache.get("a:1") is value
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.hit_rate == 0.5
    assert "a:1" in cache and "b:1" not in cache
    assert len(cache) == 1
    assert cache.used_bytes == 40
    # Membership tests do not count.
    assert (cache.hits, cache.misses) == (1, 1)


def test_lru_eviction_until_it_fits() -> None:
    cache = EncoderCache(100)
    cache.put("a", "A", 30)
    cache.put("b", "B", 30)
    cache.put("c", "C", 30)
    assert cache.keys() == ["a", "b", "c"]
    assert cache.get("a") == "A"  # a becomes most recently used
    assert cache.keys() == ["b", "c", "a"]
    cache.put("d", "D", 50)  # needs 50, has 10: evicts b then c
    assert cache.keys() == ["a", "d"]
    assert cache.used_bytes == 80
    assert cache.evictions == 2
    assert cache.get("b") is None and cache.get("c") is None
    cache.put("e", "E", 20)  # fits exactly
    assert cache.used_bytes == 100
    assert cache.keys() == ["a", "d", "e"]


def test_contains_does_not_refresh_recency() -> None:
    cache = EncoderCache(60)
    cache.put("a", 1, 30)
    cache.put("b", 2, 30)
    assert "a" in cache
    cache.put("c", 3, 30)
    assert "a" not in cache and "b" in cache and "c" in cache


def test_too_large_entry_is_not_stored_and_cache_untouched() -> None:
    cache = EncoderCache(100)
    cache.put("a", 1, 60)
    assert not cache.put("big", 2, 101)
    assert "big" not in cache
    assert cache.keys() == ["a"] and cache.used_bytes == 60
    assert cache.put("exact", 3, 100)
    assert cache.keys() == ["exact"] and cache.used_bytes == 100


def test_replacing_a_key_updates_size() -> None:
    cache = EncoderCache(100)
    cache.put("a", 1, 60)
    cache.put("b", 2, 20)
    cache.put("a", 3, 70)  # replaces a (60 -> 70): 90 used, nothing evicted
    assert cache.get("a") == 3
    assert cache.used_bytes == 90 and len(cache) == 2
    assert cache.keys() == ["b", "a"]


def test_zero_capacity_and_zero_size() -> None:
    cache = EncoderCache(0)
    assert not cache.put("a", 1, 1)
    assert cache.put("z", 0, 0)
    assert len(cache) == 1 and cache.used_bytes == 0


def test_clear_keeps_counters() -> None:
    cache = EncoderCache(100)
    cache.put("a", 1, 10)
    cache.get("a")
    cache.clear()
    assert len(cache) == 0 and cache.used_bytes == 0
    assert cache.get("a") is None
    assert (cache.hits, cache.misses) == (1, 1)


def test_invalid_sizes() -> None:
    with pytest.raises(ValueError):
        EncoderCache(-1)
    with pytest.raises(ValueError):
        EncoderCache(10).put("a", 1, -1)
