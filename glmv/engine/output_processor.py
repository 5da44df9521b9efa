"""The front end's half of generation: token ids from the core in, text deltas out.

`OutputProcessor` keeps, per request and choice, an incremental detokenizer and a stop-string
matcher. For each `CoreOutput` it appends the new token ids, turns them into text, renders logprob
token texts, and applies stop strings: on a match the text is cut, the choice finishes with
finish_reason "stop" and the matched string as stop_reason, and the choice is reported back so the
core can stop computing it (`process` returns those (request id, index) pairs). Tokens the core
produced for a choice after its stop are dropped, and usage counts only the tokens a choice kept,
so both engine modes report the same text and the same counts.

An eos or stop token ends the text without being part of it. Both the in-process engine
(`LLMEngine`) and the multi-process client run their outputs through this class.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from glmv.engine.messages import CoreOutput, SeqOutput, to_error
from glmv.engine.request import CompletionDelta, EngineRequest, RequestOutput, TokenLogprob
from glmv.errors import GlmvError
from glmv.processing.detok import IncrementalDetokenizer, StopStringMatcher


@dataclass(slots=True)
class _Choice:
    index: int
    detok: IncrementalDetokenizer
    stop: StopStringMatcher
    want_logprobs: bool
    num_tokens: int = 0
    done: bool = False


@dataclass(slots=True)
class _Request:
    request_id: str
    arrival_time: float
    choices: list[_Choice]
    prompt_tokens: int
    cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    error: GlmvError | None = None
    pending: dict[int, CompletionDelta] = field(default_factory=dict)


class OutputProcessor:
    """Detokenisation, stop strings and logprob texts for the requests of one client.
    Not thread-safe: its owner serialises calls."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _Request] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def add(self, request: EngineRequest) -> None:
        params = request.params
        choices = [
            _Choice(
                index=i,
                detok=IncrementalDetokenizer(
                    self.tokenizer, request.prompt_token_ids, skip_special_tokens=params.skip_special_tokens
                ),
                stop=StopStringMatcher(params.stop),
                want_logprobs=params.logprobs is not None,
            )
            for i in range(params.n)
        ]
        self._requests[request.request_id] = _Request(
            request.request_id, request.arrival_time, choices, len(request.prompt_token_ids)
        )

    def abort(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def process(self, outputs: Iterable[CoreOutput]) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """The requests' news, and the (request id, choice index) pairs the core should stop."""
        results: list[RequestOutput] = []
        stops: list[tuple[str, int]] = []
        for out in outputs:
            req = self._requests.get(out.request_id)
            if req is None:  # aborted, or already finished by stop strings
                continue
            req.cached_tokens = out.cached_tokens
            req.prompt_tokens = out.prompt_tokens
            req.first_scheduled_time = req.first_scheduled_time or out.first_scheduled_time
            req.first_token_time = req.first_token_time or out.first_token_time
            if out.error is not None and req.error is None:
                req.error = to_error(out.error)
            for seq in out.seqs:
                choice = req.choices[seq.index]
                if not choice.done and self._apply(req, choice, seq):
                    stops.append((req.request_id, choice.index))
            if out.finished:
                for choice in req.choices:  # the core reported every finish; defensive
                    if not choice.done:
                        self._finish(req, choice, "abort", None)
            results.append(self._collect(req))
        return results, stops

    # --- one choice -----------------------------------------------------------------------------

    def _delta(self, req: _Request, choice: _Choice) -> CompletionDelta:
        d = req.pending.get(choice.index)
        if d is None:
            d = CompletionDelta(
                index=choice.index, text="", token_ids=[], logprobs=[] if choice.want_logprobs else None
            )
            req.pending[choice.index] = d
        return d

    def _apply(self, req: _Request, choice: _Choice, seq: SeqOutput) -> bool:
        """Take the new tokens of one choice; True when a stop string ended it here (the core
        has not finished it yet and must be told)."""
        delta = self._delta(req, choice)
        tok = self.tokenizer
        last = len(seq.token_ids) - 1
        for i, token in enumerate(seq.token_ids):
            delta.token_ids.append(token)
            choice.num_tokens += 1
            if delta.logprobs is not None and seq.logprobs is not None:
                ids = seq.top_ids[i] if seq.top_ids is not None else []
                vals = seq.top_logprobs[i] if seq.top_logprobs is not None else []
                top = [(t, tok.decode([t]), lp) for t, lp in zip(ids, vals, strict=True)]
                delta.logprobs.append(TokenLogprob(token, tok.decode([token]), seq.logprobs[i], top))
            # An eos or stop token ends the text; it is not part of it.
            if i == last and seq.finish_reason == "stop":
                break
            text, stopped = choice.stop.feed(choice.detok.add([token]))
            delta.text += text
            if stopped:
                self._finish(req, choice, "stop", choice.stop.matched)
                return seq.finish_reason is None
        if seq.finish_reason is not None:
            self._finish(req, choice, seq.finish_reason, seq.stop_reason)
        return False

    def _finish(self, req: _Request, choice: _Choice, reason: str, stop_reason: int | str | None) -> None:
        delta = self._delta(req, choice)
        if not choice.stop.stopped:
            tail, stopped = choice.stop.feed(choice.detok.finish())
            delta.text += tail + choice.stop.flush()
            if stopped:  # the held-back tail completed a stop string
                reason, stop_reason = "stop", choice.stop.matched
        delta.finish_reason = reason
        delta.stop_reason = stop_reason
        choice.done = True

    def _collect(self, req: _Request) -> RequestOutput:
        deltas = sorted(req.pending.values(), key=lambda d: d.index)
        req.pending = {}
        finished = all(c.done for c in req.choices)
        if finished:
            self._requests.pop(req.request_id, None)
        return RequestOutput(
            request_id=req.request_id,
            deltas=deltas,
            prompt_tokens=req.prompt_tokens,
            cached_tokens=req.cached_tokens,
            completion_tokens=sum(c.num_tokens for c in req.choices),
            finished=finished,
            error=req.error,
            arrival_time=req.arrival_time,
            first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
        )
