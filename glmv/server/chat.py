"""POST /v1/chat/completions: the OpenAI protocol around the generation service.

The order of work is chosen so that cheap checks fail first and nothing expensive happens for a
request the server cannot take: model name and unsupported features, sampling parameters,
admission (503 when the engine is full or the server is draining), then the service decodes the
images (in its process pool) and renders the chat template.

Non-streaming answers are one `chat.completion` object; streaming answers are SSE events
(`data: {chunk}`), one role chunk per choice first, `reasoning_content`/`content` deltas, a chunk
with the `finish_reason` of each choice, the usage chunk when `stream_options.include_usage`,
and `data: [DONE]`. An error after the stream started is sent as `data: {"error": {...}}` before
`[DONE]`. The service splits GLM output into reasoning and answer.

Tools (`tools`, `tool_choice`, `parallel_tool_calls`) are planned by the service
(`GenerationService.plan_tools`): rendered by a chat template that has tool calling, with calls
enforced by a grammar for `required` and named functions, and ignored (with a warning in the log)
by one that has not unless a call is required (400). Calls come back as `message.tool_calls`
(`content` null when there is no other text) or, streaming, as `delta.tool_calls`: a call's first
event carries its index, id, type and name with empty arguments, the following ones the pieces of
its arguments JSON. An answer that made calls and ended normally has `finish_reason` `tool_calls`.
Assistant `tool_calls` and `role: "tool"` results in the history go to the template as they are
(images in tool results where the template has tool calling).

Clients send the whole conversation each turn, images included: the current turn's images (after
the last assistant message) are capped by `--max-images-per-request`; of the earlier turns' images
the most recent `--max-history-images` are kept and older ones replaced by a text placeholder
(`glmv.tasks.history`).

A client that disconnects aborts its request (freeing its KV blocks); a request that runs past
`request_timeout` fails with 504 (or an error event).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from glmv.errors import GlmvError, InvalidImageError, InvalidRequestError
from glmv.server.body_send import body_send
from glmv.server.protocol import ChatCompletionRequest, TextContentPart
from glmv.server.runs import ServedRequest, cancel_on_disconnect
from glmv.server.state import ServerState
from glmv.tasks.history import HistoryImages, limit_history_images
from glmv.tasks.images import ImageRef
from glmv.tasks.structured import StructuredOutput, parse_response_format
from glmv.tasks.types import (
    ChoiceDelta,
    Generation,
    GenerationChunk,
    GenerationRequest,
    LogprobEntry,
    SamplingParams,
    ToolCallDelta,
    ToolPlan,
)
from glmv.timeline import timeline

log = logging.getLogger("glmv.server.chat")

# Template variables the chat processor sets itself; a request may not override them.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "add_generation_prompt", "image_token_counts", "image_hashes", "self"}
)
# Logprobs of impossible tokens are -inf, which JSON cannot carry.
_MIN_LOGPROB = -9999.0


def _finite(x: float) -> float:
    return x if x > _MIN_LOGPROB else _MIN_LOGPROB


def logprob_json(entries: list[LogprobEntry]) -> list[dict[str, Any]]:
    """OpenAI's `logprobs.content` entries."""
    return [
        {
            "token": e.token,
            "logprob": _finite(e.logprob),
            "bytes": e.bytes,
            "top_logprobs": [
                {"token": t.token, "logprob": _finite(t.logprob), "bytes": t.bytes} for t in e.top
            ],
        }
        for e in entries
    ]


def usage_json(run: ServedRequest) -> dict[str, Any]:
    usage = run.stream.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class _SSEResponse(StreamingResponse):
    """A streaming response that always runs its cleanup, even if the client left before the
    first byte (Starlette does not close a body iterator it never started), and sends its body
    messages past the middleware (`glmv.server.body_send`). Each item of `content` is one send:
    the events of one engine output together."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._cleanup = cleanup
        self._body_send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._body_send = body_send(scope, send)
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()

    async def stream_response(self, send: Send) -> None:
        # The start through every layer (status, headers, counts); the body straight out.
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        out = self._body_send or send
        async for events in self.body_iterator:
            body = events.encode() if isinstance(events, str) else bytes(events)
            await out({"type": "http.response.body", "body": body, "more_body": True})
        await out({"type": "http.response.body", "body": b"", "more_body": False})


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# json.dumps(..., ensure_ascii=False) writes every string with this function.
_json_str = json.encoder.encode_basestring


class ChunkEvents:
    """The SSE events of one stream's `chat.completion.chunk`s. `event` serialises any chunk;
    `text` writes the common one (a choice's new reasoning/answer text, no logprobs, not the
    last) from a prefix serialised once per stream, byte for byte what `event` writes for it,
    without building and walking a dict per token and request."""

    def __init__(self, base: dict[str, Any]) -> None:
        self.base = base
        head = json.dumps(base, ensure_ascii=False, separators=(",", ":"))
        self._prefix = f'data: {head[:-1]},"choices":[{{"index":'

    def event(
        self,
        index: int,
        delta: dict[str, Any],
        logprobs: list[dict[str, Any]] | None = None,
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
    ) -> str:
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
            "finish_reason": finish_reason,
        }
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return _sse({**self.base, "choices": [choice]})

    def text(self, index: int, reasoning: str, content: str) -> str:
        if reasoning and content:
            delta = f'"reasoning_content":{_json_str(reasoning)},"content":{_json_str(content)}'
        elif reasoning:
            delta = f'"reasoning_content":{_json_str(reasoning)}'
        elif content:
            delta = f'"content":{_json_str(content)}'
        else:
            delta = ""
        return f'{self._prefix}{int(index)},"delta":{{{delta}}},"logprobs":null,"finish_reason":null}}]}}\n\n'


_DONE = "data: [DONE]\n\n"


# --- the handler --------------------------------------------------------------------------------


class ChatHandler:
    """Turns validated `ChatCompletionRequest`s into responses; one per app."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def __call__(self, request: Request, body: ChatCompletionRequest) -> Response:
        state = self.state
        http_arrival = time.monotonic()
        state.check_draining()
        model = state.check_model(body.model)
        self._check_unsupported(body)
        service = state.service
        response_format = parse_response_format(body.response_format)
        tool_plan = service.plan_tools(
            body.tools, body.tool_choice, body.parallel_tool_calls, has_response_format=response_format is not None
        )
        params, _ = self._sampling_params(body, tool_plan, response_format)
        template_kwargs = self._template_kwargs(body)
        messages, images = _convert_messages(
            body, tool_calls=service.supports_tools, tool_results=service.accepts_tool_messages
        )
        # Text that cannot fit is refused before anything else runs.
        service.check_prompt_size(_rendered_text(messages, tool_plan))
        conversation = self._limit_images(messages, images)
        messages = conversation.messages
        service.check_admission()  # before any image is decoded
        generation = GenerationRequest(
            messages,
            conversation.images,
            params,
            template_kwargs,
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            tools=tool_plan if (tool_plan.tools or tool_plan.parse) else None,
        )
        if state.settings.log_content:
            log.info("%s messages=%s", generation.request_id, json.dumps(messages, ensure_ascii=False)[:20000])
        trace = timeline()
        if trace is not None:
            rid = generation.request_id
            for stage, t in request.scope.get("glmv.timeline", {}).items():
                trace.mark(rid, stage, t)
            trace.mark(rid, "handler", http_arrival)
            trace.mark(rid, "checked")
        run = ServedRequest(state, request, generation, http_arrival=http_arrival)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            try:
                first = await cancel_on_disconnect(request, run.next())
            except BaseException as exc:
                await run.close("error", exc)
                raise
            if first is None and run.last is None:
                await run.close("aborted")
                return Response(status_code=499)
            return _SSEResponse(_stream(run, model, first, include_usage), run.close)
        try:
            result = await cancel_on_disconnect(request, run.collect())
        except BaseException as exc:
            await run.close("error", exc)
            raise
        if result is None:
            await run.close("aborted")
            return Response(status_code=499)
        await run.close()
        return JSONResponse(_completion(run, model, result))

    # --- checks -------------------------------------------------------------------------------

    @staticmethod
    def _check_unsupported(body: ChatCompletionRequest) -> None:
        # The deprecated `functions` / `function_call` API: its successor is tools / tool_choice.
        if body.functions:
            raise InvalidRequestError(
                "The deprecated 'functions' parameter is not supported; send 'tools' instead.",
                param="functions",
                code="unsupported_parameter",
            )
        if body.function_call is not None and body.function_call not in ("none", "auto"):
            raise InvalidRequestError(
                "The deprecated 'function_call' parameter is not supported; send 'tool_choice' instead.",
                param="function_call",
                code="unsupported_parameter",
            )
        if body.logit_bias:
            raise InvalidRequestError(
                "logit_bias is not supported by this server.",
                param="logit_bias",
                code="unsupported_parameter",
            )
        if body.stream_options is not None and not body.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true.",
                param="stream_options",
                code="invalid_value",
            )

    def _sampling_params(
        self, body: ChatCompletionRequest, tool_plan: ToolPlan, response_format: StructuredOutput | None
    ) -> tuple[SamplingParams, int]:
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true.", param="top_logprobs")
        top = body.top_logprobs or 0
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = SamplingParams(
            n=body.n if body.n is not None else 1,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens or 0,
            temperature=body.temperature if body.temperature is not None else 1.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
            top_k=body.top_k if body.top_k is not None else 0,
            min_p=body.min_p if body.min_p is not None else 0.0,
            repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None else 1.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            stop=stop,
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=bool(body.ignore_eos),
            logprobs=top if body.logprobs else None,
            # The tool-call parser reads the call tags (added tokens) in the text.
            skip_special_tokens=bool(body.skip_special_tokens) and not tool_plan.parse,
            structured=_structured_output(body, tool_plan.constraint or response_format),
        )
        try:
            self.state.service.validate_params(params)
        except InvalidRequestError as exc:
            if exc.param == "max_tokens" and body.max_completion_tokens is not None:
                exc.param = "max_completion_tokens"
            elif exc.param == "stop[0]" and isinstance(body.stop, str):
                exc.param = "stop"
            raise
        return params, top

    def _limit_images(self, messages: list[dict[str, Any]], images: list[ImageRef]) -> HistoryImages:
        """Earlier turns' images beyond --max-history-images become placeholders; the current
        turn's are capped by --max-images-per-request (400 naming the first one too many)."""
        conversation = limit_history_images(messages, images, self.state.settings.max_history_images)
        limit = self.state.service.images.limits.max_images
        current = conversation.current
        if len(current) > limit:
            raise InvalidImageError(
                f"too many images: {len(current)} in this turn, this server accepts at most {limit} per request "
                "(images of earlier turns are counted apart, see --max-history-images)",
                param=current[limit].param,
            )
        if conversation.dropped:
            log.info(
                "%d image(s) of earlier turns replaced by a placeholder (--max-history-images %s)",
                conversation.dropped,
                self.state.settings.max_history_images,
            )
        return conversation

    def _template_kwargs(self, body: ChatCompletionRequest) -> dict[str, Any]:
        kwargs = dict(body.chat_template_kwargs or {})
        for key in kwargs:
            if key in _RESERVED_TEMPLATE_KWARGS:
                raise InvalidRequestError(
                    f"chat_template_kwargs may not set '{key}'.", param=f"chat_template_kwargs.{key}"
                )
        if body.thinking is not None and self.state.service.supports_thinking_toggle:
            kwargs["enable_thinking"] = body.thinking.type == "enabled"
        return kwargs


def _structured_output(body: ChatCompletionRequest, structured: StructuredOutput | None) -> StructuredOutput | None:
    """The engine constraint of a request (its response_format, or the grammar of a required tool
    call). A thinking model may reason before the answer unless the request turns thinking off."""
    if structured is None:
        return None
    kwargs = body.chat_template_kwargs or {}
    thinking_off = (body.thinking is not None and body.thinking.type == "disabled") or (
        kwargs.get("enable_thinking") is False
    )
    return structured.with_thinking(not thinking_off)


def _convert_messages(
    body: ChatCompletionRequest, *, tool_calls: bool, tool_results: bool
) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """Template-ready messages (images as `{"type": "image"}`) and each image's URL and param.

    `tool_calls`: the template renders assistant tool calls (and images in tool results);
    `tool_results`: it renders `role: "tool"` messages. What it cannot render is refused (400)
    rather than silently left out of the prompt."""
    out: list[dict[str, Any]] = []
    refs: list[ImageRef] = []
    for i, m in enumerate(body.messages):
        role = m.role
        if role == "function":  # the deprecated name of a tool result
            role = "tool"
        if role == "tool" and not tool_results:
            raise InvalidRequestError(
                f"Messages with role '{m.role}' cannot be sent to this model: its chat template has no tool calling.",
                param=f"messages[{i}].role",
            )
        if m.tool_calls and not tool_calls:
            raise InvalidRequestError(
                "Assistant tool_calls cannot be sent to this model: its chat template has no tool calling.",
                param=f"messages[{i}].tool_calls",
            )
        if m.tool_calls and role != "assistant":
            raise InvalidRequestError(
                f"Only assistant messages carry tool_calls, not {m.role} messages.",
                param=f"messages[{i}].tool_calls",
            )
        if role == "developer":
            role = "system"
        content = m.content
        converted: str | list[dict[str, Any]]
        if content is None:
            if role not in ("assistant", "tool"):
                raise InvalidRequestError(f"A {role} message needs content.", param=f"messages[{i}].content")
            converted = ""
        elif isinstance(content, str):
            converted = content
        elif not content:
            raise InvalidRequestError(
                "A message's content must be a string or a non-empty list of content parts.",
                param=f"messages[{i}].content",
            )
        else:
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                if isinstance(part, TextContentPart):
                    parts.append({"type": "text", "text": part.text})
                    continue
                if role != "user" and not (role == "tool" and tool_calls):
                    raise InvalidRequestError(
                        f"Images are only accepted in user messages"
                        f"{' and tool results' if tool_calls else ''}, not in {m.role} messages.",
                        param=f"messages[{i}].content[{j}]",
                    )
                refs.append(ImageRef(part.image_url.url, f"messages[{i}].content[{j}].image_url"))
                parts.append({"type": "image"})
            converted = parts
        msg: dict[str, Any] = {"role": role, "content": converted}
        if role == "assistant" and m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        if role == "assistant" and m.tool_calls:
            msg["tool_calls"] = [call.model_dump() for call in m.tool_calls]
        if role == "tool":
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                msg["name"] = m.name
        out.append(msg)
    return out, refs


def _rendered_text(messages: list[dict[str, Any]], tool_plan: ToolPlan) -> list[str]:
    """The text that every chat template renders in full (user, system and tool turns, and the
    tool definitions it is given; an assistant turn's reasoning may be dropped), so its size is a
    lower bound on the prompt's."""
    out: list[str] = []
    for m in messages:
        if m["role"] not in ("user", "system", "tool"):
            continue
        content = m["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out.extend(p["text"] for p in content if p.get("type") == "text")
    out.extend(json.dumps(tool, ensure_ascii=False) for tool in tool_plan.tools or [])
    return out


# --- responses ----------------------------------------------------------------------------------


def _completion(run: ServedRequest, model: str, generation: Generation) -> dict[str, Any]:
    choices = [
        {
            "index": c.index,
            "message": {
                "role": "assistant",
                # OpenAI's shape: no text besides the calls is null content
                "content": None if c.tool_calls and not c.content else c.content,
                "reasoning_content": c.reasoning,
                "refusal": None,
                "tool_calls": [call.to_openai() for call in c.tool_calls],
            },
            "logprobs": {"content": logprob_json(c.logprobs), "refusal": None} if c.logprobs is not None else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        for c in generation.choices
    ]
    return {
        "id": run.request_id,
        "object": "chat.completion",
        "created": run.created,
        "model": model,
        "system_fingerprint": run.state.system_fingerprint,
        "choices": choices,
        "usage": usage_json(run),
    }


async def _stream(
    run: ServedRequest, model: str, first: GenerationChunk | None, include_usage: bool
) -> AsyncIterator[str]:
    base: dict[str, Any] = {
        "id": run.request_id,
        "object": "chat.completion.chunk",
        "created": run.created,
        "model": model,
        "system_fingerprint": run.state.system_fingerprint,
    }
    if include_usage:
        base["usage"] = None
    events = ChunkEvents(base)
    chunk = events.event

    def text_delta(d: ChoiceDelta) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.content:
            delta["content"] = d.content
        return delta

    finish_reasons: list[str | None] = [None] * run.n
    # The events of one engine output go out in one send (the client sees the same events).
    pending: list[str] = []
    add = pending.append
    try:
        for i in range(run.n):
            add(chunk(i, {"role": "assistant", "content": ""}))
        out = first
        while out is not None:
            for d in out.deltas:
                lps = logprob_json(d.logprobs) if d.logprobs else None
                if lps:
                    add(chunk(d.index, text_delta(d), lps))
                elif d.reasoning or d.content:
                    add(events.text(d.index, d.reasoning, d.content))
                for piece in _call_pieces(d.tool_calls):
                    add(chunk(d.index, {"tool_calls": [piece]}))
                if d.finish_reason is not None:
                    finish_reasons[d.index] = d.finish_reason
                    add(chunk(d.index, {}, None, d.finish_reason, d.stop_reason))
            if out.finished:
                break
            if pending:
                yield pending[0] if len(pending) == 1 else "".join(pending)
                pending.clear()
            out = await run.next()
        if include_usage:
            add(_sse({**base, "choices": [], "usage": usage_json(run)}))
        run.finished_with(finish_reasons)
    except GlmvError as exc:
        run.outcome = run.outcome or "error"
        run.record_error(exc.code or exc.error_type)
        add(_sse(exc.to_dict()))
    except Exception:  # never leak a traceback into the stream
        log.exception("%s: streaming failed", run.request_id)
        run.outcome = "error"
        run.record_error("internal_error")
        add(
            _sse(
                {
                    "error": {
                        "message": "The server had an error while processing your request.",
                        "type": "internal_error",
                        "param": None,
                        "code": "internal_error",
                    }
                }
            )
        )
    add(_DONE)
    yield "".join(pending)


def _call_pieces(calls: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """Stream deltas of tool-call pieces: a call's name comes alone first (with its id and empty
    arguments, as OpenAI sends it), its arguments in the events after it."""
    out: list[dict[str, Any]] = []
    for call in calls:
        if call.id is not None and call.arguments:
            out.append(ToolCallDelta(call.index, call.id, call.name, "").to_openai())
            out.append(ToolCallDelta(call.index, arguments=call.arguments).to_openai())
        else:
            out.append(call.to_openai())
    return out


__all__ = ["ChatHandler", "ChunkEvents", "logprob_json", "usage_json"]
