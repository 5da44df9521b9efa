"""Triton kernels for FP8 (e4m3) weights with per-output-channel scales.

* `fp8_weight_matmul(x, w, scale)` — decode-sized batches (up to `SMALL_M` rows): the e4m3 weight
  tile is widened to the activation dtype in registers and multiplied on the tensor cores; the
  per-channel scale factors out of the K sum and is applied once to the accumulator. Only the
  weight's bytes (1 per element) stream from memory, so the step is bound by half of bf16's
  traffic; the activations are not rounded.
* `quantize_rows_fp8(x)` — one launch per prefill-sized batch: each row's absmax, scale and e4m3
  codes, for `torch._scaled_mm` (row-wise scales) where the products are compute-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
_FP8_MAX = tl.constexpr(FP8_MAX)  # what the kernels may read
SMALL_M = 64


@triton.jit
def _weight_matmul_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + kk[None, :],
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        w = tl.load(
            w_ptr + rn[:, None] * stride_wn + kk[None, :],
            mask=(rn[:, None] < N) & (kk[None, :] < K),
            other=0.0,
        )
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_x + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=0) / _FP8_MAX, 1e-12)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_x + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        q = tl.clamp(v / scale, -_FP8_MAX, _FP8_MAX)
        tl.store(q_ptr + row * stride_q + k0 + rk, q.to(q_ptr.dtype.element_ty), mask=k0 + rk < K)


def _block_n(n: int, sms: int) -> int:
    """Narrow tiles when the layer has few output channels: enough programs to cover the SMs."""
    for block in (64, 32):
        if triton.cdiv(n, block) >= 2 * sms:
            return block
    return 16


def fp8_weight_matmul(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x` [M, K] bf16/fp16 (M <= SMALL_M), `w` [N, K] e4m3, `scale` [N] float32 -> [M, N] in x's dtype."""
    x = x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    block_m = 16 if m <= 16 else SMALL_M
    block_n = _block_n(n, sms)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _weight_matmul_kernel[grid](
        x, w, scale, bias if bias is not None else scale, y,
        m, n, k,
        x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128,
        num_warps=4, num_stages=4, enable_fp_fusion=True,
    )  # fmt: skip
    return y


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of `x` [M, K] and one float32 scale per row (absmax / 448), in one launch."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    _quantize_rows_kernel[(m,)](
        x, q, s, k, x.stride(0), q.stride(0), BLOCK_K=1024, num_warps=4, enable_fp_fusion=True
    )
    return q, s
