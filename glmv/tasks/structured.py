"""Structured output (JSON constrained token by token) as the tasks and the server ask for it.

The constraint itself (`StructuredOutput`, compiled into grammar masks inside the engine) is the
engine's; this module names the parts the layers above use, so the server reaches the engine
only through `glmv.tasks`: `parse_response_format` (an OpenAI `response_format`),
`json_schema_output` (a JSON Schema, with a 400 naming what cannot be enforced),
`schema_errors` (validation of a result, decimal `multipleOf`) and `closing_reserve` (how early
`close_on_budget` starts closing the JSON).
"""

from __future__ import annotations

from glmv.engine.structured import (
    StructuredOutput,
    closing_reserve,
    json_schema_output,
    parse_response_format,
    schema_errors,
)

__all__ = ["StructuredOutput", "closing_reserve", "json_schema_output", "parse_response_format", "schema_errors"]
