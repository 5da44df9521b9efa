"""POST /v1/moderations in the OpenAI shape, answered by the served vision-language model.

`input` is a string, a list of strings (one result each), or a list of `text` / `image_url`
parts (one result for all of them). Each input becomes one chat completion: the policy's prompt
(`glmv.tasks.moderation`), the images, and `response_format` = one boolean per category, decoded
greedily with logprobs. The score of a category is the probability the model gives `true` at the
token that decides its value (`true` vs `false`, renormalised over the alternatives that decide
it); a category is flagged when its score reaches the policy's threshold, and a result is flagged
when any category is. `category_applied_input_types` says which input types each category was
judged on (text-only categories are not judged on images, as with OpenAI's omni models).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from glmv.errors import EngineError, InvalidRequestError
from glmv.server.extract import chat_json, check_model
from glmv.server.protocol import ContentPart, TextContentPart
from glmv.tasks.moderation import ModerationPolicy

if TYPE_CHECKING:
    from glmv.server.app import ServerState
    from glmv.server.chat import ChatHandler

__all__ = [
    "MAX_MODERATION_INPUTS",
    "ModerationRequest",
    "ModerationResponse",
    "ModerationResult",
    "install_moderation_routes",
    "value_scores",
]

MAX_MODERATION_INPUTS = 32
_TOP_LOGPROBS = 8


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    input: str | list[str] | list[ContentPart] = Field(
        description="Text, a list of texts (one result each), or a list of `text` and `image_url` parts "
        "(one result for all of them)."
    )
    model: str | None = Field(None, description="The served model name; defaults to it.")


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


@dataclass(slots=True)
class _Input:
    text: str | None
    images: list[str]
    index: int  # position in a list of strings (for param names), -1 for a part list


def _inputs(body: ModerationRequest) -> list[_Input]:
    value = body.input
    if isinstance(value, str):
        return [_Input(value, [], -1)]
    if not value:
        raise InvalidRequestError("input must not be empty.", param="input", code="invalid_value")
    if len(value) > MAX_MODERATION_INPUTS:
        raise InvalidRequestError(
            f"input holds {len(value)} items; at most {MAX_MODERATION_INPUTS} are accepted per request.",
            param="input",
            code="invalid_value",
        )
    if all(isinstance(v, str) for v in value):
        return [_Input(v, [], i) for i, v in enumerate(value)]  # type: ignore[misc]
    texts: list[str] = []
    images: list[str] = []
    for part in value:
        if isinstance(part, TextContentPart):
            texts.append(part.text)
        elif not isinstance(part, str):
            images.append(part.image_url.url)
    return [_Input("\n".join(texts) if texts else None, images, -1)]


def _param_map(item: _Input) -> Any:
    def rename(param: str) -> str:
        prefix = "messages[0].content["
        if param.startswith(prefix):
            index, _, _ = param[len(prefix) :].partition("]")
            if index.isdigit() and int(index) < len(item.images):
                return f"input[{index}].image_url"  # images come first in the chat request
            return "input" if item.index < 0 else f"input[{item.index}]"
        if param.startswith("messages"):  # the whole prompt: the input it was built from
            return "input" if item.index < 0 else f"input[{item.index}]"
        return param

    return rename


def value_scores(logprobs: list[Mapping[str, Any]], names: list[str]) -> dict[str, float | None]:
    """P(`true`) of each category's value in a compact JSON answer, from the token logprobs.

    For the token that holds the first character of a category's value, the top alternatives
    (which start at the same byte) are split by the character they put there: `t` or `f`. None
    when the value cannot be found."""
    data = b""
    starts: list[int] = []
    for entry in logprobs:
        starts.append(len(data))
        data += bytes(entry.get("bytes") or entry["token"].encode("utf-8"))
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
        for alt in entry.get("top_logprobs") or [entry]:
            raw = bytes(alt.get("bytes") or alt["token"].encode("utf-8"))
            ch = raw[offset : offset + 1].decode("latin-1")
            if ch in mass:
                mass[ch] += math.exp(alt["logprob"])
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


class ModerationHandler:
    def __init__(self, state: ServerState, chat: ChatHandler) -> None:
        self.state = state
        self.chat = chat

    @property
    def policy(self) -> ModerationPolicy:
        policy = getattr(self.state.settings, "moderation", None)
        return policy if isinstance(policy, ModerationPolicy) else ModerationPolicy.default()

    async def __call__(self, request: Request, body: ModerationRequest) -> Response:
        model = check_model(self.state, body.model)
        items = _inputs(body)
        policy = self.policy
        tasks = [self._moderate(request, model, item, policy) for item in items]
        results = await asyncio.gather(*tasks)
        for r in results:
            if isinstance(r, Response):
                return r
        out = ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=model, results=results)  # type: ignore[arg-type]
        return JSONResponse(out.model_dump())

    async def _moderate(
        self, request: Request, model: str, item: _Input, policy: ModerationPolicy
    ) -> ModerationResult | Response:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in item.images]
        content.append({"type": "text", "text": policy.prompt(item.text, len(item.images))})
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "moderation", "schema": policy.schema(), "strict": True},
                "close_on_budget": True,
            },
            "temperature": 0,
            "max_tokens": 24 * len(policy.categories) + 32,
            "logprobs": True,
            "top_logprobs": _TOP_LOGPROBS,
            "thinking": {"type": "disabled"},
        }
        result = await chat_json(self.chat, request, payload, _param_map(item))
        if isinstance(result, Response):
            return result
        choice = result["choices"][0]
        if choice["finish_reason"] != "stop":
            raise EngineError(f"The moderation verdict was cut off ({choice['finish_reason']}).")
        scores = value_scores((choice.get("logprobs") or {}).get("content") or [], policy.names)
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
        return ModerationResult(
            flagged=any(categories.values()),
            categories=categories,
            category_scores=category_scores,
            category_applied_input_types=applied,
        )


def install_moderation_routes(
    app: FastAPI, chat: ChatHandler, errors: Mapping[int | str, dict[str, Any]]
) -> None:
    """Register POST /v1/moderations on `app`."""
    handler = ModerationHandler(app.state.glmv, chat)

    @app.post(
        "/v1/moderations",
        response_model=ModerationResponse,
        responses=dict(errors),
        tags=["OpenAI"],
        summary="Classify text and images against the moderation policy",
    )
    async def moderations(request: Request, body: ModerationRequest) -> Response:
        return await handler(request, body)
