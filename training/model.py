"""The transformers GLM-4.1V model as the demo model is trained and graded on the device.

`Batch.build` right-pads sequences (causal attention alone keeps padding out of every real
token's view, so no attention mask is needed) and gathers the image rows. `hidden_states` runs
the vision tower once per image, scatters its embeddings into the `<|image|>` slots and runs the
language model with glmv's own M-RoPE positions. `greedy` decodes a batch without a KV cache:
each step re-runs the prompt plus what was generated, which is simple and fast enough for a
model of this size.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from glmv.processing.image import ImageProcessor
from training.data import PackedBatch, Sequence, pack_sequences

__all__ = [
    "Batch",
    "MergerTap",
    "VisionPadding",
    "common_share",
    "glyph_loss",
    "greedy",
    "hidden_states",
    "image_rows",
    "install_cached_position_embeddings",
    "install_padded_vision_attention",
]


@dataclass(slots=True)
class VisionPadding:
    """Where each image patch goes in a padded (images, longest, ...) batch, for one forward."""

    images: int
    longest: int
    index: torch.Tensor  # (patches,) int64: image * longest + patch
    keys: torch.Tensor  # (images, 1, 1, longest) bool: real patches

    @staticmethod
    def build(grids: list[tuple[int, int, int]], device: torch.device) -> VisionPadding:
        sizes = [t * h * w for t, h, w in grids]
        longest = max(sizes)
        index = np.concatenate([np.arange(n) + i * longest for i, n in enumerate(sizes)])
        keys = np.zeros((len(sizes), longest), bool)
        for i, n in enumerate(sizes):
            keys[i, :n] = True
        return VisionPadding(
            len(sizes),
            longest,
            torch.from_numpy(index).to(device),
            torch.from_numpy(keys).to(device).view(len(sizes), 1, 1, longest),
        )


_CURRENT: dict[str, VisionPadding | None] = {"padding": None}


def install_padded_vision_attention(model: Any) -> None:
    """Run each vision block's attention over all images at once (padded, with a key mask) instead
    of transformers' loop over images: one kernel per layer rather than one per image. Same result;
    used only while `hidden_states` has set the padding of the batch."""
    from transformers.models.glm4v import modeling_glm4v as hf

    def forward(
        self: Any,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        pad = _CURRENT["padding"]
        if pad is None:
            return self._glmv_loop_forward(
                hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs
            )
        n = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        assert position_embeddings is not None
        cos, sin = position_embeddings
        q, k = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
        d = q.shape[-1]

        def padded(x: torch.Tensor) -> torch.Tensor:
            buf = x.new_zeros(pad.images * pad.longest, self.num_heads, d)
            buf[pad.index] = x.to(buf.dtype)
            return buf.view(pad.images, pad.longest, self.num_heads, d).transpose(1, 2)

        v = v.to(q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            padded(q), padded(k), padded(v), attn_mask=pad.keys, scale=self.scaling
        )
        out = out.transpose(1, 2).reshape(pad.images * pad.longest, self.num_heads, d)[pad.index]
        return self.proj(out.reshape(n, -1))

    for block in model.model.visual.blocks:
        attn = block.attn
        if not hasattr(attn, "_glmv_loop_forward"):
            attn._glmv_loop_forward = attn.forward
            attn.forward = types.MethodType(forward, attn)


class MergerTap:
    """The vision merger's output of the last forward pass (the image embeddings the language model
    receives, still attached to the graph), and how much they differ between
    image tokens: `spread` is the share of their energy that is not the mean embedding,
    `||x - mean||_F / ||x||_F`, measured in the forward pass after `armed` is set. About 0.5 for a
    new vision tower; near 0 when the tower has collapsed to one embedding for every token (then
    the language model cannot read, and in bf16 the differences round away)."""

    def __init__(self, model: Any) -> None:
        self.armed = False
        self.output: torch.Tensor | None = None
        self._spread: torch.Tensor | None = None
        self._norm: torch.Tensor | None = None
        model.model.visual.merger.register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: Any, output: torch.Tensor) -> None:
        self.output = output
        if self.armed:
            x = output.detach().float().reshape(-1, output.shape[-1])
            self._spread = (x - x.mean(0)).norm() / x.norm().clamp(min=1e-12)
            self._norm = x.norm(dim=-1).mean()
            self.armed = False

    @property
    def spread(self) -> float | None:
        return None if self._spread is None else round(float(self._spread), 5)

    @property
    def norm(self) -> float | None:
        """Mean norm of an image embedding in that pass."""
        return None if self._norm is None else round(float(self._norm), 3)


def common_share(embeds: torch.Tensor) -> torch.Tensor:
    """`||mean x||^2 / mean ||x||^2` over image embeddings `x` (tokens, hidden): 1 when every token
    has the same embedding, 0 when they average out. As a loss (`--center-weight`) it keeps the
    language model's gradient, nearly the same for every image token while the model does not yet
    read, from growing one shared vector that drowns what each token shows."""
    x = embeds.float()
    return x.mean(0).square().sum() / x.square().sum(-1).mean().clamp(min=1e-12)


def glyph_loss(
    embeds: torch.Tensor, glyphs: torch.Tensor, table: torch.Tensor, scale: float = 16.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token reading loss and its top-1 accuracy. Each image embedding with printed
    characters under it (`glyphs`: their token ids, -1 padded; see `training.data.glyph_targets`)
    is scored against the word-embedding `table` by cosine similarity times `scale`; the loss is
    the mean negative log-probability of its characters. It gives the vision tower a different,
    direct signal for every token from the first step, and puts each token's embedding next to
    the embeddings of the characters it shows (the table is tied to the output layer, so copying a
    character from the image is then the simplest thing the language model can learn). The table
    itself gets no gradient from it."""
    if glyphs.shape[0] != embeds.shape[0]:
        raise ValueError(f"{glyphs.shape[0]} glyph rows for {embeds.shape[0]} image embeddings")
    have = glyphs[:, 0] >= 0
    if not bool(have.any()):
        zero = embeds.sum() * 0
        return zero, zero.detach()
    x = torch.nn.functional.normalize(embeds[have].float(), dim=-1)
    w = torch.nn.functional.normalize(table.detach().float(), dim=-1)
    logp = (scale * x @ w.T).log_softmax(-1)
    g = glyphs[have]
    valid = g >= 0
    picked = logp.gather(1, g.clamp(min=0))
    loss = (-(picked * valid).sum(1) / valid.sum(1)).mean()
    with torch.no_grad():
        top = logp.argmax(-1, keepdim=True)
        acc = ((g == top) & valid).any(1).float().mean()
    return loss, acc


def image_rows(processor: ImageProcessor, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """The `pixel_values` rows of several images, in order: each one resized uint8 (H, W, 3) pixels
    or their `ImageProcessor.patch_bytes` (what `DocumentStream` yields). One upload and one
    normalisation for the whole batch: a batch of text strips holds hundreds of small images."""
    parts = [x if x.ndim == 4 else processor.patch_bytes(x) for x in images]
    u8 = torch.from_numpy(np.concatenate(parts))
    if device.type == "cuda":
        u8 = u8.pin_memory()
    return processor.normalise_patches(u8.to(device, non_blocking=True))


@dataclass(slots=True)
class Batch:
    ids: torch.Tensor  # (B, L) int64
    positions: torch.Tensor  # (3, B, L) int64
    targets: torch.Tensor  # (B, L) bool
    lengths: list[int]
    rows: torch.Tensor  # float32 pixel rows of every image, in sequence order
    grids: torch.Tensor  # (B, 3)
    tasks: list[str]
    glyphs: torch.Tensor | None = None  # (image tokens, k): see `training.data.glyph_targets`

    @staticmethod
    def build(seqs: list[Sequence], processor: ImageProcessor, pad_id: int, device: torch.device) -> Batch:
        """`seqs`: (ids, targets, positions, task, image, grid) per sequence (image: see `image_rows`)."""
        return Batch.from_packed(pack_sequences(seqs, pad_id, processor.patch_bytes), processor, device)

    @staticmethod
    def from_packed(packed: PackedBatch, processor: ImageProcessor, device: torch.device) -> Batch:
        """The batch on `device`: one copy per array, the images normalised in one pass."""
        cuda = device.type == "cuda"

        def put(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(a)
            return (t.pin_memory() if cuda else t).to(device, non_blocking=True)

        return Batch(
            put(packed.ids),
            put(packed.positions),
            put(packed.targets),
            packed.lengths,
            processor.normalise_patches(put(packed.patches)),
            put(packed.grids),
            packed.tasks,
            None if packed.glyphs is None else put(packed.glyphs),
        )


def install_cached_position_embeddings(model: Any) -> None:
    """Replace the vision tower's per-patch bicubic `grid_sample` of the learned position table by a
    matrix product with a cached interpolation matrix per image grid (the interpolation is linear
    in the table). Same values; the backward pass becomes a matrix product instead of scattered
    atomic adds of every patch into the small table."""
    embeddings = model.model.visual.embeddings
    if hasattr(embeddings, "_glmv_grid_forward"):
        return
    cache: dict[tuple[int, int, int, str], torch.Tensor] = {}

    def weights(t: int, h: int, w: int, hc: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
        key = (t, h, w, str(hc.device))
        found = cache.get(key)
        if found is None:
            side = int(embeddings.position_embedding.weight.shape[0] ** 0.5)
            basis = torch.eye(side * side, device=hc.device, dtype=torch.float32).view(
                1, side * side, side, side
            )
            norm_w = ((wc.float() + 0.5) / w) * 2 - 1
            norm_h = ((hc.float() + 0.5) / h) * 2 - 1
            grid = torch.stack((norm_w, norm_h), dim=-1).view(1, -1, 1, 2)
            sampled = torch.nn.functional.grid_sample(
                basis, grid, mode=embeddings.interpolated_method, align_corners=False, padding_mode="border"
            )
            found = cache[key] = sampled[0, :, :, 0].T.contiguous()  # (patches, side * side)
        return found

    def forward(
        self: Any,
        x: torch.Tensor,
        lengths: Any,
        image_shapes: torch.Tensor,
        h_coords: torch.Tensor,
        w_coords: torch.Tensor,
    ) -> torch.Tensor:
        table = self.position_embedding.weight.float()
        sizes = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        shapes = [tuple(int(v) for v in s) for s in image_shapes.tolist()]
        per_shape: dict[tuple[int, ...], torch.Tensor] = {}
        parts = []
        start = 0
        for shape, n in zip(shapes, sizes, strict=True):
            if shape not in per_shape:
                t, h, w = shape
                per_shape[shape] = (
                    weights(t, h, w, h_coords[start : start + n], w_coords[start : start + n]) @ table
                )
            parts.append(per_shape[shape])
            start += n
        adapted = torch.cat(parts).to(self.position_embedding.weight.dtype)
        return x + adapted.to(x.device)

    embeddings._glmv_grid_forward = embeddings.forward
    embeddings.forward = types.MethodType(forward, embeddings)


def _image_embeddings(model: Any, rows: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    if hasattr(model.model.visual.blocks[0].attn, "_glmv_loop_forward"):
        _CURRENT["padding"] = VisionPadding.build([tuple(g) for g in grids.tolist()], rows.device)
    try:
        out = model.model.get_image_features(rows, grids)
    finally:
        _CURRENT["padding"] = None
    parts = getattr(out, "pooler_output", out)
    return torch.cat(list(parts)) if isinstance(parts, (list, tuple)) else parts


def hidden_states(
    model: Any,
    ids: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    grids: torch.Tensor,
    image_token_id: int,
    image_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    embeds = model.model.get_input_embeddings()(ids)
    if image_embeds is None:
        image_embeds = _image_embeddings(model, rows, grids)
    mask = (ids == image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, image_embeds.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False)
    return out.last_hidden_state


@torch.no_grad()
def greedy(
    model: Any,
    batch: Batch,
    image_token_id: int,
    stop_ids: set[int],
    max_new_tokens: int,
    pad_id: int,
    deadline: float | None = None,
) -> list[list[int]]:
    """Greedy continuations of every sequence of `batch` (its prompts), stop ids left out. Decoding
    stops early at `deadline` (time.monotonic())."""
    device = batch.ids.device
    image_embeds = _image_embeddings(model, batch.rows, batch.grids)
    b = batch.ids.shape[0]
    lengths = list(batch.lengths)
    total = max(lengths) + max_new_tokens
    ids = torch.full((b, total), pad_id, dtype=torch.long, device=device)
    ids[:, : batch.ids.shape[1]] = batch.ids
    pos = torch.zeros((3, b, total), dtype=torch.long, device=device)
    pos[:, :, : batch.positions.shape[2]] = batch.positions
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    for _ in range(max_new_tokens):
        width = max(lengths)
        hidden = hidden_states(
            model, ids[:, :width], pos[:, :, :width], batch.rows, batch.grids, image_token_id, image_embeds
        )
        last = hidden[torch.arange(b, device=device), torch.tensor(lengths, device=device) - 1]
        nxt = model.lm_head(last).float().argmax(-1).tolist()
        for i, tok in enumerate(nxt):
            if done[i]:
                continue
            if tok in stop_ids:
                done[i] = True
                continue
            out[i].append(tok)
            n = lengths[i]
            ids[i, n] = tok
            pos[:, i, n] = pos[:, i, n - 1] + 1
            lengths[i] = n + 1
        if all(done) or (deadline is not None and time.monotonic() > deadline):
            break
    return out
