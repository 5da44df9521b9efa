"""Model configuration parsed from a checkpoint's `config.json`.

Both layouts in the wild are accepted: the transformers-4 form (`rope_theta`,
`partial_rotary_factor` and `rope_scaling: {type, mrope_section}` on the text config) and the
transformers-5 form (`rope_parameters: {rope_type, rope_theta, mrope_section,
partial_rotary_factor}`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmv.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("glm4v",)


@dataclass(frozen=True, slots=True)
class TextConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: tuple[int, ...] = (8, 12, 12)
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        # transformers' Glm4vTextAttention derives head_dim from hidden/heads, never from config.
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass(frozen=True, slots=True)
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    in_channels: int = 3
    image_size: int = 336
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    intermediate_size: int = 13696
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True, slots=True)
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    model_type: str = "glm4v"
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        model_type = data.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported (expected one of {SUPPORTED_MODEL_TYPES})"
            )
        try:
            text = _text_config(data.get("text_config") or {})
            vision = _vision_config(data.get("vision_config") or {})
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{source}: invalid value: {exc}") from exc
        rot_pairs = text.rotary_dim // 2
        if sum(text.mrope_section) != rot_pairs:
            raise CheckpointError(
                f"{source}: mrope_section {list(text.mrope_section)} must sum to head_dim * "
                f"partial_rotary_factor / 2 = {rot_pairs}"
            )
        eos = data.get("eos_token_id", (data.get("text_config") or {}).get("eos_token_id"))
        if eos is None:
            eos_ids: tuple[int, ...] = ()
        elif isinstance(eos, int):
            eos_ids = (eos,)
        else:
            eos_ids = tuple(int(e) for e in eos)
        text_data = data.get("text_config") or {}
        tie = bool(data.get("tie_word_embeddings", False) or text_data.get("tie_word_embeddings", False))
        return cls(
            text=text,
            vision=vision,
            model_type=model_type,
            image_token_id=int(data.get("image_token_id", 151343)),
            video_token_id=int(data.get("video_token_id", 151344)),
            image_start_token_id=int(data.get("image_start_token_id", 151339)),
            image_end_token_id=int(data.get("image_end_token_id", 151340)),
            tie_word_embeddings=tie,
            eos_token_ids=eos_ids,
            torch_dtype=data.get("dtype") or data.get("torch_dtype") or text_data.get("torch_dtype"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: not found (a checkpoint directory needs config.json)")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{file}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{file}: expected a JSON object")
        return cls.from_dict(data, source=str(file))


def _text_config(d: dict[str, Any]) -> TextConfig:
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
    section = rope.get("mrope_section", scaling.get("mrope_section", (8, 12, 12)))
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"text rope type {rope_type!r} is not supported")
    heads = int(d.get("num_attention_heads", 32))
    return TextConfig(
        vocab_size=int(d.get("vocab_size", 151552)),
        hidden_size=int(d.get("hidden_size", 4096)),
        intermediate_size=int(d.get("intermediate_size", 13696)),
        num_hidden_layers=int(d.get("num_hidden_layers", 40)),
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        rope_theta=float(theta),
        partial_rotary_factor=float(partial),
        mrope_section=tuple(int(s) for s in section),
        hidden_act=str(d.get("hidden_act", "silu")),
    )


def _vision_config(d: dict[str, Any]) -> VisionConfig:
    rope = d.get("rope_parameters") or {}
    return VisionConfig(
        depth=int(d.get("depth", d.get("num_hidden_layers", 24))),
        hidden_size=int(d.get("hidden_size", 1536)),
        num_heads=int(d.get("num_heads", d.get("num_attention_heads", 12))),
        in_channels=int(d.get("in_channels", 3)),
        image_size=int(d.get("image_size", 336)),
        patch_size=int(d.get("patch_size", 14)),
        temporal_patch_size=int(d.get("temporal_patch_size", 2)),
        spatial_merge_size=int(d.get("spatial_merge_size", 2)),
        out_hidden_size=int(d.get("out_hidden_size", 4096)),
        intermediate_size=int(d.get("intermediate_size", 13696)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        attention_bias=bool(d.get("attention_bias", False)),
        hidden_act=str(d.get("hidden_act", "silu")),
    )
