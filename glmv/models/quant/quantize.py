"""`glmv quantize`: a float checkpoint in, a 4-bit AutoAWQ-layout checkpoint out (or, with
`fp8-block`, a block-scaled FP8 one written by `glmv.models.quant.fp8_writer`).

Steps: check the source (a float checkpoint, and at least one linear layer the group size
fits: `check_quantizable`, from the config alone); load the float model with glmv's loader; choose the linear layers to quantize (the text
decoder's always, the vision tower's and `lm_head` on request, any whose input width the group
size does not divide stay float); for `awq`, build the calibration set and quantize block by
block (vision blocks on the calibration images, then decoder layers on the calibration
conversations), for `rtn` round each weight to the nearest code; then write the checkpoint.

A weightless random-init checkpoint (`glmv_random_init` in `config.json`, no safetensors) has no
weights to quantize: its copy only gains the `quantization_config`, and the loader quantizes the
random weights it draws (RTN) as it builds the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from glmv.errors import CheckpointError, ConfigError
from glmv.kernels.metadata import AttentionMetadata
from glmv.models.config import ModelConfig
from glmv.models.loader import load_model, model_skeleton
from glmv.models.quant.awq import AwqSettings, ScaleGroup, quantize_block
from glmv.models.quant.calibration import (
    CalibrationSample,
    build_calibration_set,
    random_calibration_set,
)
from glmv.models.quant.fp8_writer import BLOCK_FP8, fp8_targets, write_fp8_checkpoint
from glmv.models.quant.int4 import PACK, QuantizedWeight, quantize_rtn
from glmv.models.quant.linear import quantizable_linears
from glmv.models.quant.writer import awq_quantization_config, copy_side_files, write_quantized_checkpoint

METHODS = ("awq", "rtn", "fp8-block")
# The method that writes block-scaled FP8 weights (`glmv.models.quant.fp8_writer`), not 4-bit ones.
FP8_BLOCK = "fp8-block"
Progress = Callable[[str, int], None]  # (stage description, steps done since the last call)


@dataclass(slots=True)
class QuantizeReport:
    method: str
    group_size: int
    quantized_layers: int = 0
    float_linears: list[str] = field(default_factory=list)
    calibration_samples: int = 0
    calibration_tokens: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)


def skip_list(quantize_vision: bool, quantize_lm_head: bool) -> tuple[str, ...]:
    skip: list[str] = []
    if not quantize_vision:
        skip.append("visual")
    if not quantize_lm_head:
        skip.append("lm_head")
    return tuple(skip)


def _text_groups(model: nn.Module) -> tuple[list[ScaleGroup], dict[str, int]]:
    t = model.config.text  # type: ignore[attr-defined]
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    inter = t.intermediate_size
    groups = [
        ScaleGroup(["self_attn.qkv_proj"], prev_norm="input_layernorm"),
        ScaleGroup(["mlp.gate_up_proj"], prev_norm="post_attention_layernorm"),
        ScaleGroup(["mlp.down_proj"], prev_linear="mlp.gate_up_proj", prev_rows=(inter, 2 * inter)),
    ]
    if q == kv:  # the attention output reads v directly only without grouped-query heads
        groups.append(
            ScaleGroup(["self_attn.o_proj"], prev_linear="self_attn.qkv_proj", prev_rows=(q + kv, q + 2 * kv))
        )
    return groups, {"self_attn.qkv_proj": q + kv}


def _vision_groups(model: nn.Module) -> tuple[list[ScaleGroup], dict[str, int]]:
    v = model.config.vision  # type: ignore[attr-defined]
    h, inner = v.hidden_size, v.out_hidden_size
    groups = [
        ScaleGroup(["attn.qkv"], prev_norm="norm1"),
        ScaleGroup(["mlp.gate_up_proj"], prev_norm="norm2"),
        ScaleGroup(["mlp.down_proj"], prev_linear="mlp.gate_up_proj", prev_rows=(inner, 2 * inner)),
        ScaleGroup(["attn.proj"], prev_linear="attn.qkv", prev_rows=(2 * h, 3 * h)),
    ]
    return groups, {"attn.qkv": 2 * h}


def _prefixed(block_prefix: str, names: list[str]) -> list[str]:
    return [n[len(block_prefix) :] for n in names if n.startswith(block_prefix)]


@torch.no_grad()
def _image_embeddings(model: nn.Module, samples: list[CalibrationSample]) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for sample in samples:
        if not sample.images:
            out.append(None)
            continue
        pv = torch.cat([im.pixel_values for im in sample.images]).to(model.device)
        out.append(torch.cat(model.encode_images(pv, [im.grid_thw for im in sample.images])))
    return out


@torch.no_grad()
def _quantize_vision(
    model: nn.Module,
    samples: list[CalibrationSample],
    targets: set[str],
    settings: AwqSettings,
    quantized: dict[str, QuantizedWeight],
    changed: set[str],
    progress: Progress,
) -> None:
    tower = model.visual
    images = [im for s in samples for im in s.images]
    groups, no_clip = _vision_groups(model)
    if not images:
        return
    grids = [im.grid_thw for im in images]
    pv = torch.cat([im.pixel_values for im in images]).to(model.device)
    x = tower.post_conv_layernorm(tower.patch_embed(pv.to(model.dtype)))
    coords = tower._coords(grids, x.device)
    cos, sin = tower._rope(coords)
    x = x + tower._position_embeddings(coords, grids).to(x.device)
    lengths = [h * w for t, h, w in grids for _ in range(t)]
    for i, block in enumerate(tower.blocks):
        prefix = f"visual.blocks.{i}."
        names = _prefixed(prefix, sorted(targets))
        outs: list[torch.Tensor] = []

        def run(block: nn.Module = block, x: torch.Tensor = x, outs: list[torch.Tensor] = outs) -> None:
            outs.clear()
            outs.append(block(x, cos, sin, lengths))

        if names:
            qws, ch = quantize_block(block, groups, names, run, settings, no_clip_rows=no_clip)
            quantized.update({prefix + k: v for k, v in qws.items()})
            changed.update(prefix + c for c in ch)
        else:
            run()
        x = outs[0]
        progress("vision blocks", 1)


@torch.no_grad()
def _quantize_text(
    model: nn.Module,
    samples: list[CalibrationSample],
    embeds: list[torch.Tensor | None],
    targets: set[str],
    settings: AwqSettings,
    quantized: dict[str, QuantizedWeight],
    changed: set[str],
    progress: Progress,
) -> None:
    dev, dtype = model.device, model.dtype
    t = model.config.text
    groups, no_clip = _text_groups(model)
    block_size = 16
    hidden: list[torch.Tensor] = []
    contexts = []
    for sample, emb in zip(samples, embeds, strict=True):
        ids = torch.tensor(sample.token_ids, dtype=torch.int64, device=dev)
        x = model.embed_tokens(ids)
        if emb is not None:
            x = x.masked_scatter((ids == model.image_token_id).unsqueeze(-1), emb.to(x.dtype))
        positions, _ = model.prompt_positions(len(sample.token_ids), sample.images)
        cos, sin = model.rotary(positions.to(dev), dtype)
        n = len(sample.token_ids)
        nb = (n + block_size - 1) // block_size
        shape = (nb, block_size, t.num_key_value_heads, t.head_dim)
        cache = (torch.zeros(shape, dtype=dtype, device=dev), torch.zeros(shape, dtype=dtype, device=dev))
        meta = AttentionMetadata.build(
            query_lens=[n], seq_lens=[n], block_tables=[list(range(nb))], block_size=block_size, device=dev
        )
        hidden.append(x)
        contexts.append((cos, sin, cache, meta))
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}."
        names = _prefixed(prefix, sorted(targets))
        outs: list[torch.Tensor] = []

        def run(
            layer: nn.Module = layer, hidden: list[torch.Tensor] = hidden, outs: list[torch.Tensor] = outs
        ) -> None:
            outs.clear()
            for h, (cos, sin, cache, meta) in zip(hidden, contexts, strict=True):
                outs.append(layer(h, cos, sin, cache, meta))

        if names:
            qws, ch = quantize_block(layer, groups, names, run, settings, no_clip_rows=no_clip)
            quantized.update({prefix + k: v for k, v in qws.items()})
            changed.update(prefix + c for c in ch)
        else:
            run()
        hidden = list(outs)
        progress("decoder layers", 1)


def check_quantizable(src: Path, group_size: int | None, skip: tuple[str, ...]) -> list[str]:
    """The linear layers of `src` that would be quantized, read from its config (the model is
    built on the meta device); `group_size` None: FP8, every linear layer not skipped. A
    `CheckpointError` when `src` is no float checkpoint, a `ConfigError` when no layer would be
    quantized (a group size that divides no input width)."""
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: not a checkpoint directory (no config.json)")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        raise CheckpointError(
            f"{src}: already quantized ({config['quantization_config'].get('quant_method')}); "
            "quantize the float checkpoint it came from"
        )
    if group_size is None:
        return sorted(fp8_targets(ModelConfig.from_pretrained(src), skip)[0])
    model = model_skeleton(ModelConfig.from_pretrained(src))
    targets = quantizable_linears(model, group_size, skip=skip)
    if not targets:
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        widths = sorted({m.in_features for n, m in linears if not any(s in n for s in skip)})
        raise ConfigError(
            f"nothing to quantize: group size {group_size} does not divide the input width of any linear "
            f"layer into groups of a multiple of {PACK} (widths: {', '.join(map(str, widths))}); use a "
            "group size that does (128, 64, 32) or -1 for one group per output channel",
            param="group_size",
            code="nothing_to_quantize",
        )
    return targets


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    method: str = "awq",
    group_size: int = 128,
    quantize_vision: bool = False,
    quantize_lm_head: bool = False,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    num_samples: int = 32,
    max_tokens: int = 512,
    seed: int = 0,
    settings: AwqSettings | None = None,
    progress: Progress | None = None,
) -> QuantizeReport:
    """Quantize the float checkpoint `src` into `dst` (see the module docstring)."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if src.resolve() == dst.resolve():
        raise ConfigError("the output directory must differ from the source checkpoint")
    step: Progress = progress or (lambda _stage, _n: None)
    report = QuantizeReport(method, group_size)
    skip = skip_list(quantize_vision, quantize_lm_head)
    if method == FP8_BLOCK:  # no model is loaded: each weight is rounded as it streams through
        check_quantizable(src, None, skip)
        report.group_size = 0
        fp8 = write_fp8_checkpoint(src, dst, spec=BLOCK_FP8, skip=skip, progress=lambda n: step("writing tensors", n))
        report.quantized_layers, report.float_linears, report.files = (
            fp8.quantized_layers,
            fp8.float_linears,
            fp8.files,
        )
        report.seconds = time.perf_counter() - start
        return report
    check_quantizable(src, group_size, skip)  # before anything is loaded or written
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if config.get("glmv_random_init") is not None and not any(src.glob("*.safetensors")):
        dst.mkdir(parents=True, exist_ok=True)
        copy_side_files(src, dst, awq_quantization_config(group_size, skip))
        report.seconds = time.perf_counter() - start
        return report

    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    load_dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    model = load_model(src, dtype=load_dtype, device=dev)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    targets = set(quantizable_linears(model, group_size, skip=skip))
    report.float_linears = [n for n in linears if n not in targets]
    cfg = settings or AwqSettings(group_size=group_size)
    cfg.group_size = group_size
    quantized: dict[str, QuantizedWeight] = {}
    changed: set[str] = set()

    if method == "awq":
        try:
            samples = build_calibration_set(src, num_samples=num_samples, max_tokens=max_tokens, seed=seed)
        except CheckpointError:
            samples = random_calibration_set(model.vocab_size, num_samples=num_samples, seed=seed)
        report.calibration_samples = len(samples)
        report.calibration_tokens = sum(len(s.token_ids) for s in samples)
        embeds = _image_embeddings(model, samples)  # from the float vision tower
        if any(n.startswith("visual.blocks.") for n in targets):
            _quantize_vision(model, samples, targets, cfg, quantized, changed, step)
        _quantize_text(model, samples, embeds, targets, cfg, quantized, changed, step)
    for name in sorted(targets - set(quantized)):
        weight = model.get_submodule(name).weight
        quantized[name] = quantize_rtn(weight, group_size)
        step("other linear layers", 1)
    report.quantized_layers = len(quantized)

    not_converted = set(skip) | {n for n in report.float_linears if not any(s in n for s in skip)}
    written = write_quantized_checkpoint(
        src,
        dst,
        model,
        quantized,
        changed,
        awq_quantization_config(group_size, not_converted),
        progress=lambda n: step("writing tensors", n),
    )
    report.files = written.files
    report.seconds = time.perf_counter() - start
    return report
