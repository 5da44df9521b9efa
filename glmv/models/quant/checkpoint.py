"""Reading 4-bit checkpoints: the `quantization_config`, and each tensor into an `Int4Linear`
(FP8 configs are told apart here and read by `glmv.models.quant.fp8_checkpoint`).

Two layouts load (`glmv.models.quant.int4` describes them): AutoAWQ's GEMM packing
(`quant_method: awq`, `version: gemm`, 4 bits, zero points) and GPTQ (`quant_method: gptq`,
4 bits, sym or asym, `desc_act` off — or on with a `g_idx` that is still in order — in the
original v1 zero-point convention or `checkpoint_format: gptq_v2`). Projections that glmv fuses
(q/k/v, gate/up) arrive as separate tensors; each is converted to glmv's layout and written into
its columns of the fused module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmv.errors import CheckpointError
from glmv.models.quant.fp8_checkpoint import FP8_METHODS, Fp8Spec
from glmv.models.quant.int4 import AWQ_ORDER, PACK, gptq_zeros, pack_rows, unpack_columns
from glmv.models.quant.linear import Int4Linear

QUANT_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
# Buffer of `Int4Linear` that each checkpoint tensor fills (g_idx is only checked).
LEAF_TO_BUFFER = {"qweight": "qweight", "qzeros": "zeros", "scales": "scales"}
SUPPORTED_METHODS = ("awq", "gptq")


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """What a checkpoint's quantization config says, reduced to what loading needs."""

    method: str  # "awq" | "gptq"
    group_size: int  # -1: one group per output channel
    sym: bool = False
    gptq_v1: bool = True  # GPTQ zero points stored minus one
    modules_to_not_convert: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str) -> QuantSpec:
        method = str(data.get("quant_method", "")).lower()
        if method not in SUPPORTED_METHODS:
            raise CheckpointError(
                f"{source}: quant_method {method or None!r} is not supported "
                f"(glmv loads {', '.join(SUPPORTED_METHODS + FP8_METHODS)})"
            )
        bits = int(data.get("bits", data.get("w_bit", 4)))
        if bits != 4:
            raise CheckpointError(f"{source}: {bits}-bit weights are not supported (glmv loads 4-bit)")
        group = int(data.get("group_size", data.get("q_group_size", 128)))
        skip = tuple(str(m) for m in (data.get("modules_to_not_convert") or ()))
        if method == "awq":
            version = str(data.get("version", "gemm")).lower()
            if version != "gemm":
                raise CheckpointError(
                    f"{source}: AWQ version {version!r} is not supported (glmv loads the GEMM packing)"
                )
            if not data.get("zero_point", True):
                raise CheckpointError(f"{source}: AWQ without zero points is not supported")
            return cls("awq", group, sym=False, gptq_v1=False, modules_to_not_convert=skip)
        fmt = str(data.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported")
        return cls(
            "gptq", group, sym=bool(data.get("sym", True)), gptq_v1=fmt == "gptq", modules_to_not_convert=skip
        )


def read_quant_spec(path: str | Path) -> QuantSpec | Fp8Spec | None:
    """The checkpoint's quantization, from `config.json`'s `quantization_config` (or AutoAWQ's
    `quant_config.json` / AutoGPTQ's `quantize_config.json` beside it): a `QuantSpec` for 4-bit
    weights, an `Fp8Spec` for FP8 ones, None for float weights."""
    path = Path(path)
    candidates: list[tuple[Path, str | None]] = [
        (path / "config.json", "quantization_config"),
        (path / "quant_config.json", None),
        (path / "quantize_config.json", None),
    ]
    for file, key in candidates:
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: not valid JSON: {exc}") from exc
        if key is not None:
            data = data.get(key) if isinstance(data, dict) else None
        if not isinstance(data, dict) or not data:
            continue
        if key is None and "quant_method" not in data:
            data = {**data, "quant_method": "awq" if file.name == "quant_config.json" else "gptq"}
        if str(data.get("quant_method", "")).lower() in FP8_METHODS:
            return Fp8Spec.from_dict(data, source=str(file))
        return QuantSpec.from_dict(data, source=str(file))
    return None


def copy_quantized_part(
    module: Int4Linear,
    leaf: str,
    tensor: torch.Tensor,
    slot: tuple[int, int] | None,
    spec: QuantSpec,
) -> int:
    """Convert one checkpoint tensor (`leaf` in `QUANT_LEAVES`) of a projection into `module`'s
    buffers, at output columns `slot` (`(start, length)`, or all of them). Returns how many output
    columns it filled (0 for `g_idx`); raises ValueError on a shape or format mismatch."""
    start, length = slot if slot is not None else (0, module.out_features)
    k = module.in_features
    g = module.group_size
    groups = k // g
    dev = module.qweight.device
    if leaf == "g_idx":
        expected = torch.arange(k, dtype=torch.int64) // g
        if tuple(tensor.shape) != (k,) or not torch.equal(tensor.to(torch.int64).cpu(), expected):
            raise ValueError(
                "g_idx is not in input-channel order (act-order / desc_act GPTQ checkpoints are not supported)"
            )
        return 0
    if leaf == "scales":
        _expect(tensor, (groups, length))
        module.scales[:, start : start + length].copy_(tensor.to(device=dev, dtype=torch.float16))
        return length
    if spec.method == "awq":
        if length % PACK != 0:
            raise ValueError(f"AWQ packs output columns by {PACK}; this projection has {length}")
        if leaf == "qweight":
            _expect(tensor, (k, length // PACK))
            codes = unpack_columns(tensor.to(device=dev, dtype=torch.int32), AWQ_ORDER)
            module.qweight[:, start : start + length].copy_(pack_rows(codes))
        else:
            _expect(tensor, (groups, length // PACK))
            zeros = unpack_columns(tensor.to(device=dev, dtype=torch.int32), AWQ_ORDER)
            module.zeros[:, start : start + length].copy_(zeros)
        return length
    if leaf == "qweight":
        _expect(tensor, (k // PACK, length))
        module.qweight[:, start : start + length].copy_(tensor.to(device=dev, dtype=torch.int32))
        return length
    if length % PACK != 0:
        raise ValueError(f"GPTQ packs zero points by {PACK} output columns; this projection has {length}")
    _expect(tensor, (groups, length // PACK))
    zeros = gptq_zeros(tensor.to(device=dev, dtype=torch.int32), v1=spec.gptq_v1)
    module.zeros[:, start : start + length].copy_(zeros)
    return length


def _expect(tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"has shape {tuple(tensor.shape)}, expected {shape}")
