"""Fused small ops for the CUDA path (Triton; imported lazily): RMSNorm (+ residual add),
SwiGLU and M-RoPE. Each replaces a chain of 5–10 tiny elementwise kernels per call, which at
batch 1 cost more than the matrix products they sit between. Each rounds to the model dtype at
the same points as the torch reference in `glmv/models/glm4v.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, res_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, 0) / n_cols
    xn = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = (w.to(tl.float32) * xn.to(tl.float32)).to(out_ptr.dtype.element_ty)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        y = (r.to(tl.float32) + y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, y, mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """`weight * norm(x)` (+ `residual`), rows of the last dimension."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res = residual.reshape(-1, shape[-1]) if residual is not None else x2
    n = shape[-1]
    _rms_norm_kernel[(x2.shape[0],)](
        x2, weight, res, out, x2.stride(0), res.stride(0), out.stride(0), n, eps,
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 2048 else 4,
        enable_fp_fusion=True,
    )  # fmt: skip
    return out.view(shape)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_in, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < n_cols
    g = tl.load(gu_ptr + row * stride_in + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_in + n_cols + col, mask=mask, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + col, (u * s.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`up * silu(gate)` for a fused `[gate | up]` projection output `[N, 2 * inner]`."""
    n, two = gate_up.shape
    inner = two // 2
    out = torch.empty(n, inner, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(n, triton.cdiv(inner, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inner, BLOCK=block, enable_fp_fusion=True
    )
    return out


@triton.jit
def _mrope_kernel(
    x_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ct, HALF: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.arange(0, HALF)
    base = x_ptr + t * stride_xt + h * stride_xh
    xe = tl.load(base + 2 * j)
    xo = tl.load(base + 2 * j + 1)
    ce = tl.load(cos_ptr + t * stride_ct + 2 * j)
    co = tl.load(cos_ptr + t * stride_ct + 2 * j + 1)
    se = tl.load(sin_ptr + t * stride_ct + 2 * j)
    so = tl.load(sin_ptr + t * stride_ct + 2 * j + 1)
    dt = x_ptr.dtype.element_ty
    a = (xe.to(tl.float32) * ce.to(tl.float32)).to(dt).to(tl.float32)
    b = (-xo.to(tl.float32) * se.to(tl.float32)).to(dt).to(tl.float32)
    c = (xo.to(tl.float32) * co.to(tl.float32)).to(dt).to(tl.float32)
    d = (xe.to(tl.float32) * so.to(tl.float32)).to(dt).to(tl.float32)
    tl.store(base + 2 * j, (a + b).to(dt))
    tl.store(base + 2 * j + 1, (c + d).to(dt))


def mrope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of `x` `[N, heads, head_dim]` in place (pairs)."""
    n, heads, _ = x.shape
    rot = cos.shape[-1]
    if n:
        _mrope_kernel[(n, heads)](
            x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), HALF=rot // 2, enable_fp_fusion=True
        )
    return x
