"""What the engine is asked to do and what it answers, step by step.

`EngineRequest` carries an already-rendered prompt (token ids), its preprocessed images and the
sampling parameters. `RequestOutput` is one step's news for one request: the new text and
token ids of each choice, logprobs, finish reasons and usage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from glmv.engine.sampling import SamplingParams
from glmv.errors import GlmvError


@dataclass(slots=True)
class ImageInput:
    """One preprocessed image and the placeholder tokens it fills in the prompt."""

    offset: int  # index of its first placeholder token in the prompt
    length: int  # number of placeholder tokens (= merged patches)
    content_hash: str  # identity of the pixels + preprocessing settings (cache key)
    grid_thw: tuple[int, int, int]  # patch grid before the 2×2 merge
    pixel_values: torch.Tensor | None  # [t*h*w, patch_dim] rows, for processors that make them on the CPU
    # Or the resized uint8 (H, W, 3) pixels: the engine normalises and patchifies them on its
    # device with the checkpoint's image processor (4x fewer bytes travel than float32 rows).
    pixels: np.ndarray | None = None


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    images: list[ImageInput] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    prompt_text: str = ""  # the rendered prompt, when built from messages (for reasoning parsing)


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, token text, logprob) alternatives


@dataclass(slots=True)
class CompletionDelta:
    """New output of one choice since the previous `RequestOutput`."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    deltas: list[CompletionDelta]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int  # all choices, so far
    finished: bool
    error: GlmvError | None = None
    # Timings (monotonic seconds) for metrics: when queued, when first scheduled, first token.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
