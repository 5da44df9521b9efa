"""Batched token sampling: penalties, temperature, top-k/top-p/min-p, seeds and logprobs.

One call handles the whole batch. Greedy rows take an argmax. Other rows draw with the
Gumbel-max trick (`argmax(p / E)`, `E ~ Exp(1)`), which needs no cumulative sum; a request with a
seed draws its noise from its own generator, so its text does not depend on what else shares
the batch. Logprobs are those of the model's raw distribution (before temperature), as the
OpenAI API reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from glmv.engine.sampling import SamplingParams


@dataclass(slots=True)
class SampleRequest:
    """What the sampler needs to know about one row of the batch."""

    params: SamplingParams
    token_ids: Sequence[int]  # prompt + output so far (read only when penalties apply)
    num_prompt_tokens: int
    generator: torch.Generator | None  # a seeded request's own generator


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SampleRequest]) -> None:
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if not p.uses_penalties:
            continue
        device = logits.device
        out_ids = torch.tensor(row.token_ids[row.num_prompt_tokens :], dtype=torch.int64, device=device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(row.token_ids, device=device)
            seen = seen[seen < vocab].unique()
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if out_ids.numel() and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(out_ids[out_ids < vocab], minlength=vocab).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks on one row; returns probabilities."""
    logits = logits / p.temperature
    if p.top_k_enabled and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
        drop[0] = False
        probs = probs.scatter(0, order[drop], 0.0)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def sample(
    logits: torch.Tensor,
    rows: Sequence[SampleRequest],
    default_generator: torch.Generator | None = None,
    *,
    vocab_limit: int | None = None,
) -> list[SampledToken]:
    """Pick one token per row of `logits` `[B, vocab]` (float32).

    Ids from `vocab_limit` on (padding rows of the embedding that the tokenizer cannot decode) are
    never picked; logprobs stay those of the model's whole distribution."""
    want_logprobs = any(r.params.logprobs is not None for r in rows)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[:, vocab_limit:] = float("-inf")
        if raw_logprobs is not None:
            raw_logprobs = raw_logprobs.clone()
            raw_logprobs[:, vocab_limit:] = float("-inf")  # never offered as alternatives either
    if any(r.params.uses_penalties for r in rows):
        logits = logits.clone()
        _apply_penalties(logits, rows)
    greedy_ids = logits.argmax(dim=-1)
    chosen = greedy_ids.clone()
    for i, row in enumerate(rows):
        if row.params.greedy:
            continue
        probs = _filter(logits[i], row.params)
        gen = row.generator if row.generator is not None else default_generator
        noise = torch.empty_like(probs).exponential_(generator=gen)
        chosen[i] = (probs / noise).argmax()
    ids = chosen.tolist()
    out = [SampledToken(t) for t in ids]
    if raw_logprobs is not None:
        for i, row in enumerate(rows):
            k = row.params.logprobs
            if k is None:
                continue
            out[i].logprob = float(raw_logprobs[i, ids[i]])
            if k > 0:
                vals, idx = raw_logprobs[i].topk(k)
                out[i].top_logprobs = list(zip(idx.tolist(), vals.tolist(), strict=True))
            else:
                out[i].top_logprobs = []
    return out
