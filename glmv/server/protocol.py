"""Pydantic models of the OpenAI chat-completions API as glmv serves it.

Requests: `ChatCompletionRequest` with messages whose content is a string or a list of parts
(`text`, `image_url`), the OpenAI sampling fields and glmv/vLLM extras (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `min_tokens`, `skip_special_tokens`, `stop_token_ids`,
`chat_template_kwargs`, `thinking`). Unknown fields are ignored, as most OpenAI-compatible
servers do; fields that glmv knows but cannot honour are rejected by the handler with a 400 that
names them.

Tool calling, in OpenAI's shapes: `tools` (`ToolDefinition`: a function's name, description and
JSON Schema `parameters`), `tool_choice` (`"none"`, `"auto"`, `"required"` or a `NamedToolChoice`),
`parallel_tool_calls`; in the history, assistant messages with `tool_calls` (`ToolCall`, whose
`arguments` are a JSON string) and `role: "tool"` messages with `tool_call_id` (content: text, and
images where the model's chat template takes them).

Responses: `ChatCompletionResponse`, `ChatCompletionChunk` (the SSE events), `ModelList` and
`ErrorResponse`, shaped exactly as OpenAI's, plus `reasoning_content` on messages and deltas.
Messages carry `tool_calls` (`ToolCall`); stream deltas carry `DeltaToolCall`s: the first delta of a
call has its `index`, `id`, `type` and `function.name`, later ones `function.arguments` pieces
whose concatenation is the call's arguments JSON.

`validation_error_to_glmv` turns a pydantic validation error into an `InvalidRequestError` whose
`param` is the OpenAI-style path of the offending field (`messages[2].content[1].image_url`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from glmv.errors import InvalidRequestError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# --- request: messages -----------------------------------------------------------------------


class _Lenient(BaseModel):
    """Unknown fields are dropped; NaN and infinities are never valid numbers."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ImageURL(_Lenient):
    url: str = Field(
        description="A `data:image/...;base64,...` URL, or an http(s) URL when the server allows remote images."
    )
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="Accepted for compatibility; glmv always uses the checkpoint's image resolution."
    )


class TextContentPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageContentPart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string(cls, value: Any) -> Any:
        # Some clients send `"image_url": "data:..."` instead of an object.
        return {"url": value} if isinstance(value, str) else value


# Tags of the tagged unions below carry a ':' so they can never be mistaken for field names when a
# validation error's location is turned into a `param` path.
_PART_TAGS = {"text": "part:text", "image_url": "part:image_url"}


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(kind, str):
        return None
    return _PART_TAGS.get(kind, kind)


ContentPart = Annotated[
    Union[  # noqa: UP007 - Annotated members need the explicit Union
        Annotated[TextContentPart, Tag("part:text")],
        Annotated[ImageContentPart, Tag("part:image_url")],
    ],
    Discriminator(_part_tag),
]


def _content_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "content:text"
    if isinstance(value, list):
        return "content:parts"
    return None


MessageContent = Annotated[
    Union[  # noqa: UP007
        Annotated[str, Tag("content:text")],
        Annotated[list[ContentPart], Tag("content:parts")],
    ],
    Discriminator(
        _content_tag,
        custom_error_type="invalid_content",
        custom_error_message="Input should be a string or a list of content parts",
    ),
]

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

# OpenAI's rule for function names, plus '.' and ':' that tool-server names use.
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"


class FunctionCall(_Lenient):
    """A function call as the model made it: `arguments` is a JSON object as text."""

    name: str = Field(min_length=1)
    arguments: str = Field(
        "{}", description="The arguments as a JSON object in a string (an object is accepted too)."
    )

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments_text(cls, value: Any) -> Any:
        # Some clients send the arguments back as an object; OpenAI's shape is its JSON text.
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
        return "{}" if value is None else value


class ToolCall(_Lenient):
    """One entry of an assistant message's `tool_calls` (request history and responses alike)."""

    id: str = Field(description="The call's id; the tool message that answers it names it in `tool_call_id`.")
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Role = Field(
        description="`developer` is treated as `system`; `function` is the old name of `tool`."
    )
    content: MessageContent | None = None
    name: str | None = None
    reasoning_content: str | None = Field(
        None,
        description="An earlier assistant turn's reasoning; the chat template decides whether it is kept.",
    )
    tool_calls: list[ToolCall] | None = Field(
        None, description="An assistant message's tool calls (`arguments` as JSON text)."
    )
    tool_call_id: str | None = Field(None, description="For `role: tool`: the id of the call it answers.")


# --- request: options ------------------------------------------------------------------------


class StreamOptions(_Lenient):
    include_usage: bool | None = Field(
        None, description="Send a last chunk with `usage` and empty `choices`."
    )


class ResponseFormat(BaseModel):
    """`text`, `json_object` (any JSON object) or `json_schema` (the output follows the schema,
    enforced token by token; features that cannot be enforced get a 400 naming them)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="`text`, `json_object` or `json_schema`.")
    json_schema: dict[str, Any] | None = Field(
        None,
        description='For `json_schema`: `{"name": ..., "schema": {JSON Schema}, "strict": true}`.',
    )
    close_on_budget: bool | None = Field(
        None,
        description="glmv extension: when max_tokens (or the context) is about to run out, steer the "
        "answer to close the JSON so that it stays complete and valid.",
    )


class ThinkingOptions(_Lenient):
    type: Literal["enabled", "disabled"]


class FunctionDefinition(_Lenient):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN, description="1-64 characters: a-z, A-Z, 0-9, _ . : -")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON Schema of the arguments object (absent: no arguments)."
    )
    strict: bool | None = Field(
        None, description="Accepted; with tool_choice required or named the arguments always follow the schema."
    )


class ToolDefinition(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str = Field(min_length=1)


class NamedToolChoice(_Lenient):
    """`{"type": "function", "function": {"name": ...}}`: the model must call this function."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]  # noqa: UP007


class ChatCompletionRequest(_Lenient):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = Field(None, description="The served model name (see GET /v1/models); defaults to it.")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Takes precedence over max_tokens.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    tools: list[ToolDefinition] | None = Field(
        None, description="Functions the model may call (models whose chat template has tool calling)."
    )
    tool_choice: ToolChoice | None = Field(
        None,
        description="`none`, `auto` (the default with tools), `required` (at least one call) or a named "
        "function; required and named calls are enforced token by token, arguments valid against the schema.",
    )
    parallel_tool_calls: bool | None = Field(None, description="Whether one answer may hold several calls.")
    # Known to OpenAI, not offered by glmv: rejected by the handler when used.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM / SGLang names).
    top_k: int | None = Field(None, ge=-1, description="0 or -1 disables it.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0)
    skip_special_tokens: bool | None = Field(
        None, description="Off by default so that reasoning tags survive to be split out."
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='Extra variables for the chat template, e.g. {"enable_thinking": false}.'
    )
    thinking: ThinkingOptions | None = Field(
        None, description='{"type": "disabled"} turns reasoning off where the chat template allows it.'
    )


# --- responses -------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: list[TokenLogprobEntry] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None
    stop_reason: int | str | None = Field(
        None, description="The stop string or token id that ended the choice."
    )


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[Choice]
    usage: Usage


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: the first one of a call has `id`, `type` and the name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed answer; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glmv"
    root: str | None = None
    max_model_len: int | None = None
    glmv: dict[str, Any] = Field(
        default_factory=dict, description="glmv's own facts about the model, e.g. `random_weights`."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# --- validation errors -> OpenAI param paths -------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Location segments pydantic adds for the members of plain unions.
_TYPE_SEGMENTS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def loc_to_param(loc: Sequence[int | str]) -> str | None:
    """`('body', 'messages', 2, 'content', 'content:parts', 1, 'part:image_url', 'image_url')`
    -> `messages[2].content[1].image_url`."""
    parts: list[str] = []
    segments = list(loc)
    if segments and segments[0] == "body":
        segments = segments[1:]
    for seg in segments:
        if isinstance(seg, int):
            if parts:
                parts[-1] += f"[{seg}]"
            else:
                parts.append(f"[{seg}]")
        elif _IDENTIFIER.fullmatch(seg) and seg not in _TYPE_SEGMENTS:
            parts.append(seg)
    return ".".join(parts) or None


def _message_for(error: dict[str, Any]) -> str:
    kind = error.get("type")
    ctx = error.get("ctx") or {}
    if kind == "union_tag_invalid":
        return f"unsupported content part type {ctx.get('tag')!r}; supported types are 'text' and 'image_url'"
    if kind == "union_tag_not_found":
        return "each content part needs a 'type' of 'text' or 'image_url'"
    return str(error.get("msg", "invalid value"))


def validation_error_to_glmv(errors: Sequence[dict[str, Any]]) -> InvalidRequestError:
    """The most specific of pydantic's errors as one `InvalidRequestError` with its `param`."""
    if not errors:
        return InvalidRequestError("The request is invalid.")
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error")
            suffix = f" ({detail})" if detail else ""
            return InvalidRequestError(
                f"We could not parse the JSON body of your request{suffix}. The body must be a JSON object.",
                code="invalid_json",
            )
    # The deepest location wins: for a union, that is the member the input came closest to.
    deepest = max(errors, key=lambda e: len([s for s in e.get("loc", ()) if s != "body"]))
    param = loc_to_param(deepest.get("loc", ()))
    same = [e for e in errors if loc_to_param(e.get("loc", ())) == param]
    messages = list(dict.fromkeys(_message_for(e) for e in same))
    text = " or ".join(messages)
    if deepest.get("type") in ("union_tag_invalid", "union_tag_not_found") and param:
        param = f"{param}.type"
    if param is None:
        if deepest.get("type") == "missing":
            return InvalidRequestError(
                "The request body is empty; send a JSON object.", code="invalid_request_body"
            )
        if deepest.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            return InvalidRequestError("The request body must be a JSON object.", code="invalid_request_body")
        return InvalidRequestError(f"Invalid request: {text}.")
    if deepest.get("type") == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    return InvalidRequestError(f"Invalid value for '{param}': {text}.", param=param, code="invalid_value")


__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "AssistantMessage",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "Choice",
    "ChoiceLogprobs",
    "ChunkChoice",
    "ContentPart",
    "DeltaFunctionCall",
    "DeltaMessage",
    "DeltaToolCall",
    "ErrorBody",
    "ErrorResponse",
    "FunctionCall",
    "FunctionDefinition",
    "ImageContentPart",
    "ImageURL",
    "ModelCard",
    "ModelList",
    "NamedFunction",
    "NamedToolChoice",
    "PromptTokensDetails",
    "ResponseFormat",
    "StreamOptions",
    "TextContentPart",
    "ThinkingOptions",
    "TokenLogprobEntry",
    "ToolCall",
    "ToolChoice",
    "ToolDefinition",
    "TopLogprob",
    "Usage",
    "loc_to_param",
    "validation_error_to_glmv",
]
