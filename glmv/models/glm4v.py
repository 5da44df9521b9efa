"""GLM-4.1V / GLM-4.6V-Flash (`model_type: glm4v`) in glmv's own PyTorch.

Written for the serving engine rather than for training: the language model takes a flattened
batch of new tokens from many sequences (`[N]` ids, `[3, N]` M-RoPE positions) plus an
`AttentionMetadata` that says where each sequence's keys and values live in the paged cache.
q/k/v and gate/up projections are fused into single matrices at load time.

The vision tower encodes each image separately (full attention within one image, never across
images) and returns one embedding per merged 2×2 patch, ready to be scattered over the image
placeholder tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from glmv.kernels.attention import paged_attention, use_triton, write_kv
from glmv.kernels.metadata import AttentionMetadata
from glmv.models.base import PromptImage
from glmv.models.config import ModelConfig, TextConfig, VisionConfig
from glmv.models.positions import ImageGrid, mrope_positions

KVCache = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`weight * norm(x)`, plus `residual` when given (fused into one kernel on CUDA)."""
        if use_triton(x):  # pragma: no cover - CUDA only
            return _fused().rms_norm(x, self.weight, self.eps, residual)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(dtype)
        return out if residual is None else residual + out


_fused_module = None


def _fused():  # pragma: no cover - CUDA only
    global _fused_module
    if _fused_module is None:
        from glmv.kernels import triton_fused

        _fused_module = triton_fused
    return _fused_module


# --------------------------------------------------------------------------------------------
# Text decoder
# --------------------------------------------------------------------------------------------


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, …) -> (-x1, x0, -x3, x2, …): GLM rotates interleaved even/odd pairs."""
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class MRotaryEmbedding:
    """cos/sin tables of the 3-axis M-RoPE over the first `rotary_dim` dims of each head."""

    def __init__(self, cfg: TextConfig) -> None:
        self.rotary_dim = cfg.rotary_dim
        self.theta = cfg.rope_theta
        half = self.rotary_dim // 2
        # For each of the `half` frequencies, which axis (t=0, h=1, w=2) drives it.
        axis: list[int] = []
        for i, n in enumerate(cfg.mrope_section):
            axis += [i % 3] * n
        assert len(axis) == half
        self._axis = torch.tensor(axis, dtype=torch.int64, device="cpu")
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            inv = 1.0 / (
                self.theta
                ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device="cpu") / self.rotary_dim)
            )
            self._cache[device] = (inv.to(device), self._axis.to(device))
        return self._cache[device]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, axis = self._tables(positions.device)
        # positions [3, N] -> per-frequency position [N, half]
        pos = positions.float().index_select(0, axis)  # [half, N]
        freqs = pos.t() * inv_freq  # [N, half]
        freqs = freqs.repeat_interleave(2, dim=-1)  # [N, rotary_dim]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_mrope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `rotary_dim` dims of `x` `[N, heads, head_dim]` (in place on CUDA)."""
    if use_triton(x):  # pragma: no cover - CUDA only
        return _fused().mrope_(x, cos, sin)
    rot = cos.shape[-1]
    c = cos.unsqueeze(1)
    s = sin.unsqueeze(1)
    x_rot = x[..., :rot]
    rotated = x_rot * c + _rotate_pairs(x_rot) * s
    return torch.cat((rotated, x[..., rot:]), dim=-1)


class TextAttention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=True)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_mrope(q.view(n, self.num_heads, self.head_dim), cos, sin)
        k = apply_mrope(k.view(n, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.reshape(n, self.q_size))


class TextMLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if use_triton(gate_up):  # pragma: no cover - CUDA only
            return self.down_proj(_fused().silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    """Four norms per layer: GLM normalises the output of attention and of the MLP as well."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = TextAttention(cfg)
        self.mlp = TextMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = x + self.post_self_attn_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        )
        return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h)))


# --------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: Sequence[int]
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        dtype = q.dtype
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        qf, kf = q.float(), k.float()
        q = (qf * c + _rotate_half(qf) * s).to(dtype)
        k = (kf * c + _rotate_half(kf) * s).to(dtype)
        outs = []
        start = 0
        for length in lengths:  # full attention inside each image, never across images
            sl = slice(start, start + length)
            # 4-D inputs so that SDPA can pick its fused kernels (3-D falls back to the math path).
            o = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None]
            )
            outs.append(o[0].transpose(0, 1).reshape(length, -1))
            start += length
        return self.proj(torch.cat(outs, dim=0) if len(outs) > 1 else outs[0])


class VisionMLP(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.inner = inner
        self.gate_up_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.down_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inner, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        # The block MLP's inner width is `out_hidden_size` in GLM-4.1V, not `intermediate_size`.
        self.mlp = VisionMLP(cfg.hidden_size, cfg.out_hidden_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: Sequence[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.mlp = VisionMLP(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.gelu(self.post_projection_norm(self.proj(x))))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        merge = cfg.spatial_merge_size
        # The Conv3d patch embedding with kernel == stride is a matmul over the flattened patch.
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=True)
        self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Likewise the 2×2 Conv2d downsample is a matmul over each merged group of patches.
        self.downsample = nn.Linear(cfg.hidden_size * merge * merge, cfg.out_hidden_size, bias=True)
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.intermediate_size)

    def _coords(self, grids: Sequence[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
        """(h, w) patch coordinates in the processor's order (2×2 merge groups contiguous)."""
        m = self.cfg.spatial_merge_size
        out = []
        for t, h, w in grids:
            hh = torch.arange(h, device=device).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            ww = torch.arange(w, device=device).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            hh = hh.permute(0, 2, 1, 3).reshape(-1)
            ww = ww.permute(0, 2, 1, 3).reshape(-1)
            out.append(torch.stack((hh, ww), dim=-1).repeat(t, 1))
        return torch.cat(out, dim=0)

    def _rope(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quarter = self.cfg.head_dim // 2
        inv = 1.0 / (
            self.cfg.rope_theta
            ** (torch.arange(0, quarter, 2, dtype=torch.float32, device=coords.device) / quarter)
        )
        freqs = coords.float()[..., None] * inv  # [N, 2, head_dim/4]
        freqs = torch.cat((freqs[:, 0], freqs[:, 1]), dim=-1)
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()

    def _position_embeddings(
        self, coords: torch.Tensor, grids: Sequence[tuple[int, int, int]]
    ) -> torch.Tensor:
        """The learned square position table, resampled bicubically to each image's grid."""
        table = self.position_embedding.weight
        side = int(table.shape[0] ** 0.5)
        table2d = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()
        sizes_h = torch.cat([torch.full((t * h * w,), h) for t, h, w in grids]).to(coords.device)
        sizes_w = torch.cat([torch.full((t * h * w,), w) for t, h, w in grids]).to(coords.device)
        norm_w = ((coords[:, 1].float() + 0.5) / sizes_w.float()) * 2 - 1
        norm_h = ((coords[:, 0].float() + 0.5) / sizes_h.float()) * 2 - 1
        grid = torch.stack((norm_w, norm_h), dim=-1).unsqueeze(0).unsqueeze(2)
        sampled = F.grid_sample(table2d, grid, mode="bicubic", align_corners=False, padding_mode="border")
        return sampled.squeeze(0).squeeze(-1).permute(1, 0).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """`pixel_values` `[sum(t*h*w), patch_dim]` → merged embeddings `[sum(t*h*w)/4, out_hidden]`."""
        dtype = self.patch_embed.weight.dtype
        x = self.post_conv_layernorm(self.patch_embed(pixel_values.to(dtype)))
        coords = self._coords(grids, x.device)
        cos, sin = self._rope(coords)
        x = x + self._position_embeddings(coords, grids).to(x.device)
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        x = self.post_layernorm(x)
        m = self.cfg.spatial_merge_size
        x = x.view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2).reshape(-1, x.shape[-1] * m * m)
        return self.merger(self.downsample(x))


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------


class Glm4vModel(nn.Module):
    """Vision tower + text decoder + LM head, driven by the engine one flattened step at a time."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        t = config.text
        self.visual = VisionTower(config.vision)
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t) for _ in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.rotary = MRotaryEmbedding(t)
        # The `ServedModel` view the engine uses.
        self.num_layers = t.num_hidden_layers
        self.num_kv_heads = t.num_key_value_heads
        self.head_dim = t.head_dim
        self.vocab_size = t.vocab_size
        self.max_model_len = t.max_position_embeddings
        self.eos_token_ids = tuple(config.eos_token_ids)
        self.image_token_id = config.image_token_id

    def prompt_positions(self, num_tokens: int, images: Sequence[PromptImage]) -> tuple[torch.Tensor, int]:
        m = self.config.vision.spatial_merge_size
        grids = [
            ImageGrid(im.offset, im.grid_thw[0], im.grid_thw[1] // m, im.grid_thw[2] // m) for im in images
        ]
        return mrope_positions(num_tokens, grids)

    def positions_after_prompt(self, start: int, end: int, delta: int) -> torch.Tensor:
        return torch.arange(start + delta, end + delta).expand(3, -1)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def encode_images(
        self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]
    ) -> list[torch.Tensor]:
        """Run the vision tower; one `[tokens_i, hidden]` tensor per image."""
        merged = self.visual(pixel_values, grids)
        m2 = self.config.vision.spatial_merge_size**2
        return list(merged.split([t * h * w // m2 for t, h, w in grids]))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[KVCache],
        meta: AttentionMetadata,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states `[N, hidden]` (after the final norm) for a flattened batch of new tokens.

        `image_embeds` rows replace the embeddings where `image_mask` is true, in order.
        """
        x = self.embed_tokens(input_ids)
        if image_embeds is not None and image_mask is not None:
            x = x.masked_scatter(image_mask.unsqueeze(-1), image_embeds.to(x.dtype))
        cos, sin = self.rotary(positions, x.dtype)
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
