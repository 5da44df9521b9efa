"""3-axis M-RoPE positions of a GLM-4.1V prompt.

Text advances (t, h, w) together by one per token. An image whose merged grid is `gh × gw`
gets `(p0, p0 + i, p0 + j)` for its `i < gh`, `j < gw` tokens in row-major order, and the text
after it resumes at `p0 + max(gh, gw)`. During decode a sequence's position is its token index
plus its `delta` (= last prompt position + 1 - prompt length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class ImageGrid:
    """Where an image's tokens sit in the prompt, and its merged grid (after the 2×2 merge)."""

    offset: int
    grid_t: int
    grid_h: int
    grid_w: int

    @property
    def length(self) -> int:
        return self.grid_t * self.grid_h * self.grid_w


def mrope_positions(num_tokens: int, images: Sequence[ImageGrid]) -> tuple[torch.Tensor, int]:
    """Positions `[3, num_tokens]` (int64) of a prompt and its decode delta."""
    pos = torch.empty(3, num_tokens, dtype=torch.int64)
    cursor = 0  # next token index to fill
    current = 0  # next position value
    for img in sorted(images, key=lambda g: g.offset):
        if img.offset < cursor or img.offset + img.length > num_tokens:
            raise ValueError(f"image span at {img.offset} (+{img.length}) does not fit the prompt")
        n_text = img.offset - cursor
        if n_text:
            pos[:, cursor : img.offset] = torch.arange(current, current + n_text)
            current += n_text
        t = torch.arange(img.grid_t).view(-1, 1, 1).expand(img.grid_t, img.grid_h, img.grid_w)
        h = torch.arange(img.grid_h).view(1, -1, 1).expand(img.grid_t, img.grid_h, img.grid_w)
        w = torch.arange(img.grid_w).view(1, 1, -1).expand(img.grid_t, img.grid_h, img.grid_w)
        end = img.offset + img.length
        pos[0, img.offset : end] = t.reshape(-1) + current
        pos[1, img.offset : end] = h.reshape(-1) + current
        pos[2, img.offset : end] = w.reshape(-1) + current
        current += max(img.grid_h, img.grid_w)
        cursor = end
    if cursor < num_tokens:
        pos[:, cursor:] = torch.arange(current, current + num_tokens - cursor)
        current += num_tokens - cursor
    delta = current - num_tokens
    return pos, delta
