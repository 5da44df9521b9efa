"""4-bit weight formats: quantization, packing, and the reference dequantization.

One linear layer `y = x @ W.T` with `W` `[N, K]` (out, in) is stored as 4-bit codes `q` in
0…15, one zero point `z` and one scale `s` per group of `group_size` consecutive input channels
of each output channel, and dequantizes as

    W[n, k] = (q[n, k] - z[n, k // group_size]) * s[n, k // group_size]

This module knows three packings of the same numbers:

* **glmv's own** (what `Int4Linear` holds and the kernels read): `qweight` int32 `[K / 8, N]`,
  nibble `i` (bits `4i…4i+3`) of row `r` holding input channel `8r + i`; `zeros` uint8
  `[K / g, N]`; `scales` float16 `[K / g, N]`. Fusing projections concatenates along `N`.
  `Int4Linear` stores `qweight` K-major (the transpose of a contiguous `[N, K / 8]`, each output
  channel's words together, as the CUDA kernels read them); the functions here take any strides.
* **AutoAWQ GEMM** (`quant_method: awq`, `version: gemm`): `qweight` int32 `[K, N / 8]` packed
  along output columns in AWQ's interleaved order — nibble `i` of word `c` holds column
  `8c + AWQ_ORDER[i]`; `qzeros` int32 `[K / g, N / 8]` packed the same way, holding `z`;
  `scales` float16 `[K / g, N]`.
* **GPTQ** (`quant_method: gptq`, `desc_act: false`): `qweight` int32 `[K / 8, N]` packed along
  input rows in order (glmv's layout); `qzeros` int32 `[K / g, N / 8]` packed along output
  columns in order, holding `z - 1` in the original (`checkpoint_format: gptq`, "v1") format
  and `z` in `gptq_v2`; `scales` float16 `[K / g, N]`; `g_idx` int32 `[K]` = `k // g`.

Everything here is plain torch and runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The layout constants and the reference matmul are the kernels' (their CPU path); named here too.
from glmv.kernels.int4_reference import BITS as BITS
from glmv.kernels.int4_reference import PACK as PACK
from glmv.kernels.int4_reference import SHIFTS
from glmv.kernels.int4_reference import dequantize_packed as dequantize_packed
from glmv.kernels.int4_reference import int4_matmul_reference as int4_matmul_reference
from glmv.kernels.int4_reference import unpack_rows as unpack_rows

AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER: tuple[int, ...] = (0, 4, 1, 5, 2, 6, 3, 7)
SEQUENTIAL_ORDER: tuple[int, ...] = tuple(range(PACK))


@dataclass(slots=True)
class QuantizedWeight:
    """One linear layer's 4-bit weight in unpacked form (the canonical, format-free view)."""

    q: torch.Tensor  # uint8 [N, K], 0…15
    zeros: torch.Tensor  # uint8 [N, K / group_size]
    scales: torch.Tensor  # float16 [N, K / group_size]
    group_size: int

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.q.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`(q - z) * s` as a `[N, K]` matrix, computed in float32 and rounded once to `dtype`."""
        return dequantize(self.q, self.zeros, self.scales, self.group_size, dtype)

    def rows(self, start: int, length: int) -> QuantizedWeight:
        """The output channels `start … start + length` (splitting a fused projection)."""
        sl = slice(start, start + length)
        return QuantizedWeight(self.q[sl], self.zeros[sl], self.scales[sl], self.group_size)


def check_group_size(in_features: int, group_size: int) -> int:
    """The effective group size (`-1` means one group per output channel); raises if it does not fit."""
    g = in_features if group_size in (-1, 0) else group_size
    if g <= 0 or g % PACK != 0 or in_features % g != 0:
        raise ValueError(
            f"group size {group_size} does not divide the {in_features} input features into groups of "
            f"a multiple of {PACK}"
        )
    return g


def dequantize(
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference dequantization of unpacked `[N, K]` codes with `[N, K/g]` zeros and scales."""
    n, k = q.shape
    g = check_group_size(k, group_size)
    qf = q.to(torch.float32).view(n, k // g, g)
    w = (qf - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return w.view(n, k).to(dtype)


def quantize_rtn(w: torch.Tensor, group_size: int, *, sym: bool = False) -> QuantizedWeight:
    """Round-to-nearest 4-bit quantization of `w` `[N, K]` with one scale/zero per group.

    Asymmetric (default, AutoAWQ's formula): `s = (max - min) / 15`, `z = round(-min / s)`.
    Symmetric (GPTQ's): `s = 2 * max|w| / 15`, `z = 8`. Scales are rounded to float16 first, and
    the codes are computed with those rounded scales, so the stored numbers are self-consistent.
    """
    n, k = w.shape
    g = check_group_size(k, group_size)
    wf = w.detach().to(torch.float32).reshape(n, k // g, g)
    if sym:
        absmax = wf.abs().amax(-1).clamp(min=1e-5)
        scales = (2.0 * absmax / 15.0).to(torch.float16)
        zeros = torch.full_like(absmax, 8.0)
    else:
        wmax = wf.amax(-1)
        wmin = wf.amin(-1)
        scales = ((wmax - wmin).clamp(min=1e-5) / 15.0).to(torch.float16)
        zeros = (-torch.round(wmin / scales.float())).clamp(0, 15)
    s = scales.float().unsqueeze(-1)
    q = (torch.round(wf / s) + zeros.unsqueeze(-1)).clamp(0, 15)
    return QuantizedWeight(
        q=q.reshape(n, k).to(torch.uint8),
        zeros=zeros.to(torch.uint8),
        scales=scales,
        group_size=g,
    )


def fake_quantize(w: torch.Tensor, group_size: int, *, sym: bool = False) -> torch.Tensor:
    """`dequantize(quantize_rtn(w))` in `w`'s dtype: the weight the int4 model will really use."""
    return quantize_rtn(w, group_size, sym=sym).dequantize(w.dtype)


# ----------------------------------------------------------------------------------- packing


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns → int32 with the same bits (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """`[K, N]` codes → int32 `[K / 8, N]`, nibble `i` of row `r` = code of row `8r + i`."""
    k, n = codes.shape
    if k % PACK != 0:
        raise ValueError(f"cannot pack {k} rows into words of {PACK}")
    c = codes.to(torch.int64).view(k // PACK, PACK, n)
    words = torch.zeros(k // PACK, n, dtype=torch.int64, device=codes.device)
    for i, shift in enumerate(SHIFTS):
        words |= (c[:, i] & 0xF) << shift
    return _to_int32(words)


def pack_columns(codes: torch.Tensor, order: tuple[int, ...] = SEQUENTIAL_ORDER) -> torch.Tensor:
    """`[R, N]` codes → int32 `[R, N / 8]`, nibble `i` of word `c` = column `8c + order[i]`."""
    r, n = codes.shape
    if n % PACK != 0:
        raise ValueError(f"cannot pack {n} columns into words of {PACK}")
    c = codes.to(torch.int64).view(r, n // PACK, PACK)
    words = torch.zeros(r, n // PACK, dtype=torch.int64, device=codes.device)
    for i, shift in enumerate(SHIFTS):
        words |= (c[:, :, order[i]] & 0xF) << shift
    return _to_int32(words)


def unpack_columns(words: torch.Tensor, order: tuple[int, ...] = SEQUENTIAL_ORDER) -> torch.Tensor:
    """int32 `[R, N / 8]` → uint8 codes `[R, N]` (inverse of `pack_columns` with the same order)."""
    r, c = words.shape
    nibbles = torch.stack([((words >> shift) & 0xF) for shift in SHIFTS], dim=-1)  # [R, C, 8] by nibble
    inverse = [order.index(j) for j in range(PACK)]  # column j sits in nibble inverse[j]
    return nibbles[:, :, inverse].reshape(r, c * PACK).to(torch.uint8)


# ------------------------------------------------------------------------- glmv's own layout


@dataclass(slots=True)
class PackedInt4:
    """glmv's kernel layout of one weight: see the module docstring."""

    qweight: torch.Tensor  # int32 [K / 8, N]
    zeros: torch.Tensor  # uint8 [K / g, N]
    scales: torch.Tensor  # float16 [K / g, N]
    group_size: int


def to_packed(w: QuantizedWeight) -> PackedInt4:
    return PackedInt4(
        qweight=pack_rows(w.q.t()),
        zeros=w.zeros.t().contiguous(),
        scales=w.scales.t().contiguous(),
        group_size=w.group_size,
    )


def from_packed(
    qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> QuantizedWeight:
    return QuantizedWeight(
        q=unpack_rows(qweight).t().contiguous(),
        zeros=zeros.t().contiguous(),
        scales=scales.t().contiguous(),
        group_size=group_size,
    )


# ------------------------------------------------------------------ checkpoint formats (per part)


def awq_to_packed(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ GEMM tensors → glmv layout `(qweight [K/8, N], zeros [K/g, N], scales [K/g, N])`."""
    codes = unpack_columns(qweight, AWQ_ORDER)  # [K, N]
    zeros = unpack_columns(qzeros, AWQ_ORDER)  # [K/g, N]
    return pack_rows(codes), zeros, scales.to(torch.float16)


def packed_to_awq(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors (`qweight`, `qzeros`, `scales`) for one linear layer."""
    return {
        "qweight": pack_columns(w.q.t(), AWQ_ORDER).contiguous(),
        "qzeros": pack_columns(w.zeros.t(), AWQ_ORDER).contiguous(),
        "scales": w.scales.t().contiguous().to(torch.float16),
    }


def gptq_zeros(qzeros: torch.Tensor, *, v1: bool) -> torch.Tensor:
    """GPTQ `qzeros` → uint8 zero points `[K/g, N]`. The v1 format stores `z - 1`, so a stored
    nibble `v` means `v + 1` (16 for a stored 15, as the GPTQ kernels read it)."""
    z = unpack_columns(qzeros, SEQUENTIAL_ORDER)
    return (z + 1) if v1 else z


def packed_to_gptq(w: QuantizedWeight, *, v1: bool = True) -> dict[str, torch.Tensor]:
    """GPTQ tensors (`qweight`, `qzeros`, `scales`, `g_idx`) for one linear layer (desc_act off)."""
    zeros = w.zeros.t().to(torch.int64)
    if v1:
        if bool((zeros == 0).any()):
            raise ValueError("the GPTQ v1 format cannot store a zero point of 0")
        zeros = zeros - 1
    k = w.in_features
    return {
        "qweight": pack_rows(w.q.t()).contiguous(),
        "qzeros": pack_columns(zeros, SEQUENTIAL_ORDER).contiguous(),
        "scales": w.scales.t().contiguous().to(torch.float16),
        "g_idx": (torch.arange(k, dtype=torch.int32) // w.group_size),
    }
