"""Writing FP8 checkpoints from float ones, in the layouts `glmv.models.quant.fp8_checkpoint`
reads (`glmv quantize --method fp8-block` writes the block-scaled `fp8` one).

No model is loaded: the source's tensors stream through one at a time, and each 2-D weight of a
linear layer that is not skipped is written as e4m3 codes with its scale tensor under the
source's own name (q/k/v and gate/up stay separate projections, as published checkpoints have
them); every other tensor is copied unchanged. `config.json` gains the `quantization_config`,
with the linear layers left in float listed in `modules_to_not_convert` (`ignore` for
compressed-tensors).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glmv.kernels.fp8 import quantize_blocks, quantize_rows
from glmv.models.config import ModelConfig
from glmv.models.loader import fused_name, iter_checkpoint_tensors, map_name, model_skeleton
from glmv.models.quant.fp8_checkpoint import Fp8Spec
from glmv.models.quant.writer import SHARD_BYTES, ShardWriter, copy_side_files

# The layout of the published GLM-4.5V / GLM-4.6V FP8 checkpoints.
BLOCK_FP8 = Fp8Spec("fp8", "block", (128, 128))


@dataclass(slots=True)
class Fp8WriteReport:
    quantized_layers: int = 0
    float_linears: list[str] = field(default_factory=list)  # checkpoint names of float linear layers
    files: list[str] = field(default_factory=list)


def quantize_weight(spec: Fp8Spec, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of `w` [N, K] and its scale tensor as `spec`'s layout stores it
    (block grid [ceil(N/bn), ceil(K/bk)], per channel [N, 1], per tensor [1])."""
    if spec.strategy == "block":
        assert spec.block is not None
        return quantize_blocks(w, spec.block)
    if spec.strategy == "channel":
        codes, scale = quantize_rows(w)
        return codes, scale[:, None]
    codes, scale = quantize_rows(w.reshape(1, -1))
    return codes.reshape(w.shape), scale


def fp8_quantization_config(spec: Fp8Spec, not_converted: list[str]) -> dict[str, Any]:
    """The `quantization_config` of `config.json` for `spec`'s layout."""
    skip = sorted(set(not_converted))
    if spec.method == "fp8":
        config: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        if spec.block is not None:
            config["weight_block_size"] = list(spec.block)
        config["modules_to_not_convert"] = skip
        return config
    weights: dict[str, Any] = {
        "num_bits": 8,
        "type": "float",
        "strategy": spec.strategy,
        "symmetric": True,
        "dynamic": False,
    }
    if spec.block is not None:
        weights["block_structure"] = list(spec.block)
    activations = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}
        },
        "ignore": skip,
    }


def fp8_targets(config: ModelConfig, skip: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """glmv names of the linear layers written in FP8 (those not matching `skip`), and of all."""
    model = model_skeleton(config)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {n for n in linears if not any(s in n for s in skip)}, linears


def write_fp8_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    spec: Fp8Spec = BLOCK_FP8,
    skip: tuple[str, ...] = ("visual", "lm_head"),
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Fp8WriteReport:
    """Write `dst`: the float checkpoint `src` with its linear layers (but those whose glmv name
    contains one of `skip`) in FP8, in `spec`'s layout."""
    src, dst = Path(src), Path(dst)
    config = ModelConfig.from_pretrained(src)
    targets, linears = fp8_targets(config, skip)
    raw_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    report = Fp8WriteReport()
    if raw_config.get("glmv_random_init") is not None and not any(src.glob("*.safetensors")):
        # No weights to round: the loader draws them and holds the layers `skip` spares in FP8.
        dst.mkdir(parents=True, exist_ok=True)
        copy_side_files(src, dst, fp8_quantization_config(spec, list(skip)))
        report.quantized_layers = len(targets)
        return report
    out = ShardWriter(dst, shard_bytes=shard_bytes)
    for raw_name, tensor, _file in iter_checkpoint_tensors(src):
        name, _fused, _idx = fused_name(map_name(raw_name))
        module_name, _, leaf = name.rpartition(".")
        if leaf == "weight" and module_name in linears and tensor.ndim == 2:
            if module_name in targets:
                codes, scale = quantize_weight(spec, tensor)
                out.emit(raw_name, codes)
                out.emit(raw_name[: -len("weight")] + spec.scale_leaf, scale)
                report.quantized_layers += 1
            else:
                out.emit(raw_name, tensor)
                report.float_linears.append(raw_name[: -len(".weight")])
        else:
            out.emit(raw_name, tensor)
        if progress is not None:
            progress(1)
    report.files = out.close().files
    copy_side_files(src, dst, fp8_quantization_config(spec, report.float_linears))
    return report
