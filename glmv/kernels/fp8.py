"""FP8 (e4m3) weight matmuls: per-output-channel weight scales, per-token activation scales.

`fp8_linear(x, weight, weight_scale, bias)` computes `x @ (weight * weight_scale[:, None]).T + b`.

* On a CUDA device with FP8 tensor cores (compute capability 8.9: Ada, 9.0: Hopper):
  decode-sized batches (up to 64 rows) run a Triton kernel that widens the e4m3 weight tile in
  registers (only the weight's bytes stream, half of bf16's; activations are not rounded);
  larger batches quantize the activations per row to e4m3 in one Triton launch and multiply in
  cuBLASLt through `torch._scaled_mm` with row-wise scales on both sides (FP8 tensor-core
  throughput). Measured on an H200: cuBLASLt's FP8 GEMM with unfused activation rounding was
  1.1-4x slower than bf16 below 64 rows (benchmarks/RESULTS.md).
* Elsewhere (the CPU, and the reference the tests compare to) the weight is dequantized to the
  activation dtype and multiplied with a plain `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Smallest per-row scale: keeps an all-zero row from dividing by zero.
_MIN_SCALE = 1e-12


def supports_fp8(device: torch.device) -> bool:
    """True where `fp8_linear` runs on FP8 tensor cores (CUDA compute capability 8.9 or newer)."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of `w` [rows, cols] with one float32 scale per row (absmax / 448)."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)
    codes = (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`codes * scale[:, None]` in float32, rounded once to `dtype`."""
    return (codes.float() * scale.float()[:, None]).to(dtype)


def block_scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scale grid of a `shape` [rows, cols] weight in `block` [rows, cols] tiles
    (the last tile of each axis may be partial, as in DeepSeek-V3's and transformers' layout)."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def expand_block_scales(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """The per-element float32 scales [rows, cols] of a block scale grid."""
    s = scale.float().repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return s[: shape[0], : shape[1]]


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of `w` [rows, cols] with one float32 scale per `block` tile (absmax / 448):
    the `weight` / `weight_scale_inv` pair of block-FP8 checkpoints (`codes * scale = w`)."""
    rows, cols = w.shape
    br, bc = block
    grid = block_scale_shape((rows, cols), block)
    w32 = w.float()
    padded = w32.new_zeros(grid[0] * br, grid[1] * bc)
    padded[:rows, :cols] = w32
    tiles = padded.view(grid[0], br, grid[1], bc)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=_MIN_SCALE)
    codes = (w32 / expand_block_scales(scale, (rows, cols), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def dequantize_blocks(
    codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """`codes * scale` (one scale per `block` tile) in float32, rounded once to `dtype`."""
    shape = (codes.shape[0], codes.shape[1])
    return (codes.float() * expand_block_scales(scale, shape, block)).to(dtype)


def fp8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The product with the dequantized weight (no activation rounding): the CPU path."""
    return F.linear(x, dequantize_rows(weight, weight_scale, x.dtype), bias)


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """`x` [M, K] (bf16/fp16/fp32), `weight` [N, K] e4m3, `weight_scale` [N] float32 -> [M, N]."""
    if not supports_fp8(x.device):
        return fp8_linear_reference(x, weight, weight_scale, bias)
    from glmv.kernels.fp8_triton import SMALL_M, fp8_weight_matmul, quantize_rows_fp8  # pragma: no cover

    if x.shape[0] <= SMALL_M:  # pragma: no cover - CUDA
        return fp8_weight_matmul(x, weight, weight_scale, bias)
    x_codes, x_scale = quantize_rows_fp8(x)  # pragma: no cover - CUDA
    # Row-wise scales want a bf16 result; the bias is added after (cuBLASLt's epilogue would
    # take it in bf16 only).
    out = torch._scaled_mm(  # pragma: no cover - CUDA
        x_codes,
        weight.t(),  # column-major [K, N] view of the row-major [N, K] codes, as cuBLASLt wants
        scale_a=x_scale[:, None],
        scale_b=weight_scale[None, :],
        out_dtype=torch.bfloat16,
    )
    if bias is not None:  # pragma: no cover - CUDA
        out = out + bias.to(out.dtype)
    return out.to(x.dtype)  # pragma: no cover - CUDA
