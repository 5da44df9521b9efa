"""The torch reference of glmv's 4-bit weight layout: unpacking, dequantization, matmul.

glmv's own packing (see `glmv.models.quant.int4` for the formats): `qweight` int32 `[K / 8, N]`,
nibble `i` (bits `4i…4i+3`) of row `r` holding input channel `8r + i`; `zeros` uint8 `[K / g, N]`;
`scales` float16 `[K / g, N]`, `W[n, k] = (q - z) * s` per group of `g` input channels. This is
what the Triton kernels compute and what they fall back to where no kernel applies (plain torch,
any device).
"""

from __future__ import annotations

import torch

BITS = 4
PACK = 32 // BITS  # codes per int32 word
SHIFTS = tuple(BITS * i for i in range(PACK))

__all__ = ["BITS", "PACK", "SHIFTS", "dequantize_packed", "int4_matmul_reference", "unpack_rows"]


def unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """int32 `[K / 8, N]` → uint8 codes `[K, N]` (inverse of `pack_rows`)."""
    r, n = words.shape
    parts = [((words >> shift) & 0xF) for shift in SHIFTS]
    return torch.stack(parts, dim=1).reshape(r * PACK, n).to(torch.uint8)


def dequantize_packed(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
    *,
    k_start: int = 0,
    k_end: int | None = None,
) -> torch.Tensor:
    """Dequantize input channels `k_start … k_end` of glmv-layout tensors to `[k_end - k_start, N]`
    (the transpose of the `nn.Linear` weight), in float32 arithmetic rounded once to `dtype`.
    `k_start` and `k_end` must be multiples of the group size."""
    k = qweight.shape[0] * PACK
    k_end = k if k_end is None else k_end
    g = group_size
    rows = qweight[k_start // PACK : k_end // PACK]
    q = unpack_rows(rows).to(torch.float32)  # [k_len, N]
    kl, n = q.shape
    z = zeros[k_start // g : k_end // g].to(torch.float32)
    s = scales[k_start // g : k_end // g].to(torch.float32)
    w = (q.view(kl // g, g, n) - z.unsqueeze(1)) * s.unsqueeze(1)
    return w.view(kl, n).to(dtype)


def int4_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    block_k: int = 4096,
) -> torch.Tensor:
    """`x @ dequantize(W)` for 2-D `x` `[M, K]`, dequantizing `block_k` input channels at a time
    so that the full-precision weight never exists at once. Result in `x.dtype`."""
    k = qweight.shape[0] * PACK
    g = group_size
    step = max(g, (block_k // g) * g)
    out: torch.Tensor | None = None
    for start in range(0, k, step):
        end = min(k, start + step)
        w = dequantize_packed(qweight, zeros, scales, g, x.dtype, k_start=start, k_end=end)
        part = x[:, start:end] @ w
        out = part if out is None else out.add_(part)
    assert out is not None
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out
