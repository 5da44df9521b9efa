"""Paged decode attention in Triton (CUDA only; imported lazily).

One query token per sequence. Grid `(batch, kv_heads, splits)`: each program takes one KV head
of one sequence and one slice of its blocks, loads every KV tile once for all the query heads
that share it (GQA: 16 query heads per KV head in GLM-4.1V), and keeps an online softmax. A
second kernel merges the slices by their log-sum-exp. Splitting the sequence keeps the GPU busy
at batch 1, where `batch × kv_heads` alone would be two programs.

Everything the kernels read about lengths comes from device tensors, so the launch is
capturable in a CUDA graph and valid for any sequence length up to the block table's width.

One compiled variant serves every launch of a model: the split count, the block table's width
and the strides that follow from them are plain runtime integers (`do_not_specialize`; the
partial outputs' row strides, multiples of the head size at every batch, stay specialised so
that their accesses stay 128-bit), and the merge always pads to `MAX_SPLITS`. Were they
compile-time constants or specialised integers (Triton specialises an integer equal to 1 or
divisible by 16), every new decode count and table width of a mixed prefill+decode step would
build another variant while the server runs: 57 variants of the partial kernel and 19 of the merge
over batches 1-160, against the dozen that graph capture builds at start-up
(`tests/kernels/test_kernel_variants.py` counts them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_SPLITS = 32  # the most slices a sequence is cut into (`num_splits_for`)

# The integers that change with the batch: not specialised, so they never select a new variant.
# The partial outputs' row strides (`stride_ob`, `stride_oh`) stay specialised: they are multiples
# of HEAD_DIM (>= 16) whatever the batch, so their key never changes, and knowing that keeps the
# stores and the merge's loads vectorised (128-bit instead of 32-bit accesses).
_SPLIT_INTS = ["num_splits", "stride_lb", "stride_lh"]
_TABLE_INTS = ["max_blocks", "stride_btb"]


@triton.jit(do_not_specialize=_SPLIT_INTS + _TABLE_INTS)
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, o_ptr, lse_ptr,
    scale,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    max_blocks, num_splits,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    BLOCKS_PER_TILE: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(sl_ptr + b)
    n_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    per_split = tl.cdiv(n_blocks, num_splits)
    blk_start = s * per_split
    blk_end = tl.minimum(blk_start + per_split, n_blocks)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, TILE)
    head = kvh * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
        mask=(offs_g < GROUP)[:, None],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)

    for blk0 in range(blk_start, blk_end, BLOCKS_PER_TILE):
        blk = blk0 + offs_t // BLOCK_SIZE
        in_range = blk < blk_end
        phys = tl.load(bt_ptr + b * stride_btb + blk, mask=in_range & (blk < max_blocks), other=0).to(tl.int64)
        tok = blk * BLOCK_SIZE + offs_t % BLOCK_SIZE
        valid = in_range & (tok < seq_len)
        kv_off = phys[:, None] * stride_kb + (offs_t % BLOCK_SIZE)[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
        if IEEE:  # float32 caches: exact products, as the CPU reference computes them
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [GROUP_PAD, TILE]
        else:
            qk = tl.dot(q, tl.trans(k)) * scale
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    gmask = offs_g < GROUP
    tl.store(
        o_ptr + b * stride_ob + head[:, None] * stride_oh + s * stride_os + offs_d[None, :],
        out,
        mask=gmask[:, None],
    )
    tl.store(lse_ptr + b * stride_lb + head * stride_lh + s, lse, mask=gmask)


@triton.jit(do_not_specialize=_SPLIT_INTS)
def _decode_merge_kernel(
    o_part_ptr, lse_ptr, out_ptr,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    num_splits,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    smask = offs_s < num_splits
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    w = tl.where(smask, w, 0.0)
    parts = tl.load(
        o_part_ptr + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
        mask=smask[:, None],
        other=0.0,
    )
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_outb + h * stride_outh + offs_d, out.to(out_ptr.dtype.element_ty))


def num_splits_for(batch: int, num_kv_heads: int, sm_count: int) -> int:
    """Enough sequence slices that batch × kv_heads × splits fills the GPU about twice over."""
    want = (2 * sm_count + batch * num_kv_heads - 1) // (batch * num_kv_heads)
    return max(1, min(MAX_SPLITS, want))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """`q` `[B, heads, D]`, caches `[num_blocks, block_size, kv_heads, D]` → `[B, heads, D]`."""
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    if num_splits is None:
        props = torch.cuda.get_device_properties(q.device)
        num_splits = num_splits_for(batch, kv_heads, props.multi_processor_count)
    if dim % 16:
        raise ValueError(f"head_dim must be a multiple of 16, got {dim}")
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    o_part = torch.empty(batch, heads, num_splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
    group_pad = max(16, triton.next_power_of_2(group))
    blocks_per_tile = max(1, 64 // block_size)
    _decode_partial_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, o_part, lse,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        block_tables.shape[1], num_splits,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=dim,
        BLOCK_SIZE=block_size, TILE=block_size * blocks_per_tile,
        BLOCKS_PER_TILE=blocks_per_tile, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2, enable_fp_fusion=True,
    )  # fmt: skip
    out = torch.empty_like(q)
    _decode_merge_kernel[(batch, heads)](
        o_part, lse, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        num_splits,
        SPLITS_PAD=MAX_SPLITS, HEAD_DIM=dim,
        enable_fp_fusion=True,
    )  # fmt: skip
    return out
