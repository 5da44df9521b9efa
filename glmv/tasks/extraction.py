"""Document extraction: images + a schema in, one validated JSON object out.

`extraction_spec` resolves the schema (a built-in name such as `invoice`, or an inline JSON
Schema, checked for what the grammar can enforce) and its prompt; `extraction_request` makes the
generation: the document's images, the prompt, greedy decoding under `json_schema` with
`close_on_budget` (the JSON stays complete when the token budget runs low), thinking off unless
asked for. `extraction_result` parses the answer, validates it against the schema (decimal
`multipleOf`) and says whether it was closed early. `/v1/extract` and `glmv extract` both use
`extract`, which does all three through the service.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from glmv.errors import EngineError, InvalidRequestError, UnprocessableEntityError
from glmv.tasks.images import ImageRef
from glmv.tasks.schemas import BUILTIN_SCHEMAS, extraction_prompt
from glmv.tasks.service import GenerationService
from glmv.tasks.structured import closing_reserve, json_schema_output, schema_errors
from glmv.tasks.types import Generation, GenerationRequest, SamplingParams, Usage

__all__ = [
    "Extraction",
    "ExtractionSpec",
    "extract",
    "extraction_request",
    "extraction_result",
    "extraction_spec",
    "non_finite_numbers",
]


@dataclass(frozen=True, slots=True)
class ExtractionSpec:
    schema: dict[str, Any]
    name: str | None  # the built-in schema's name; None for an inline schema
    prompt: str


@dataclass(slots=True)
class Extraction:
    data: dict[str, Any]
    reasoning: str | None
    truncated: bool  # the budget ran low and the object was closed early
    finish_reason: str
    usage: Usage


def extraction_spec(
    schema: str | Mapping[str, Any], instructions: str | None = None, *, param: str = "schema"
) -> ExtractionSpec:
    """The schema and prompt of an extraction; 400 (naming `param`) for an unknown name or a
    schema the grammar cannot enforce."""
    if isinstance(schema, str):
        preset = BUILTIN_SCHEMAS.get(schema)
        if preset is None:
            raise InvalidRequestError(
                f"Unknown built-in schema {schema!r}; choose one of {', '.join(BUILTIN_SCHEMAS)} "
                "or send a JSON Schema object.",
                param=param,
                code="invalid_value",
            )
        return ExtractionSpec(preset.schema, preset.name, preset.prompt(instructions))
    json_schema_output(schema, param=param)  # 400 naming what cannot be enforced
    return ExtractionSpec(dict(schema), None, extraction_prompt(schema, instructions))


def extraction_request(
    spec: ExtractionSpec,
    images: Sequence[ImageRef],
    *,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    thinking: bool = False,
    thinking_toggle: bool = True,
    request_id: str | None = None,
) -> GenerationRequest:
    """The generation of one extraction: the images first, then the prompt, under the schema."""
    structured = (
        json_schema_output(spec.schema, name=spec.name or "extraction", strict=True, param="schema")
        .with_close_on_budget()
        .with_thinking(thinking)
    )
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": spec.prompt})
    return GenerationRequest(
        messages=[{"role": "user", "content": content}],
        images=list(images),
        params=SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed, structured=structured),
        template_kwargs={"enable_thinking": thinking} if thinking_toggle else None,
        request_id=request_id,
    )


def extraction_result(
    spec: ExtractionSpec, generation: Generation, *, max_tokens: int | None, max_model_len: int
) -> Extraction:
    """The validated object of a finished extraction; 422 when the answer was cut by the budget
    or does not validate (or holds a number JSON cannot carry, such as `1e999`), 500 when it is
    not JSON at all."""
    choice = generation.choices[0]
    if choice.finish_reason == "length":
        limit = f"max_tokens ({max_tokens})" if max_tokens else "the context length"
        raise UnprocessableEntityError(
            f"The answer reached {limit} before the JSON object was complete; raise max_tokens, "
            "or use a schema with shorter fields.",
            param="max_tokens",
            code="incomplete_output",
        )
    try:
        data = json.loads(choice.content)
    except ValueError as exc:
        raise EngineError(f"The model's answer is not JSON ({exc}).", code="invalid_output") from None
    non_finite = non_finite_numbers(data)
    if non_finite:
        # JSON grammar allows `1e999`, which parses to infinity: no JSON response can carry it.
        raise UnprocessableEntityError(
            "The extracted object holds a number too large for JSON (infinite or not a number) at "
            f"{', '.join(non_finite[:5])}; bound the field with minimum and maximum in the schema, or ask again.",
            param="schema",
            code="non_finite_number",
        )
    problems = schema_errors(spec.schema, data)
    if problems or not isinstance(data, dict):
        raise UnprocessableEntityError(
            "The extracted object does not validate against the schema: " + "; ".join(problems[:5]),
            param="schema",
            code="schema_validation_failed",
        )
    usage = generation.usage
    budget = max_model_len - usage.prompt_tokens
    if max_tokens is not None:
        budget = min(budget, max_tokens)
    return Extraction(
        data=data,
        reasoning=choice.reasoning,
        truncated=usage.completion_tokens > budget - closing_reserve(budget),
        finish_reason=str(choice.finish_reason),
        usage=usage,
    )


def non_finite_numbers(value: Any, path: str = "$") -> list[str]:
    """JSON paths (`$.total`, `$.items[2].price`) of the infinite or NaN floats in a parsed value."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite_numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite_numbers(v, f"{path}[{i}]")]
    return []


async def extract(
    service: GenerationService,
    spec: ExtractionSpec,
    images: Sequence[ImageRef],
    *,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    thinking: bool = False,
) -> Extraction:
    """One document through the service."""
    request = extraction_request(
        spec,
        images,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        thinking=thinking,
        thinking_toggle=service.supports_thinking_toggle,
    )
    generation = await service.generate(request)
    return extraction_result(spec, generation, max_tokens=max_tokens, max_model_len=service.max_model_len)
