"""What the engine needs from a model architecture: the `ServedModel` protocol.

The runner, the engine and the server see a model only through these members, so another
architecture (GLM-4v-9b's ChatGLM + EVA2-CLIP) plugs in by implementing them: how it encodes
images, how its prompt positions are laid out, the shape of its KV cache, and one flattened
forward pass over the paged cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from glmv.kernels.metadata import AttentionMetadata

KVCache = tuple[torch.Tensor, torch.Tensor]


class PromptImage(Protocol):
    """An image as placed in a prompt: its first placeholder token and its patch grid."""

    offset: int
    grid_thw: tuple[int, int, int]


class ServedModel(Protocol):
    config: Any  # has at least `model_type`

    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def device(self) -> torch.device: ...

    # KV cache layout: one (k, v) pair of [num_blocks, block_size, num_kv_heads, head_dim] per layer.
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    image_token_id: int  # the placeholder id repeated over every image's span in a prompt

    def encode_images(
        self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]
    ) -> list[torch.Tensor]: ...

    def prompt_positions(self, num_tokens: int, images: Sequence[PromptImage]) -> tuple[torch.Tensor, int]:
        """Position ids `[P, num_tokens]` of a prompt and the offset of the positions after it."""
        ...

    def positions_after_prompt(self, start: int, end: int, delta: int) -> torch.Tensor:
        """Position ids `[P, end - start]` of generated tokens `start … end - 1`."""
        ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[KVCache],
        meta: AttentionMetadata,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
