"""Paged KV-cache accounting: which physical blocks each sequence uses, with automatic prefix caching.

The KV cache is `num_blocks` blocks of `block_size` token slots. Token position `p` of a sequence
lives in slot `block_table[p // block_size] * block_size + p % block_size`.

Prefix caching: once a block is full and its KV computed (`commit`), it is registered under a hash
chain `h_i = H(h_{i-1}, block_key(i))`, where the key holds the block's token ids and the identity
(content hash and covered part) of any image overlapping it. A new sequence whose leading full blocks
hash the same reuses those blocks instead of recomputing them. Blocks nobody references but that
hold cached content stay *evictable*: they count as free, and the least recently used one is
recycled when a fresh block is needed and the plain free list is empty.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass

from glmv.engine.sequence import BlockKey, Sequence

_ROOT_HASH = b"glmv-prefix-root"


def chain_hash(parent: bytes, key: BlockKey) -> bytes:
    """H(parent, key): 128-bit BLAKE2b over the parent hash and an unambiguous encoding of the key."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(repr(key).encode())
    return h.digest()


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while registered in the prefix cache
    parent_hash: bytes | None = None
    key: BlockKey | None = None


class BlockManager:
    """Allocates KV blocks to sequences; shares full, computed blocks between equal prefixes."""

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Unreferenced blocks without cached content, handed out first.
        self._free: deque[int] = deque(range(num_blocks))
        # Unreferenced blocks with cached content, least recently used first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[bytes, int] = {}
        # Bumped whenever _hash_to_block changes; keys the memo of the last lookup.
        self._cache_version = 0
        self._lookup_memo: tuple[tuple[int, int, int], list[int]] | None = None
        self.prefix_cache_queries = 0  # prompt tokens looked up at first admission
        self.prefix_cache_hits = 0  # of those, tokens served from the cache
        self.num_evictions = 0

    # --- accounting ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence could get now: plain free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or evictable)."""
        return len(self._hash_to_block)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def is_cached(self, block_id: int) -> bool:
        return self._blocks[block_id].hash is not None

    def evictable_block_ids(self) -> list[int]:
        """Evictable blocks, the next one to be evicted first."""
        return list(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix lookup ------------------------------------------------------------------------

    def _block_key(self, seq: Sequence, i: int) -> BlockKey:
        keys = seq.block_keys
        while len(keys) <= i:
            keys.append(seq.block_key(len(keys), self.block_size))
        return keys[i]

    def _block_hash(self, seq: Sequence, i: int) -> bytes:
        hashes = seq.block_hashes
        while len(hashes) <= i:
            j = len(hashes)
            parent = hashes[j - 1] if j else _ROOT_HASH
            hashes.append(chain_hash(parent, self._block_key(seq, j)))
        return hashes[i]

    def _lookup(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the sequence's leading full blocks, capped so that at least the
        last token is left to compute (its logits are needed to sample)."""
        if not self.enable_prefix_caching:
            return []
        # The scheduler asks several times per admission; the answer only changes with the cache.
        memo_key = (seq.seq_id, seq.num_tokens, self._cache_version)
        if self._lookup_memo is not None and self._lookup_memo[0] == memo_key:
            return list(self._lookup_memo[1])
        hits: list[int] = []
        parent = _ROOT_HASH
        for i in range((seq.num_tokens - 1) // self.block_size):
            h = self._block_hash(seq, i)
            block_id = self._hash_to_block.get(h)
            if block_id is None:
                break
            block = self._blocks[block_id]
            # A hash match is verified against the stored content, ruling out collisions.
            if block.parent_hash != parent or block.key != self._block_key(seq, i):
                break
            hits.append(block_id)
            parent = h
        self._lookup_memo = (memo_key, hits)
        return list(hits)

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """Leading tokens of a waiting `seq` the prefix cache could serve now (no side effects)."""
        return len(self._lookup(seq)) * self.block_size

    # --- allocation ---------------------------------------------------------------------------

    def _blocks_for_new_seq(self, hits: list[int], num_new_tokens: int) -> tuple[int, int]:
        """(fresh blocks needed, free blocks usable for them) for admitting with these hits."""
        needed = self.blocks_needed(len(hits) * self.block_size + num_new_tokens) - len(hits)
        # Hits on evictable blocks take them out of the free pool.
        reclaimed = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        return needed, self.num_free_blocks - reclaimed

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether a waiting `seq` can be admitted with `num_new_tokens` slots beyond its cache hits."""
        needed, available = self._blocks_for_new_seq(self._lookup(seq), num_new_tokens)
        return needed <= available

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """First admission (or re-admission after preemption) of `seq`: take the prefix-cache hits,
        set `num_computed_tokens` to the tokens they cover, then allocate `num_new_tokens` slots."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} already has blocks")
        hits = self._lookup(seq)
        needed, available = self._blocks_for_new_seq(hits, num_new_tokens)
        if needed > available:
            raise RuntimeError(f"not enough free KV blocks for {seq!r}: need {needed}, have {available}")
        for block_id in hits:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._evictable[block_id]
            block.ref_count += 1
        num_hit_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = num_hit_tokens
            if self.enable_prefix_caching:
                self.prefix_cache_queries += seq.num_tokens
                self.prefix_cache_hits += num_hit_tokens
        seq.block_table = hits
        seq.num_computed_tokens = num_hit_tokens
        seq.num_committed_blocks = len(hits)
        for _ in range(needed):
            seq.block_table.append(self._take_block())

    def _take_block(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            self._uncache(self._blocks[block_id])
            self.num_evictions += 1
        self._blocks[block_id].ref_count = 1
        return block_id

    def _uncache(self, block: _Block) -> None:
        if block.hash is not None and self._hash_to_block.get(block.hash) == block.block_id:
            del self._hash_to_block[block.hash]
            self._cache_version += 1
        block.hash = block.parent_hash = block.key = None

    def _num_slots_missing(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, self.blocks_needed(seq.num_scheduled_tokens + num_new_tokens) - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._num_slots_missing(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table to cover positions up to `num_scheduled_tokens + num_new_tokens`
        (the computed tokens plus those of steps in flight, then the new ones)."""
        missing = self._num_slots_missing(seq, num_new_tokens)
        if missing > self.num_free_blocks:
            raise RuntimeError(
                f"not enough free KV blocks for {seq!r}: need {missing}, have {self.num_free_blocks}"
            )
        for _ in range(missing):
            seq.block_table.append(self._take_block())

    def commit(self, seq: Sequence) -> None:
        """Register every block of `seq` that became full and computed since the last commit."""
        num_full = min(seq.num_computed_tokens, seq.num_tokens, len(seq.block_table) * self.block_size)
        num_full //= self.block_size
        if not self.enable_prefix_caching:
            seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)
            return
        for i in range(seq.num_committed_blocks, num_full):
            block = self._blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            h = self._block_hash(seq, i)
            # Another sequence may have computed the same content at the same time; the first one
            # registered stays the shared copy, this one is simply not cached.
            if h in self._hash_to_block:
                continue
            block.hash = h
            block.parent_hash = self._block_hash(seq, i - 1) if i else _ROOT_HASH
            block.key = self._block_key(seq, i)
            self._hash_to_block[h] = block.block_id
            self._cache_version += 1
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references. Its cached blocks become evictable, tail blocks first in line
        (a prompt's tail is the part least likely to be shared)."""
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table = []
        seq.num_committed_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Forget all cached content. Evictable blocks return to the free list; blocks in use keep
        their KV for their sequences but are no longer shared. Always succeeds (returns True)."""
        for block in self._blocks:
            if block.hash is not None:
                self._uncache(block)
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._hash_to_block.clear()
        self._cache_version += 1
        return True

    def check_consistency(self) -> None:
        """Assert the internal invariants (for tests and debugging)."""
        free = set(self._free)
        evictable = set(self._evictable)
        assert len(free) == len(self._free), "duplicate block in the free list"
        assert not free & evictable, "block both free and evictable"
        for block in self._blocks:
            if block.ref_count > 0:
                assert block.block_id not in free and block.block_id not in evictable
            else:
                assert block.ref_count == 0
                in_free = block.block_id in free
                assert in_free != (block.block_id in evictable)
                assert in_free == (block.hash is None)
            if block.hash is not None:
                assert self._hash_to_block.get(block.hash) == block.block_id
        for h, block_id in self._hash_to_block.items():
            assert self._blocks[block_id].hash == h
        assert self.num_free_blocks + self.num_used_blocks == self.num_blocks
