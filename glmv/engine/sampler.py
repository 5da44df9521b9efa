"""Batched token sampling: penalties, temperature, top-k/top-p/min-p, seeds and logprobs.

One call handles the whole batch. Greedy rows take an argmax. Other rows draw with the
Gumbel-max trick (`argmax(p / E)`, `E ~ Exp(1)`), which needs no cumulative sum; a request with a
seed draws its noise from its own generator, so its text does not depend on what else shares
the batch. Logprobs are those of the model's raw distribution (before temperature), as the
OpenAI API reports them.

`sample_batch` leaves its results on the device (`SampledBatch`) and starts their copy to the host
without waiting: the next step can read the ids where they are (asynchronous scheduling), and
`SampledBatch.tokens()` waits only for this copy, not for whatever was queued after it. Nothing
in sampling reads a value back to the host on the way, except penalties (they read the history).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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


@dataclass(slots=True)
class SampledBatch:
    """One step's sampled tokens, on the device, with their copy to the host under way.

    Row `i` is the row `i` of the logits. `finite` (optional) carries the caller's per-row flag
    of finite logits along with the ids, so it comes back in the same copy."""

    token_ids: torch.Tensor  # [B] int64, on the logits' device
    num_alternatives: list[int | None]  # per row: top logprobs wanted (None: no logprobs)
    logprobs: torch.Tensor | None = None  # [B] logprob of each chosen token
    top_ids: torch.Tensor | None = None  # [B, K] best alternatives (K = the largest k asked)
    top_logprobs: torch.Tensor | None = None  # [B, K]
    finite: torch.Tensor | None = None  # [B] bool
    _host: list[torch.Tensor | None] = field(default_factory=list)
    _event: object = None  # torch.cuda.Event once the copy is queued (CUDA only)
    _tokens: list[SampledToken] | None = None

    def start_copy(self) -> None:
        """Queue the copy of the results into pinned host memory; returns at once."""
        parts = [self.token_ids, self.finite, self.logprobs, self.top_ids, self.top_logprobs]
        if self.token_ids.device.type == "cuda":
            self._host, self._event = _copy_to_host(parts)
        else:
            self._host = parts

    def finite_rows(self) -> list[bool] | None:
        """The `finite` flags on the host (waits for the copy), or None if none were given."""
        self.tokens()
        flags = self._host[1]
        return None if flags is None else [bool(f) for f in flags.tolist()]

    def tokens(self) -> list[SampledToken]:
        """The sampled tokens on the host: waits for this batch's copy (only), once."""
        if self._tokens is not None:
            return self._tokens
        if not self._host:
            self.start_copy()
        if self._event is not None:  # pragma: no cover - CUDA
            self._event.synchronize()  # type: ignore[attr-defined]
        ids_t, _, lp_t, top_ids_t, top_lp_t = self._host
        assert ids_t is not None
        out = [SampledToken(t) for t in ids_t.tolist()]
        if lp_t is not None:
            lps = lp_t.tolist()
            top_ids = top_ids_t.tolist() if top_ids_t is not None else None
            top_lps = top_lp_t.tolist() if top_lp_t is not None else None
            for i, k in enumerate(self.num_alternatives):
                if k is None:
                    continue
                out[i].logprob = lps[i]
                if k > 0 and top_ids is not None and top_lps is not None:
                    out[i].top_logprobs = list(zip(top_ids[i][:k], top_lps[i][:k], strict=True))
                else:
                    out[i].top_logprobs = []
        self._tokens = out
        return out


def _copy_to_host(
    parts: list[torch.Tensor | None],
) -> tuple[list[torch.Tensor | None], object]:  # pragma: no cover - CUDA
    """Non-blocking copies of device tensors into pinned host memory, and an event after them."""
    host: list[torch.Tensor | None] = []
    for t in parts:
        if t is None:
            host.append(None)
            continue
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        host.append(h)
    event = torch.cuda.Event()
    event.record()
    return host, event


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
        # Scatter the whole (masked) permutation back: indexing with the mask would read it back
        # to the host and stall the device queue.
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
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
    """Pick one token per row of `logits` `[B, vocab]` (float32); see `sample_batch`."""
    return sample_batch(logits, rows, default_generator, vocab_limit=vocab_limit).tokens()


def sample_batch(
    logits: torch.Tensor,
    rows: Sequence[SampleRequest],
    default_generator: torch.Generator | None = None,
    *,
    vocab_limit: int | None = None,
    finite: torch.Tensor | None = None,
) -> SampledBatch:
    """Pick one token per row of `logits` `[B, vocab]` (float32), leaving the results on the device
    with their copy to the host started.

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
    wanted = [row.params.logprobs for row in rows]
    batch = SampledBatch(chosen, wanted, finite=finite)
    if raw_logprobs is not None:
        batch.logprobs = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        k_max = max(k for k in wanted if k is not None)
        if k_max > 0:
            batch.top_logprobs, batch.top_ids = raw_logprobs.topk(k_max, dim=-1)
    batch.start_copy()
    return batch
