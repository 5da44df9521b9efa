"""What the service is asked and what it answers (typed records, no HTTP in sight).

A `GenerationRequest` is a conversation whose image parts are `{"type": "image"}` placeholders,
the `ImageRef`s that fill them in order, sampling parameters, chat-template variables and, when
the request offers tools, its `ToolPlan` (`glmv.tasks.tool_calls.plan_tools`).
Streaming yields `GenerationChunk`s: per choice a `ChoiceDelta` with the new text (raw, and split
into reasoning and answer), the tool-call pieces parsed out of the answer, its token ids and
logprobs, and at the end its finish reason; plus the usage so far. `generate` collects them into
a `Generation` of `Choice`s.

The engine's own types that the layers above use (`SamplingParams`, `EngineStats`) are named
here too, so that the server reaches the engine only through this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glmv.engine.client import EngineStats
from glmv.engine.sampling import SamplingParams
from glmv.tasks.images import ImageRef
from glmv.tasks.tool_calls import ParsedToolCall, ToolCallDelta, ToolPlan

__all__ = [
    "Choice",
    "ChoiceDelta",
    "EngineStats",
    "Generation",
    "GenerationChunk",
    "GenerationRequest",
    "LogprobEntry",
    "ParsedToolCall",
    "SamplingParams",
    "ToolCallDelta",
    "ToolPlan",
    "TopLogprob",
    "Usage",
]


@dataclass(slots=True)
class GenerationRequest:
    messages: list[dict[str, Any]]  # chat-template messages; images as {"type": "image"} parts
    images: list[ImageRef] = field(default_factory=list)  # one per image part, in order
    params: SamplingParams = field(default_factory=SamplingParams)
    template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": False}
    request_id: str | None = None  # made up when None
    # The request's tools: rendered by the template, the answer parsed for calls (None: no tools).
    tools: ToolPlan | None = None


@dataclass(slots=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: list[int]  # the token's exact bytes (a token may hold part of a UTF-8 character)


@dataclass(slots=True)
class LogprobEntry:
    token_id: int
    token: str
    logprob: float
    bytes: list[int]
    top: list[TopLogprob]  # the most likely alternatives, best first


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # all choices
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class ChoiceDelta:
    """New output of one choice; `reasoning` + `content` is `text` with the reasoning tags
    taken out (GLM's `<think>...</think>`, `<answer>`, box tags) and, for a request with tools,
    the tool calls taken out of the answer into `tool_calls` (a call's first piece has its id and
    name, later pieces add to its arguments JSON)."""

    index: int
    text: str = ""
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None  # None unless the request asked for logprobs
    # "stop" | "length" | "tool_calls" | "abort" | "error" on the last delta
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or token id that ended it


@dataclass(slots=True)
class GenerationChunk:
    request_id: str
    deltas: list[ChoiceDelta]
    usage: Usage
    finished: bool
    queue_time: float | None = None  # seconds from submission to first scheduling, once known


@dataclass(slots=True)
class Choice:
    index: int
    text: str = ""  # everything generated, reasoning tags included
    reasoning: str | None = None  # None when the answer had no reasoning part
    content: str = ""  # the answer without its tool calls
    tool_calls: list[ParsedToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class Generation:
    request_id: str
    choices: list[Choice]
    usage: Usage
    prompt_token_ids: list[int] = field(default_factory=list)
