"""Paged KV-cache writes and attention: the torch reference, and the dispatch to GPU kernels.

Cache layout (one pair per decoder layer): `k_cache`, `v_cache` of shape
`[num_blocks, block_size, num_kv_heads, head_dim]`; token position `p` of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from glmv.kernels.metadata import AttentionMetadata, to_device


def _lower_right(q_len: int, s_len: int, device: torch.device) -> Any:
    """The causal mask of a chunk after a cached prefix (aligned to the bottom-right corner).

    On the CPU this is the boolean mask itself, which is what SDPA materialises from the bias
    object there anyway; elsewhere the bias object keeps SDPA on its fused kernels. Its module is
    imported only then: it pulls in torch._dynamo, seconds of start-up for every engine core."""
    if device.type == "cpu":
        return torch.ones(q_len, s_len, dtype=torch.bool).tril(s_len - q_len)
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(q_len, s_len)


def write_kv_reference(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values `[N, kv_heads, head_dim]` into their cache slots."""
    heads, dim = k_cache.shape[-2], k_cache.shape[-1]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather_slots(table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    pos = torch.arange(length, device=table.device)
    return table[pos // block_size].long() * block_size + pos % block_size


def _seq_slots(meta: AttentionMetadata, i: int, length: int) -> torch.Tensor:
    """Cache slots of sequence `i`'s first `length` tokens; computed once per step, not per layer."""
    if meta.seq_slots is None:
        meta.seq_slots = {}
    slots = meta.seq_slots.get(i)
    if slots is None:
        slots = meta.seq_slots[i] = _gather_slots(meta.block_tables[i], length, meta.block_size)
    return slots


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of `q` `[N, heads, head_dim]` over each sequence's cached keys/values.

    New token `j` of a sequence with `n` new tokens and `L` tokens in total sits at position
    `L - n + j` and sees keys `0 … L - n + j`. Decode-only batches take one padded, vectorised
    pass; mixed batches go sequence by sequence.
    """
    heads, dim = k_cache.shape[-2], k_cache.shape[-1]
    k_flat = k_cache.view(-1, heads, dim)
    v_flat = v_cache.view(-1, heads, dim)
    if meta.decode_only:
        return _decode_reference(q, k_flat, v_flat, meta, scale)
    out = torch.empty_like(q)
    _attend_each(q, k_flat, v_flat, meta, scale, out, skip_decodes=False)
    return out


def _attend_each(
    q: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    *,
    skip_decodes: bool,
) -> None:
    """Sequence by sequence (optionally leaving out the one-token decodes) into `out`."""
    start = 0
    for i, (q_len, s_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        if skip_decodes and q_len == 1:
            start += 1
            continue
        slots = _seq_slots(meta, i, s_len)
        # 4-D inputs: the fused (flash / memory-efficient) SDPA kernels take no 3-D tensors.
        k = k_flat[slots].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, L, D]
        v = v_flat[slots].transpose(0, 1).unsqueeze(0)
        qi = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, heads, n, D]
        if q_len == s_len:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # A chunk after a cached prefix: causal, aligned to the bottom-right corner. Expanding
            # the KV heads keeps this on the flash / memory-efficient kernels (a boolean mask with
            # GQA falls back to the slow math path on CUDA).
            group = qi.shape[1] // k.shape[1]
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            o = F.scaled_dot_product_attention(
                qi, k, v, attn_mask=_lower_right(q_len, s_len, qi.device), scale=scale
            )
        out[start : start + q_len] = o[0].transpose(0, 1)
        start += q_len


def _decode_reference(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    max_len = meta.max_seq_len
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < meta.seq_lens[:, None].long()  # [B, max_len]
    slots = meta.decode_slots
    if slots is None:  # computed once per step, reused by every layer
        bs = meta.block_size
        tables = meta.block_tables.long()
        blocks = tables.gather(1, (pos // bs).clamp(max=tables.shape[1] - 1).expand(tables.shape[0], -1))
        slots = blocks * bs + pos % bs  # [B, max_len]
        # Padding positions would read whatever a reused block holds (even NaN left by a failed
        # request): point them at the sequence's own first token, so masked scores stay finite.
        slots = meta.decode_slots = slots.where(valid, slots[:, :1])
    # index_select of the flat slots: several times faster on the CPU than `k_flat[slots]`.
    gathered = (slots.shape[0], slots.shape[1], k_flat.shape[1], k_flat.shape[2])
    flat = slots.reshape(-1)
    k = k_flat.index_select(0, flat).view(gathered).permute(0, 2, 1, 3)  # [B, kv_heads, max_len, D]
    v = v_flat.index_select(0, flat).view(gathered).permute(0, 2, 1, 3)
    mask = valid[:, None, None, :]  # [B, 1, 1, max_len]
    qb = q.unsqueeze(2)  # [B, heads, 1, D]
    o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.squeeze(2)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    write_kv_reference(k_cache, v_cache, k, v, slot_mapping)


_triton_decode = None  # the module, once imported (CUDA only)


def _decode_kernel():  # pragma: no cover - needs CUDA and Triton
    global _triton_decode
    if _triton_decode is None:
        from glmv.kernels import triton_decode

        _triton_decode = triton_decode
    return _triton_decode


def use_triton(q: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors unless GLMV_DISABLE_TRITON is set."""
    return q.is_cuda and not _TRITON_DISABLED


_TRITON_DISABLED = os.environ.get("GLMV_DISABLE_TRITON", "") not in ("", "0")


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Decode-only batches on CUDA take the Triton paged kernel (graph-capturable: it reads lengths
    from device tensors); everything else, and every CPU batch, the torch reference."""
    if use_triton(q):  # pragma: no cover - CUDA only
        kernel = _decode_kernel().paged_decode_attention
        if meta.decode_only:
            return kernel(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, meta.num_splits)
        if 1 in meta.query_lens_cpu:
            # Mixed step: all one-token decodes in one kernel launch, the prefill chunks one by one.
            if meta.decode_subset is None:
                seqs, rows, row = [], [], 0
                for i, n in enumerate(meta.query_lens_cpu):
                    if n == 1:
                        seqs.append(i)
                        rows.append(row)
                    row += n
                dev = q.device
                meta.decode_subset = (to_device(seqs, torch.int64, dev), to_device(rows, torch.int64, dev))
            seqs_t, rows_t = meta.decode_subset
            out = torch.empty_like(q)
            out[rows_t] = kernel(
                q[rows_t], k_cache, v_cache, meta.block_tables[seqs_t], meta.seq_lens[seqs_t], scale
            )
            heads, dim = k_cache.shape[-2], k_cache.shape[-1]
            _attend_each(
                q,
                k_cache.view(-1, heads, dim),
                v_cache.view(-1, heads, dim),
                meta,
                scale,
                out,
                skip_decodes=True,
            )
            return out
    return paged_attention_reference(q, k_cache, v_cache, meta, scale)


def split_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
) -> torch.Tensor:
    """The Triton decode kernel's algorithm in plain torch, for CPU tests of its partitioning.

    Each sequence's blocks are cut into `num_splits` slices of `ceil(blocks / splits)` blocks; each
    slice yields a partial softmax-weighted sum and its log-sum-exp; the slices are merged by their
    log-sum-exp. Empty slices (short sequences, zero-length padding rows) contribute nothing.
    """
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    out = torch.zeros(batch, heads, dim, dtype=torch.float32)
    for b in range(batch):
        length = int(seq_lens[b])
        n_blocks = -(-length // block_size)
        per_split = -(-n_blocks // num_splits) if n_blocks else 0
        parts, lses = [], []
        for s in range(num_splits):
            lo, hi = s * per_split, min(s * per_split + per_split, n_blocks)
            if lo >= hi:
                continue
            blocks = block_tables[b, lo:hi].long()
            k = k_cache[blocks].reshape(-1, kv_heads, dim)[: length - lo * block_size].float()
            v = v_cache[blocks].reshape(-1, kv_heads, dim)[: length - lo * block_size].float()
            k = k.repeat_interleave(group, dim=1)  # [T, heads, D]
            v = v.repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,thd->ht", q[b].float(), k) * scale
            lse = torch.logsumexp(scores, dim=-1)  # [heads]
            parts.append(torch.einsum("ht,thd->hd", torch.softmax(scores, dim=-1), v))
            lses.append(lse)
        if parts:
            weights = torch.softmax(torch.stack(lses), dim=0)  # [splits, heads]
            out[b] = (torch.stack(parts) * weights[..., None]).sum(0)
    return out.to(q.dtype)
