"""POST /v1/extract (glmv extension): images + a schema in, one validated JSON object out.

The schema is a built-in name (`invoice`, `receipt`, `id_card`, `business_license`, `table`,
`chat_screenshot`; listed by GET /v1/extract/schemas) or an inline JSON Schema. The extraction
itself (prompt, `json_schema` constraint, parsing and validation) is `glmv.tasks.extraction`;
this route checks the request, serves the generation like any other (admission control, image
checks, timeouts, metrics, batching) and answers with the object and the usage.

Errors name the extract request's own fields: `images[1]`, `schema`, `max_tokens`. An answer
that reached `max_tokens` before the JSON was complete is a 422 (`incomplete_output`), as is one
that does not validate or holds a number no JSON response can carry (`1e999`: `non_finite_number`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from glmv.errors import GlmvError, InvalidImageError
from glmv.server.protocol import ImageURL, PromptTokensDetails, Usage
from glmv.server.runs import ServedRequest, cancel_on_disconnect
from glmv.server.state import ServerState
from glmv.tasks.extraction import extraction_request, extraction_result, extraction_spec
from glmv.tasks.images import ImageRef
from glmv.tasks.schemas import BUILTIN_SCHEMAS

__all__ = [
    "ExtractRequest",
    "ExtractResponse",
    "ExtractionSchemaCard",
    "install_extract_routes",
]


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


# --- the handler ---------------------------------------------------------------------------------


def _renamed(exc: GlmvError) -> GlmvError:
    """The prompt is this request's images and instructions: name them, not chat messages."""
    if exc.param is not None and exc.param.startswith("messages"):
        exc.param = "images"
    return exc


class ExtractHandler:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def __call__(self, request: Request, body: ExtractRequest) -> Response:
        state = self.state
        http_arrival = time.monotonic()
        state.check_draining()
        model = state.check_model(body.model)
        spec = extraction_spec(body.schema_, body.instructions)
        urls = [im if isinstance(im, str) else im.url for im in body.images]
        limits = state.service.images.limits
        images = [ImageRef(url, f"images[{i}]") for i, url in enumerate(urls)]
        if len(images) > limits.max_images:
            raise InvalidImageError(
                f"too many images: {len(images)} given, this server accepts at most {limits.max_images} per request",
                param=images[limits.max_images].param,
            )
        generation_request = extraction_request(
            spec,
            images,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            seed=body.seed,
            thinking=body.thinking,
            thinking_toggle=state.service.supports_thinking_toggle,
            request_id=f"extract-{uuid.uuid4().hex}",
        )
        try:
            state.service.validate_params(generation_request.params)
            state.service.check_admission()
        except GlmvError as exc:
            raise _renamed(exc) from None
        run = ServedRequest(state, request, generation_request, http_arrival=http_arrival)
        try:
            generation = await cancel_on_disconnect(request, run.collect())
        except GlmvError as exc:
            await run.close("error", exc)
            raise _renamed(exc) from None
        except BaseException as exc:
            await run.close("error", exc)
            raise
        if generation is None:
            await run.close("aborted")
            return Response(status_code=499)
        await run.close()
        result = extraction_result(
            spec, generation, max_tokens=body.max_tokens, max_model_len=state.service.max_model_len
        )
        usage = result.usage
        out = ExtractResponse(
            id=run.request_id,
            created=int(time.time()),
            model=model,
            schema_name=spec.name,
            data=result.data,
            reasoning=result.reasoning,
            truncated=result.truncated,
            finish_reason=result.finish_reason,
            usage=Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
            ),
        )
        return JSONResponse(out.model_dump())


def install_extract_routes(
    app: FastAPI, state: ServerState, errors: Mapping[int | str, dict[str, Any]]
) -> None:
    """Register POST /v1/extract and GET /v1/extract/schemas on `app`."""
    handler = ExtractHandler(state)
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
