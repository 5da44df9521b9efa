"""POST /v1/moderations in the OpenAI shape, answered by the served vision-language model.

`input` is a string, a list of strings (one result each), or a list of `text` / `image_url`
parts (one result for all of them). Each input becomes one generation of the moderation task
(`glmv.tasks.moderator`: the policy's prompt, the images, one boolean per category decoded
greedily with logprobs, scores from the deciding tokens); the inputs of a request run
concurrently. `category_applied_input_types` says which input types each category was judged on
(text-only categories are not judged on images, as with OpenAI's omni models).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from glmv.errors import GlmvError, InvalidRequestError
from glmv.server.protocol import ContentPart, TextContentPart
from glmv.server.runs import ServedRequest, cancel_on_disconnect
from glmv.server.state import ServerState
from glmv.tasks.images import ImageRef
from glmv.tasks.moderation import ModerationPolicy
from glmv.tasks.moderator import ModerationInput, moderation_request, moderation_verdict, value_scores

try:
    from glmv.server.guard import record_usage as _record_usage
except ImportError:  # the guard is optional
    _record_usage = None  # type: ignore[assignment]

__all__ = [
    "MAX_MODERATION_INPUTS",
    "ModerationRequest",
    "ModerationResponse",
    "ModerationResult",
    "install_moderation_routes",
    "value_scores",
]

MAX_MODERATION_INPUTS = 32


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
    images: list[tuple[str, str]]  # (url, param)
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
    images: list[tuple[str, str]] = []
    for k, part in enumerate(value):
        if isinstance(part, TextContentPart):
            texts.append(part.text)
        elif not isinstance(part, str):
            images.append((part.image_url.url, f"input[{k}].image_url"))
    return [_Input("\n".join(texts) if texts else None, images, -1)]


def _renamed(exc: GlmvError, item: _Input) -> GlmvError:
    """The prompt is this request's input: name it, not chat messages."""
    if exc.param is not None and exc.param.startswith("messages"):
        exc.param = "input" if item.index < 0 else f"input[{item.index}]"
    return exc


class ModerationHandler:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @property
    def policy(self) -> ModerationPolicy:
        policy = getattr(self.state.settings, "moderation", None)
        return policy if isinstance(policy, ModerationPolicy) else ModerationPolicy.default()

    async def __call__(self, request: Request, body: ModerationRequest) -> Response:
        state = self.state
        http_arrival = time.monotonic()
        state.check_draining()
        model = state.check_model(body.model)
        items = _inputs(body)
        policy = self.policy
        runs: list[ServedRequest] = []
        tasks = [
            asyncio.ensure_future(self._moderate(request, item, policy, http_arrival, runs)) for item in items
        ]
        try:
            results = await cancel_on_disconnect(request, asyncio.gather(*tasks))
        finally:
            for task in tasks:  # one input failed (or the client left): stop the others
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if _record_usage is not None and runs:
                usages = [r.stream.usage for r in runs]
                _record_usage(
                    request,
                    prompt_tokens=sum(u.prompt_tokens for u in usages),
                    completion_tokens=sum(u.completion_tokens for u in usages),
                    cached_tokens=sum(u.cached_tokens for u in usages),
                    ttft=max((r.ttft for r in runs if r.ttft is not None), default=None),
                )
        if results is None:
            return Response(status_code=499)
        out = ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=model, results=results)
        return JSONResponse(out.model_dump())

    async def _moderate(
        self,
        request: Request,
        item: _Input,
        policy: ModerationPolicy,
        http_arrival: float,
        runs: list[ServedRequest],
    ) -> ModerationResult:
        state = self.state
        task_input = ModerationInput(item.text, [ImageRef(url, param) for url, param in item.images])
        generation_request = moderation_request(
            policy, task_input, thinking_toggle=state.service.supports_thinking_toggle
        )
        try:
            # Text that cannot fit is refused before anything else runs.
            state.service.check_prompt_size([item.text] if item.text else [])
            state.service.check_admission()
        except GlmvError as exc:
            raise _renamed(exc, item) from None
        run = ServedRequest(state, request, generation_request, http_arrival=http_arrival, record_usage=False)
        runs.append(run)
        try:
            generation = await run.collect()
        except asyncio.CancelledError:
            await run.close("aborted")
            raise
        except GlmvError as exc:
            await run.close("error", exc)
            raise _renamed(exc, item) from None
        except BaseException as exc:
            await run.close("error", exc)
            raise
        await run.close()
        verdict = moderation_verdict(policy, task_input, generation)
        return ModerationResult(
            flagged=verdict.flagged,
            categories=verdict.categories,
            category_scores=verdict.category_scores,
            category_applied_input_types=verdict.category_applied_input_types,
        )


def install_moderation_routes(
    app: FastAPI, state: ServerState, errors: Mapping[int | str, dict[str, Any]]
) -> None:
    """Register POST /v1/moderations on `app`."""
    handler = ModerationHandler(state)

    @app.post(
        "/v1/moderations",
        response_model=ModerationResponse,
        responses=dict(errors),
        tags=["OpenAI"],
        summary="Classify text and images against the moderation policy",
    )
    async def moderations(request: Request, body: ModerationRequest) -> Response:
        return await handler(request, body)
