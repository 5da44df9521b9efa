"""Tiny random-weight GLM-4.1V checkpoints in exactly the Hugging Face layout.

`create_tiny_model(dir)` writes `config.json`, `model.safetensors`, a real byte-level BPE
tokenizer holding every GLM special token, the chat template, `preprocessor_config.json` and
`generation_config.json`. The weights are seeded, so the same call always writes the same
checkpoint. These checkpoints load in glmv and in transformers alike; tests prove parity on them
and `glmv serve` falls back to one when the package has no demo model. Their answers are random text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

RANDOM_WEIGHTS_MARKER = "glmv_random_weights"


@dataclass(frozen=True, slots=True)
class TinySpec:
    """The shapes of one tiny variant."""

    template: str
    config_style: str  # "v4": rope_theta/rope_scaling keys; "v5": rope_parameters
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vision_image_size: int
    max_image_tokens: int


VARIANTS: dict[str, TinySpec] = {
    # GLM-4.1V-9B-Thinking style: transformers-4 config keys, the GLM-4.1V template.
    "glm41v": TinySpec("glm41v", "v4", 128, 320, 2, 4, 2, (2, 3, 3), 2, 64, 2, 112, 1024),
    # GLM-4.6V-Flash style: transformers-5 `rope_parameters`, other sizes, the 4.6V template.
    "glm46v": TinySpec("glm46v", "v5", 192, 256, 3, 6, 2, (2, 3, 3), 3, 96, 3, 168, 1024),
    # The full GLM-4.6V-Flash shape (10.3 B parameters) for GPU benchmarks. No weights are written:
    # config.json asks the loader to draw them on the device (see RANDOM_INIT_KEY).
    "full": TinySpec("glm46v", "v5", 4096, 13696, 40, 32, 2, (8, 12, 12), 24, 1536, 12, 336, 6144),
}

# config.json key of a weightless checkpoint whose weights the loader draws at random.
RANDOM_INIT_KEY = "glmv_random_init"


def _config(spec: TinySpec, vocab_size: int, ids: dict[str, Any]) -> dict[str, Any]:
    head_dim = spec.hidden // spec.heads
    text: dict[str, Any] = {
        "model_type": "glm4v_text",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "pad_token_id": ids["pad_token_id"],
        "eos_token_id": ids["eos_token_ids"],
        "use_cache": True,
    }
    assert sum(spec.mrope_section) * 4 == head_dim
    if spec.config_style == "v4":
        text |= {
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "rope_scaling": {"type": "default", "mrope_section": list(spec.mrope_section)},
        }
    else:
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": list(spec.mrope_section),
            "partial_rotary_factor": 0.5,
        }
    vision: dict[str, Any] = {
        "model_type": "glm4v_vision",
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "num_heads": spec.vision_heads,
        "in_channels": 3,
        "image_size": spec.vision_image_size,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
    }
    if spec.config_style == "v5":
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": 10000.0}
    return {
        "architectures": ["Glm4vForConditionalGeneration"],
        "model_type": "glm4v",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["image_token_id"],
        "video_token_id": ids["video_token_id"],
        "image_start_token_id": ids["image_start_token_id"],
        "image_end_token_id": ids["image_end_token_id"],
        "video_start_token_id": ids["video_start_token_id"],
        "video_end_token_id": ids["video_end_token_id"],
        "eos_token_id": ids["eos_token_ids"],
        "tie_word_embeddings": False,
        "dtype": "float32",
        RANDOM_WEIGHTS_MARKER: True,
    }


def _weights(spec: TinySpec, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random tensors under the transformers names, scaled so logits are well spread."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return normal(out_f, in_f, std=1.0 / math.sqrt(in_f))

    def norm(dim: int) -> torch.Tensor:
        return 1.0 + normal(dim, std=0.1)

    h, inter = spec.hidden, spec.intermediate
    hd = h // spec.heads
    w: dict[str, torch.Tensor] = {}
    lm = "model.language_model"
    w[f"{lm}.embed_tokens.weight"] = normal(vocab_size, h, std=1.0)
    for i in range(spec.layers):
        p = f"{lm}.layers.{i}"
        w[f"{p}.self_attn.q_proj.weight"] = linear(spec.heads * hd, h)
        w[f"{p}.self_attn.q_proj.bias"] = normal(spec.heads * hd, std=0.1)
        w[f"{p}.self_attn.k_proj.weight"] = linear(spec.kv_heads * hd, h)
        w[f"{p}.self_attn.k_proj.bias"] = normal(spec.kv_heads * hd, std=0.1)
        w[f"{p}.self_attn.v_proj.weight"] = linear(spec.kv_heads * hd, h)
        w[f"{p}.self_attn.v_proj.bias"] = normal(spec.kv_heads * hd, std=0.1)
        w[f"{p}.self_attn.o_proj.weight"] = linear(h, spec.heads * hd)
        w[f"{p}.mlp.gate_up_proj.weight"] = linear(2 * inter, h)
        w[f"{p}.mlp.down_proj.weight"] = linear(h, inter)
        for n in (
            "input_layernorm",
            "post_self_attn_layernorm",
            "post_attention_layernorm",
            "post_mlp_layernorm",
        ):
            w[f"{p}.{n}.weight"] = norm(h)
    w[f"{lm}.norm.weight"] = norm(h)
    w["lm_head.weight"] = normal(vocab_size, h, std=2.0 / math.sqrt(h))

    vh = spec.vision_hidden
    v = "model.visual"
    side = spec.vision_image_size // 14
    w[f"{v}.patch_embed.proj.weight"] = normal(vh, 3, 2, 14, 14, std=1.0 / math.sqrt(3 * 2 * 14 * 14))
    w[f"{v}.patch_embed.proj.bias"] = normal(vh, std=0.1)
    w[f"{v}.post_conv_layernorm.weight"] = norm(vh)
    w[f"{v}.embeddings.position_embedding.weight"] = normal(side * side, vh, std=0.5)
    for i in range(spec.vision_depth):
        p = f"{v}.blocks.{i}"
        w[f"{p}.norm1.weight"] = norm(vh)
        w[f"{p}.norm2.weight"] = norm(vh)
        w[f"{p}.attn.qkv.weight"] = linear(3 * vh, vh)
        w[f"{p}.attn.proj.weight"] = linear(vh, vh)
        w[f"{p}.mlp.gate_proj.weight"] = linear(h, vh)
        w[f"{p}.mlp.up_proj.weight"] = linear(h, vh)
        w[f"{p}.mlp.down_proj.weight"] = linear(vh, h)
    w[f"{v}.post_layernorm.weight"] = norm(vh)
    w[f"{v}.downsample.weight"] = normal(h, vh, 2, 2, std=1.0 / math.sqrt(vh * 4))
    w[f"{v}.downsample.bias"] = normal(h, std=0.1)
    w[f"{v}.merger.proj.weight"] = linear(h, h)
    w[f"{v}.merger.post_projection_norm.weight"] = norm(h)
    w[f"{v}.merger.post_projection_norm.bias"] = normal(h, std=0.1)
    w[f"{v}.merger.gate_proj.weight"] = linear(inter, h)
    w[f"{v}.merger.up_proj.weight"] = linear(inter, h)
    w[f"{v}.merger.down_proj.weight"] = linear(h, inter)
    return {k: t.contiguous() for k, t in w.items()}


def _preprocessor_config(spec: TinySpec) -> dict[str, Any]:
    longest = 9633792 if spec.hidden == 4096 else 2 * 28 * 28 * spec.max_image_tokens
    return {
        "image_processor_type": "Glm4vImageProcessor",
        "processor_class": "Glm4vProcessor",
        "do_resize": True,
        "size": {"shortest_edge": 12544, "longest_edge": longest},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }


def create_tiny_model(out_dir: str | Path, *, variant: str = "glm41v", seed: int = 0) -> Path:
    """Write a tiny random-weight checkpoint to `out_dir` and return its path."""
    from glmv.processing.tiny_tokenizer import write_tiny_tokenizer

    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = write_tiny_tokenizer(out, template=spec.template, seed=seed)
    keys = (
        "image_token_id",
        "video_token_id",
        "image_start_token_id",
        "image_end_token_id",
        "video_start_token_id",
        "video_end_token_id",
        "pad_token_id",
    )
    ids: dict[str, Any] = {k: int(info.special_ids[k]) for k in keys}
    ids["eos_token_ids"] = [int(t) for t in info.special_ids["eos_token_ids"]]
    vocab_size = ((info.vocab_size + 63) // 64) * 64
    if variant == "full":
        vocab_size = 151552
    config = _config(spec, vocab_size, ids)
    if variant == "full":
        config[RANDOM_INIT_KEY] = {"seed": seed, "branch_scale": 0.2}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if variant != "full":
        save_file(_weights(spec, vocab_size, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "preprocessor_config.json").write_text(
        json.dumps(_preprocessor_config(spec), indent=2) + "\n", encoding="utf-8"
    )
    generation = {
        "eos_token_id": ids["eos_token_ids"],
        "pad_token_id": ids["pad_token_id"],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return out


def is_random_checkpoint(path: str | Path) -> bool:
    """True for checkpoints written by `create_tiny_model` (their answers are random text)."""
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(data.get(RANDOM_WEIGHTS_MARKER, False))
