"""What the engine is asked to do and what it answers, step by step.

`EngineRequest` carries an already-rendered prompt (token ids), its preprocessed images and the
sampling parameters. `RequestOutput` is one step's news for one request: the new text and
token ids of each choice, logprobs, finish reasons and usage. `validate_request` holds the checks
that need only the model's shape (`EngineInfo`), so a client can refuse a request without asking
its core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from glmv.engine.sampling import SamplingParams
from glmv.errors import ContextLengthExceededError, GlmvError, InvalidRequestError

if TYPE_CHECKING:  # the API process builds requests without importing torch
    import numpy as np
    import torch


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


def validate_request(
    request: EngineRequest,
    *,
    max_model_len: int,
    vocab_size: int,
    image_token_id: int,
    max_sequences: int | None = None,
) -> None:
    """Raise a client error for a request that can never run; cheap, no side effects.
    `max_sequences`: the most sequences one core can ever queue (its `max_waiting`)."""
    request.params.validate(max_model_len=max_model_len, vocab_size=vocab_size, max_sequences=max_sequences)
    n_prompt = len(request.prompt_token_ids)
    if n_prompt == 0:
        raise InvalidRequestError("The prompt is empty.", param="messages")
    if n_prompt >= max_model_len:
        raise ContextLengthExceededError(
            f"The prompt has {n_prompt} tokens; this server's context is {max_model_len} tokens.",
            param="messages",
        )
    max_tokens = request.params.max_tokens
    if max_tokens is not None and n_prompt + max_tokens > max_model_len:
        raise ContextLengthExceededError(
            f"The prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds this server's "
            f"context of {max_model_len} tokens.",
            param="max_tokens",
        )
    if any(not 0 <= t < vocab_size for t in request.prompt_token_ids):
        raise InvalidRequestError("The prompt holds token ids outside the vocabulary.", param="messages")
    expected = sum(1 for t in request.prompt_token_ids if t == image_token_id)
    if expected != sum(im.length for im in request.images):
        raise InvalidRequestError(
            "The prompt's image placeholder tokens do not match the images supplied.", param="messages"
        )


def merge_outputs(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    """One output carrying both steps' news: deltas joined per choice, the later counts and state."""
    by_index: dict[int, CompletionDelta] = {}
    for d in [*first.deltas, *second.deltas]:
        cur = by_index.get(d.index)
        if cur is None:
            by_index[d.index] = CompletionDelta(
                d.index, d.text, list(d.token_ids), list(d.logprobs) if d.logprobs is not None else None,
                d.finish_reason, d.stop_reason,
            )  # fmt: skip
            continue
        cur.text += d.text
        cur.token_ids += d.token_ids
        if d.logprobs is not None:
            cur.logprobs = (cur.logprobs or []) + d.logprobs
        if d.finish_reason is not None:
            cur.finish_reason, cur.stop_reason = d.finish_reason, d.stop_reason
    return RequestOutput(
        request_id=second.request_id,
        deltas=[by_index[i] for i in sorted(by_index)],
        prompt_tokens=second.prompt_tokens,
        cached_tokens=second.cached_tokens,
        completion_tokens=second.completion_tokens,
        finished=second.finished,
        error=second.error or first.error,
        arrival_time=first.arrival_time,
        first_scheduled_time=first.first_scheduled_time or second.first_scheduled_time,
        first_token_time=first.first_token_time or second.first_token_time,
    )
