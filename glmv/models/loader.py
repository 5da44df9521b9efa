"""Load a Hugging Face–layout GLM-4.1V checkpoint into glmv's native model.

Reads `config.json` and single or sharded `*.safetensors` (with `model.safetensors.index.json`),
maps the transformers tensor names onto glmv's modules (fusing q/k/v and gate/up, turning the
patch and downsample convolutions into matmuls), and checks every tensor: a missing, unexpected
or mis-shaped tensor, or an unreadable file, raises one `CheckpointError` naming the file and
the tensor.

4-bit checkpoints (AWQ GEMM or GPTQ, `glmv.models.quant`) load too: the linear layers the
checkpoint holds `qweight`s for become `Int4Linear`s before any memory is allocated, and their
packed tensors are converted into glmv's layout, fused like the float ones.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

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


def quantized_module_names(names: Iterable[str]) -> set[str]:
    """glmv module names of the linear layers that checkpoint tensor `names` hold `qweight`s for."""
    modules: set[str] = set()
    for raw in names:
        if raw.endswith(".qweight"):
            name, _, _ = fused_name(map_name(raw[: -len("qweight")] + "weight"))
            modules.add(name[: -len(".weight")])
    return modules


def load_weights(
    model: Glm4vModel, tensors: Iterable[tuple[str, torch.Tensor, str]], quant: QuantSpec | None = None
) -> None:
    """Copy checkpoint tensors into `model`, fusing and reshaping; strict about names and shapes.
    `quant` describes the packing of the 4-bit tensors of the model's `Int4Linear` layers."""
    params = dict(model.named_parameters())
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
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
            elif module_name in qmods:
                inner = qmods[module_name].out_features // 2
                sizes = (inner, inner)
            else:
                inner = params[name].shape[0] // 2 if name in params else 0
                sizes = (inner, inner)
            slot = (sum(sizes[:idx]), sizes[idx])
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
