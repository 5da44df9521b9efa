"""GLM-4v-9b (`model_type: chatglm`: GLM-4-9B text decoder + EVA2-CLIP-E vision) on glmv's engine.

The architecture follows the checkpoint's published remote code exactly; the module tree mirrors
its ``transformer.*`` tensor names, so loading is a prefix strip.

Text decoder (``transformer.embedding`` / ``encoder`` / ``output_layer``): pre-norm blocks
``h = x + attn(RMSNorm(x))``, ``out = h + mlp(RMSNorm(h))``, a final RMSNorm (weight applied in
float32, then cast, as the original does). Attention: one fused ``query_key_value`` (q for all
heads, then k and v for the ``multi_query_group_num`` KV groups; with bias), ``dense`` without
bias, scale ``1/sqrt(kv_channels)``. RoPE on the first ``kv_channels / 2`` dims of each head in
interleaved (even, odd) pairs, frequency ``i`` = ``(10000 · rope_ratio) ** (-2i / (kv_channels/2))``,
one position id per token. MLP: ``dense_h_to_4h`` → ``silu(first half) * second half`` →
``dense_4h_to_h``.

Vision (``transformer.vision``): Conv2d patch embedding (patch 14) → prepend the CLS vector → add
the learned position table (``(S/14)² + 1`` rows) → blocks with the norm *after* each branch
(``x = x + LN(attn(x))``, ``x = x + LN(mlp(x))``, GELU MLP) → drop CLS → Conv2d 2×2 stride 2 to
the text width → GLU adapter (``linear_proj`` → LayerNorm → GELU → ``silu(gate_proj) *
dense_h_to_4h`` → ``dense_4h_to_h``) → ``[boi, tokens, eoi]`` → divided by ``scaling_factor`` (8).
For a 1120×1120 image that is 1 + 1600 + 1 = 1602 embeddings.

Prompt layout and positions (glmv's one-span design; see `glmv.processing.chatglm_prompt`): the
original prompt holds ``<|begin_of_image|><|endoftext|><|end_of_image|>`` and the model swaps
those three tokens for the 1602 vision embeddings. In glmv's expanded prompt the image is one
span of 1602 placeholder ids (``<|endoftext|>``, the config's ``pad_token_id``) whose first and
last rows carry the begin/end-of-image vectors. Positions are the original's exactly: with the
begin-of-image token at position ``b``, the boi vector sits at ``b``, **all 1600 image tokens
share position ``b + 1``**, the eoi vector is at ``b + 2`` and the text after it continues at
``b + 3`` — the positions the unexpanded three-token prompt would have. Each image therefore
shifts later positions back by ``1599``; generated tokens continue from the last prompt position.
In glmv's optional multi-image mode every image follows the same rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmv.errors import CheckpointError
from glmv.kernels.attention import paged_attention, write_kv
from glmv.kernels.metadata import AttentionMetadata
from glmv.models.base import PromptImage

KVCache = tuple[torch.Tensor, torch.Tensor]

__all__ = [
    "Glm4v9bConfig",
    "Glm4v9bModel",
    "Glm4v9bVisionConfig",
    "build_glm4v_9b",
    "image_positions",
    "load_glm4v_9b",
    "load_glm4v_9b_weights",
    "random_init_glm4v_9b",
]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Glm4v9bVisionConfig:
    hidden_size: int = 1792
    num_hidden_layers: int = 63
    num_heads: int = 16
    intermediate_size: int = 15360
    patch_size: int = 14
    image_size: int = 1120
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    num_positions: int = 6401
    scaling_factor: float = 8.0
    hidden_act: str = "gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Merged patches per image (1600 at 1120×1120), not counting begin/end-of-image."""
        return (self.grid // 2) ** 2


@dataclass(frozen=True, slots=True)
class Glm4v9bConfig:
    """The keys of the original ``config.json`` that shape the model (the rest are ignored)."""

    hidden_size: int = 4096
    num_layers: int = 40
    num_attention_heads: int = 32
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    kv_channels: int = 128
    ffn_hidden_size: int = 13696
    padded_vocab_size: int = 151552
    layernorm_epsilon: float = 1.5625e-07
    add_qkv_bias: bool = True
    add_bias_linear: bool = False
    rope_ratio: float = 1.0
    seq_length: int = 8192
    eos_token_ids: tuple[int, ...] = (151329, 151336, 151338)
    pad_token_id: int = 151329
    boi_token_id: int = 151339
    eoi_token_id: int = 151340
    vision: Glm4v9bVisionConfig = field(default_factory=Glm4v9bVisionConfig)
    model_type: str = "chatglm"

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first half: 64 of 128)."""
        return self.kv_channels // 2

    @property
    def rope_base(self) -> float:
        return 10000.0 * self.rope_ratio

    @property
    def image_token_id(self) -> int:
        """The id every position of an image span holds in glmv's expanded prompt."""
        return self.pad_token_id

    @property
    def image_span_length(self) -> int:
        return self.vision.num_image_tokens + 2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Glm4v9bConfig:
        if data.get("model_type") != "chatglm":
            raise CheckpointError(f"model_type must be 'chatglm', got {data.get('model_type')!r}")
        # Variants of the ChatGLM code this implementation does not cover.
        unsupported = {
            "rmsnorm": (False, "LayerNorm blocks"),
            "original_rope": (False, "the non-interleaved RoPE variant"),
            "apply_residual_connection_post_layernorm": (True, "residuals taken after the norm"),
            "post_layer_norm": (False, "no final norm"),
        }
        for key, (bad, what) in unsupported.items():
            if key in data and bool(data[key]) == bad:
                raise CheckpointError(f"config.json: {key}={data[key]!r} ({what}) is not supported")
        if data.get("pre_seq_len") is not None:
            raise CheckpointError("config.json: pre_seq_len (P-tuning prefixes) is not supported")
        vision_data = data.get("vision_config")
        if not isinstance(vision_data, dict):
            raise CheckpointError("config.json: vision_config is missing (not a GLM-4v checkpoint?)")
        names = {f.name for f in fields(Glm4v9bVisionConfig)}
        try:
            vision = Glm4v9bVisionConfig(**{k: v for k, v in vision_data.items() if k in names})
        except TypeError as exc:  # pragma: no cover - dataclass kwargs are filtered above
            raise CheckpointError(f"config.json: bad vision_config: {exc}") from exc
        if vision.hidden_act not in ("gelu", "gelu_python"):
            raise CheckpointError(f"config.json: vision hidden_act {vision.hidden_act!r} is not supported")
        if vision.num_positions != vision.grid**2 + 1:
            raise CheckpointError(
                f"config.json: vision num_positions {vision.num_positions} does not match image_size "
                f"{vision.image_size} / patch_size {vision.patch_size} (expected {vision.grid**2 + 1})"
            )
        if vision.grid % 2:
            raise CheckpointError("config.json: image_size / patch_size must be even (2×2 downsample)")
        eos = data.get("eos_token_id", [151329, 151336, 151338])
        eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
        top = {f.name for f in fields(cls)} - {"vision", "eos_token_ids", "model_type"}
        values: dict[str, Any] = {k: data[k] for k in top if k in data and data[k] is not None}
        if "num_layers" not in values and "num_hidden_layers" in data:
            values["num_layers"] = data["num_hidden_layers"]
        if "padded_vocab_size" not in values and "vocab_size" in data:
            values["padded_vocab_size"] = data["vocab_size"]
        cfg = cls(**values, eos_token_ids=tuple(int(t) for t in eos_ids), vision=vision)
        if cfg.num_attention_heads % cfg.num_kv_heads:
            raise CheckpointError(
                "config.json: num_attention_heads must be a multiple of multi_query_group_num"
            )
        if cfg.kv_channels % 4:
            raise CheckpointError(
                "config.json: kv_channels must be a multiple of 4 (half of it is rotated in pairs)"
            )
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Glm4v9bConfig:
        file = Path(path) / "config.json"
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: cannot read: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{file}: not a JSON object")
        try:
            return cls.from_dict(data)
        except CheckpointError as exc:
            raise CheckpointError(f"{file}: {exc.message}") from exc
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{file}: bad value: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


def image_positions(
    num_tokens: int, span_offsets: Sequence[int], span_length: int
) -> tuple[torch.Tensor, int]:
    """1-D position ids `[num_tokens]` of an expanded prompt and the delta for what follows.

    Every image span (`span_length` positions: boi, the image tokens, eoi) occupies three
    positions: boi at `b`, all image tokens at `b + 1`, eoi at `b + 2`; text continues at `b + 3`.
    The delta is what generated token `i` adds to its index: position = `i + delta`.
    """
    pos = torch.arange(num_tokens, dtype=torch.int64)
    shift = 0
    for offset in sorted(span_offsets):
        end = offset + span_length
        if offset < 0 or end > num_tokens:
            raise ValueError(f"image span {offset}…{end} lies outside the prompt of {num_tokens} tokens")
        b = offset - shift
        pos[offset] = b
        pos[offset + 1 : end - 1] = b + 1
        pos[end - 1] = b + 2
        shift += span_length - 3
        pos[end:] -= span_length - 3
    return pos, -shift


# --------------------------------------------------------------------------------------------
# Text decoder
# --------------------------------------------------------------------------------------------


class ChatGLMRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, …) → (-x1, x0, -x3, x2, …)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of `x` `[N, heads, head_dim]` in interleaved pairs."""
    rot = cos.shape[-1]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    x_rot = x[..., :rot]
    return torch.cat((x_rot * c + _rotate_pairs(x_rot) * s, x[..., rot:]), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg: Glm4v9bConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        bias = cfg.add_qkv_bias or cfg.add_bias_linear
        self.query_key_value = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.dense = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.query_key_value(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(n, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(n, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.dense(o.reshape(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: Glm4v9bConfig) -> None:
        super().__init__()
        self.ffn = cfg.ffn_hidden_size
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=cfg.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).split(self.ffn, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, cfg: Glm4v9bConfig) -> None:
        super().__init__()
        self.input_layernorm = ChatGLMRMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.self_attention = SelfAttention(cfg)
        self.post_attention_layernorm = ChatGLMRMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = x + self.self_attention(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class Embedding(nn.Module):
    def __init__(self, cfg: Glm4v9bConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(ids)


class Encoder(nn.Module):
    def __init__(self, cfg: Glm4v9bConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = ChatGLMRMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)


# --------------------------------------------------------------------------------------------
# Vision tower (EVA2-CLIP-E) and adapter
# --------------------------------------------------------------------------------------------


class PatchEmbedding(nn.Module):
    def __init__(self, v: Glm4v9bVisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(v.in_channels, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, v.hidden_size))
        self.position_embedding = nn.Embedding(v.num_positions, v.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # [B, grid², hidden]
        cls = self.cls_embedding.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.position_embedding.weight.unsqueeze(0)


class VisionAttention(nn.Module):
    def __init__(self, v: Glm4v9bVisionConfig) -> None:
        super().__init__()
        self.num_heads = v.num_heads
        self.query_key_value = nn.Linear(v.hidden_size, 3 * v.hidden_size)
        self.dense = nn.Linear(v.hidden_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # full attention within each image
        return self.dense(o.transpose(1, 2).reshape(b, n, -1))


class VisionMLP(nn.Module):
    def __init__(self, v: Glm4v9bVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    """EVA2-CLIP's block normalises each branch's output, not its input."""

    def __init__(self, v: Glm4v9bVisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.attention = VisionAttention(v)
        self.mlp = VisionMLP(v)
        self.post_attention_layernorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class VisionTransformer(nn.Module):
    def __init__(self, v: Glm4v9bVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(v) for _ in range(v.num_hidden_layers))


class GLU(nn.Module):
    def __init__(self, cfg: Glm4v9bConfig) -> None:
        super().__init__()
        h, ffn = cfg.hidden_size, cfg.ffn_hidden_size
        self.linear_proj = nn.Linear(h, h, bias=False)
        self.norm1 = nn.LayerNorm(h)
        self.gate_proj = nn.Linear(h, ffn, bias=False)
        self.dense_h_to_4h = nn.Linear(h, ffn, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    def __init__(self, cfg: Glm4v9bConfig) -> None:
        super().__init__()
        v = cfg.vision
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(v)
        self.transformer = VisionTransformer(v)
        self.linear_proj = GLU(cfg)
        self.conv = nn.Conv2d(v.hidden_size, cfg.hidden_size, kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` → `[B, (S/28)² + 2, hidden]`: boi, merged patches, eoi, scaled down."""
        v = self.cfg.vision
        x = self.patch_embedding(images)
        for layer in self.transformer.layers:
            x = layer(x)
        x = x[:, 1:]  # drop CLS
        b, _, h = x.shape
        g = v.grid
        x = self.conv(x.view(b, g, g, h).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        x = self.linear_proj(x)
        x = torch.cat((self.boi.expand(b, -1, -1), x, self.eoi.expand(b, -1, -1)), dim=1)
        return x / v.scaling_factor


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


class Glm4v9bModel(nn.Module):
    """GLM-4v-9b as a `glmv.models.base.ServedModel`: one flattened, paged forward per step."""

    def __init__(self, config: Glm4v9bConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.vision = EVA2CLIPModel(config)
        # The `ServedModel` view the engine uses.
        self.num_layers = config.num_layers
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.vocab_size = config.padded_vocab_size
        self.max_model_len = config.seq_length
        self.eos_token_ids = tuple(config.eos_token_ids)
        self.image_token_id = config.image_token_id
        half = config.rotary_dim // 2
        # Explicit CPU device: the model may be built under a `meta` device context.
        steps = torch.arange(0, config.rotary_dim, 2, dtype=torch.float32, device="cpu")
        self._inv_freq_cpu = 1.0 / (config.rope_base ** (steps / config.rotary_dim))
        assert self._inv_freq_cpu.numel() == half
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.word_embeddings.weight.device

    # --- positions -----------------------------------------------------------------------------

    def _span_length(self, image: PromptImage) -> int:
        length = getattr(image, "length", None)  # the engine's ImageInput carries it
        if isinstance(length, int):
            return length
        _, h, w = image.grid_thw
        return (h // 2) * (w // 2) + 2

    def prompt_positions(self, num_tokens: int, images: Sequence[PromptImage]) -> tuple[torch.Tensor, int]:
        """`[1, num_tokens]` positions of an expanded prompt (see the module docstring)."""
        lengths = {self._span_length(im) for im in images}
        if len(lengths) > 1:
            raise ValueError("all images of a GLM-4v-9b prompt have the same size")
        span = lengths.pop() if lengths else self.config.image_span_length
        pos, delta = image_positions(num_tokens, [im.offset for im in images], span)
        return pos.unsqueeze(0), delta

    def positions_after_prompt(self, start: int, end: int, delta: int) -> torch.Tensor:
        return torch.arange(start + delta, end + delta, dtype=torch.int64).unsqueeze(0)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._inv_freq.get(positions.device)
        if inv is None:
            inv = self._inv_freq[positions.device] = self._inv_freq_cpu.to(positions.device)
        freqs = positions.reshape(-1).float()[:, None] * inv  # [N, rotary_dim / 2]
        freqs = freqs.repeat_interleave(2, dim=-1)  # pair (2i, 2i+1) turns with frequency i
        # The original keeps its cos/sin table in the model dtype.
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    # --- images --------------------------------------------------------------------------------

    def encode_images(
        self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]
    ) -> list[torch.Tensor]:
        """`[B, 3, S, S]` pixels → one `[(S/28)² + 2, hidden]` tensor per image."""
        v = self.config.vision
        expected = (len(grids), v.in_channels, v.image_size, v.image_size)
        if tuple(pixel_values.shape) != expected:
            raise ValueError(f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}")
        w = self.vision.patch_embedding.proj.weight
        # One image per pass: a 1120×1120 image is already 6401 tokens, and peak activation memory
        # stays that of one image however many a step brings.
        return [
            self.vision(pixel_values[i : i + 1].to(device=w.device, dtype=w.dtype))[0]
            for i in range(pixel_values.shape[0])
        ]

    # --- language model ------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[KVCache],
        meta: AttentionMetadata,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states `[N, hidden]` after the final norm; `positions` is `[1, N]` or `[N]`.

        `image_embeds` rows replace the embeddings where `image_mask` is true, in order.
        """
        x = self.embedding(input_ids)
        if image_embeds is not None and image_mask is not None:
            x = x.masked_scatter(image_mask.unsqueeze(-1), image_embeds.to(x.dtype))
        cos, sin = self._rope(positions, x.dtype)
        for layer, cache in zip(self.encoder.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, cache, meta)
        return self.encoder.final_layernorm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_layer(hidden).float()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

# Buffers the original saves that glmv recomputes.
_IGNORED_SUFFIXES = ("rotary_pos_emb.inv_freq",)


def build_glm4v_9b(config: Glm4v9bConfig, dtype: torch.dtype, device: torch.device) -> Glm4v9bModel:
    """An uninitialised model of the given shape, allocated directly on `device`."""
    with torch.device("meta"):
        model = Glm4v9bModel(config)
    model = model.to_empty(device=device).to(dtype)
    return model.eval().requires_grad_(False)


def load_glm4v_9b_weights(model: Glm4v9bModel, tensors: Iterable[tuple[str, torch.Tensor, str]]) -> None:
    """Copy `(name, tensor, file)` items with the original ``transformer.*`` names into `model`;
    a missing, unexpected or mis-shaped tensor raises `CheckpointError` naming it."""
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for raw_name, tensor, file in tensors:
        if raw_name.endswith(_IGNORED_SUFFIXES):
            continue
        if tensor.dtype.itemsize == 1 and tensor.is_floating_point():
            raise CheckpointError(
                f"{file}: tensor {raw_name!r} is {tensor.dtype}; FP8 checkpoints load for GLM-4.1V / "
                "GLM-4.6V models only (serve GLM-4v-9b from its bf16 checkpoint)"
            )
        name = raw_name.removeprefix("transformer.")
        param = params.get(name)
        if param is None or name == raw_name:
            raise CheckpointError(f"{file}: unexpected tensor {raw_name!r}")
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{file}: tensor {raw_name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        if name in filled:
            raise CheckpointError(f"{file}: tensor {raw_name!r} appears twice")
        with torch.no_grad():
            param.copy_(tensor.to(param.dtype))
        filled.add(name)
    missing = [n for n in params if n not in filled]
    if missing:
        shown = ", ".join(f"transformer.{n}" for n in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(f"checkpoint is missing tensors: {shown}")


@torch.no_grad()
def random_init_glm4v_9b(model: Glm4v9bModel, *, seed: int = 0, branch_scale: float = 1.0) -> None:
    """Draw every weight at random on the model's device (for speed runs of the full shape):
    fan-in-scaled matrices, unit norms, small biases; `branch_scale` < 1 shrinks what each
    residual branch adds, so a deep random network stays tame."""
    gen = torch.Generator(device=model.device).manual_seed(seed)
    hidden = model.config.hidden_size
    for name, p in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.fill_(branch_scale if name.startswith("vision.transformer") else 1.0)
        elif p.ndim == 1:
            p.normal_(0.0, 0.02, generator=gen)
        elif name in ("embedding.word_embeddings.weight", "vision.patch_embedding.position_embedding.weight"):
            p.normal_(0.0, 1.0, generator=gen)
        elif name == "output_layer.weight":
            p.normal_(0.0, 2.0 / hidden**0.5, generator=gen)
        elif name in ("vision.boi", "vision.eoi", "vision.patch_embedding.cls_embedding"):
            p.normal_(0.0, 1.0, generator=gen)
        else:
            fan_in = p[0].numel()
            branch = name.startswith("encoder.layers") and ("dense.weight" in name or "dense_4h_to_h" in name)
            p.normal_(0.0, (branch_scale if branch else 1.0) / fan_in**0.5, generator=gen)


def load_glm4v_9b(
    path: str | Path, *, dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = None
) -> Glm4v9bModel:
    """Load a GLM-4v-9b checkpoint directory (single or sharded safetensors, original names).

    A weightless directory whose ``config.json`` holds ``glmv_random_init: {seed, branch_scale}``
    gets random weights drawn on the device instead (full-size speed runs).
    """
    from glmv.models.loader import iter_checkpoint_tensors, resolve_dtype
    from glmv.models.tiny import RANDOM_INIT_KEY

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if device is not None:
        dev = torch.device(device)
    else:
        dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    config = Glm4v9bConfig.from_pretrained(path)
    model = build_glm4v_9b(config, resolve_dtype(dtype, dev), dev)
    spec = json.loads((path / "config.json").read_text(encoding="utf-8")).get(RANDOM_INIT_KEY)
    if isinstance(spec, dict) and not any(path.glob("*.safetensors")):
        random_init_glm4v_9b(
            model, seed=int(spec.get("seed", 0)), branch_scale=float(spec.get("branch_scale", 1.0))
        )
        return model
    load_glm4v_9b_weights(model, iter_checkpoint_tensors(path))
    return model
