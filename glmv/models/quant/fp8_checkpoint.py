"""Checkpoints that are already FP8: their `quantization_config`, and each FP8 weight into glmv's
layers.

Layouts read (the checkpoint's `config.json` says which; the tensors say which layers):

* `quant_method: fp8` with `weight_block_size: [128, 128]` (the zai-org GLM-4.5V/4.6V `-FP8`
  releases, DeepSeek-V3, transformers' fine-grained FP8): `weight` e4m3 [N, K] and
  `weight_scale_inv` float32 [ceil(N/128), ceil(K/128)]; `w = weight * weight_scale_inv` tile by
  tile (the last tile of an axis may be partial).
* `quant_method: fp8` without a block size (AutoFP8, vLLM's own fp8 serialization): `weight`
  e4m3 and one `weight_scale` per tensor.
* `quant_method: compressed-tensors`, format `float-quantized` (or `naive-quantized`), 8-bit float
  weights (llm-compressor's FP8 / FP8_DYNAMIC / FP8_BLOCK schemes): `weight` e4m3 and
  `weight_scale` per tensor ([1]), per output channel ([N, 1]) or per block (`block_structure`).

Static activation scales (`input_scale`) are not used: glmv rounds activations per token at run
time, which is at least as fine. A layer is FP8 when its weight comes with a scale tensor; the
layers a checkpoint keeps in bf16 (`modules_to_not_convert` / `ignore`: vision tower, lm_head)
load as float layers.

Where FP8 runs (`keep_fp8`: a CUDA GPU with FP8 tensor cores) an FP8 layer becomes an `Fp8Linear`
with per-output-channel scales, served by glmv's existing FP8 kernels: per-tensor and
per-channel scales become per-row scales with the checkpoint's codes unchanged (exact); block
scales are converted a band of rows at a time, dequantized to float32 and rounded again per row
(`quantize_rows`). Elsewhere (the CPU, older GPUs) every FP8 weight is dequantized to the model
dtype: the float reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from glmv.errors import CheckpointError
from glmv.kernels.fp8 import (
    FP8_DTYPE,
    block_scale_shape,
    dequantize_blocks,
    quantize_rows,
    supports_fp8,
)

FP8_METHODS = ("fp8", "compressed-tensors")
STRATEGIES = ("block", "channel", "tensor")
# compressed-tensors formats whose FP8 weights are stored as plain e4m3 tensors.
CT_FORMATS = ("float-quantized", "naive-quantized")
# Checkpoint tensors of an FP8 layer that glmv reads but does not keep.
IGNORED_LEAVES = ("input_scale",)
# Elements converted per step when block scales become row scales (bounds the float32 copy).
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True, slots=True)
class Fp8Spec:
    """What an FP8 checkpoint's quantization config says, reduced to what loading needs."""

    method: str  # "fp8" | "compressed-tensors"
    strategy: str  # "block" | "channel" | "tensor"
    block: tuple[int, int] | None  # (rows, cols) of a scale tile, for "block"
    modules_to_not_convert: tuple[str, ...] = ()

    @property
    def scale_leaf(self) -> str:
        """Name of the scale tensor beside each `weight`."""
        return "weight_scale_inv" if self.method == "fp8" and self.strategy == "block" else "weight_scale"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str) -> Fp8Spec:
        method = str(data.get("quant_method", "")).lower()
        if method == "fp8":
            fmt = str(data.get("fmt", "e4m3")).lower()
            if fmt != "e4m3":
                raise CheckpointError(f"{source}: FP8 fmt {fmt!r} is not supported (glmv loads e4m3)")
            skip = tuple(str(m) for m in (data.get("modules_to_not_convert") or ()))
            if data.get("weight_block_size") is None:
                return cls("fp8", "tensor", None, skip)
            return cls("fp8", "block", _block(data["weight_block_size"], "weight_block_size", source), skip)
        if method != "compressed-tensors":
            raise CheckpointError(f"{source}: quant_method {method!r} is not an FP8 method")
        groups = data.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise CheckpointError(f"{source}: compressed-tensors quantization_config without config_groups")
        schemes: set[tuple[str, tuple[int, int] | None]] = set()
        for name, group in groups.items():
            weights = group.get("weights") if isinstance(group, dict) else None
            if not isinstance(weights, dict):
                raise CheckpointError(f"{source}: config_groups.{name} has no weights description")
            fmt = str(group.get("format") or data.get("format") or "").lower()
            if fmt not in CT_FORMATS:
                raise CheckpointError(
                    f"{source}: compressed-tensors format {fmt or None!r} is not supported "
                    f"(glmv loads FP8 weights: {', '.join(CT_FORMATS)})"
                )
            kind, bits = str(weights.get("type", "")).lower(), weights.get("num_bits")
            if kind != "float" or bits != 8:
                raise CheckpointError(
                    f"{source}: config_groups.{name} weights are {bits}-bit {kind or '?'}; glmv loads "
                    "8-bit float (FP8) compressed-tensors checkpoints"
                )
            if weights.get("symmetric", True) is False:
                raise CheckpointError(
                    f"{source}: config_groups.{name}: asymmetric FP8 weights are not supported"
                )
            strategy = str(weights.get("strategy", "")).lower()
            if strategy not in STRATEGIES:
                raise CheckpointError(
                    f"{source}: config_groups.{name}: weight strategy {strategy or None!r} is not supported "
                    f"(glmv loads {', '.join(STRATEGIES)})"
                )
            block = (
                _block(
                    weights.get("block_structure"), f"config_groups.{name}.weights.block_structure", source
                )
                if strategy == "block"
                else None
            )
            schemes.add((strategy, block))
        if len(schemes) != 1:
            raise CheckpointError(
                f"{source}: config_groups with different FP8 weight schemes are not supported"
            )
        strategy, block = schemes.pop()
        skip = tuple(str(m) for m in (data.get("ignore") or ()))
        return cls("compressed-tensors", strategy, block, skip)


def _block(value: Any, key: str, source: str) -> tuple[int, int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise CheckpointError(f"{source}: {key} must be two positive integers [rows, cols], got {value!r}")
    return int(value[0]), int(value[1])


def keep_fp8(device: torch.device) -> bool:
    """True where FP8 layers stay FP8 (`Fp8Linear`); elsewhere they are dequantized at load."""
    return supports_fp8(device)


def check_scale(spec: Fp8Spec, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`scale` as float32 in its canonical shape ([rows/tiles, cols/tiles] for blocks, [N] per
    channel, [1] per tensor); ValueError naming both shapes when it does not fit `weight`."""
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"is {weight.dtype}, expected float8_e4m3fn beside its {spec.scale_leaf}")
    if weight.ndim != 2:
        raise ValueError(f"is an FP8 tensor of {weight.ndim} dimensions; glmv reads 2-D FP8 weights only")
    rows, cols = weight.shape
    got = tuple(scale.shape)
    if spec.strategy == "block":
        assert spec.block is not None
        expected: tuple[int, ...] = block_scale_shape((rows, cols), spec.block)
        ok = got == expected
    elif spec.strategy == "channel":
        expected = (rows, 1)
        ok = got in ((rows, 1), (rows,))
    else:
        expected = (1,)
        ok = scale.numel() == 1 and len(got) <= 1
    if not ok:
        raise ValueError(
            f"has a {spec.scale_leaf} of shape {got}, expected {expected} for a {rows}x{cols} weight "
            f"with {spec.strategy} scales{_block_words(spec)}"
        )
    return scale.float().reshape(-1) if spec.strategy != "block" else scale.float()


def _block_words(spec: Fp8Spec) -> str:
    return f" of {spec.block[0]}x{spec.block[1]}" if spec.block is not None else ""


def dequantize_weight(
    spec: Fp8Spec, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The float weight of `codes` with its checked `scale`, in float32 then rounded once to `dtype`."""
    if spec.strategy == "block":
        assert spec.block is not None
        return dequantize_blocks(codes, scale, spec.block, dtype)
    per_row = scale.expand(codes.shape[0]) if scale.numel() == 1 else scale
    return (codes.float() * per_row[:, None]).to(dtype)


def row_scaled(spec: Fp8Spec, codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same weight as e4m3 codes with one float32 scale per row (what `Fp8Linear` holds).

    Per-tensor and per-channel scales keep the codes as they are. Block scales are dequantized
    and rounded again per row, `rows_per_step` rows at a time (a multiple of the tile height, so
    each step covers whole tiles): the float32 copy stays a few MB whatever the layer's size."""
    rows, cols = codes.shape
    if spec.strategy != "block":
        return codes, (scale.expand(rows) if scale.numel() == 1 else scale).contiguous()
    assert spec.block is not None
    tile = spec.block[0]
    rows_per_step = max(tile, (_CHUNK_ELEMENTS // max(cols, 1)) // tile * tile)
    out_codes = torch.empty_like(codes)
    out_scale = torch.empty(rows, dtype=torch.float32, device=codes.device)
    for start in range(0, rows, rows_per_step):
        stop = min(rows, start + rows_per_step)
        tiles = scale[start // tile : -(-stop // tile)]
        w = dequantize_blocks(codes[start:stop], tiles, spec.block, torch.float32)
        out_codes[start:stop], out_scale[start:stop] = quantize_rows(w)
    return out_codes, out_scale
