"""INT4 weight × bf16/fp16 activation matmul in Triton: a GEMV-shaped kernel and a GEMM kernel.

Imported only when an `Int4Linear` runs on a CUDA device; nothing on the CPU path imports
Triton. Weights are in glmv's layout (`glmv.models.quant.int4`): `qweight` int32 `[K/8, N]` with
input channel `8r + i` in nibble `i` of row `r`, `zeros` uint8 and `scales` float16 `[K/g, N]`.

Both kernels walk K in chunks of 128 input channels (16 packed rows) and never build the
dequantized weight in memory. Turning a nibble into a number costs two integer instructions:
rotate it into mantissa bits 19–22 and OR in the exponent of 1.0, which gives the float32
`v = 1 + q/16` exactly (no int→float conversion, a quarter-rate instruction). When a chunk lies
inside one quantization group (group size a multiple of 128), the scale and zero point come out
of the inner product:

    Σ_k x_k (q_k - z) s = s · (16 · (Σ_k x_k v_k − Σ_k x_k) − z · Σ_k x_k)

so the inner loop is one FMA per weight (GEMV) or one tensor-core product of `x` with the exact
`v` (GEMM), and the scale/zero work is per chunk and column. Smaller groups dequantize each
element instead. K is split across programs when the output alone gives too few of them; the
partial sums go through a float32 buffer and a second small kernel (deterministic, unlike
atomics), which also adds the bias.

`int4_matmul` falls back to the torch reference (`int4_matmul_reference`) where a kernel cannot
run (no Triton, an unsupported dtype, or a failed compile), saying so once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from glmv.models.quant.int4 import int4_matmul_reference

logger = logging.getLogger(__name__)

CHUNK_K = 128  # input channels per inner step
_CHUNK: tl.constexpr = tl.constexpr(CHUNK_K)
_ROWS: tl.constexpr = tl.constexpr(CHUNK_K // 8)  # packed rows per inner step
GEMV_MAX_M = 4  # at most this many rows use the CUDA-core kernel; more use tensor cores


@triton.jit
def _nibble(w, NIB: tl.constexpr):
    """Nibble `NIB` of each int32 of `w` as the float32 `1 + q/16` (exact)."""
    R: tl.constexpr = (4 * NIB + 13) % 32  # rotate right so that bit 4·NIB lands on bit 19
    u = w.to(tl.uint32, bitcast=True)
    rot = (u >> R) | (u << (32 - R))
    bits = (rot & 0x00780000) | 0x3F800000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    qw_ptr,
    z_ptr,
    s_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_os,
    chunks_per_split,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FACTORED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
):
    """CUDA-core kernel for a handful of rows (decode): one FMA per weight and row."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, _ROWS)
    k_rows = K // 8
    c_start = pid_s * chunks_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # The last split may run past K: those rows are masked (no memory traffic).
    for it in range(0, chunks_per_split):
        c = c_start + it
        rows = c * _ROWS + offs_r
        r_mask = rows < k_rows
        w = tl.load(
            qw_ptr + rows[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0
        )
        t = tl.zeros([BLOCK_M, _ROWS, BLOCK_N], dtype=tl.float32)
        xs = tl.zeros([BLOCK_M], dtype=tl.float32)
        if not FACTORED:
            grp = (rows * 8) // GROUP
            gz = tl.load(z_ptr + grp[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0)
            gs = tl.load(s_ptr + grp[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0)
            gs = gs.to(tl.float32)
            gz = (gz.to(tl.float32) + 16.0) * gs  # (16v - 16 - z)·s = 16s·v − (16 + z)·s
            gs16 = gs * 16.0
        for i in tl.static_range(8):
            xi = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + (rows * 8 + i)[None, :],
                mask=m_mask[:, None] & r_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            v = _nibble(w, i)
            if FACTORED:
                t += xi[:, :, None] * v[None, :, :]
                xs += tl.sum(xi, axis=1)
            else:
                t += xi[:, :, None] * (gs16 * v - gz)[None, :, :]
        part = tl.sum(t, axis=1)
        if FACTORED:
            g = (c * _CHUNK) // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
            acc += s[None, :] * (16.0 * (part - xs[:, None]) - z[None, :] * xs[:, None])
        else:
            acc += part
    mask = m_mask[:, None] & n_mask[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_s * stride_os + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask)


@triton.jit
def _int4_gemm_kernel(
    x_ptr,
    qw_ptr,
    z_ptr,
    s_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_os,
    chunks_per_split,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FACTORED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Tensor-core kernel: per chunk, eight products of x's stride-8 column slices with the
    nibble planes of the packed rows (each K = 16)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, _ROWS)
    k_rows = K // 8
    c_start = pid_s * chunks_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # The last split may run past K: those rows are masked (no memory traffic).
    for it in range(0, chunks_per_split):
        c = c_start + it
        rows = c * _ROWS + offs_r
        r_mask = rows < k_rows
        w = tl.load(
            qw_ptr + rows[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0
        )
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        xs = tl.zeros([BLOCK_M], dtype=tl.float32)
        if not FACTORED:
            grp = (rows * 8) // GROUP
            gz = tl.load(z_ptr + grp[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0)
            gs = tl.load(s_ptr + grp[:, None] * N + offs_n[None, :], mask=r_mask[:, None] & n_mask[None, :], other=0)
            gs = gs.to(tl.float32)
            gz = (gz.to(tl.float32) + 16.0) * gs
            gs16 = gs * 16.0
        for i in tl.static_range(8):
            xi = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + (rows * 8 + i)[None, :],
                mask=m_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            v = _nibble(w, i)
            if FACTORED:
                xs += tl.sum(xi.to(tl.float32), axis=1)
            else:
                v = gs16 * v - gz
            if IEEE:
                part = tl.dot(xi, v.to(xi.dtype), part, input_precision="ieee")
            else:
                part = tl.dot(xi, v.to(xi.dtype), part)
        if FACTORED:
            g = (c * _CHUNK) // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
            z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
            acc += s[None, :] * (16.0 * (part - xs[:, None]) - z[None, :] * xs[:, None])
        else:
            acc += part
    mask = m_mask[:, None] & n_mask[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_s * stride_os + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=mask)


@triton.jit
def _split_reduce_kernel(
    part_ptr, bias_ptr, out_ptr, M, N, SPLITS, stride_om, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    """out[m, n] = Σ_s partial[s, m, n] (+ bias[n]), in a fixed order."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    m = offs // N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + n, acc, mask=mask)


# --------------------------------------------------------------------------------- launching


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """Tile shape and K split of one launch (chosen by `choose_config`, or given for tuning)."""

    gemv: bool
    block_m: int
    block_n: int
    split_k: int
    num_warps: int
    num_stages: int


_SM_COUNT: dict[int, int] = {}
_FALLBACK_REASONS: set[str] = set()


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_config(m: int, n: int, k: int, sm_count: int) -> LaunchConfig:
    """Tiles for an `[m, k] @ [k, n]` product: enough programs to cover the SMs a few times over."""
    chunks = triton.cdiv(k, CHUNK_K)
    if m <= GEMV_MAX_M:
        block_m = _next_pow2(m)
        block_n = 128 if block_m <= 2 else 64
        tiles = triton.cdiv(n, block_n)
        gemv, warps, stages = True, 4, 3
    else:
        block_m = min(64, max(16, _next_pow2(m)))
        block_n = 128 if m >= 64 else 64
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        gemv, warps, stages = False, 4, 3
    split = 1
    target = 2 * sm_count
    if tiles < target:
        split = min(chunks, triton.cdiv(target, tiles))
        split = triton.cdiv(chunks, triton.cdiv(chunks, split))  # even chunks per split
    return LaunchConfig(gemv, block_m, block_n, split, warps, stages)


def int4_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """`x` `[M, K]` (contiguous rows) times the int4 weight: `[M, N]` in `x.dtype`. No fallback."""
    m, k = x.shape
    n = qweight.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or choose_config(m, n, k, _sm_count(x.device))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    factored = group_size % CHUNK_K == 0
    chunks = triton.cdiv(k, CHUNK_K)
    split = max(1, min(cfg.split_k, chunks))
    per_split = triton.cdiv(chunks, split)
    split = triton.cdiv(chunks, per_split)
    partial = split > 1
    dest = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if partial else out
    has_bias = bias is not None
    bias_arg = bias if bias is not None else out
    common = dict(
        GROUP=group_size,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        FACTORED=factored,
        HAS_BIAS=has_bias,
        PARTIAL=partial,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    args = (x, qweight, zeros, scales, bias_arg, dest, m, n, k, x.stride(0), out.stride(0), m * n, per_split)
    if cfg.gemv:
        grid = (triton.cdiv(n, cfg.block_n), split)
        _int4_gemv_kernel[grid](*args, **common)
    else:
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
        _int4_gemm_kernel[grid](*args, IEEE=x.dtype == torch.float32, **common)
    if partial:
        block = 1024
        _split_reduce_kernel[(triton.cdiv(m * n, block),)](
            dest, bias_arg, out, m, n, split, out.stride(0), HAS_BIAS=has_bias, BLOCK=block, num_warps=4
        )
    return out


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The int4 product on CUDA, falling back to the torch reference where the kernel cannot run."""
    reason = None
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reason = f"activation dtype {x.dtype}"
    elif group_size % 8 != 0:
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
