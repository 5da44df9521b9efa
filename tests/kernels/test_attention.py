"""The attention references, the GPU kernel's partitioning (emulated in torch) and the decode
graph inputs, checked against plain causal attention on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from glmv.engine.runner import decode_graph_inputs
from glmv.engine.scheduler import ScheduledChunk
from glmv.engine.sequence import Sequence
from glmv.kernels.attention import paged_attention_reference, split_decode_reference, write_kv_reference
from glmv.kernels.metadata import AttentionMetadata


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int, scale: float) -> torch.Tensor:
    """q [n, H, D] at positions first_pos…; k, v [L, Hkv, D] contiguous history."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    out = torch.empty_like(q)
    for j in range(q.shape[0]):
        upto = first_pos + j + 1
        w = torch.softmax(torch.einsum("hd,thd->ht", q[j], k[:upto]) * scale, dim=-1)
        out[j] = torch.einsum("ht,thd->hd", w, v[:upto])
    return out


def _paged(lens: list[int], block_size: int, kv_heads: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(n / block_size) for n in lens]
    perm = torch.randperm(sum(blocks) + 3, generator=gen).tolist()
    tables, used = [], 0
    for nb in blocks:
        tables.append(perm[used : used + nb])
        used += nb
    shape = (len(perm), block_size, kv_heads, dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    histories = []
    for n, table in zip(lens, tables, strict=True):
        k = torch.randn(n, kv_heads, dim, generator=gen)
        v = torch.randn(n, kv_heads, dim, generator=gen)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        write_kv_reference(k_cache, v_cache, k, v, slots)
        histories.append((k, v))
    return k_cache, v_cache, tables, histories


@pytest.mark.parametrize("lens", [[1], [16], [17], [5, 33, 64, 100], [129, 2, 47]])
def test_decode_reference_and_split_emulation(lens: list[int]) -> None:
    heads, kv_heads, dim, bs = 8, 2, 16, 16
    k_cache, v_cache, tables, hist = _paged(lens, bs, kv_heads, dim, seed=len(lens))
    q = torch.randn(len(lens), heads, dim)
    meta = AttentionMetadata.build(
        query_lens=[1] * len(lens), seq_lens=lens, block_tables=tables, block_size=bs
    )
    ref = paged_attention_reference(q, k_cache, v_cache, meta, dim**-0.5)
    for i, (k, v) in enumerate(hist):
        expected = _naive(q[i : i + 1], k, v, lens[i] - 1, dim**-0.5)
        assert torch.allclose(ref[i : i + 1], expected, atol=1e-5)
    for splits in (1, 2, 3, 7, 32):
        emulated = split_decode_reference(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, dim**-0.5, splits
        )
        assert torch.allclose(emulated, ref, atol=1e-5)


def test_split_emulation_padding_rows_are_zero() -> None:
    k_cache, v_cache, tables, _ = _paged([20], 16, 2, 16, seed=0)
    q = torch.randn(2, 4, 16)
    bt = torch.tensor([tables[0], [0, 0]], dtype=torch.int32)
    out = split_decode_reference(q, k_cache, v_cache, bt, torch.tensor([20, 0]), 0.25, 4)
    assert torch.all(out[1] == 0) and torch.isfinite(out[0]).all()


def test_mixed_prefill_chunks_with_prefix() -> None:
    heads, kv_heads, dim, bs = 4, 2, 8, 4
    lens = [11, 6, 9]
    q_lens = [3, 6, 1]  # a chunk after a cached prefix, a whole prompt, a decode
    k_cache, v_cache, tables, hist = _paged(lens, bs, kv_heads, dim, seed=5)
    q = torch.randn(sum(q_lens), heads, dim)
    meta = AttentionMetadata.build(query_lens=q_lens, seq_lens=lens, block_tables=tables, block_size=bs)
    out = paged_attention_reference(q, k_cache, v_cache, meta, 0.3)
    start = 0
    for (k, v), n, total in zip(hist, q_lens, lens, strict=True):
        expected = _naive(q[start : start + n], k, v, total - n, 0.3)
        assert torch.allclose(out[start : start + n], expected, atol=1e-5)
        start += n


def test_decode_graph_inputs_match_attention_metadata() -> None:
    seqs = []
    for n, table in ((5, [7]), (17, [2, 9]), (32, [4, 1, 8])):
        seq = Sequence("r", list(range(n)))
        seq.block_table = table
        seq.num_computed_tokens = n - 1
        seqs.append(seq)
    chunks = [ScheduledChunk(s, s.num_tokens - 1, 1) for s in seqs]
    slots, lens, tables, keys = decode_graph_inputs(chunks, 16)
    meta = AttentionMetadata.build(
        query_lens=[1] * 3,
        seq_lens=[s.num_tokens for s in seqs],
        block_tables=[s.block_table for s in seqs],
        block_size=16,
    )
    assert slots == meta.slot_mapping.tolist() == [7 * 16 + 4, 9 * 16 + 0, 1 * 16 + 15]
    assert lens == meta.seq_lens_cpu == [5, 17, 32]
    assert tables == [[7], [2, 9], [4, 1, 8]]
    assert keys == [(s.seq_id, 0) for s in seqs]
