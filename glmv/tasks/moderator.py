"""Moderation verdicts from the served vision-language model.

One input (text and/or images) becomes one generation (`moderation_request`): the policy's
prompt, the images, and a JSON answer with one boolean per category, decoded greedily with
logprobs. `moderation_verdict` reads the answer: the score of a category is the probability the
model gives `true` at the token that decides its value (`true` vs `false`, renormalised over the
alternatives that decide it, `value_scores`); a category is flagged when its score reaches the
policy's threshold and it applies to the input's types; the verdict is flagged when any
category is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from glmv.errors import EngineError
from glmv.tasks.images import ImageRef
from glmv.tasks.moderation import ModerationPolicy
from glmv.tasks.structured import json_schema_output
from glmv.tasks.types import Generation, GenerationRequest, LogprobEntry, SamplingParams

__all__ = ["ModerationInput", "ModerationVerdict", "moderation_request", "moderation_verdict", "value_scores"]

TOP_LOGPROBS = 8


@dataclass(slots=True)
class ModerationInput:
    text: str | None
    images: list[ImageRef] = field(default_factory=list)


@dataclass(slots=True)
class ModerationVerdict:
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]


def moderation_request(
    policy: ModerationPolicy, item: ModerationInput, *, thinking_toggle: bool = True, request_id: str | None = None
) -> GenerationRequest:
    structured = (
        json_schema_output(policy.schema(), name="moderation", strict=True, param="input")
        .with_close_on_budget()
        .with_thinking(False)
    )
    content: list[dict[str, Any]] = [{"type": "image"} for _ in item.images]
    content.append({"type": "text", "text": policy.prompt(item.text, len(item.images))})
    return GenerationRequest(
        messages=[{"role": "user", "content": content}],
        images=list(item.images),
        params=SamplingParams(
            temperature=0.0,
            max_tokens=24 * len(policy.categories) + 32,
            logprobs=TOP_LOGPROBS,
            structured=structured,
        ),
        template_kwargs={"enable_thinking": False} if thinking_toggle else None,
        request_id=request_id,
    )


def moderation_verdict(policy: ModerationPolicy, item: ModerationInput, generation: Generation) -> ModerationVerdict:
    choice = generation.choices[0]
    if choice.finish_reason != "stop":
        raise EngineError(f"The moderation verdict was cut off ({choice.finish_reason}).")
    scores = value_scores(choice.logprobs or [], policy.names)
    present = {"image"} if item.images else set()
    if item.text is not None:
        present.add("text")
    categories: dict[str, bool] = {}
    category_scores: dict[str, float] = {}
    applied: dict[str, list[str]] = {}
    for c in policy.categories:
        types = c.applied_to(present)
        score = scores.get(c.name)
        score = 0.0 if score is None or not types else float(score)
        category_scores[c.name] = score
        categories[c.name] = bool(types) and score >= c.threshold
        applied[c.name] = types
    return ModerationVerdict(any(categories.values()), categories, category_scores, applied)


def value_scores(logprobs: Sequence[LogprobEntry], names: list[str]) -> dict[str, float | None]:
    """P(`true`) of each category's value in a compact JSON answer, from the token logprobs.

    For the token that holds the first character of a category's value, the top alternatives
    (which start at the same byte) are split by the character they put there: `t` or `f`. None
    when the value cannot be found."""
    data = b""
    starts: list[int] = []
    for entry in logprobs:
        starts.append(len(data))
        data += bytes(entry.bytes or entry.token.encode("utf-8"))
    out: dict[str, float | None] = {}
    for name in names:
        key = ('"' + name + '": ').encode()
        at = data.rfind(key)
        if at < 0:
            out[name] = None
            continue
        pos = at + len(key)
        i = _token_at(starts, pos)
        if i is None:
            out[name] = None
            continue
        offset = pos - starts[i]
        entry = logprobs[i]
        mass = {"t": 0.0, "f": 0.0}
        alternatives: Sequence[Any] = entry.top or [entry]
        for alt in alternatives:
            raw = bytes(alt.bytes or alt.token.encode("utf-8"))
            ch = raw[offset : offset + 1].decode("latin-1")
            if ch in mass:
                mass[ch] += math.exp(alt.logprob)
        total = mass["t"] + mass["f"]
        if total > 0:
            out[name] = mass["t"] / total
        else:  # no deciding alternative listed: the sampled value decides
            out[name] = 1.0 if data[pos : pos + 1] == b"t" else 0.0
    return out


def _token_at(starts: list[int], pos: int) -> int | None:
    lo, hi = 0, len(starts) - 1
    if hi < 0 or pos < 0:
        return None
    while lo < hi:  # the last token that starts at or before pos
        mid = (lo + hi + 1) // 2
        if starts[mid] <= pos:
            lo = mid
        else:
            hi = mid - 1
    return lo
