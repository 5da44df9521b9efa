"""Writing a 4-bit checkpoint in AutoAWQ's GEMM layout (or GPTQ's, for tests and interchange).

The output keeps the source checkpoint's tensor names: every linear layer that was quantized
is written as `<name>.qweight` / `.qzeros` / `.scales` (q/k/v and gate/up are split back into the
source's own projections when the source had them separate), float tensors that quantization
changed (norm weights that absorbed AWQ scales) are written from the model, and all the others
are copied from the source unchanged. `config.json` gains a `quantization_config`; the
tokenizer, chat template and processor files are copied.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from glmv.models.loader import fused_name, iter_checkpoint_tensors, map_name
from glmv.models.quant.int4 import QuantizedWeight, packed_to_awq, packed_to_gptq

SHARD_BYTES = 2 * 1024**3


@dataclass(slots=True)
class WriteReport:
    files: list[str] = field(default_factory=list)
    quantized_tensors: int = 0
    float_tensors: int = 0
    bytes_written: int = 0


def awq_quantization_config(group_size: int, modules_to_not_convert: Iterable[str]) -> dict[str, Any]:
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": sorted(set(modules_to_not_convert)),
    }


def gptq_quantization_config(group_size: int, *, sym: bool, v1: bool = True) -> dict[str, Any]:
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "desc_act": False,
        "sym": sym,
        "checkpoint_format": "gptq" if v1 else "gptq_v2",
    }


def _slot(model: nn.Module, name: str, fused: str | None, idx: int) -> tuple[int, int] | None:
    """Rows of the fused glmv module that checkpoint projection `idx` occupies (as the loader)."""
    if fused is None:
        return None
    if fused.endswith("qkv_proj"):
        t = model.config.text  # type: ignore[attr-defined]
        q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
        sizes = (q, kv, kv)
    else:
        inner = model.get_submodule(name.rpartition(".")[0]).out_features // 2
        sizes = (inner, inner)
    return sum(sizes[:idx]), sizes[idx]


def write_quantized_checkpoint(
    src: str | Path,
    dst: str | Path,
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    changed: Iterable[str],
    quantization_config: dict[str, Any],
    *,
    fmt: str = "awq",
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[int], None] | None = None,
) -> WriteReport:
    """Write `dst` from the source checkpoint `src` and the quantization results.

    `quantized` maps glmv module names (e.g. `layers.0.self_attn.qkv_proj`) to their 4-bit
    weights; `changed` names glmv parameters whose float values in `model` replace the source's.
    `fmt` is "awq" (AutoAWQ GEMM) or "gptq" (v1 zero points when the config says so).
    """
    src, dst = Path(src), Path(dst)
    changed = set(changed)
    params = dict(model.named_parameters())
    v1 = quantization_config.get("checkpoint_format", "gptq") == "gptq"
    out = ShardWriter(dst, shard_bytes=shard_bytes)
    report = out.report

    for raw_name, tensor, _file in iter_checkpoint_tensors(src):
        name, fused, idx = fused_name(map_name(raw_name))
        module_name, _, leaf = name.rpartition(".")
        slot = _slot(model, name, fused, idx)
        if module_name in quantized and leaf == "weight":
            qw = quantized[module_name]
            if slot is not None:
                qw = qw.rows(*slot)
            parts = packed_to_awq(qw) if fmt == "awq" else packed_to_gptq(qw, v1=v1)
            prefix = raw_name[: -len("weight")]
            for key, value in parts.items():
                out.emit(prefix + key, value)
            report.quantized_tensors += 1
        elif name in changed:
            value = params[name].detach()
            if slot is not None:
                value = value.narrow(0, slot[0], slot[1])
            out.emit(raw_name, value.reshape(tensor.shape).to(tensor.dtype))
            report.float_tensors += 1
        else:
            out.emit(raw_name, tensor)
            report.float_tensors += 1
        if progress is not None:
            progress(1)
    out.close()
    copy_side_files(src, dst, quantization_config)
    return report


class ShardWriter:
    """Safetensors shards of at most `shard_bytes` in `dst` (old weight files removed first),
    named and indexed like Hugging Face checkpoints once `close` is called."""

    def __init__(self, dst: Path, *, shard_bytes: int = SHARD_BYTES) -> None:
        self.dst = dst
        self.shard_bytes = shard_bytes
        self.report = WriteReport()
        dst.mkdir(parents=True, exist_ok=True)
        for old in [*dst.glob("*.safetensors"), dst / "model.safetensors.index.json"]:
            old.unlink(missing_ok=True)
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_size = 0
        self._written: list[tuple[Path, list[str]]] = []  # shards saved under temporary names

    def _flush(self) -> None:
        if self._shard:
            tmp = self.dst / f".shard-{len(self._written):05d}.partial"
            save_file(self._shard, str(tmp), metadata={"format": "pt"})
            self._written.append((tmp, list(self._shard)))
            self._shard, self._shard_size = {}, 0

    def emit(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_size + size > self.shard_bytes:
            self._flush()
        self._shard[key] = tensor
        self._shard_size += size
        self.report.bytes_written += size

    def close(self) -> WriteReport:
        self._flush()
        written, dst, report = self._written, self.dst, self.report
        if len(written) == 1:
            written[0][0].rename(dst / "model.safetensors")
            report.files.append("model.safetensors")
        else:
            weight_map: dict[str, str] = {}
            for i, (tmp, keys) in enumerate(written, start=1):
                fname = f"model-{i:05d}-of-{len(written):05d}.safetensors"
                tmp.rename(dst / fname)
                report.files.append(fname)
                weight_map.update(dict.fromkeys(keys, fname))
            index = {"metadata": {"total_size": report.bytes_written}, "weight_map": weight_map}
            (dst / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )
        return report


def copy_side_files(src: Path, dst: Path, quantization_config: dict[str, Any]) -> None:
    """Copy everything but the weights, adding `quantization_config` to `config.json`."""
    for item in src.iterdir():
        if item.name.endswith(".safetensors") or item.name == "model.safetensors.index.json":
            continue
        target = dst / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        elif item.name != "config.json":
            shutil.copy2(item, target)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
