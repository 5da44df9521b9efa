"""POST /v1/extract (glmv extension): images + a schema in, one validated JSON object out.

The schema is a built-in name (`invoice`, `receipt`, `id_card`, `business_license`, `table`,
`chat_screenshot`; listed by GET /v1/extract/schemas) or an inline JSON Schema. The request is
served as a chat completion with the preset's prompt (role + task + constraints) and
`response_format: json_schema`, so it passes the same guard, admission control, image checks,
timeouts, metrics and batching as any chat request, and the grammar keeps the output inside the
schema token by token. The answer is parsed and validated against the schema (decimal
`multipleOf`) before it is returned with the usage.

Errors name the extract request's own fields: `images[1]`, `schema`, `max_tokens`. An answer
that reached `max_tokens` before the JSON was complete is a 422 (`incomplete_output`).

`chat_json` (shared with the moderation route) runs one internal chat completion and returns its
JSON body.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from glmv.engine.structured import closing_reserve, json_schema_output, schema_errors
from glmv.errors import (
    EngineError,
    GlmvError,
    InvalidRequestError,
    ModelNotFoundError,
    UnprocessableEntityError,
)
from glmv.server.protocol import ChatCompletionRequest, ImageURL, Usage, validation_error_to_glmv
from glmv.tasks.schemas import BUILTIN_SCHEMAS, extraction_prompt

if TYPE_CHECKING:
    from glmv.server.app import ServerState
    from glmv.server.chat import ChatHandler

__all__ = [
    "ExtractRequest",
    "ExtractResponse",
    "ExtractionSchemaCard",
    "chat_json",
    "check_model",
    "install_extract_routes",
    "warm_up_structured_output",
]

ParamMap = Callable[[str], str]
log = logging.getLogger("glmv.server.extract")


# --- protocol ------------------------------------------------------------------------------------


class ExtractRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)

    model: str | None = Field(None, description="The served model name; defaults to it.")
    images: list[str | ImageURL] = Field(
        min_length=1,
        description="Pages or photos of one document: `data:image/...;base64,...` URLs (or http(s) URLs "
        'when the server allows remote images), as strings or `{"url": ...}` objects.',
    )
    schema_: str | dict[str, Any] = Field(
        alias="schema",
        description="A built-in schema name (see GET /v1/extract/schemas) or an inline JSON Schema.",
    )
    instructions: str | None = Field(
        None, max_length=8000, description="Extra instructions added to the prompt (e.g. which page matters)."
    )
    max_tokens: int | None = Field(None, ge=1, description="Cap on generated tokens (default: the context).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 (greedy) by default.")
    seed: int | None = None
    thinking: bool = Field(
        False, description="Let a thinking model reason before answering (slower; off by default)."
    )


class ExtractResponse(BaseModel):
    id: str
    object: Literal["extraction"] = "extraction"
    created: int
    model: str
    schema_name: str | None = Field(description="The built-in schema used, or null for an inline schema.")
    data: dict[str, Any] = Field(description="The extracted object; it validates against the schema.")
    reasoning: str | None = Field(None, description="The model's reasoning when `thinking` was on.")
    truncated: bool = Field(
        description="The token budget ran low and the object was closed early: later fields may be null or short."
    )
    finish_reason: str
    usage: Usage


class ExtractionSchemaCard(BaseModel):
    name: str
    description: str
    schema_: dict[str, Any] = Field(alias="schema", serialization_alias="schema")


class ExtractionSchemaList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExtractionSchemaCard]


# --- shared with the moderation route --------------------------------------------------------------


def warm_up_structured_output(engine: Any) -> None:
    """Build the engine's grammar machinery (token table, grammar tokenizer: about a second for a
    151k vocabulary) in a background thread, so the first JSON request does not stall the engine."""

    def build() -> None:
        try:
            engine.grammar_backend()
        except Exception as exc:  # structured output then fails per request, with this message
            log.warning("structured output is unavailable: %s", exc)

    threading.Thread(target=build, name="glmv-grammar-warm-up", daemon=True).start()


def check_model(state: ServerState, model: str | None) -> str:
    names = state.model_names
    if model is None or model == "":
        return names[0]
    if model not in names:
        raise ModelNotFoundError(
            f"The model '{model}' does not exist on this server; it serves '{names[0]}' (see GET /v1/models).",
            param="model",
        )
    return model


async def chat_json(
    chat: ChatHandler, request: Request, payload: Mapping[str, Any], param_map: ParamMap
) -> dict[str, Any] | Response:
    """Run `payload` as a non-streaming chat completion; its JSON body, or the handler's own
    response when it is not a 200 (a client that left gets 499). Errors are raised with `param`
    renamed by `param_map`."""
    try:
        body = ChatCompletionRequest.model_validate(dict(payload))
    except ValidationError as exc:
        raise _renamed(validation_error_to_glmv(list(exc.errors())), param_map) from None
    try:
        response = await chat(request, body)
    except GlmvError as exc:
        raise _renamed(exc, param_map) from None
    if response.status_code != 200 or not isinstance(response, JSONResponse):
        return response
    return json.loads(bytes(response.body))


def _renamed(exc: GlmvError, param_map: ParamMap) -> GlmvError:
    if exc.param:
        exc.param = param_map(exc.param)
        exc.message = exc.message.replace("'messages[0].content", "'content")
    return exc


# --- the handler ---------------------------------------------------------------------------------


def _image_param(num_images: int) -> ParamMap:
    def rename(param: str) -> str:
        prefix = "messages[0].content["
        if param.startswith(prefix):
            index, _, _ = param[len(prefix) :].partition("]")
            if index.isdigit() and int(index) < num_images:
                return f"images[{index}]"
            return "instructions"
        if param.startswith("response_format.json_schema.schema"):
            return "schema" + param[len("response_format.json_schema.schema") :]
        if param.startswith("messages"):
            return "images"
        return param

    return rename


class ExtractHandler:
    def __init__(self, state: ServerState, chat: ChatHandler) -> None:
        self.state = state
        self.chat = chat

    async def __call__(self, request: Request, body: ExtractRequest) -> Response:
        model = check_model(self.state, body.model)
        if isinstance(body.schema_, str):
            preset = BUILTIN_SCHEMAS.get(body.schema_)
            if preset is None:
                raise InvalidRequestError(
                    f"Unknown built-in schema {body.schema_!r}; choose one of {', '.join(BUILTIN_SCHEMAS)} "
                    "or send a JSON Schema object.",
                    param="schema",
                    code="invalid_value",
                )
            schema, name, prompt = preset.schema, preset.name, preset.prompt(body.instructions)
        else:
            schema, name = body.schema_, None
            json_schema_output(schema, param="schema")  # 400 naming what cannot be enforced
            prompt = extraction_prompt(schema, body.instructions)
        urls = [im if isinstance(im, str) else im.url for im in body.images]
        payload: dict[str, Any] = {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        *({"type": "image_url", "image_url": {"url": u}} for u in urls),
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": name or "extraction", "schema": schema, "strict": True},
                "close_on_budget": True,
            },
            "temperature": body.temperature,
            "max_tokens": body.max_tokens,
            "seed": body.seed,
            "thinking": {"type": "enabled" if body.thinking else "disabled"},
        }
        result = await chat_json(self.chat, request, payload, _image_param(len(urls)))
        if isinstance(result, Response):
            return result
        choice = result["choices"][0]
        content = choice["message"]["content"] or ""
        if choice["finish_reason"] == "length":
            limit = f"max_tokens ({body.max_tokens})" if body.max_tokens else "the context length"
            raise UnprocessableEntityError(
                f"The answer reached {limit} before the JSON object was complete; raise max_tokens, "
                "or use a schema with shorter fields.",
                param="max_tokens",
                code="incomplete_output",
            )
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise EngineError(f"The model's answer is not JSON ({exc}).", code="invalid_output") from None
        problems = schema_errors(schema, data)
        if problems or not isinstance(data, dict):
            raise UnprocessableEntityError(
                "The extracted object does not validate against the schema: " + "; ".join(problems[:5]),
                param="schema",
                code="schema_validation_failed",
            )
        out = ExtractResponse(
            id=f"extract-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=model,
            schema_name=name,
            data=data,
            reasoning=choice["message"].get("reasoning_content"),
            truncated=self._closed_early(result["usage"], body.max_tokens),
            finish_reason=choice["finish_reason"],
            usage=Usage.model_validate(result["usage"]),
        )
        return JSONResponse(out.model_dump())

    def _closed_early(self, usage: Mapping[str, Any], max_tokens: int | None) -> bool:
        budget = self.state.engine.engine.max_model_len - int(usage["prompt_tokens"])
        if max_tokens is not None:
            budget = min(budget, max_tokens)
        return int(usage["completion_tokens"]) > budget - closing_reserve(budget)


def install_extract_routes(
    app: FastAPI, chat: ChatHandler, errors: Mapping[int | str, dict[str, Any]]
) -> None:
    """Register POST /v1/extract and GET /v1/extract/schemas on `app`."""
    handler = ExtractHandler(app.state.glmv, chat)
    responses: dict[int | str, dict[str, Any]] = {
        **errors,
        422: {
            "model": errors[400]["model"],
            "description": "The answer was cut by max_tokens, or does not validate against the schema",
        },
    }

    @app.post(
        "/v1/extract",
        response_model=ExtractResponse,
        responses=responses,
        tags=["glmv"],
        summary="Extract a JSON object from document images (built-in or inline JSON Schema)",
    )
    async def extract(request: Request, body: ExtractRequest) -> Response:
        return await handler(request, body)

    @app.get(
        "/v1/extract/schemas",
        response_model=ExtractionSchemaList,
        response_model_by_alias=True,
        tags=["glmv"],
        summary="List the built-in extraction schemas",
    )
    async def extract_schemas() -> ExtractionSchemaList:
        return ExtractionSchemaList(
            data=[
                ExtractionSchemaCard(name=p.name, description=p.description, schema=p.schema)
                for p in BUILTIN_SCHEMAS.values()
            ]
        )
