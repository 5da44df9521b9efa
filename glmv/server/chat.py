"""POST /v1/chat/completions: from an OpenAI request to engine outputs and back.

The order of work is chosen so that cheap checks fail first and nothing expensive happens for a
request the server cannot take: model name and unsupported features, sampling parameters,
admission (`check_admission`, 503 when the queue is full or the server is draining), then image
decoding (`resolve_image`, guarded) and preprocessing in worker threads, then the chat template.

Non-streaming answers are one `chat.completion` object; streaming answers are SSE events
(`data: {chunk}`), one role chunk per choice first, `reasoning_content`/`content` deltas, a chunk
with the `finish_reason` of each choice, the usage chunk when `stream_options.include_usage`,
and `data: [DONE]`. An error after the stream started is sent as `data: {"error": {...}}` before
`[DONE]`. GLM output is split into `reasoning_content` and `content` by `ReasoningParser`.

A client that disconnects aborts its request (the engine generator is closed, freeing its KV
blocks); a request that runs past `request_timeout` fails with 504 (or an error event).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from glmv.engine.request import EngineRequest, RequestOutput, TokenLogprob
from glmv.engine.sampling import SamplingParams
from glmv.engine.structured import StructuredOutput, parse_response_format
from glmv.errors import (
    EngineError,
    GlmvError,
    InvalidImageError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    RequestTimeoutError,
)
from glmv.processing.bytelevel import unicode_to_bytes
from glmv.processing.media import ImageBudget, resolve_image
from glmv.processing.reasoning import ReasoningParser, prompt_opens_thinking
from glmv.server.protocol import ChatCompletionRequest, TextContentPart

try:
    from glmv.server.guard import record_usage as _record_usage
except ImportError:  # the guard is optional
    _record_usage = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from glmv.server.app import ServerState

log = logging.getLogger("glmv.server.chat")

# Template variables the chat processor sets itself; a request may not override them.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "add_generation_prompt", "image_token_counts", "image_hashes", "self"}
)
# Logprobs of impossible tokens are -inf, which JSON cannot carry.
_MIN_LOGPROB = -9999.0
_DISCONNECT_POLL_S = 0.5
_HAS_ASYNCIO_TIMEOUT = sys.version_info >= (3, 11)


# --- token bytes for logprobs -------------------------------------------------------------------


class TokenBytes:
    """The raw bytes of a token id, exact even when the token is part of a UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._decoder = unicode_to_bytes()
        self._added: set[int] = set(getattr(tokenizer, "added_token_ids", set()))
        self._cache: dict[int, list[int]] = {}

    def __call__(self, token_id: int, text: str) -> list[int]:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        piece = self._tokenizer.id_to_token(token_id)
        if token_id in self._added or piece is None or any(ch not in self._decoder for ch in piece):
            out = list(text.encode("utf-8"))
        else:
            out = [self._decoder[ch] for ch in piece]
        if len(self._cache) < 200_000:
            self._cache[token_id] = out
        return out


def _finite(x: float) -> float:
    return x if x > _MIN_LOGPROB else _MIN_LOGPROB


# --- per-choice state --------------------------------------------------------------------------


@dataclass(slots=True)
class _Choice:
    parser: ReasoningParser
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class _Prepared:
    request: EngineRequest
    starts_in_thinking: bool
    num_images: int


class _SSEResponse(StreamingResponse):
    """A streaming response that always runs its cleanup, even if the client left before the
    first byte (Starlette does not close a body iterator it never started)."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


_DONE = "data: [DONE]\n\n"


# --- the run of one request --------------------------------------------------------------------


class _Run:
    """One admitted request: iterates the engine's outputs, records metrics, cleans up once."""

    def __init__(
        self,
        state: ServerState,
        request_id: str,
        model: str,
        params: SamplingParams,
        prepared: _Prepared,
        http_arrival: float,
        top_logprobs: int,
        http_request: Request,
    ) -> None:
        self.state = state
        self.http_request = http_request
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self.params = params
        self.http_arrival = http_arrival
        self.top_logprobs = top_logprobs
        self.choices = [
            _Choice(
                ReasoningParser(starts_in_thinking=prepared.starts_in_thinking),
                logprobs=[] if params.logprobs is not None else None,
            )
            for _ in range(params.n)
        ]
        self.gen = state.engine.generate(prepared.request)
        self.last: RequestOutput | None = None
        self.outcome: str | None = None
        self._last_token_time: float | None = None
        self.ttft: float | None = None
        self._closed = False
        timeout = state.settings.request_timeout
        self.deadline = http_arrival + timeout if timeout and timeout > 0 else None
        # Set when the server stops this run at the end of its shutdown timeout.
        self.stopped = state.stopping
        self._waiting: Any = None  # the asyncio.timeout of the await in progress, if any
        state.runs.add(self)

    def stop(self) -> None:
        """End this run with a 503 `overloaded` error (the server is going away): the stream sends
        the error event and `[DONE]`, a waiting non-streaming request answers 503."""
        self.stopped = True
        if self._waiting is not None:
            self._waiting.reschedule(asyncio.get_running_loop().time())

    def _shutdown_error(self) -> OverloadedError:
        self.outcome = "error"
        return OverloadedError(
            "The server is shutting down and stopped this request before it finished; retry it.",
            retry_after=5,
        )

    async def next(self) -> RequestOutput | None:
        """The next engine output, None at the end; raises the request's error or a timeout."""
        if self.stopped:
            raise self._shutdown_error()
        try:
            if _HAS_ASYNCIO_TIMEOUT:  # no extra task per token; `stop` can end the wait early
                remaining = None if self.deadline is None else self.deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise asyncio.TimeoutError
                async with asyncio.timeout(remaining) as waiting:  # type: ignore[attr-defined]
                    self._waiting = waiting
                    try:
                        out = await self.gen.__anext__()
                    finally:
                        self._waiting = None
            elif self.deadline is None:  # pragma: no cover - Python 3.10
                out = await self.gen.__anext__()
            else:  # pragma: no cover - Python 3.10
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                out = await asyncio.wait_for(self.gen.__anext__(), remaining)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            if self.stopped:
                raise self._shutdown_error() from None
            self.outcome = "timeout"
            raise RequestTimeoutError(
                f"The request did not finish within {self.state.settings.request_timeout:g} s and was stopped."
            ) from None
        self._observe(out)
        if out.error is not None:
            raise out.error
        return out

    def _observe(self, out: RequestOutput) -> None:
        m = self.state.metrics
        now = time.monotonic()
        new_tokens = any(d.token_ids for d in out.deltas)
        if new_tokens:
            if self._last_token_time is None:
                self.ttft = max(0.0, now - self.http_arrival)
                m.ttft.observe(self.ttft)
                if out.first_scheduled_time is not None:
                    m.queue_time.observe(max(0.0, out.first_scheduled_time - out.arrival_time))
            else:
                m.itl.observe(max(0.0, now - self._last_token_time))
            self._last_token_time = now
        self.last = out

    async def close(self, outcome: str | None = None) -> None:
        """Abort the engine request if it is still running, and account for it (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.state.runs.discard(self)
        try:
            await self.gen.aclose()
        except RuntimeError:  # pragma: no cover - closing while another task iterates it
            self.state.engine.abort(self.id)
        self.state.inflight -= 1
        outcome = self.outcome or outcome or "aborted"
        m = self.state.metrics
        m.request_finished(outcome)
        m.e2e.observe(max(0.0, time.monotonic() - self.http_arrival))
        if self.last is not None:
            m.prompt_tokens.inc(self.last.prompt_tokens)
            m.cached_prompt_tokens.inc(self.last.cached_tokens)
            m.generation_tokens.inc(self.last.completion_tokens)
            if _record_usage is not None:
                _record_usage(
                    self.http_request,
                    prompt_tokens=self.last.prompt_tokens,
                    completion_tokens=self.last.completion_tokens,
                    cached_tokens=self.last.cached_tokens,
                    ttft=self.ttft,
                )
        if self.state.settings.log_content:
            for i, c in enumerate(self.choices):
                log.info(
                    "%s choice %d reasoning=%r content=%r",
                    self.id,
                    i,
                    "".join(c.reasoning),
                    "".join(c.content),
                )
        log.debug(
            "%s %s: prompt %d tokens, completion %d tokens",
            self.id,
            outcome,
            self.last.prompt_tokens if self.last else 0,
            self.last.completion_tokens if self.last else 0,
        )

    # --- output shaping ---------------------------------------------------------------------

    def logprob_entries(self, items: list[TokenLogprob]) -> list[dict[str, Any]]:
        token_bytes = self.state.token_bytes
        k = self.top_logprobs
        return [
            {
                "token": lp.token,
                "logprob": _finite(lp.logprob),
                "bytes": token_bytes(lp.token_id, lp.token),
                "top_logprobs": [
                    {"token": text, "logprob": _finite(v), "bytes": token_bytes(tid, text)}
                    for tid, text, v in lp.top[:k]
                ],
            }
            for lp in items
        ]

    def usage(self) -> dict[str, Any]:
        out = self.last
        prompt = out.prompt_tokens if out else 0
        completion = out.completion_tokens if out else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens if out else 0},
        }


# --- the handler --------------------------------------------------------------------------------


class ChatHandler:
    """Turns validated `ChatCompletionRequest`s into responses; one per app."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def __call__(self, request: Request, body: ChatCompletionRequest) -> Response:
        state = self.state
        http_arrival = time.monotonic()
        if state.draining:
            raise OverloadedError("The server is shutting down; retry on another replica.", retry_after=5)
        model = self._check_model(body)
        self._check_unsupported(body)
        params, top_logprobs = self._sampling_params(body)
        template_kwargs = self._template_kwargs(body)
        messages, image_refs = _convert_messages(body)
        prompt_limit = getattr(state.builder.chat, "prompt_limit", None)
        if prompt_limit is not None:  # text that cannot fit is refused before anything else runs
            prompt_limit.check_bytes(_rendered_text(messages))
        limits = state.image_limits
        if len(image_refs) > limits.max_images:
            raise InvalidImageError(
                f"too many images: {len(image_refs)} given, this server accepts at most {limits.max_images} per request",
                param=image_refs[limits.max_images][1],
            )
        state.engine.check_admission()  # before any image is decoded
        if state.inflight >= state.engine.max_pending:  # requests still decoding images count too
            raise OverloadedError(
                f"The server is at capacity ({state.inflight} requests in flight); retry shortly.",
                retry_after=1,
            )

        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        state.inflight += 1
        counted = True
        try:
            prepared = await _cancel_on_disconnect(
                request,
                self._within_timeout(
                    self._prepare(request_id, messages, image_refs, params, template_kwargs), http_arrival
                ),
            )
            if prepared is None:
                state.metrics.request_finished("aborted")
                return Response(status_code=499)
            if state.settings.log_content:
                log.info("%s messages=%s", request_id, json.dumps(messages, ensure_ascii=False)[:20000])
            run = _Run(state, request_id, model, params, prepared, http_arrival, top_logprobs, request)
            counted = False  # from here on the run owns the in-flight count
        finally:
            if counted:
                state.inflight -= 1

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            try:
                first = await _cancel_on_disconnect(request, run.next())
            except BaseException:
                await run.close("error")
                raise
            if first is None and run.last is None:
                await run.close("aborted")
                return Response(status_code=499)
            return _SSEResponse(_stream(run, first, include_usage), run.close)
        try:
            result = await _cancel_on_disconnect(request, _collect(run))
        except BaseException:
            await run.close("error")
            raise
        if result is None:
            await run.close("aborted")
            return Response(status_code=499)
        await run.close(_outcome(run))
        return JSONResponse(result)

    # --- checks -------------------------------------------------------------------------------

    def _check_model(self, body: ChatCompletionRequest) -> str:
        names = self.state.model_names
        if body.model is None or body.model == "":
            return names[0]
        if body.model not in names:
            raise ModelNotFoundError(
                f"The model '{body.model}' does not exist on this server; it serves '{names[0]}' (see GET /v1/models).",
                param="model",
            )
        return body.model

    @staticmethod
    def _check_unsupported(body: ChatCompletionRequest) -> None:
        if body.tools:
            raise InvalidRequestError(
                "Tool calling is not supported by this server.", param="tools", code="unsupported_parameter"
            )
        if body.functions:
            raise InvalidRequestError(
                "Function calling is not supported by this server.",
                param="functions",
                code="unsupported_parameter",
            )
        for name in ("tool_choice", "function_call"):
            value = getattr(body, name)
            if value is not None and value not in ("none", "auto"):
                raise InvalidRequestError(
                    f"'{name}' is not supported by this server (no tool calling).",
                    param=name,
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

    def _sampling_params(self, body: ChatCompletionRequest) -> tuple[SamplingParams, int]:
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
            skip_special_tokens=bool(body.skip_special_tokens),
            structured=_structured_output(body),
        )
        core = self.state.engine.engine
        try:
            params.validate(
                max_model_len=core.max_model_len,
                vocab_size=core.model.vocab_size,
                max_sequences=core.config.max_waiting,
            )
        except InvalidRequestError as exc:
            if exc.param == "max_tokens" and body.max_completion_tokens is not None:
                exc.param = "max_completion_tokens"
            elif exc.param == "stop[0]" and isinstance(body.stop, str):
                exc.param = "stop"
            raise
        return params, top

    def _template_kwargs(self, body: ChatCompletionRequest) -> dict[str, Any]:
        kwargs = dict(body.chat_template_kwargs or {})
        for key in kwargs:
            if key in _RESERVED_TEMPLATE_KWARGS:
                raise InvalidRequestError(
                    f"chat_template_kwargs may not set '{key}'.", param=f"chat_template_kwargs.{key}"
                )
        if body.thinking is not None and self.state.builder.chat.supports_thinking_toggle:
            kwargs["enable_thinking"] = body.thinking.type == "enabled"
        return kwargs

    async def _within_timeout(self, awaitable: Awaitable[_Prepared], http_arrival: float) -> _Prepared:
        timeout = self.state.settings.request_timeout
        if not timeout or timeout <= 0:
            return await awaitable
        remaining = http_arrival + timeout - time.monotonic()
        try:
            return await asyncio.wait_for(awaitable, max(remaining, 0.001))
        except asyncio.TimeoutError:
            self.state.metrics.request_finished("timeout")
            raise RequestTimeoutError(
                f"The request's images were not ready within {timeout:g} s and it was stopped."
            ) from None

    # --- images and prompt --------------------------------------------------------------------

    async def _prepare(
        self,
        request_id: str,
        messages: list[dict[str, Any]],
        image_refs: list[tuple[str, str]],
        params: SamplingParams,
        template_kwargs: dict[str, Any],
    ) -> _Prepared:
        state = self.state
        budget = ImageBudget(state.image_limits)
        images: list[Image.Image] = []
        for url, param in image_refs:
            images.append(
                await resolve_image(
                    url, param=param, limits=state.image_limits, remote=state.remote_policy, budget=budget
                )
            )
        return await asyncio.to_thread(
            self._build, request_id, messages, images, [p for _, p in image_refs], params, template_kwargs
        )

    def _build(
        self,
        request_id: str,
        messages: list[dict[str, Any]],
        images: list[Image.Image],
        image_params: list[str],
        params: SamplingParams,
        template_kwargs: dict[str, Any],
    ) -> _Prepared:
        builder = self.state.builder
        processed: list[Any] = []
        for image, param in zip(images, image_params, strict=True):
            try:
                processed.append(builder.preprocess_one(image))
            except InvalidImageError as exc:
                exc.param = exc.param or param
                raise
            finally:
                image.close()
        request = builder.build(request_id, messages, processed, params, chat_template_kwargs=template_kwargs)
        text = request.prompt_text  # rendered once, by the input builder
        return _Prepared(request, prompt_opens_thinking(text), len(processed))


def _structured_output(body: ChatCompletionRequest) -> StructuredOutput | None:
    """`response_format` json_object / json_schema as an engine constraint (400 for a bad schema).
    A thinking model may reason before the JSON unless the request turns thinking off."""
    structured = parse_response_format(body.response_format)
    if structured is None:
        return None
    kwargs = body.chat_template_kwargs or {}
    thinking_off = (body.thinking is not None and body.thinking.type == "disabled") or (
        kwargs.get("enable_thinking") is False
    )
    return structured.with_thinking(not thinking_off)


def _convert_messages(body: ChatCompletionRequest) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Template-ready messages (images as `{"type": "image"}`) and each image's (url, param)."""
    out: list[dict[str, Any]] = []
    refs: list[tuple[str, str]] = []
    for i, m in enumerate(body.messages):
        role = m.role
        if role in ("tool", "function"):
            raise InvalidRequestError(
                f"Messages with role '{role}' are not supported: this server does not offer tool calling.",
                param=f"messages[{i}].role",
            )
        if m.tool_calls:
            raise InvalidRequestError(
                "Assistant tool_calls are not supported: this server does not offer tool calling.",
                param=f"messages[{i}].tool_calls",
            )
        if role == "developer":
            role = "system"
        content = m.content
        converted: str | list[dict[str, Any]]
        if content is None:
            if role != "assistant":
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
                if role != "user":
                    raise InvalidRequestError(
                        f"Images are only accepted in user messages, not in {m.role} messages.",
                        param=f"messages[{i}].content[{j}]",
                    )
                refs.append((part.image_url.url, f"messages[{i}].content[{j}].image_url"))
                parts.append({"type": "image"})
            converted = parts
        msg: dict[str, Any] = {"role": role, "content": converted}
        if role == "assistant" and m.reasoning_content:
            msg["reasoning_content"] = m.reasoning_content
        out.append(msg)
    return out, refs


def _rendered_text(messages: list[dict[str, Any]]) -> list[str]:
    """The text of the user and system turns: what every chat template renders in full (an
    assistant turn's reasoning may be dropped), so its size is a lower bound on the prompt's."""
    out: list[str] = []
    for m in messages:
        if m["role"] not in ("user", "system"):
            continue
        content = m["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out.extend(p["text"] for p in content if p.get("type") == "text")
    return out


async def _cancel_on_disconnect(request: Request, awaitable: Awaitable[Any]) -> Any:
    """Await `awaitable`; if the client disconnects meanwhile, cancel it and return None."""
    task = asyncio.ensure_future(awaitable)
    left = False

    async def watch() -> None:
        nonlocal left
        while not task.done():
            await asyncio.sleep(_DISCONNECT_POLL_S)
            if await request.is_disconnected():
                left = True
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if left:
            return None
        raise
    finally:
        watcher.cancel()


def _outcome(run: _Run) -> str:
    reasons = {c.finish_reason for c in run.choices}
    if "length" in reasons:
        return "length"
    return "stop"


def _apply_delta(run: _Run, choice: _Choice, text: str) -> tuple[str, str]:
    reasoning, content = choice.parser.feed(text) if text else ("", "")
    if reasoning:
        choice.reasoning.append(reasoning)
    if content:
        choice.content.append(content)
    return reasoning, content


def _finish(choice: _Choice, finish_reason: str, stop_reason: int | str | None) -> tuple[str, str]:
    reasoning, content = choice.parser.flush()
    if reasoning:
        choice.reasoning.append(reasoning)
    if content:
        choice.content.append(content)
    choice.finish_reason = finish_reason
    choice.stop_reason = stop_reason
    return reasoning, content


async def _collect(run: _Run) -> dict[str, Any]:
    while (out := await run.next()) is not None:
        for d in out.deltas:
            choice = run.choices[d.index]
            _apply_delta(run, choice, d.text)
            if choice.logprobs is not None and d.logprobs:
                choice.logprobs.extend(run.logprob_entries(d.logprobs))
            if d.finish_reason is not None:
                _finish(choice, d.finish_reason, d.stop_reason)
        if out.finished:
            break
    if run.last is None or not run.last.finished:
        raise EngineError("The engine ended the request without finishing it.")
    choices = []
    for i, c in enumerate(run.choices):
        reasoning = "".join(c.reasoning)
        choices.append(
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": "".join(c.content),
                    "reasoning_content": reasoning or None,
                    "refusal": None,
                    "tool_calls": [],
                },
                "logprobs": {"content": c.logprobs, "refusal": None} if c.logprobs is not None else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
        )
    return {
        "id": run.id,
        "object": "chat.completion",
        "created": run.created,
        "model": run.model,
        "system_fingerprint": run.state.system_fingerprint,
        "choices": choices,
        "usage": run.usage(),
    }


async def _stream(run: _Run, first: RequestOutput | None, include_usage: bool) -> AsyncIterator[str]:
    base: dict[str, Any] = {
        "id": run.id,
        "object": "chat.completion.chunk",
        "created": run.created,
        "model": run.model,
        "system_fingerprint": run.state.system_fingerprint,
    }
    if include_usage:
        base["usage"] = None

    def chunk(
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
        return _sse({**base, "choices": [choice]})

    def text_delta(reasoning: str, content: str) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        return delta

    try:
        for i in range(len(run.choices)):
            yield chunk(i, {"role": "assistant", "content": ""})
        out = first
        while out is not None:
            for d in out.deltas:
                choice = run.choices[d.index]
                reasoning, content = _apply_delta(run, choice, d.text)
                lps = (
                    run.logprob_entries(d.logprobs) if (choice.logprobs is not None and d.logprobs) else None
                )
                if lps is not None:
                    choice.logprobs.extend(lps)  # type: ignore[union-attr]
                if reasoning or content or lps:
                    yield chunk(d.index, text_delta(reasoning, content), lps)
                if d.finish_reason is not None:
                    reasoning, content = _finish(choice, d.finish_reason, d.stop_reason)
                    if reasoning or content:
                        yield chunk(d.index, text_delta(reasoning, content))
                    yield chunk(d.index, {}, None, d.finish_reason, d.stop_reason)
            if out.finished:
                break
            out = await run.next()
        if include_usage:
            yield _sse({**base, "choices": [], "usage": run.usage()})
        run.outcome = _outcome(run)
    except GlmvError as exc:
        run.outcome = run.outcome or "error"
        yield _sse(exc.to_dict())
    except Exception:  # never leak a traceback into the stream
        log.exception("%s: streaming failed", run.id)
        run.outcome = "error"
        yield _sse(
            {
                "error": {
                    "message": "The server had an error while processing your request.",
                    "type": "internal_error",
                    "param": None,
                    "code": "internal_error",
                }
            }
        )
    yield _DONE


__all__ = ["ChatHandler", "TokenBytes"]
