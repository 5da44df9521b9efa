"""BlockManager: block accounting, prefix-cache hits through the hash chain (images included),
LRU eviction of cached blocks, and Sequence.block_key."""

from __future__ import annotations

import pytest

import glmv.engine.block_manager as block_manager_module
from glmv.engine.block_manager import BlockManager
from glmv.engine.sampling import SamplingParams
from glmv.engine.sequence import ImageSpan, Sequence, SequenceStatus
from glmv.errors import InvalidRequestError

BS = 4
IMG = 99  # the placeholder token id every image token shares


def make_seq(tokens: list[int], images: tuple[ImageSpan, ...] = (), rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams(), images=images, eos_token_ids=[0])


def run_prefill(bm: BlockManager, seq: Sequence) -> None:
    """Admit `seq` with its whole prompt, pretend the model computed it, commit."""
    cached = bm.num_cached_prefix_tokens(seq)
    bm.allocate(seq, seq.num_tokens - cached)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)


def slots(bm: BlockManager, seq: Sequence) -> list[int]:
    return [
        seq.block_table[p // bm.block_size] * bm.block_size + p % bm.block_size for p in range(seq.num_tokens)
    ]


# --- Sequence ---------------------------------------------------------------------------------


def test_sequence_basics() -> None:
    seq = Sequence("req", [1, 2, 3], SamplingParams(max_tokens=4), index=1, eos_token_ids=[0, 5])
    other = Sequence("req", [1])
    assert other.seq_id > seq.seq_id and other.arrival > seq.arrival
    assert seq.status is SequenceStatus.WAITING
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens) == (3, 3, 0)
    assert seq.eos_token_ids == frozenset({0, 5})
    seq.append_token(7)
    seq.append_token(8)
    assert seq.token_ids == [1, 2, 3, 7, 8]
    assert seq.prompt_token_ids == [1, 2, 3]
    assert seq.output_token_ids == [7, 8]
    assert seq.last_token_id == 8
    assert seq.num_output_tokens == 2
    assert seq.num_uncomputed_tokens == 5 and seq.is_prefill
    assert not seq.is_finished
    assert seq.block_table == [] and seq.finish_reason is None and seq.num_preemptions == 0


def test_sequence_rejects_bad_input() -> None:
    with pytest.raises(InvalidRequestError):
        Sequence("r", [])
    with pytest.raises(InvalidRequestError):
        Sequence("r", [1, 2, 3], images=[ImageSpan(2, 2, "h")])
    with pytest.raises(InvalidRequestError):
        Sequence("r", [1] * 10, images=[ImageSpan(0, 4, "a"), ImageSpan(3, 2, "b")])


def test_block_key_contains_tokens_and_image_parts() -> None:
    # Image "X" covers positions 2..9: block 0 holds image tokens 0..2, block 1 all of 2..6,
    # block 2 holds 6..8. A second image "Y" starts in block 2.
    tokens = [1, 2] + [IMG] * 8 + [3, 4] + [IMG] * 3 + [5]
    seq = make_seq(tokens, (ImageSpan(2, 8, "X"), ImageSpan(12, 3, "Y")))
    assert seq.block_key(0, BS) == ((1, 2, IMG, IMG), (("X", 0, 2),))
    assert seq.block_key(1, BS) == ((IMG,) * 4, (("X", 2, 6),))
    assert seq.block_key(2, BS) == ((IMG, IMG, 3, 4), (("X", 6, 8),))
    assert seq.block_key(3, BS) == ((IMG, IMG, IMG, 5), (("Y", 0, 3),))
    with pytest.raises(ValueError):
        seq.block_key(4, BS)  # not full
    assert seq.block_key(0, 16) == (tuple(tokens), (("X", 0, 8), ("Y", 0, 3)))
    assert [(s.content_hash, lo, hi) for s, lo, hi in seq.images_in_range(5, 13)] == [
        ("X", 3, 8),
        ("Y", 0, 1),
    ]


# --- plain accounting ---------------------------------------------------------------------------


def test_allocate_append_free_accounting() -> None:
    bm = BlockManager(8, BS)
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (8, 0, 0.0)
    seq = make_seq(list(range(1, 7)))  # 6 tokens -> 2 blocks
    assert bm.can_allocate(seq, 6)
    bm.allocate(seq, 6)
    assert len(seq.block_table) == 2 and seq.num_computed_tokens == 0 and seq.num_cached_tokens == 0
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (6, 2, 0.25)
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    # Slots are distinct and follow the block table.
    assert len(set(slots(bm, seq))) == 6
    seq.num_computed_tokens = 6
    seq.append_token(7)
    assert bm.can_append(seq, 1)
    bm.append_slots(seq, 1)  # position 6 fits in block 1
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 7
    seq.append_token(8)
    bm.append_slots(seq, 1)  # position 7 still fits
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 8
    seq.append_token(9)
    bm.append_slots(seq, 1)  # position 8 needs block 2
    assert len(seq.block_table) == 3 and bm.num_used_blocks == 3
    bm.free(seq)
    assert seq.block_table == []
    assert (bm.num_free_blocks, bm.num_used_blocks) == (8, 0)
    bm.check_consistency()


def test_append_slots_for_a_chunk_spanning_blocks() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(1, 20)))
    bm.allocate(seq, 5)  # first chunk: 5 tokens -> 2 blocks
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 5
    bm.append_slots(seq, 10)  # positions 5..14 -> 4 blocks in all
    assert len(seq.block_table) == 4
    # 5 computed + 27 new = 32 positions -> 8 blocks: 4 more, and 4 are free; 33 need 9.
    assert bm.can_append(seq, 27) is True
    assert bm.can_append(seq, 28) is False


def test_out_of_blocks_raises_without_side_effects() -> None:
    bm = BlockManager(2, BS)
    seq = make_seq(list(range(1, 10)))  # needs 3 blocks
    assert not bm.can_allocate(seq, 9)
    with pytest.raises(RuntimeError):
        bm.allocate(seq, 9)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    bm.allocate(seq, 8)
    with pytest.raises(RuntimeError):
        bm.append_slots(seq, 9)
    assert len(seq.block_table) == 2
    with pytest.raises(RuntimeError):
        bm.allocate(seq, 1)  # already has blocks


def test_invalid_construction() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


# --- prefix caching -------------------------------------------------------------------------------


def test_commit_registers_only_full_computed_blocks() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq(list(range(1, 11)))  # 10 tokens: 2 full blocks + 2 tokens
    bm.allocate(seq, 10)
    bm.commit(seq)  # nothing computed yet
    assert bm.num_cached_blocks == 0
    seq.num_computed_tokens = 5
    bm.commit(seq)
    assert bm.num_cached_blocks == 1 and bm.is_cached(seq.block_table[0])
    seq.num_computed_tokens = 10
    bm.commit(seq)
    assert bm.num_cached_blocks == 2
    assert not bm.is_cached(seq.block_table[2])  # partial block is never cached
    assert seq.num_committed_blocks == 2
    bm.check_consistency()


def test_prefix_hit_shares_blocks_and_sets_counts() -> None:
    bm = BlockManager(16, BS)
    a = make_seq(list(range(1, 11)), rid="a")  # 2 full blocks + 2
    run_prefill(bm, a)
    b = make_seq([*list(range(1, 9)), 50, 51, 52, 53, 54], rid="b")  # shares 2 blocks, then differs
    assert bm.num_cached_prefix_tokens(b) == 8
    assert bm.prefix_cache_queries == 10 and bm.prefix_cache_hits == 0  # lookups have no side effects
    assert bm.can_allocate(b, 5)
    bm.allocate(b, 5)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert [bm.ref_count(x) for x in b.block_table] == [2, 2, 1, 1]
    assert bm.num_used_blocks == 3 + 2
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (10 + 13, 8)
    assert bm.prefix_cache_hit_rate == pytest.approx(8 / 23)
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1, 1]
    # a's third block had no hash: back on the free list, not evictable.
    assert bm.num_evictable_blocks == 0
    bm.free(b)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 16
    assert bm.num_evictable_blocks == 2  # the two shared cached blocks
    bm.check_consistency()


def test_no_hit_on_uncommitted_or_partial_blocks() -> None:
    bm = BlockManager(16, BS)
    a = make_seq(list(range(1, 10)))
    bm.allocate(a, 9)  # allocated but not computed/committed
    b = make_seq(list(range(1, 10)))
    assert bm.num_cached_prefix_tokens(b) == 0
    a.num_computed_tokens = 9
    bm.commit(a)
    assert bm.num_cached_prefix_tokens(b) == 8  # 2 full blocks; the partial third never
    c = make_seq(list(range(1, 8)))  # 7 tokens: only 1 full block of its own
    assert bm.num_cached_prefix_tokens(c) == 4


def test_hit_cap_leaves_the_last_token_to_compute() -> None:
    bm = BlockManager(16, BS)
    a = make_seq(list(range(1, 9)))  # exactly 2 full blocks
    run_prefill(bm, a)
    assert bm.num_cached_blocks == 2
    same = make_seq(list(range(1, 9)))
    # Both blocks are cached, but the last token must be computed to sample: only block 0 hits.
    assert bm.num_cached_prefix_tokens(same) == 4
    bm.allocate(same, 4)
    assert same.num_computed_tokens == 4
    assert same.block_table[0] == a.block_table[0]
    assert same.block_table[1] != a.block_table[1]
    longer = make_seq(list(range(1, 10)))
    assert bm.num_cached_prefix_tokens(longer) == 8
    one_block = make_seq(list(range(1, 5)))
    assert bm.num_cached_prefix_tokens(one_block) == 0


def test_same_tokens_different_image_misses_same_image_hits() -> None:
    bm = BlockManager(32, BS)
    tokens = [1, 2, 3, 4] + [IMG] * 8 + [5, 6, 7, 8, 9]
    a = make_seq(tokens, (ImageSpan(4, 8, "cat"),))
    run_prefill(bm, a)
    assert bm.num_cached_blocks == 4
    other_image = make_seq(tokens, (ImageSpan(4, 8, "dog"),))
    assert bm.num_cached_prefix_tokens(other_image) == 4  # only the text block before the image
    same_image = make_seq(tokens, (ImageSpan(4, 8, "cat"),))
    assert bm.num_cached_prefix_tokens(same_image) == 16
    no_image = make_seq(tokens)
    assert bm.num_cached_prefix_tokens(no_image) == 4


def test_partial_image_overlap_is_part_of_the_key() -> None:
    bm = BlockManager(32, BS)
    # Image covers positions 2..5: block 0 has image tokens [0, 2), block 1 has [2, 4).
    tokens = [1, 2] + [IMG] * 4 + [IMG, IMG] + [3, 4, 5, 6, 7]
    a = make_seq(tokens, (ImageSpan(2, 4, "cat"),))
    run_prefill(bm, a)
    # Same token ids, same image, but the image is longer (covers 2..7): block 0 still matches
    # (cat [0, 2)), block 1 covers cat [2, 6) instead of [2, 4) plus two text tokens -> miss.
    longer = make_seq(tokens, (ImageSpan(2, 6, "cat"),))
    assert bm.num_cached_prefix_tokens(longer) == 4
    # Same image id but starting one token later: block 0 covers cat [0, 1) -> miss at once.
    shifted = make_seq(tokens, (ImageSpan(3, 4, "cat"),))
    assert bm.num_cached_prefix_tokens(shifted) == 0
    same = make_seq(tokens, (ImageSpan(2, 4, "cat"),))
    assert bm.num_cached_prefix_tokens(same) == 12


def test_chain_hash_covers_the_whole_prefix() -> None:
    bm = BlockManager(32, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    run_prefill(bm, a)
    # Same second block, different first block: the second block must not hit either.
    b = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert bm.num_cached_prefix_tokens(b) == 0


def test_key_is_verified_on_hash_collision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager_module, "chain_hash", lambda parent, key: b"same-for-all")
    bm = BlockManager(16, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    run_prefill(bm, a)
    assert bm.num_cached_blocks == 1  # the second block collides with the first: not registered
    b = make_seq([4, 3, 2, 1, 5, 6, 7, 8, 9])
    assert bm.num_cached_prefix_tokens(b) == 0  # hash matches, key does not
    c = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.num_cached_prefix_tokens(c) == 4
    bm.check_consistency()


def test_evictable_blocks_count_as_free_and_lru_order() -> None:
    bm = BlockManager(6, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], rid="a")  # 2 full blocks + 1
    b = make_seq([11, 12, 13, 14, 15, 16, 17, 18, 19], rid="b")
    run_prefill(bm, a)
    run_prefill(bm, b)
    a0, a1, a2 = a.block_table
    b0, b1, b2 = b.block_table
    bm.free(a)
    bm.free(b)
    # Tail blocks are freed first, so they are evicted first; a before b.
    assert bm.evictable_block_ids() == [a1, a0, b1, b0]
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 0 and bm.num_evictable_blocks == 4
    # Fresh blocks come from the plain free list first (a2 and b2), keeping the cache.
    c = make_seq([30] * 8)
    bm.allocate(c, 8)
    assert sorted(c.block_table) == sorted([a2, b2])
    assert bm.num_evictions == 0
    d = make_seq([40] * 4)
    bm.allocate(d, 4)  # evicts the least recently used: a1
    assert d.block_table == [a1]
    assert bm.num_evictions == 1
    assert bm.evictable_block_ids() == [a0, b1, b0]
    a_again = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.num_cached_prefix_tokens(a_again) == 4  # block 0 still cached, block 1 gone
    b_again = make_seq([11, 12, 13, 14, 15, 16, 17, 18, 19])
    assert bm.num_cached_prefix_tokens(b_again) == 8
    bm.check_consistency()


def test_hit_on_evictable_block_refreshes_recency() -> None:
    bm = BlockManager(4, BS)
    a = make_seq([1, 2, 3, 4, 5], rid="a")
    b = make_seq([6, 7, 8, 9, 10], rid="b")
    run_prefill(bm, a)
    run_prefill(bm, b)
    a0, b0 = a.block_table[0], b.block_table[0]
    bm.free(a)
    bm.free(b)
    assert bm.evictable_block_ids() == [a0, b0]
    again = make_seq([1, 2, 3, 4, 99])
    bm.allocate(again, 1)
    assert again.block_table[0] == a0 and bm.ref_count(a0) == 1
    assert bm.evictable_block_ids() == [b0]  # taken out of the LRU while in use
    assert bm.num_used_blocks == 2
    bm.free(again)
    assert bm.evictable_block_ids() == [b0, a0]  # now the most recently used
    bm.check_consistency()


def test_can_allocate_counts_hits_on_evictable_blocks_once() -> None:
    bm = BlockManager(4, BS)
    a = make_seq(list(range(1, 14)))  # 3 full blocks + 1 token
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_evictable_blocks == 3 and bm.num_free_blocks == 4
    # 16 tokens: hits 3 blocks (cap leaves the last token), needs 1 more; 1 truly available.
    b = make_seq([*list(range(1, 13)), 70, 71, 72, 73])
    assert bm.num_cached_prefix_tokens(b) == 12
    assert bm.can_allocate(b, 4)
    # 20 tokens: hits 3, needs 2 more, but only 1 block is left once the hits are taken.
    c = make_seq(list(range(1, 13)) + [70] * 8)
    assert not bm.can_allocate(c, 8)
    bm.allocate(b, 4)
    assert bm.num_used_blocks == 4 and bm.num_free_blocks == 0
    assert b.num_computed_tokens == 12
    bm.check_consistency()


def test_identical_content_computed_twice_is_cached_once() -> None:
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5], rid="a")
    b = make_seq([1, 2, 3, 4, 5], rid="b")
    bm.allocate(a, 5)
    bm.allocate(b, 5)  # nothing committed yet: no hit, both compute block 0
    for seq in (a, b):
        seq.num_computed_tokens = 5
        bm.commit(seq)
    assert bm.num_cached_blocks == 1
    assert bm.is_cached(a.block_table[0]) and not bm.is_cached(b.block_table[0])
    a0 = a.block_table[0]
    bm.free(b)
    assert bm.num_evictable_blocks == 0  # b's copy went back to the free list
    bm.free(a)
    assert bm.evictable_block_ids() == [a0]
    bm.check_consistency()


def test_generated_tokens_are_cached_too() -> None:
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3])
    bm.allocate(a, 3)
    for tok in (10, 11, 12, 13, 14):
        a.num_computed_tokens = a.num_tokens
        bm.commit(a)
        a.append_token(tok)
        bm.append_slots(a, 1)
    a.num_computed_tokens = a.num_tokens  # [1,2,3,10, 11,12,13,14] computed
    bm.commit(a)
    assert bm.num_cached_blocks == 2
    follow_up = make_seq([1, 2, 3, 10, 11, 12, 13, 14, 20])
    assert bm.num_cached_prefix_tokens(follow_up) == 8


def test_reset_prefix_cache() -> None:
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], rid="a")
    b = make_seq([11, 12, 13, 14, 15], rid="b")
    run_prefill(bm, a)
    run_prefill(bm, b)
    bm.free(a)
    assert bm.num_evictable_blocks == 2
    assert bm.reset_prefix_cache() is True
    assert bm.num_evictable_blocks == 0 and bm.num_cached_blocks == 0
    assert bm.num_used_blocks == 2  # b keeps its blocks
    assert bm.num_cached_prefix_tokens(make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])) == 0
    assert bm.num_cached_prefix_tokens(make_seq([11, 12, 13, 14, 15])) == 0
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.num_evictable_blocks == 0
    bm.check_consistency()
    # Caching works again afterwards.
    run_prefill(bm, make_seq([1, 2, 3, 4, 5]))
    assert bm.num_cached_prefix_tokens(make_seq([1, 2, 3, 4, 6])) == 4


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    run_prefill(bm, a)
    assert bm.num_cached_blocks == 0
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.num_cached_prefix_tokens(b) == 0
    bm.allocate(b, 9)
    assert b.num_computed_tokens == 0 and b.num_cached_tokens == 0
    assert not set(a.block_table) & set(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_evictable_blocks == 0 and bm.num_free_blocks == 8
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)
    bm.check_consistency()


def test_readmission_after_preemption_reuses_own_blocks_without_touching_stats() -> None:
    bm = BlockManager(8, BS)
    a = make_seq([1, 2, 3, 4, 5, 6])
    run_prefill(bm, a)
    a.append_token(7)
    a.append_token(8)  # pretend two outputs were generated and computed up to 7 tokens
    bm.append_slots(a, 1)
    a.num_computed_tokens = 7
    bm.commit(a)
    queries, hits = bm.prefix_cache_queries, bm.prefix_cache_hits
    bm.free(a)  # preempted by recompute
    a.num_computed_tokens = 0
    a.num_preemptions = 1
    bm.allocate(a, a.num_tokens - bm.num_cached_prefix_tokens(a))
    assert a.num_computed_tokens == 4  # cap: 8 tokens -> 1 block reused, last block recomputed
    assert a.num_cached_tokens == 0  # still what the first admission got
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (queries, hits)
