"""The application layer: one `GenerationService` between every front end and the engine.

`create_service(config)` is the one factory: it starts the engine of `config.engine` (or takes a
started `EngineClient`), loads the checkpoint's tokenizer, prompt rules and image processor, and
starts the image-decoding pool. Chat completions, extraction, moderation, the offline `LLM` and
`glmv extract` all generate through it:

* `stream(request)` returns a `GenerationStream`: admission (503 when the engine is full),
  the request's images decoded and resized in the pool, the prompt rendered, then one
  `GenerationChunk` per engine output, each choice's text split into reasoning and answer and its
  logprobs carrying exact token bytes; `usage` is kept up to date, also when it fails. Closing
  the stream early aborts the request in the engine;
* tools: `plan_tools(...)` checks a request's tools against this model (see
  `glmv.tasks.tool_calls.plan_tools`); with a `ToolPlan` on the request the template renders the
  tools, and each choice's answer runs through its own `ToolCallParser`, so calls come out as
  `tool_calls` (in deltas: name first, then argument pieces) and an answer that made calls and
  ended normally finishes with `tool_calls`;
* `generate(request)` collects a stream into a `Generation`.

Errors are `glmv.errors` classes whose `param` names the field of the request that caused them
(each `ImageRef` carries its own `param`); a failure in the engine surfaces as `EngineError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmv.engine.client import EngineClient, EngineInfo, EngineStats, start_engine
from glmv.engine.request import EngineRequest, RequestOutput, TokenLogprob
from glmv.engine.sampling import SamplingParams
from glmv.errors import EngineError, OverloadedError
from glmv.processing.reasoning import ReasoningParser, prompt_opens_thinking
from glmv.tasks.config import ServiceConfig
from glmv.tasks.images import ImagePreparer
from glmv.tasks.inputs import InputBuilder, load_processors
from glmv.tasks.tokens import TokenBytes
from glmv.tasks.tool_calls import ToolCallParser, ToolPlan
from glmv.tasks.tool_calls import finish_reason as tool_finish_reason
from glmv.tasks.tool_calls import plan_tools as _plan_tools
from glmv.tasks.types import (
    Choice,
    ChoiceDelta,
    Generation,
    GenerationChunk,
    GenerationRequest,
    LogprobEntry,
    ParsedToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from glmv.timeline import timeline

__all__ = ["GenerationService", "GenerationStream", "create_service", "demo_note", "is_random_checkpoint"]

log = logging.getLogger("glmv.tasks")

# The key `glmv create-tiny-model` writes into config.json (glmv.models.tiny.RANDOM_WEIGHTS_MARKER).
RANDOM_WEIGHTS_KEY = "glmv_random_weights"


# The object `training.demo_checkpoint` writes into the demo model's config.json
# (glmv.models.demo.DEMO_CARD_KEY); its `description` is what the model says of itself.
DEMO_CARD_KEY = "glmv_demo_model"


def _config(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_random_checkpoint(path: str | Path) -> bool:
    """True for checkpoints with random weights (their answers are random text)."""
    return bool(_config(path).get(RANDOM_WEIGHTS_KEY, False))


def demo_note(path: str | Path) -> str | None:
    """For glmv's demo model, the one line that the start-up log, `/v1/models` and the web page
    show of it; None for any other checkpoint."""
    card = _config(path).get(DEMO_CARD_KEY)
    if not isinstance(card, dict):
        return None
    description = card.get("description")
    return description if isinstance(description, str) and description else "demo model"


def create_service(
    config: ServiceConfig, *, client: EngineClient | None = None, warm_up: bool = True
) -> GenerationService:
    """The service for `config`: starts its engine (unless `client`, a started engine of the same
    checkpoint, is given; the service then leaves it running at shutdown). `warm_up` starts the
    image workers now, in the background (else with the first image)."""
    owns_client = client is None
    engine = client if client is not None else start_engine(config.engine)
    try:
        model_dir = engine.info.model_dir or config.model
        tokenizer, builder = load_processors(model_dir, chat_template=config.chat_template)
        # Prompts that cannot fit the context are refused before they are tokenised.
        builder.chat.limit_prompt(engine.info.max_model_len)
        images = ImagePreparer(
            builder.image_processor,
            limits=config.image_limits,
            remote=config.remote_images,
            workers=config.resolved_image_workers(),
        )
    except BaseException:
        if owns_client:
            engine.shutdown()
        raise
    service = GenerationService(
        engine,
        tokenizer,
        builder,
        images,
        random_weights=is_random_checkpoint(model_dir),
        demo_note=demo_note(model_dir),
        owns_client=owns_client,
        max_sequences=config.engine.max_waiting,
    )
    service.start(warm_up=warm_up)
    return service


@dataclass(slots=True)
class _ChoiceState:
    parser: ReasoningParser
    want_logprobs: bool
    tools: ToolCallParser | None = None  # set when the request's answer is parsed for tool calls
    one_call: bool = False  # parallel_tool_calls false: calls after the first are dropped


class GenerationService:
    """See the module docstring. Built by `create_service`."""

    def __init__(
        self,
        client: EngineClient,
        tokenizer: Any,
        builder: InputBuilder,
        images: ImagePreparer,
        *,
        random_weights: bool = False,
        demo_note: str | None = None,
        owns_client: bool = True,
        max_sequences: int | None = None,
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.builder = builder
        self.images = images
        self.random_weights = random_weights
        self.demo_note = demo_note  # glmv's demo model: what it is, in one line (else None)
        self.owns_client = owns_client
        self.max_sequences = max_sequences  # the most sequences the engine can ever queue at once
        self.token_bytes = TokenBytes(tokenizer)
        self._inflight = 0  # admitted requests not yet finished (including those still preparing)
        self._warned_tools = False  # whether ignored tools were reported (at warning level) yet

    # --- facts -----------------------------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return self.client.info

    @property
    def model_dir(self) -> str:
        return str(self.client.info.model_dir)

    @property
    def max_model_len(self) -> int:
        return int(self.client.info.max_model_len)

    @property
    def supports_thinking_toggle(self) -> bool:
        return bool(getattr(self.builder.chat, "supports_thinking_toggle", False))

    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders tools and tool calls (GLM-4.5V/4.6V style)."""
        return bool(getattr(self.builder.chat, "supports_tools", False))

    @property
    def accepts_tool_messages(self) -> bool:
        """Whether the prompt format renders `role: "tool"` results (templates with tool calling,
        and GLM-4v-9b's observation turn)."""
        chat = self.builder.chat
        return bool(getattr(chat, "accepts_tool_messages", getattr(chat, "supports_tools", False)))

    @property
    def running(self) -> bool:
        return bool(self.client.running)

    @property
    def dead(self) -> BaseException | None:
        return self.client.dead

    @property
    def num_inflight(self) -> int:
        return self._inflight

    def stats(self) -> EngineStats:
        return self.client.stats()

    def core_stats(self) -> list[EngineStats]:
        return self.client.core_stats()

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, *, warm_up: bool = True) -> None:
        if not self.client.running and self.client.dead is None:
            self.client.start()
        if warm_up:
            self.images.start()

    def shutdown(self) -> None:
        self.images.shutdown()
        if self.owns_client:
            self.client.shutdown()

    # --- requests --------------------------------------------------------------------------------

    def validate_params(self, params: SamplingParams) -> None:
        """Raise `InvalidRequestError` for sampling parameters this engine cannot honour."""
        params.validate(
            max_model_len=self.max_model_len,
            vocab_size=int(self.client.info.vocab_size),
            max_sequences=self.max_sequences,
        )

    def check_prompt_size(self, texts: list[str]) -> None:
        """Raise `ContextLengthExceededError` when text that every chat template renders in full
        (user and system turns) already cannot fit the context; cheap, before any tokenising."""
        limit = getattr(self.builder.chat, "prompt_limit", None)
        if limit is not None:
            limit.check_bytes(texts)

    def check_admission(self) -> None:
        """Raise `OverloadedError` when a request cannot be taken now (cheap; before any work)."""
        self.client.check_admission()
        if self._inflight >= self.client.max_pending:  # requests still preparing images count too
            raise OverloadedError(
                f"The server is at capacity ({self._inflight} requests in flight); retry shortly.",
                retry_after=1,
            )

    def plan_tools(
        self,
        tools: list[Any] | None,
        tool_choice: Any = None,
        parallel_tool_calls: bool | None = None,
        *,
        has_response_format: bool = False,
    ) -> ToolPlan:
        """A request's `ToolPlan` for this model (400 for tools it cannot honour). Tools offered
        to a model without tool calling are ignored, with a warning in the log (the first time;
        later ones at debug level)."""
        plan = _plan_tools(
            tools,
            tool_choice,
            parallel_tool_calls,
            supports_tools=self.supports_tools,
            has_response_format=has_response_format,
        )
        if plan.warning:
            # Clients such as Open WebUI send their tools with every message: say it once.
            log.log(logging.DEBUG if self._warned_tools else logging.WARNING, "%s", plan.warning)
            self._warned_tools = True
        return plan

    def stream(self, request: GenerationRequest) -> GenerationStream:
        return GenerationStream(self, request)

    async def generate(self, request: GenerationRequest) -> Generation:
        stream = self.stream(request)
        try:
            return await stream.collect()
        finally:
            await stream.aclose()

    async def build_request(self, request_id: str, request: GenerationRequest) -> EngineRequest:
        """The engine request: images decoded and resized (pool), prompt rendered (a thread)."""
        trace = timeline()
        images = await self.images.prepare(request.images)
        if trace is not None:
            trace.mark(request_id, "images")
        kwargs = dict(request.template_kwargs or {})
        if request.tools is not None and request.tools.tools:
            kwargs["tools"] = request.tools.tools
        engine_request = await asyncio.to_thread(
            self.builder.build,
            request_id,
            request.messages,
            images,
            request.params,
            chat_template_kwargs=kwargs,
        )
        if trace is not None:
            trace.mark(request_id, "prompt")
        return engine_request

    # --- output shaping --------------------------------------------------------------------------

    def _logprobs(self, items: list[TokenLogprob], top: int) -> list[LogprobEntry]:
        tb = self.token_bytes
        return [
            LogprobEntry(
                token_id=lp.token_id,
                token=lp.token,
                logprob=lp.logprob,
                bytes=tb(lp.token_id, lp.token),
                top=[TopLogprob(tid, text, v, tb(tid, text)) for tid, text, v in lp.top[:top]],
            )
            for lp in items
        ]

    def _chunk(
        self, request_id: str, out: RequestOutput, states: list[_ChoiceState], top: int
    ) -> GenerationChunk:
        deltas = []
        for d in out.deltas:
            state = states[d.index]
            reasoning, content = state.parser.feed(d.text) if d.text else ("", "")
            if d.finish_reason is not None:
                r, c = state.parser.flush()
                reasoning, content = reasoning + r, content + c
            calls: list[ToolCallDelta] = []
            finish = d.finish_reason
            if state.tools is not None:
                parsed = state.tools.feed(content) if content else None
                content = parsed.content if parsed is not None else ""
                calls = list(parsed.calls) if parsed is not None else []
                if d.finish_reason is not None:
                    tail = state.tools.finish()
                    content += tail.content
                    calls = _merge_call_deltas(calls + tail.calls)
                    finish = tool_finish_reason(d.finish_reason, len(state.tools.calls))
                if state.one_call:
                    calls = [c for c in calls if c.index == 0]
            logprobs = self._logprobs(d.logprobs, top) if state.want_logprobs and d.logprobs else None
            deltas.append(
                ChoiceDelta(
                    index=d.index,
                    text=d.text,
                    reasoning=reasoning,
                    content=content,
                    tool_calls=calls,
                    token_ids=list(d.token_ids),
                    logprobs=logprobs,
                    finish_reason=finish,
                    stop_reason=d.stop_reason,
                )
            )
        queue_time = None
        if out.first_scheduled_time is not None:
            queue_time = max(0.0, out.first_scheduled_time - out.arrival_time)
        return GenerationChunk(request_id, deltas, _usage(out), out.finished, queue_time)


def _merge_call_deltas(calls: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Adjacent pieces of one call as one piece (a `feed` and the `finish` after it may both add
    to the same call)."""
    merged: list[ToolCallDelta] = []
    for call in calls:
        last = merged[-1] if merged else None
        if last is not None and last.index == call.index and call.id is None and call.name is None:
            last.arguments += call.arguments
        else:
            merged.append(ToolCallDelta(call.index, call.id, call.name, call.arguments))
    return merged


def _usage(out: RequestOutput) -> Usage:
    return Usage(out.prompt_tokens, out.completion_tokens, out.cached_tokens)


def _add_call_deltas(calls: list[ParsedToolCall], deltas: list[ToolCallDelta]) -> None:
    """Put streamed call pieces together (a piece with an id opens the call of its index)."""
    for d in deltas:
        if d.id is not None:
            calls.append(ParsedToolCall(d.id, d.name or "", d.arguments))
        elif 0 <= d.index < len(calls):
            calls[d.index].arguments += d.arguments


class GenerationStream:
    """The chunks of one request (`async for`); `usage` and `prompt_token_ids` as known so far.
    Always `aclose()` it: that aborts the request in the engine when it has not finished."""

    def __init__(self, service: GenerationService, request: GenerationRequest) -> None:
        self.service = service
        self.request = request
        self.request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        self.usage = Usage()
        self.prompt_token_ids: list[int] = []
        self.finished = False
        self._chunks = self._run()

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()

    async def _run(self) -> AsyncIterator[GenerationChunk]:
        service = self.service
        service.check_admission()
        service._inflight += 1
        try:
            engine_request = await service.build_request(self.request_id, self.request)
            self.prompt_token_ids = list(engine_request.prompt_token_ids)
            params = self.request.params
            starts_in_thinking = prompt_opens_thinking(engine_request.prompt_text)
            plan = self.request.tools
            states = [
                _ChoiceState(
                    ReasoningParser(starts_in_thinking=starts_in_thinking),
                    params.logprobs is not None,
                    plan.parser() if plan is not None else None,
                    plan is not None and not plan.parallel,
                )
                for _ in range(params.n)
            ]
            outputs = service.client.generate(engine_request)
            try:
                async for out in outputs:
                    self.usage = _usage(out)
                    if out.error is not None:
                        raise out.error
                    chunk = service._chunk(self.request_id, out, states, params.logprobs or 0)
                    self.finished = out.finished
                    yield chunk
                    if out.finished:
                        return
            finally:
                await outputs.aclose()  # type: ignore[attr-defined]
            raise EngineError("The engine ended the request without finishing it.")
        finally:
            service._inflight -= 1

    async def collect(self, observe: Callable[[GenerationChunk], None] | None = None) -> Generation:
        """Run the stream to its end and put each choice together (`observe` sees every chunk)."""
        n = self.request.params.n
        want_logprobs = self.request.params.logprobs is not None
        choices = [Choice(i, logprobs=[] if want_logprobs else None) for i in range(n)]
        parts: list[tuple[list[str], list[str], list[str]]] = [([], [], []) for _ in range(n)]
        calls: list[list[ParsedToolCall]] = [[] for _ in range(n)]
        async for chunk in self:
            if observe is not None:
                observe(chunk)
            for d in chunk.deltas:
                choice, (text, reasoning, content) = choices[d.index], parts[d.index]
                text.append(d.text)
                reasoning.append(d.reasoning)
                content.append(d.content)
                _add_call_deltas(calls[d.index], d.tool_calls)
                choice.token_ids += d.token_ids
                if choice.logprobs is not None and d.logprobs:
                    choice.logprobs += d.logprobs
                if d.finish_reason is not None:
                    choice.finish_reason, choice.stop_reason = d.finish_reason, d.stop_reason
            if chunk.finished:
                break
        if not self.finished:
            raise EngineError("The engine ended the request without finishing it.")
        for choice, (text, reasoning, content), made in zip(choices, parts, calls, strict=True):
            choice.text = "".join(text)
            choice.reasoning = "".join(reasoning) or None
            choice.content = "".join(content)
            choice.tool_calls = made
        return Generation(self.request_id, choices, self.usage, list(self.prompt_token_ids))
