"""Sampling parameters of one request, with validation against the OpenAI/vLLM ranges.

`SamplingParams.validate` raises `InvalidRequestError` naming the offending parameter, so the HTTP
layer can answer 400 with `param` set, and the engine never sees a value it cannot honour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from glmv.errors import ContextLengthExceededError, InvalidRequestError

# Temperatures below this are treated as greedy decoding (argmax), as in vLLM.
GREEDY_EPSILON = 1e-5
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_TEMPERATURE = 2.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and not math.isnan(value)


def _invalid(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token of a request, and when to stop."""

    n: int = 1
    max_tokens: int | None = None  # None: up to the context limit
    min_tokens: int = 0
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 => disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: sampled token's logprob + k top alternatives
    skip_special_tokens: bool = False
    # Structured output (glmv.engine.structured.StructuredOutput): the output is constrained to JSON.
    structured: Any = None

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature < GREEDY_EPSILON

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(
        self,
        *,
        max_model_len: int | None = None,
        vocab_size: int | None = None,
        max_sequences: int | None = None,
    ) -> None:
        """Raise `InvalidRequestError` (with `param`) for the first value out of range.

        `vocab_size` bounds `stop_token_ids`; `max_sequences` is the most sequences the engine can
        ever queue at once (its `max_waiting`): a larger `n` could never be admitted."""
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise _invalid("n", f"n must be an integer between 1 and {MAX_N}, got {self.n!r}.")
        if max_sequences is not None and self.n > max_sequences:
            raise _invalid(
                "n",
                f"n ({self.n}) is more than this server can ever queue at once ({max_sequences} "
                "sequences, see --max-waiting).",
            )
        if self.max_tokens is not None:
            if not _is_int(self.max_tokens) or self.max_tokens < 1:
                raise _invalid("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
            if max_model_len is not None and self.max_tokens > max_model_len:
                raise ContextLengthExceededError(
                    f"max_tokens ({self.max_tokens}) exceeds this model's maximum context length "
                    f"({max_model_len} tokens).",
                    param="max_tokens",
                )
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _invalid("min_tokens", f"min_tokens must be an integer >= 0, got {self.min_tokens!r}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _invalid(
                "min_tokens",
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}).",
            )
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise _invalid(
                "temperature",
                f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {self.temperature!r}.",
            )
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise _invalid("top_p", f"top_p must be in (0, 1], got {self.top_p!r}.")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _invalid(
                "top_k", f"top_k must be an integer >= 1, or 0 or -1 to disable it, got {self.top_k!r}."
            )
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise _invalid("min_p", f"min_p must be in [0, 1], got {self.min_p!r}.")
        if (
            not _is_number(self.repetition_penalty)
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty <= 0.0
        ):
            raise _invalid(
                "repetition_penalty",
                f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}.",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise _invalid(name, f"{name} must be between -2 and 2, got {value!r}.")
        if self.seed is not None and not _is_int(self.seed):
            raise _invalid("seed", f"seed must be an integer, got {self.seed!r}.")
        if not isinstance(self.stop, list):
            raise _invalid("stop", "stop must be a list of strings.")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _invalid("stop", f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}.")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise _invalid(f"stop[{i}]", f"stop strings must be non-empty strings, got {s!r}.")
        if not isinstance(self.stop_token_ids, list):
            raise _invalid("stop_token_ids", "stop_token_ids must be a list of token ids.")
        for i, t in enumerate(self.stop_token_ids):
            if not _is_int(t) or t < 0:
                raise _invalid(f"stop_token_ids[{i}]", f"token ids must be integers >= 0, got {t!r}.")
            if vocab_size is not None and t >= vocab_size:
                raise _invalid(
                    f"stop_token_ids[{i}]",
                    f"{t} is not a token id of this model (its vocabulary has {vocab_size} ids).",
                )
        if not isinstance(self.ignore_eos, bool):
            raise _invalid("ignore_eos", f"ignore_eos must be a boolean, got {self.ignore_eos!r}.")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise _invalid(
                "logprobs",
                f"logprobs must be an integer between 0 and {MAX_LOGPROBS}, got {self.logprobs!r}.",
            )
        if self.structured is not None and not hasattr(self.structured, "grammar"):
            raise _invalid(
                "response_format", "structured must be a StructuredOutput (see glmv.engine.structured)."
            )
        if not isinstance(self.skip_special_tokens, bool):
            raise _invalid(
                "skip_special_tokens",
                f"skip_special_tokens must be a boolean, got {self.skip_special_tokens!r}.",
            )
