"""Load a Hugging Face–layout GLM-4.1V checkpoint into glmv's native model.

Reads `config.json` and single or sharded `*.safetensors` (with `model.safetensors.index.json`),
maps the transformers tensor names onto glmv's modules (fusing q/k/v and gate/up, turning the
patch and downsample convolutions into matmuls), and checks every tensor: a missing, unexpected
or mis-shaped tensor, or an unreadable file, raises one `CheckpointError` naming the file and
the tensor.

4-bit checkpoints (AWQ GEMM or GPTQ, `glmv.models.quant`) load too: the linear layers the
checkpoint holds `qweight`s for become `Int4Linear`s before any memory is allocated, and their
packed tensors are converted into glmv's layout, fused like the float ones.

FP8 checkpoints (block-scaled `fp8`, or compressed-tensors `float-quantized`,
`glmv.models.quant.fp8_checkpoint`) load too: the scale tensors are read first (they are small),
the linear layers whose every part has one become `Fp8Linear`s before any memory is allocated
where FP8 runs (`keep_fp8`), and each FP8 weight is converted to per-row scales as it streams in;
elsewhere each is dequantized to the model dtype as it streams in.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from glmv.errors import CheckpointError
from glmv.models.config import ModelConfig
from glmv.models.glm4v import Glm4vModel
from glmv.models.quant.checkpoint import (
    LEAF_TO_BUFFER,
    QUANT_LEAVES,
    QuantSpec,
    copy_quantized_part,
    read_quant_spec,
)
from glmv.models.quant.fp8 import Fp8Linear, convert_to_fp8, fp8_linear_names
from glmv.models.quant.fp8_checkpoint import (
    IGNORED_LEAVES,
    Fp8Spec,
    check_scale,
    dequantize_weight,
    keep_fp8,
    row_scaled,
)
from glmv.models.quant.linear import Int4Linear, quantizable_linears, random_init_int4, replace_linears

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_PREFIXES = (
    # (pattern of the checkpoint name, replacement in glmv's module tree)
    (re.compile(r"^model\.language_model\."), ""),
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^visual\."), "visual."),
    (re.compile(r"^model\.(?=(layers|embed_tokens|norm)\b)"), ""),
    (re.compile(r"^language_model\.model\."), ""),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
)

# Checkpoint projections fused into one glmv matrix: (suffix, fused module, slot index, slots).
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r} (choose auto, float32, bfloat16 or float16)")
    return DTYPES[dtype]


def map_name(name: str) -> str:
    """Checkpoint tensor name → glmv parameter name (before fusion)."""
    for pattern, repl in _PREFIXES:
        if pattern.search(name):
            name = pattern.sub(repl, name, count=1)
            break
    name = name.replace("visual.embeddings.position_embedding", "visual.position_embedding")
    name = name.replace("visual.patch_embed.proj.", "visual.patch_embed.")
    name = name.replace("visual.merger.gate_proj", "visual.merger.mlp.gate_proj")
    name = name.replace("visual.merger.up_proj", "visual.merger.mlp.up_proj")
    name = name.replace("visual.merger.down_proj", "visual.merger.mlp.down_proj")
    return name


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index: {exc}") from exc
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors weights found")
    return [path / fname for fname in files]


def iter_checkpoint_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield `(name, tensor, file)` for every tensor of a checkpoint directory."""
    for fpath in _checkpoint_files(path):
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: listed in the index but missing")
        try:
            with safe_open(str(fpath), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield key, f.get_tensor(key), str(fpath)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{fpath}: cannot read safetensors file: {exc}") from exc


def checkpoint_tensor_names(path: Path) -> list[str]:
    """The names of every tensor of a checkpoint directory, without reading the tensors."""
    names: list[str] = []
    for fpath in _checkpoint_files(path):
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: listed in the index but missing")
        try:
            with safe_open(str(fpath), framework="pt", device="cpu") as f:
                names.extend(f.keys())
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{fpath}: cannot read safetensors file: {exc}") from exc
    return names


def fused_name(name: str) -> tuple[str, str | None, int]:
    """A glmv parameter name (after `map_name`) → its name after q/k/v and gate/up fusion, the
    fused module suffix it goes into (None when not fused), and its slot index there."""
    for suffix, (fused, idx) in _FUSED.items():
        if f".{suffix}." in f".{name}":
            base, _, leaf = name.rpartition(f"{suffix}.")
            return f"{base}{fused}.{leaf}", fused, idx
    return name, None, 0


def read_named_tensors(path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors called `names` of a checkpoint directory (read file by file, others untouched)."""
    wanted = set(names)
    found: dict[str, torch.Tensor] = {}
    if not wanted:
        return found
    for fpath in _checkpoint_files(path):
        try:
            with safe_open(str(fpath), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if key in wanted:
                        found[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{fpath}: cannot read safetensors file: {exc}") from exc
    return found


def fp8_module_names(names: Iterable[str], spec: Fp8Spec) -> set[str]:
    """glmv module names of the linear layers whose every checkpoint weight (among tensor `names`)
    has an FP8 scale tensor beside it; a fused module with some parts in float stays a float
    layer, and its FP8 parts are dequantized."""
    weights: dict[str, set[int]] = {}
    scaled: dict[str, set[int]] = {}
    suffix = f".{spec.scale_leaf}"
    for raw in names:
        if raw.endswith(suffix):
            raw, parts = raw[: -len(suffix)] + ".weight", scaled
        elif raw.endswith(".weight"):
            parts = weights
        else:
            continue
        name, _, idx = fused_name(map_name(raw))
        parts.setdefault(name[: -len(".weight")], set()).add(idx)
    return {m for m, got in scaled.items() if got == weights.get(m)}


def quantized_module_names(names: Iterable[str]) -> set[str]:
    """glmv module names of the linear layers that checkpoint tensor `names` hold `qweight`s for."""
    modules: set[str] = set()
    for raw in names:
        if raw.endswith(".qweight"):
            name, _, _ = fused_name(map_name(raw[: -len("qweight")] + "weight"))
            modules.add(name[: -len(".weight")])
    return modules


def load_weights(
    model: Glm4vModel,
    tensors: Iterable[tuple[str, torch.Tensor, str]],
    quant: QuantSpec | None = None,
    *,
    fp8: Fp8Spec | None = None,
    fp8_scales: dict[str, torch.Tensor] | None = None,
) -> None:
    """Copy checkpoint tensors into `model`, fusing and reshaping; strict about names and shapes.
    `quant` describes the packing of the 4-bit tensors of the model's `Int4Linear` layers; `fp8`
    the FP8 weights, whose scale tensors `fp8_scales` holds by name (read beforehand)."""
    params = dict(model.named_parameters())
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    fmods = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    ffilled: dict[str, int] = {}
    scales = fp8_scales or {}
    qfilled: dict[tuple[str, str], int] = {}
    cfg = model.config
    t = cfg.text
    q_size = t.num_attention_heads * t.head_dim
    kv_size = t.num_key_value_heads * t.head_dim
    filled: dict[str, int] = {}
    expected_parts: dict[str, int] = {}
    seen_head = False

    for raw_name, tensor, file in tensors:
        name, fused, idx = fused_name(map_name(raw_name))
        module_name, _, leaf = name.rpartition(".")
        slot: tuple[int, int] | None = None
        if fused is not None:
            if fused.endswith("qkv_proj"):
                sizes = (q_size, kv_size, kv_size)
            elif module_name in qmods or module_name in fmods:
                inner = (qmods.get(module_name) or fmods[module_name]).out_features // 2
                sizes = (inner, inner)
            else:
                inner = params[name].shape[0] // 2 if name in params else 0
                sizes = (inner, inner)
            slot = (sum(sizes[:idx]), sizes[idx])
        if fp8 is not None and (leaf == fp8.scale_leaf or leaf in IGNORED_LEAVES):
            continue  # scales were read beforehand; static activation scales are not used
        if tensor.dtype.itemsize == 1 and tensor.is_floating_point():
            if fp8 is None:
                raise CheckpointError(
                    f"{file}: tensor {raw_name!r} is {tensor.dtype} but config.json has no FP8 quantization_config"
                )
            scale = scales.get(raw_name[: -len("weight")] + fp8.scale_leaf) if leaf == "weight" else None
            if scale is None:
                raise CheckpointError(f"{file}: FP8 tensor {raw_name!r} has no {fp8.scale_leaf} beside it")
            try:
                scale = check_scale(fp8, tensor, scale)
            except ValueError as exc:
                raise CheckpointError(f"{file}: tensor {raw_name!r} {exc}") from exc
            if module_name in fmods:
                module = fmods[module_name]
                start, length = slot if slot is not None else (0, module.out_features)
                if tuple(tensor.shape) != (length, module.in_features):
                    raise CheckpointError(
                        f"{file}: tensor {raw_name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {(length, module.in_features)} from config.json"
                    )
                dev = module.weight.device
                codes, row_scale = row_scaled(fp8, tensor.to(dev), scale.to(dev))
                with torch.no_grad():
                    module.weight[start : start + length].copy_(codes)
                    module.weight_scale[start : start + length].copy_(row_scale)
                ffilled[module_name] = ffilled.get(module_name, 0) + length
                continue
            target_dtype = params[name].dtype if name in params else torch.float32
            tensor = dequantize_weight(fp8, tensor, scale, target_dtype)
        elif module_name in fmods and leaf == "weight":
            raise CheckpointError(
                f"{file}: tensor {raw_name!r} has a {fp8.scale_leaf if fp8 else 'scale'} but is stored as "
                f"{tensor.dtype}, not float8_e4m3fn"
            )
        if module_name in qmods and leaf in QUANT_LEAVES:
            if quant is None:
                raise CheckpointError(f"{file}: 4-bit tensor {raw_name!r} but no quantization config")
            try:
                done = copy_quantized_part(qmods[module_name], leaf, tensor, slot, quant)
            except ValueError as exc:
                raise CheckpointError(f"{file}: tensor {raw_name!r} {exc}") from exc
            key = (module_name, LEAF_TO_BUFFER.get(leaf, leaf))
            qfilled[key] = qfilled.get(key, 0) + done
            continue
        if name not in params:
            raise CheckpointError(f"{file}: unexpected tensor {raw_name!r} (not part of a glm4v model)")
        param = params[name]
        if name == "visual.patch_embed.weight" or name == "visual.downsample.weight":
            tensor = tensor.reshape(tensor.shape[0], -1)
        target = param.data if slot is None else param.data.narrow(0, slot[0], slot[1])
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{file}: tensor {raw_name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)} from config.json"
            )
        with torch.no_grad():
            target.copy_(tensor.to(dtype=target.dtype))
        filled[name] = filled.get(name, 0) + (slot[1] if slot else param.shape[0])
        expected_parts[name] = param.shape[0]
        if name == "lm_head.weight":
            seen_head = True

    if (
        not seen_head
        and cfg.tie_word_embeddings
        and "embed_tokens.weight" in filled
        and "lm_head.weight" in params
    ):
        with torch.no_grad():
            params["lm_head.weight"].data.copy_(params["embed_tokens.weight"].data)
        filled["lm_head.weight"] = params["lm_head.weight"].shape[0]
    missing = [n for n, p in params.items() if filled.get(n, 0) != p.shape[0]]
    for module_name, module in qmods.items():
        for buffer in LEAF_TO_BUFFER.values():
            if qfilled.get((module_name, buffer), 0) != module.out_features:
                missing.append(f"{module_name}.{buffer}")
        module.invalidate_cache()
    for module_name, fmodule in fmods.items():
        if ffilled.get(module_name, 0) != fmodule.out_features:
            missing.append(f"{module_name}.weight")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint is missing tensors for: {shown}")


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
)


@contextlib.contextmanager
def _meta_init() -> Iterator[None]:
    """Build modules on the meta device without running their weight initialisers: the values
    are thrown away anyway, and random draws on meta tensors import torch._dynamo (seconds of
    start-up in every engine core process)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _materialize(model: Glm4vModel, device: torch.device) -> Glm4vModel:
    """`model.to_empty(device)` without `empty_like` on meta tensors (whose Python reference
    implementation imports sympy: seconds of start-up). Strides are kept: the int4 layers store
    their codes K-major (a transposed view), the layout their CUDA kernels read."""
    return model._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device))


def model_skeleton(config: ModelConfig) -> Glm4vModel:
    """The model's modules on the meta device: names and shapes, no memory, no initialisation
    (what a plan needs, e.g. which linear layers a quantization would reach)."""
    with _meta_init():
        return Glm4vModel(config)


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> Glm4vModel:
    """An uninitialised model of the given shape, allocated directly on `device`."""
    with _meta_init():
        model = Glm4vModel(config).to(dtype)  # cast while still on meta: no full-precision copy
    model = _materialize(model, device)
    # LayerNorm/RMSNorm parameters stay in the model dtype (as in transformers).
    return model.eval().requires_grad_(False)


@torch.no_grad()
def random_init(model: Glm4vModel, *, seed: int = 0, branch_scale: float = 1.0) -> None:
    """Draw every weight at random on the model's device: fan-in-scaled matrices, unit norms, and
    residual branches scaled by `branch_scale` (< 1 keeps a deep random network from being chaotic)."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    hidden = model.config.text.hidden_size
    for name, p in model.named_parameters():
        if "post_self_attn_layernorm" in name or "post_mlp_layernorm" in name:
            p.fill_(branch_scale)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        elif p.ndim == 1:
            p.normal_(0.0, 0.02, generator=gen)
        elif name in ("embed_tokens.weight", "visual.position_embedding.weight"):
            p.normal_(0.0, 1.0, generator=gen)
        elif name == "lm_head.weight":
            p.normal_(0.0, 2.0 / hidden**0.5, generator=gen)
        else:
            scale = (
                branch_scale
                if name.startswith("visual.blocks") and ("attn.proj" in name or "down_proj" in name)
                else 1.0
            )
            p.normal_(0.0, scale / p.shape[1] ** 0.5, generator=gen)


def load_model(
    path: str | Path, *, dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = None
) -> Glm4vModel:
    """Load a checkpoint directory onto `device` (default: CUDA when available, else CPU)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    dev = torch.device(device) if device is not None else _default_device()
    config = ModelConfig.from_pretrained(path)
    quant = read_quant_spec(path)
    random_spec = json.loads((path / "config.json").read_text(encoding="utf-8")).get("glmv_random_init")
    weightless = random_spec is not None and not any(path.glob("*.safetensors"))
    if isinstance(quant, Fp8Spec):
        return _load_fp8_checkpoint(path, config, quant, resolve_dtype(dtype, dev), dev, random_spec, weightless)
    if quant is None:
        model = build_model(config, resolve_dtype(dtype, dev), dev)
    else:
        if weightless:
            with _meta_init():
                shapes = Glm4vModel(config)
            names = quantizable_linears(shapes, quant.group_size, skip=quant.modules_to_not_convert)
        else:
            names = sorted(quantized_module_names(checkpoint_tensor_names(path)))
        model = build_quantized_model(config, resolve_dtype(dtype, dev), dev, names, quant.group_size)
    if weightless:
        seed = int(random_spec.get("seed", 0))
        branch_scale = float(random_spec.get("branch_scale", 1.0))
        random_init(model, seed=seed, branch_scale=branch_scale)
        if quant is not None:
            random_init_int4(model, seed=seed, branch_scale=branch_scale)
        return model
    load_weights(model, iter_checkpoint_tensors(path), quant)
    return model


def _load_fp8_checkpoint(
    path: Path,
    config: ModelConfig,
    spec: Fp8Spec,
    dtype: torch.dtype,
    device: torch.device,
    random_spec: dict[str, Any] | None,
    weightless: bool,
) -> Glm4vModel:
    """An FP8 checkpoint: FP8 layers as `Fp8Linear`s where FP8 runs, dequantized elsewhere."""
    keep = keep_fp8(device)
    if weightless:
        assert random_spec is not None
        model = build_model(config, dtype, device)
        random_init(
            model, seed=int(random_spec.get("seed", 0)), branch_scale=float(random_spec.get("branch_scale", 1.0))
        )
        if keep:  # the layers such a checkpoint would hold in FP8: all but those it names
            convert_to_fp8(model, skip=tuple(map_name(f"{m}.").rstrip(".") for m in spec.modules_to_not_convert))
        return model
    names = checkpoint_tensor_names(path)
    scale_names = [n for n in names if n.endswith(f".{spec.scale_leaf}")]
    held: list[str] = []
    if keep:
        fp8_modules = fp8_module_names(names, spec)
        # Fp8Linear's GEMM wants aligned shapes; any other FP8 layer is dequantized.
        held = [n for n in fp8_linear_names(model_skeleton(config), skip=()) if n in fp8_modules]
    with _meta_init():
        model = Glm4vModel(config).to(dtype)
        for name in held:  # on the meta device: the float weights of these layers never exist
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, leaf)
            setattr(
                parent, leaf, Fp8Linear(old.in_features, old.out_features, bias=old.bias is not None, dtype=dtype)
            )
    model = _materialize(model, device).eval().requires_grad_(False)
    load_weights(model, iter_checkpoint_tensors(path), fp8=spec, fp8_scales=read_named_tensors(path, scale_names))
    return model


def build_quantized_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, quantized: Iterable[str], group_size: int
) -> Glm4vModel:
    """Like `build_model`, with the linear layers named in `quantized` made `Int4Linear`s before
    anything is allocated (so the full-precision weights never exist)."""
    with _meta_init():
        model = Glm4vModel(config).to(dtype)
    try:
        replace_linears(model, quantized, group_size, dtype=dtype)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot hold the 4-bit layers of this checkpoint: {exc}") from exc
    model = _materialize(model, device)
    return model.eval().requires_grad_(False)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
