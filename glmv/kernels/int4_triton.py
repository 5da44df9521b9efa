"""INT4 weight × bf16/fp16 activation matmul on CUDA: Triton GEMV and GEMM kernels.

Imported only when an `Int4Linear` runs on a CUDA device; nothing on the CPU path imports
Triton. Weights are in glmv's layout (`glmv.models.quant.int4`) — `qweight` int32 `[K/8, N]` with
input channel `8r + i` in nibble `i` of word `r`, `zeros` uint8 and `scales` float16 `[K/g, N]` —
with `qweight` stored **K-major** (the transpose of a contiguous `[N, K/8]`): each output
channel's words are contiguous, so a thread reads 16-byte runs of one channel and expands them in
registers (three rounds of `tl.interleave`, no shared memory).

A nibble becomes a float32 with one shift and one three-input AND-OR (its bit patterns are kernel
arguments, so they sit in registers): moved under the exponent of 1.0 it reads `v = 1 + q/16`
exactly. With 16-bit activations and whole-chunk groups the unpacking takes half a shift per
weight: even nibbles land on bits 16–19 (`1 + q/128`), odd ones on bits 12–15 (`1 + q/2048`), and
four shifted copies of a word serve all eight. The scale and zero point come out of the sums,

    Σ_k x_k (q_k − z) s = s · (16 · (Σ_k x_k v_k − Σ_k x_k) − z · Σ_k x_k),

so the inner loop is one FMA per weight (and the GEMM's dequantized weight one FMA, exact before
its single rounding).

Three paths, by the number of rows `M` of `x`:

* **GEMV** (decode, `M ≤ GEMV_MAX_M`): a program owns a strip of output channels and walks its
  share of K 128 channels at a time, loading the words of the next chunk(s) before computing the
  current one.
* **GEMM** (`GEMV_MAX_M < M < DEQUANT_MIN_M`): a `[BLOCK_N, 128]` chunk of the weight, dequantized
  in registers, times the transpose of a `[BLOCK_M, 128]` tile of `x` on the tensor cores (the
  weight is the wide side of the product even for a handful of rows).
* **Large M** (prefill): the weight is dequantized into a scratch bf16/fp16 matrix by a Triton
  kernel and multiplied by cuBLAS: the dequantization is a small fraction of a compute-bound
  product.

The GEMV moves each chunk's 128 activations through shared memory (a barrier per chunk) into the
layout of the weight tile. The `gemv_pairs` launch reads words permuted within each chunk
(`permute_for_pairs`) so that the activations a word meets are sixteen consecutive int32 pairs,
loaded straight into that layout; it is checked and swept by the device benchmark but not yet
timed, so `Int4Linear` does not store that order and the defaults do not choose it.

The scales and zero points of a chunk are read in the chunk's own step by default (in the GEMV
after its barriers; in the GEMM outside the compiler's pipelining, being too narrow for
asynchronous copies), so each step waits for them. The `prefetch` launch option loads them (and
the GEMV's activations) a chunk ahead with the words; like `gemv_pairs` it is checked, not yet
timed, and not a default.

When the output alone gives too few programs, K is split between programs and the partial sums
are added in a fixed order (the same bits every run), plus the bias: by a second small kernel,
or by the last program of each output tile to finish, counted with an atomic.

`int4_matmul` falls back to the torch reference (`int4_matmul_reference`) where a kernel cannot
run (an unsupported dtype or group size, or a failed compile), saying so once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from glmv.kernels.int4_reference import int4_matmul_reference

logger = logging.getLogger(__name__)

CHUNK_K = 128  # input channels per step of both kernels (16 words per output channel)
GEMV_MAX_M = 1  # at most this many rows take the GEMV kernel (more: the GEMM shares the unpacking)
DEQUANT_MIN_M = 128  # at least this many rows take dequantize + cuBLAS


@triton.jit
def _nibble(w, NIB: tl.constexpr, mant_mask, one_bits):
    """Nibble `NIB` of each int32 of `w` as the float32 `1 + q/16` (exact): one shift moves it to
    mantissa bits 19–22, one AND-OR keeps it under the exponent of 1.0. The two bit patterns come
    in registers (kernel arguments, not constants), so the AND-OR is a single three-input LOP3."""
    u = w.to(tl.uint32, bitcast=True)
    if NIB < 5:
        u = u << (19 - 4 * NIB)
    else:
        u = u >> (4 * NIB - 19)
    return ((u & mant_mask) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _finish_tile(
    acc,
    offs_m,
    offs_n,
    m_mask,
    n_mask,
    M,
    N,
    bias_ptr,
    out_ptr,
    stride_om,
    part_ptr,
    count_ptr,
    tile,
    pid_s,
    splits,
    PARTIAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
):
    """Store a finished tile. With split K, store the partial sum; then either the last program of
    the tile to finish adds all partials (in split order) and stores the result, or (not
    FUSED_REDUCE) `_split_reduce_kernel` does that in a second launch."""
    mask = m_mask[:, None] & n_mask[None, :]
    idx = offs_m[:, None] * N + offs_n[None, :]
    if PARTIAL:
        tl.store(part_ptr + pid_s * M * N + idx, acc, mask=mask)
    if PARTIAL and FUSED_REDUCE:
        tl.debug_barrier()  # every thread's partial is stored before the release below
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            acc = tl.zeros_like(acc)
            for s in range(0, splits):
                acc += tl.load(part_ptr + s * M * N + idx, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(count_ptr + tile, 0)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask)
    if not PARTIAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask)


@triton.jit
def _expand8(w, mant_mask, one_bits):
    """`[R, C]` int32 words → `[R, 8C]` float32, element `8j + i` the `1 + q/16` of nibble `i` of
    word `j` (glmv's input-channel order). Three rounds of interleaving, all within registers."""
    a = tl.interleave(
        tl.interleave(_nibble(w, 0, mant_mask, one_bits), _nibble(w, 4, mant_mask, one_bits)),
        tl.interleave(_nibble(w, 2, mant_mask, one_bits), _nibble(w, 6, mant_mask, one_bits)),
    )
    b = tl.interleave(
        tl.interleave(_nibble(w, 1, mant_mask, one_bits), _nibble(w, 5, mant_mask, one_bits)),
        tl.interleave(_nibble(w, 3, mant_mask, one_bits), _nibble(w, 7, mant_mask, one_bits)),
    )
    return tl.interleave(a, b)


@triton.jit
def _expand8_fast(w, mant_mask, one_bits):
    """`_expand8` at half a shift per weight, as two halves: the even nibbles `[R, 4C]` as
    `1 + q/128` (moved to bits 16–19) and the odd ones as `1 + q/2048` (bits 12–15), both in
    input-channel order among themselves. Four shifted copies of each word serve all eight."""
    mask_e = mant_mask >> 3  # 0x000F0000
    mask_o = mant_mask >> 7  # 0x0000F000
    u = w.to(tl.uint32, bitcast=True)
    l16 = u << 16
    l8 = u << 8
    r8 = u >> 8
    r16 = u >> 16
    n0 = ((l16 & mask_e) | one_bits).to(tl.float32, bitcast=True)
    n2 = ((l8 & mask_e) | one_bits).to(tl.float32, bitcast=True)
    n4 = ((u & mask_e) | one_bits).to(tl.float32, bitcast=True)
    n6 = ((r8 & mask_e) | one_bits).to(tl.float32, bitcast=True)
    n1 = ((l8 & mask_o) | one_bits).to(tl.float32, bitcast=True)
    n3 = ((u & mask_o) | one_bits).to(tl.float32, bitcast=True)
    n5 = ((r8 & mask_o) | one_bits).to(tl.float32, bitcast=True)
    n7 = ((r16 & mask_o) | one_bits).to(tl.float32, bitcast=True)
    even = tl.interleave(tl.interleave(n0, n4), tl.interleave(n2, n6))
    odd = tl.interleave(tl.interleave(n1, n5), tl.interleave(n3, n7))
    return even, odd


@triton.jit
def _load_chunk_k(qw_ptr, offs_n, c, K, stride_qn, EVEN_K: tl.constexpr):
    """The 16 packed words (128 input channels) of chunk `c` for each output channel in `offs_n`,
    from K-major storage (word `r` of output `n` at `r + n * stride_qn`): `[BLOCK_N, 16]` int32."""
    cols = c * 16 + tl.arange(0, 16)
    ptrs = qw_ptr + offs_n[:, None] * stride_qn + cols[None, :]
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(cols < K // 8)[None, :], other=0)


@triton.jit
def _scale_zero_raw(s_ptr, z_ptr, c, N, offs_nc, GROUP: tl.constexpr):
    """Scale and zero point (`[BLOCK_N]`, as stored: float16, uint8) of the group holding chunk `c`
    (groups of whole chunks)."""
    g = (c * 128) // GROUP
    return tl.load(s_ptr + g * N + offs_nc), tl.load(z_ptr + g * N + offs_nc)


@triton.jit
def _scale_zero(s_ptr, z_ptr, c, N, offs_nc, GROUP: tl.constexpr):
    """`_scale_zero_raw` as float32."""
    s, z = _scale_zero_raw(s_ptr, z_ptr, c, N, offs_nc, GROUP)
    return s.to(tl.float32), z.to(tl.float32)


@triton.jit
def _load_x_raw(x_row, c, K):
    """Activations `c * 128 … c * 128 + 127` of one row of x, as stored (zero past K)."""
    kk = c * 128 + tl.arange(0, 128)
    return tl.load(x_row + kk, mask=kk < K, other=0.0)


@triton.jit
def _load_x_chunk(x_row, c, K):
    """Activations `c * 128 … c * 128 + 127` of one row of x as float32 (zero past K)."""
    return _load_x_raw(x_row, c, K).to(tl.float32)


@triton.jit
def _load_x_pairs(x_row, c, chunks):
    """PAIRS: the activations of chunk `c` (x read as int32 pairs) as four `[1, 16]` vectors, the
    pairs met by nibbles `2p`, `2p + 1` of the chunk's sixteen words (zero past K)."""
    live = ((tl.arange(0, 16) * 0 + c) < chunks)[None, :]  # the last split may run past K
    base = x_row + tl.minimum(c, chunks - 1) * 64 + tl.arange(0, 16)[None, :]
    x0 = tl.load(base, mask=live, other=0)
    x1 = tl.load(base + 16, mask=live, other=0)
    x2 = tl.load(base + 32, mask=live, other=0)
    x3 = tl.load(base + 48, mask=live, other=0)
    return x0, x1, x2, x3


@triton.jit
def _pair_halves(xp, BF16: tl.constexpr):
    """The two 16-bit activations of each int32 pair as float32: (low, high)."""
    xu = xp.to(tl.uint32, bitcast=True)
    if BF16:
        return (xu << 16).to(tl.float32, bitcast=True), (xu & 0xFFFF0000).to(tl.float32, bitcast=True)
    lo = (xu & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (xu >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _pairs_terms(w, xp0, xp1, xp2, xp3, mant_mask, one_bits, BLOCK_N: tl.constexpr, BF16: tl.constexpr):
    """PAIRS chunk: `(t, xs)` with `Σ_k x_k (q_k − z) = t − z · xs` per output channel."""
    t = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    lo, hi = _pair_halves(xp0, BF16)
    t += lo * _nibble(w, 0, mant_mask, one_bits)
    t += hi * _nibble(w, 1, mant_mask, one_bits)
    xsum = lo + hi
    lo, hi = _pair_halves(xp1, BF16)
    t += lo * _nibble(w, 2, mant_mask, one_bits)
    t += hi * _nibble(w, 3, mant_mask, one_bits)
    xsum += lo + hi
    lo, hi = _pair_halves(xp2, BF16)
    t += lo * _nibble(w, 4, mant_mask, one_bits)
    t += hi * _nibble(w, 5, mant_mask, one_bits)
    xsum += lo + hi
    lo, hi = _pair_halves(xp3, BF16)
    t += lo * _nibble(w, 6, mant_mask, one_bits)
    t += hi * _nibble(w, 7, mant_mask, one_bits)
    xsum += lo + hi
    tp = tl.sum(t, axis=1)
    xs = tl.sum(xsum, axis=1)
    return 16.0 * (tp - xs), xs


@triton.jit
def _pairs_step(w, x_row, c, chunks, mant_mask, one_bits, BLOCK_N: tl.constexpr, BF16: tl.constexpr):
    """A PAIRS step: reads chunk `c`'s activations and returns `_pairs_terms`. The barrier keeps
    the loads ahead issued before this step's arithmetic: the activations load after it, and the
    arithmetic waits for them (without it, the compiler issues the loads ahead at the step's
    end, just before the loop's first barrier, leaving them no time)."""
    tl.debug_barrier()
    x0, x1, x2, x3 = _load_x_pairs(x_row, c, chunks)
    return _pairs_terms(w, x0, x1, x2, x3, mant_mask, one_bits, BLOCK_N, BF16)


@triton.jit
def _fast_terms(w, x, mant_mask, one_bits):
    """Whole-chunk group, 16-bit x (whose products keep their bits in float32), half-shift
    unpacking: `(t, xs)` with `Σ_k x_k (q_k − z) = t − z · xs` per output channel, from the
    chunk's words and its 128 activations (float32)."""
    ve, vo = _expand8_fast(w, mant_mask, one_bits)
    xe, xo = tl.split(tl.reshape(x, [64, 2]))
    xe2 = xe[None, :]
    xo2 = xo[None, :]
    t = tl.sum(ve * xe2, axis=1) + tl.sum(vo * (16.0 * xo2), axis=1)
    # Sums of x reduced along the weight tile's axis 1 (no cross-warp reduction).
    xs = tl.sum(xe2 + xo2, axis=1)
    xw = xs + tl.sum(15.0 * xo2, axis=1)
    return 128.0 * (t - xw), xs


@triton.jit
def _plain_terms(w, x, mant_mask, one_bits):
    """`_fast_terms` with the exact unpacking (any activation dtype)."""
    v = _expand8(w, mant_mask, one_bits)
    t = tl.sum(v * x[None, :], axis=1)
    xs = tl.sum(x, axis=0)
    return 16.0 * (t - xs), xs


@triton.jit
def _fetch_step(
    qw_ptr, s_ptr, z_ptr, x_row, offs_nc, c, last, N, K, stride_qn,
    GROUP: tl.constexpr, EVEN_K: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    """PREFETCH: what step `c` of the GEMV reads, as loaded (converted where it is used, so that
    issuing the loads waits for nothing): its words, scale and zero point, and its activations
    (PAIRS reads those in the step itself: `_pairs_step`)."""
    cc = tl.minimum(c, last)  # the last split may run past K: x is zero there
    w = _load_chunk_k(qw_ptr, offs_nc, cc, K, stride_qn, EVEN_K)
    s, z = _scale_zero_raw(s_ptr, z_ptr, cc, N, offs_nc, GROUP)
    if PAIRS:
        x = 0.0
    else:
        x = _load_x_raw(x_row, c, K)
    return w, s, z, x


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    qw_ptr,
    z_ptr,
    s_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_qn,
    chunks_per_split,
    splits,
    mant_mask,
    one_bits,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    EVEN_K: tl.constexpr,
    FAST: tl.constexpr,
    AHEAD: tl.constexpr,
    PAIRS: tl.constexpr,
    BF16: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """GEMV on K-major weights: a program owns `BLOCK_N` output channels and walks its share of K
    128 channels at a time. Each thread reads whole 16-byte runs of one output channel's words,
    expands them in registers and sums their products with `x` itself; a few lanes finish the
    sum. The row of `x` is grid axis 0, so the programs that read the same weights run together.

    Words are loaded AHEAD chunks before they are used, so that their loads are in flight while
    the chunks before them are computed (the loop itself is not pipelined by the compiler).
    PREFETCH (whole-chunk groups): the chunk's scales, zero points and activations come ahead
    with its words, as loaded, instead of being read (and waited for) in the chunk's own step.

    PAIRS: the words come from `permute_for_pairs` (nibbles `2p`, `2p + 1` of word `j` hold input
    channels `32p + 2j`, `32p + 2j + 1`) and `x_ptr` is the 16-bit `x` read as int32 pairs (BF16 or
    fp16), so the activations of nibble pair `p` are sixteen consecutive int32 loaded straight into
    the weight tile's layout. Needs K and the group size multiples of 128."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_nc = tl.minimum(offs_n, N - 1)  # rows past N read row N - 1 and are not stored
    chunks = tl.cdiv(K, 128)
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    c0 = pid_s * chunks_per_split
    last = chunks - 1
    if PREFETCH:  # GROUP % 128 == 0
        nxt = _fetch_step(
            qw_ptr, s_ptr, z_ptr, x_row, offs_nc, c0, last, N, K, stride_qn, GROUP, EVEN_K, PAIRS
        )
        if AHEAD == 2:
            nxt2 = _fetch_step(
                qw_ptr, s_ptr, z_ptr, x_row, offs_nc, c0 + 1, last, N, K, stride_qn, GROUP, EVEN_K, PAIRS
            )
        for it in range(0, chunks_per_split):
            c = c0 + it
            w, s, z, x = nxt
            if AHEAD == 2:
                nxt = nxt2
                nxt2 = _fetch_step(
                    qw_ptr, s_ptr, z_ptr, x_row, offs_nc, c + 2, last, N, K, stride_qn, GROUP, EVEN_K, PAIRS
                )
            else:
                nxt = _fetch_step(
                    qw_ptr, s_ptr, z_ptr, x_row, offs_nc, c + 1, last, N, K, stride_qn, GROUP, EVEN_K, PAIRS
                )
            if PAIRS:
                t, xs = _pairs_step(w, x_row, c, chunks, mant_mask, one_bits, BLOCK_N, BF16)
            elif FAST:
                t, xs = _fast_terms(w, x.to(tl.float32), mant_mask, one_bits)
            else:
                t, xs = _plain_terms(w, x.to(tl.float32), mant_mask, one_bits)
            acc += s.to(tl.float32) * (t - z.to(tl.float32) * xs)
    else:
        w_next = _load_chunk_k(qw_ptr, offs_nc, tl.minimum(c0, last), K, stride_qn, EVEN_K)
        if AHEAD == 2:
            w_next2 = _load_chunk_k(qw_ptr, offs_nc, tl.minimum(c0 + 1, last), K, stride_qn, EVEN_K)
        for it in range(0, chunks_per_split):
            c = c0 + it
            cc = tl.minimum(c, last)  # the last split may run past K: x is zero there
            w = w_next
            if AHEAD == 2:
                w_next = w_next2
                w_next2 = _load_chunk_k(qw_ptr, offs_nc, tl.minimum(c + 2, last), K, stride_qn, EVEN_K)
            else:
                w_next = _load_chunk_k(qw_ptr, offs_nc, tl.minimum(c + 1, last), K, stride_qn, EVEN_K)
            if GROUP % 128 == 0:
                if PAIRS:
                    t, xs = _pairs_step(w, x_row, c, chunks, mant_mask, one_bits, BLOCK_N, BF16)
                elif FAST:
                    t, xs = _fast_terms(w, _load_x_chunk(x_row, c, K), mant_mask, one_bits)
                else:
                    t, xs = _plain_terms(w, _load_x_chunk(x_row, c, K), mant_mask, one_bits)
                s, z = _scale_zero(s_ptr, z_ptr, cc, N, offs_nc, GROUP)
                acc += s * (t - z * xs)
            else:
                x = _load_x_chunk(x_row, c, K)
                v = _expand8(w, mant_mask, one_bits)
                NG: tl.constexpr = 128 // GROUP
                t2 = tl.sum(tl.reshape(v * x[None, :], [BLOCK_N, NG, GROUP]), axis=2)
                xs2 = tl.sum(tl.reshape(x, [NG, GROUP]), axis=1)
                gi = tl.minimum(c * NG + tl.arange(0, NG), tl.cdiv(K, GROUP) - 1)
                s2 = tl.load(s_ptr + gi[None, :] * N + offs_nc[:, None]).to(tl.float32)
                z2 = tl.load(z_ptr + gi[None, :] * N + offs_nc[:, None]).to(tl.float32)
                acc += tl.sum(s2 * (16.0 * (t2 - xs2[None, :]) - z2 * xs2[None, :]), axis=1)
    offs_m = pid_m + tl.arange(0, 1)
    _finish_tile(
        acc[None, :], offs_m, offs_n, offs_m < M, n_mask, M, N, bias_ptr, out_ptr, stride_om,
        part_ptr, count_ptr, pid_m * tl.num_programs(1) + pid_n, pid_s, splits, PARTIAL, HAS_BIAS, FUSED_REDUCE,
    )  # fmt: skip


@triton.jit
def _dequant_words(w, s, z, mant_mask, one_bits, FAST: tl.constexpr):
    """`(q - z) * s` in float32 for a `[BLOCK_N, 16]` tile of words of one group (`s`, `z`:
    float32 `[BLOCK_N]`): `[BLOCK_N, 128]`. Each value is one FMA `v * a + b` of the expanded
    nibble, exact before its single rounding."""
    if FAST:
        ve, vo = _expand8_fast(w, mant_mask, one_bits)
        de = ve * (128.0 * s)[:, None] - ((128.0 + z) * s)[:, None]
        do = vo * (2048.0 * s)[:, None] - ((2048.0 + z) * s)[:, None]
        return tl.interleave(de, do)
    v = _expand8(w, mant_mask, one_bits)
    # (16 v - 16 - z) s as one FMA per weight
    return v * (16.0 * s)[:, None] - ((16.0 + z) * s)[:, None]


@triton.jit
def _dequant_tile_k(
    w, s_ptr, z_ptr, offs_nc, c, N, K, mant_mask, one_bits, GROUP: tl.constexpr, FAST: tl.constexpr
):
    """`(q - z) * s` in float32 for a `[BLOCK_N, 16]` tile of words of chunk `c`: `[BLOCK_N, 128]`
    (FAST needs whole-chunk groups)."""
    if GROUP % 128 == 0:
        s, z = _scale_zero(s_ptr, z_ptr, c, N, offs_nc, GROUP)
        return _dequant_words(w, s, z, mant_mask, one_bits, FAST)
    v = _expand8(w, mant_mask, one_bits)
    kk = c * 128 + tl.arange(0, 128)
    gi = tl.minimum(kk // GROUP, tl.cdiv(K, GROUP) - 1)
    s2 = tl.load(s_ptr + gi[None, :] * N + offs_nc[:, None]).to(tl.float32)
    z2 = tl.load(z_ptr + gi[None, :] * N + offs_nc[:, None]).to(tl.float32)
    return (16.0 * v - 16.0 - z2) * s2


# The row count only masks loads and stores: not specialised, so a step of any row count between
# two CUDA-graph buckets (65-95 rows, say) reuses a variant built at start-up.
@triton.jit(do_not_specialize=["M"])
def _int4_gemm_kernel(
    x_ptr,
    qw_ptr,
    z_ptr,
    s_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_qn,
    chunks_per_split,
    splits,
    mant_mask,
    one_bits,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    EVEN_K: tl.constexpr,
    FAST: tl.constexpr,
    IEEE: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """GEMM on K-major weights, output transposed on the tensor cores: a `[BLOCK_N, 128]` chunk of
    the weight, dequantized in registers, times the `[128, BLOCK_M]` transpose of `x`, so that the
    weight (the large operand) fills the wide side of the product even for a handful of rows.

    The compiler pipelines the loads of words and x (asynchronous copies, `num_stages` deep), not
    those of the scales and zero points (too narrow for such copies); PREFETCH (whole-chunk
    groups) loads them a chunk ahead instead of in the chunk's own step."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_nc = tl.minimum(offs_n, N - 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    lane = tl.arange(0, 128)
    chunks = tl.cdiv(K, 128)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    c0 = pid_s * chunks_per_split
    if PREFETCH:
        ns, nz = _scale_zero_raw(s_ptr, z_ptr, tl.minimum(c0, chunks - 1), N, offs_nc, GROUP)
    for it in range(0, chunks_per_split):
        c = c0 + it
        cc = tl.minimum(c, chunks - 1)  # past K: x is zero there
        w = _load_chunk_k(qw_ptr, offs_nc, cc, K, stride_qn, EVEN_K)
        kk = c * 128 + lane
        xt = tl.load(
            x_ptr + offs_m[None, :] * stride_xm + kk[:, None],
            mask=(kk < K)[:, None] & m_mask[None, :],
            other=0.0,
        )
        if PREFETCH:
            s = ns
            z = nz
            ns, nz = _scale_zero_raw(s_ptr, z_ptr, tl.minimum(c + 1, chunks - 1), N, offs_nc, GROUP)
            wd = _dequant_words(w, s.to(tl.float32), z.to(tl.float32), mant_mask, one_bits, FAST)
        else:
            wd = _dequant_tile_k(w, s_ptr, z_ptr, offs_nc, cc, N, K, mant_mask, one_bits, GROUP, FAST)
        if IEEE:
            acc = tl.dot(wd, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(wd.to(xt.dtype), xt, acc)
    _finish_tile(
        tl.trans(acc), offs_m, offs_n, m_mask, n_mask, M, N, bias_ptr, out_ptr, stride_om,
        part_ptr, count_ptr, pid_m * tl.num_programs(0) + pid_n, pid_s, splits, PARTIAL, HAS_BIAS, FUSED_REDUCE,
    )  # fmt: skip


@triton.jit
def _dequant_kernel(
    qw_ptr,
    z_ptr,
    s_ptr,
    out_ptr,
    N,
    K,
    stride_qn,
    mant_mask,
    one_bits,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[n, k] = (q - z) * s from K-major words: the `nn.Linear` weight `[N, K]`."""
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    offs_nc = tl.minimum(offs_n, N - 1)
    w = _load_chunk_k(qw_ptr, offs_nc, c, K, stride_qn, False)
    val = _dequant_tile_k(w, s_ptr, z_ptr, offs_nc, c, N, K, mant_mask, one_bits, GROUP, False)
    kk = c * 128 + tl.arange(0, 128)
    tl.store(out_ptr + offs_n[:, None] * K + kk[None, :], val, mask=row_ok[:, None] & (kk < K)[None, :])


@triton.jit
def _split_reduce_kernel(
    part_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    stride_om,
    splits,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[m, n] = Σ_s partial[s, m, n] (+ bias[n]), in split order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N) * stride_om + n, acc, mask=mask)


# --------------------------------------------------------------------------------- launching


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """How one product runs: `kind` is "gemv", "gemm" or "dequant"; tiles and K split."""

    kind: str
    block_m: int = 1
    block_n: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    ahead: int = 1  # GEMV: chunks of words loaded ahead of their use (1 or 2)
    fused_reduce: bool = False
    fast_unpack: bool = True  # half-shift unpacking where it is exact enough (16-bit x, group % 128 == 0)
    prefetch: bool = False  # scales and zero points (GEMV: and x) come a chunk ahead (group % 128 == 0)


_SM_COUNT: dict[int, int] = {}
_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}
_FALLBACK_REASONS: set[str] = set()
# The bit patterns of `_nibble`, passed as arguments so that they stay in registers.
_NIBBLE_BITS = (0x00780000, 0x3F800000)


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _counters(device: torch.device, need: int) -> torch.Tensor:
    """Zeroed per-tile arrival counters, one buffer per stream (kernels on one stream run in
    order, and each launch leaves its counters at zero again)."""
    if device.type == "cuda":
        key = (
            torch.cuda.current_device() if device.index is None else device.index,
            torch.cuda.current_stream(device).cuda_stream,
        )
    else:  # the Triton interpreter, in tests
        key = (-1, 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < need:
        buf = torch.zeros(max(need, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _split_for(tiles: int, chunks: int, sm_count: int, waves: int = 2) -> int:
    """Enough K splits that the grid covers the SMs about `waves` times, each split at least one
    128-chunk long."""
    target = waves * sm_count
    if tiles >= target:
        return 1
    split = min(chunks, triton.cdiv(target, tiles), 32)
    return triton.cdiv(chunks, triton.cdiv(chunks, split))


def is_k_major(qweight: torch.Tensor) -> bool:
    """Whether `qweight` `[K/8, N]` is stored K-major (each output channel's words contiguous, as
    `Int4Linear` holds them) rather than row-major."""
    return qweight.stride(0) == 1 and qweight.stride(1) == qweight.shape[0]


def k_major(qweight: torch.Tensor) -> torch.Tensor:
    """`qweight` with the same values, stored K-major."""
    return qweight if is_k_major(qweight) else qweight.t().contiguous().t()


def permute_for_pairs(qweight: torch.Tensor) -> torch.Tensor:
    """K-major words for the "gemv_pairs" kernel: within each 128-channel chunk, nibble `2p + b` of
    word `j` holds channel `32p + 2j + b` (glmv's order holds `8j + 2p + b`). K must be a multiple
    of 128."""
    kw, n = qweight.shape
    if kw % 16 != 0:
        raise ValueError("pair-permuted words need K to be a multiple of 128")
    words = k_major(qweight).t()  # [N, K/8] contiguous
    codes = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # [N, K/8, 8]
    # [N, chunks, 128] in channel order, the 128 split as (p, j, b) = 32p + 2j + b; word j of the
    # new chunk holds (p, b) in nibble 2p + b.
    codes = codes.reshape(n, kw // 16, 4, 16, 2).permute(0, 1, 3, 2, 4).reshape(n, kw, 8)
    out = torch.zeros(n, kw, dtype=torch.int64, device=qweight.device)
    for i in range(8):
        out |= codes[..., i].to(torch.int64) << (4 * i)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.t()


def choose_config(m: int, n: int, k: int, sm_count: int) -> LaunchConfig:
    """The default launch for an `[m, k] @ [k, n]` product: the best of a sweep of the decoder
    shapes of GLM-4.6V-Flash on an H200 (benchmarks/device_int4.py --sweep)."""
    chunks = triton.cdiv(k, CHUNK_K)
    if m >= DEQUANT_MIN_M:
        return LaunchConfig("dequant")
    if m <= GEMV_MAX_M:
        if triton.cdiv(n, 128) >= 4 * sm_count:  # wide (lm_head): one-warp programs, two chunks ahead
            return LaunchConfig("gemv", 1, 32, 1, 1, 2, ahead=2)
        split = _split_for(triton.cdiv(n, 128), chunks, sm_count, waves=4)
        return LaunchConfig("gemv", 1, 128, split, 2, 2, fused_reduce=split > 1)
    if m <= 16:
        split = _split_for(triton.cdiv(n, 64), chunks, sm_count, waves=4)
        return LaunchConfig("gemm", 16, 64, split, 4, 3, fused_reduce=split > 1)
    block_m = 32 if m <= 32 else 64
    if k >= 8192 or n >= 16384:  # long rows or many columns: wide tiles, 8 warps
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 128)
        split = _split_for(tiles, chunks, sm_count, waves=1)
        return LaunchConfig("gemm", block_m, 128, split, 8, 3, fused_reduce=split > 1)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 64)
    split = _split_for(tiles, chunks, sm_count, waves=2)
    return LaunchConfig("gemm", block_m, 64, split, 4, 3, fused_reduce=split > 1)


def dequantize_triton(
    qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The `[K, N]` dequantized weight (the transpose of the Linear weight, a view of a contiguous
    `[N, K]`) in `dtype`."""
    qweight = k_major(qweight)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    block_n = 32
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, CHUNK_K))](
        qweight,
        zeros.contiguous(),
        scales.contiguous(),
        out,
        n,
        k,
        qweight.stride(1),
        *_NIBBLE_BITS,
        GROUP=group_size,
        BLOCK_N=block_n,
        num_warps=4,
        enable_fp_fusion=True,
    )
    return out.t()


def int4_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """`x` `[M, K]` times the int4 weight: `[M, N]` in `x.dtype`. No fallback. Weights that are
    not K-major are copied to K-major first (`Int4Linear` holds them K-major)."""
    m, k = x.shape
    n = qweight.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    if m == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device)
    qweight = k_major(qweight)
    zeros = zeros.contiguous()
    scales = scales.contiguous()
    cfg = config or choose_config(m, n, k, _sm_count(x.device))
    if cfg.kind == "dequant":
        w = dequantize_triton(qweight, zeros, scales, group_size, x.dtype)
        return torch.addmm(bias.to(x.dtype), x, w) if bias is not None else x @ w
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    chunks = triton.cdiv(k, CHUNK_K)
    split = max(1, min(cfg.split_k, chunks))
    per_split = triton.cdiv(chunks, split)
    split = triton.cdiv(chunks, per_split)
    if cfg.kind in ("gemv", "gemv_pairs"):
        grid: tuple[int, int, int] = (m, triton.cdiv(n, cfg.block_n), split)
    elif cfg.kind == "gemm":
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    else:
        raise ValueError(f"unknown launch kind {cfg.kind!r}")
    tiles = grid[0] * grid[1]
    if split > 1:
        part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        count = _counters(x.device, tiles) if cfg.fused_reduce else out
    else:
        part = count = out
    bias_arg = bias if bias is not None else out
    args = (
        x,
        qweight,
        zeros,
        scales,
        bias_arg,
        out,
        part,
        count,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        qweight.stride(1),
        per_split,
        split,
        *_NIBBLE_BITS,
    )
    # Half-shift unpacking for 16-bit activations and whole-chunk groups (see `_expand8_fast`).
    fast = cfg.fast_unpack and x.dtype != torch.float32 and group_size % CHUNK_K == 0
    prefetch = cfg.prefetch and group_size % CHUNK_K == 0
    common = dict(
        GROUP=group_size,
        BLOCK_N=cfg.block_n,
        PARTIAL=split > 1,
        HAS_BIAS=bias is not None,
        FUSED_REDUCE=cfg.fused_reduce,
        EVEN_K=k % CHUNK_K == 0,
        FAST=fast,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        enable_fp_fusion=True,  # the "one FMA per weight" above; not left to Triton's default
    )
    if cfg.kind == "gemv_pairs":  # words from `permute_for_pairs`
        if x.dtype not in (torch.bfloat16, torch.float16) or k % CHUNK_K or group_size % CHUNK_K:
            raise ValueError("gemv_pairs takes 16-bit x, K and the group size multiples of 128")
        pair_args = (x.view(torch.int32), *args[1:11], x.stride(0) // 2, *args[12:])
        common.update(EVEN_K=True, FAST=False)
        _int4_gemv_kernel[grid](
            *pair_args,
            AHEAD=cfg.ahead,
            PAIRS=True,
            BF16=x.dtype == torch.bfloat16,
            PREFETCH=prefetch,
            **common,
        )
    elif cfg.kind == "gemv":
        _int4_gemv_kernel[grid](*args, AHEAD=cfg.ahead, PAIRS=False, BF16=False, PREFETCH=prefetch, **common)
    else:
        _int4_gemm_kernel[grid](
            *args, BLOCK_M=cfg.block_m, IEEE=x.dtype == torch.float32, PREFETCH=prefetch, **common
        )
    if split > 1 and not cfg.fused_reduce:
        block = 512
        _split_reduce_kernel[(triton.cdiv(m * n, block),)](
            part,
            bias_arg,
            out,
            m,
            n,
            out.stride(0),
            split,
            HAS_BIAS=bias is not None,
            BLOCK=block,
            num_warps=4,
            enable_fp_fusion=True,
        )
    return out


def supports(group_size: int) -> bool:
    """Group sizes the kernels take: multiples of 128, or 8/16/32/64 (which divide 128)."""
    return group_size % 128 == 0 or group_size in (8, 16, 32, 64)


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The int4 product on CUDA, falling back to the torch reference where the kernels cannot run."""
    reason = None
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reason = f"activation dtype {x.dtype}"
    elif not supports(group_size):
        reason = f"group size {group_size}"
    if reason is None:
        try:
            return int4_matmul_triton(x, qweight, zeros, scales, group_size, bias)
        except (RuntimeError, ValueError, triton.CompilationError) as exc:  # pragma: no cover - device only
            reason = f"{type(exc).__name__}: {exc}"
    if reason not in _FALLBACK_REASONS:
        _FALLBACK_REASONS.add(reason)
        logger.warning("int4 Triton kernel unavailable (%s); using the torch reference", reason)
    return int4_matmul_reference(x, qweight, zeros, scales, group_size, bias)
