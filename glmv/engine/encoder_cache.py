"""LRU cache of vision-encoder outputs, bounded in bytes.

Keys are strings (the runner uses f"{content_hash}:{preprocessing_key}"), so the same image sent
again (a follow-up turn, a retry, another user) skips the vision encoder. Values are opaque here
(tensors at run time); the caller states each value's size. Thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class EncoderCache:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: str) -> object | None:
        """The value for `key` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, value: object, nbytes: int) -> bool:
        """Store `value`, evicting least recently used entries until it fits. A value larger than
        the whole capacity is not stored (returns False; the cache is left unchanged)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        with self._lock:
            if nbytes > self.capacity_bytes:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self.used_bytes -= old[1]
            while self.used_bytes + nbytes > self.capacity_bytes:
                _, (_, evicted_bytes) = self._entries.popitem(last=False)
                self.used_bytes -= evicted_bytes
                self.evictions += 1
            self._entries[key] = (value, nbytes)
            self.used_bytes += nbytes
            return True

    def __contains__(self, key: object) -> bool:
        """Membership test that neither counts a hit/miss nor refreshes recency."""
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.used_bytes = 0
