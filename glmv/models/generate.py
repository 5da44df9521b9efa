"""Single-sequence generation straight over the native model, without the batching engine.

A small, dependable path for checking a checkpoint (`glmv chat`) and for parity tests: the
prompt runs as one prefill into a private paged cache, then one token per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from glmv.kernels.metadata import AttentionMetadata
from glmv.models.glm4v import Glm4vModel
from glmv.models.positions import ImageGrid, mrope_positions


@dataclass(slots=True)
class ImageInput:
    """A preprocessed image and where its placeholder tokens start in the prompt."""

    pixel_values: torch.Tensor  # [t*h*w, patch_dim]
    grid_thw: tuple[int, int, int]
    offset: int


def _sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, gen: torch.Generator) -> int:
    if temperature <= 0.0 or top_k == 1:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


@torch.inference_mode()
def generate(
    model: Glm4vModel,
    prompt_ids: Sequence[int],
    images: Sequence[ImageInput] = (),
    *,
    max_new_tokens: int = 64,
    eos_token_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    block_size: int = 16,
) -> list[int]:
    """Generate up to `max_new_tokens` ids after `prompt_ids` (greedy when temperature is 0)."""
    cfg = model.config
    device, dtype = model.device, model.dtype
    total = len(prompt_ids) + max_new_tokens
    num_blocks = (total + block_size - 1) // block_size
    t = cfg.text
    shape = (num_blocks, block_size, t.num_key_value_heads, t.head_dim)
    caches = [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(t.num_hidden_layers)
    ]
    table = list(range(num_blocks))
    merge = cfg.vision.spatial_merge_size
    grids = [ImageGrid(im.offset, im.grid_thw[0], im.grid_thw[1] // merge, im.grid_thw[2] // merge) for im in images]
    positions, delta = mrope_positions(len(prompt_ids), grids)
    ids = torch.tensor(list(prompt_ids), dtype=torch.int64, device=device)
    embeds = mask = None
    if images:
        pv = torch.cat([im.pixel_values for im in images]).to(device)
        embeds = torch.cat(model.encode_images(pv, [im.grid_thw for im in images]))
        mask = ids == cfg.image_token_id
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    meta = AttentionMetadata.build(
        query_lens=[len(ids)], seq_lens=[len(ids)], block_tables=[table], block_size=block_size, device=device
    )
    hidden = model(ids, positions.to(device), caches, meta, embeds, mask)
    out: list[int] = []
    eos = set(eos_token_ids)
    for _ in range(max_new_tokens):
        token = _sample(model.compute_logits(hidden[-1:])[0], temperature, top_p, top_k, gen)
        out.append(token)
        if token in eos:
            break
        pos = len(prompt_ids) + len(out) - 1
        meta = AttentionMetadata.build(
            query_lens=[1], seq_lens=[pos + 1], block_tables=[table], block_size=block_size, device=device
        )
        p = torch.full((3, 1), pos + delta, dtype=torch.int64, device=device)
        hidden = model(torch.tensor([token], device=device), p, caches, meta)
    return out
