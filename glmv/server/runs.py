"""One generation served on behalf of an HTTP request, whichever route asked for it.

`ServedRequest` wraps the service's `GenerationStream` with what HTTP adds: the request timeout
(504), cancellation when the client disconnects (499), the Prometheus metrics (time to first
token, inter-token latency, queue time, end-to-end latency, tokens, outcome), the usage the
guard logs and limits by, and content logging when it is on. Chat completions, extraction and
moderation all serve their generations through it; `close()` must always be called (it aborts
an unfinished request in the engine and accounts for it once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from glmv.errors import GlmvError, OverloadedError, RequestTimeoutError
from glmv.server.deadline import Deadline, Interrupted
from glmv.server.state import ServerState
from glmv.tasks.types import Generation, GenerationChunk, GenerationRequest
from glmv.timeline import timeline

try:
    from glmv.server.guard import record_error as _record_error
    from glmv.server.guard import record_usage as _record_usage
except ImportError:  # the guard is optional
    _record_usage = None  # type: ignore[assignment]
    _record_error = None  # type: ignore[assignment]

__all__ = ["ServedRequest", "cancel_on_disconnect"]

log = logging.getLogger("glmv.server")
T = TypeVar("T")

_DISCONNECT_POLL_S = 0.5


async def cancel_on_disconnect(request: Request, awaitable: Awaitable[T]) -> T | None:
    """Await `awaitable`; if the client disconnects meanwhile, cancel it and return None.

    The request's body has been read, so the client's next ASGI message is its disconnect: the
    watcher waits for it in `receive()` (no wake-up while nothing happens, where polling woke
    every waiting request twice a second). Should another message come, it polls instead."""
    task = asyncio.ensure_future(awaitable)
    left = False

    async def watch() -> None:
        nonlocal left
        try:
            message = await request.receive()
            if message["type"] != "http.disconnect":  # not expected after the body: poll
                while not await request.is_disconnected():
                    await asyncio.sleep(_DISCONNECT_POLL_S)
        except Exception:  # a receive that fails tells nothing: let the request run on
            log.debug("disconnect watch of %s %s failed", request.method, request.url.path, exc_info=True)
            return
        left = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if left:
            return None
        raise
    finally:
        watcher.cancel()


class ServedRequest:
    """See the module docstring. `record_usage=False` leaves reporting usage to the caller (a
    route that serves one HTTP request with several generations)."""

    def __init__(
        self,
        state: ServerState,
        http_request: Request,
        request: GenerationRequest,
        *,
        http_arrival: float,
        record_usage: bool = True,
    ) -> None:
        self.state = state
        self.http_request = http_request
        self.http_arrival = http_arrival
        self.record_usage = record_usage
        self.stream = state.service.stream(request)
        self.request_id = self.stream.request_id
        self.n = request.params.n
        self.created = int(time.time())
        self.last: GenerationChunk | None = None
        self.outcome: str | None = None
        self.ttft: float | None = None
        self._last_token_time: float | None = None
        self._closed = False
        self._texts: list[list[str]] | None = [[] for _ in range(self.n)] if state.settings.log_content else None
        timeout = state.settings.request_timeout
        self.deadline = http_arrival + timeout if timeout and timeout > 0 else None
        # Set when the server stops this request at the end of its shutdown timeout.
        self.stopped = state.stopping
        self._deadline = Deadline(self.deadline)
        self._trace = timeline()  # looked up once (it reads the environment), not per token
        state.runs.add(self)

    def stop(self) -> None:
        """End this request with a 503 `overloaded` error (the server is going away): a stream
        sends the error event and `[DONE]`, a waiting non-streaming request answers 503."""
        self.stopped = True
        self._deadline.interrupt("stopped")

    def _shutdown_error(self) -> OverloadedError:
        self.outcome = "error"
        return OverloadedError(
            "The server is shutting down and stopped this request before it finished; retry it.",
            retry_after=5,
        )

    # --- iterating --------------------------------------------------------------------------------

    async def _bounded(self, awaitable: Awaitable[T]) -> T:
        """`awaitable` within what is left of the request timeout (504 after it); `stop` ends the
        wait early (503). One timer per request (`Deadline`), not one per await."""
        if self.stopped:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise self._shutdown_error()
        try:
            return await self._deadline.wait(awaitable)
        except Interrupted:
            if self.stopped:
                raise self._shutdown_error() from None
            self.outcome = "timeout"
            raise RequestTimeoutError(
                f"The request did not finish within {self.state.settings.request_timeout:g} s and was stopped."
            ) from None

    async def next(self) -> GenerationChunk | None:
        """The next chunk, None at the end; raises the request's error or a timeout."""
        try:
            chunk = await self._bounded(self.stream.__anext__())
        except StopAsyncIteration:
            return None
        self._observe(chunk)
        return chunk

    async def collect(self) -> Generation:
        """The whole generation (non-streaming answers)."""
        generation = await self._bounded(self.stream.collect(self._observe))
        self.outcome = _outcome(c.finish_reason for c in generation.choices)
        return generation

    def _observe(self, chunk: GenerationChunk) -> None:
        m = self.state.metrics
        now = time.monotonic()
        if any(d.token_ids for d in chunk.deltas):
            trace = self._trace
            if trace is not None:
                trace.mark(self.request_id, "first_token", now)
                trace.set(self.request_id, "last_token", now)
                trace.add(self.request_id, "chunks")
            if self._last_token_time is None:
                self.ttft = max(0.0, now - self.http_arrival)
                m.ttft.observe(self.ttft)
                if chunk.queue_time is not None:
                    m.queue_time.observe(chunk.queue_time)
            else:
                m.itl.observe(max(0.0, now - self._last_token_time))
            self._last_token_time = now
        if self._texts is not None:
            for d in chunk.deltas:
                self._texts[d.index].append(d.text)
        self.last = chunk

    # --- the end ----------------------------------------------------------------------------------

    def record_error(self, code: str) -> None:
        """The error code of a stream that failed after its 200 went out (for the access log)."""
        if _record_error is not None:
            _record_error(self.http_request, code)

    def finished_with(self, finish_reasons: list[str | None]) -> None:
        """Record the outcome of a stream that ran to its end."""
        self.outcome = _outcome(finish_reasons)

    async def close(self, outcome: str | None = None, error: BaseException | None = None) -> None:
        """Abort the request in the engine if it still runs, and account for it (idempotent).
        A client error met before any output (a bad image, a prompt too long) counts as no request."""
        if self._closed:
            return
        self._closed = True
        self._deadline.cancel()
        self.state.runs.discard(self)
        trace = timeline()
        if trace is not None:
            trace.finish(
                self.request_id,
                done=time.monotonic(),
                outcome=self.outcome or outcome,
                completion_tokens=self.stream.usage.completion_tokens,
            )
        try:
            await self.stream.aclose()
        except RuntimeError:  # pragma: no cover - closing while another task iterates it
            self.state.service.client.abort(self.request_id)
        if self.last is None and isinstance(error, GlmvError) and error.status_code < 500 and not self.outcome:
            return
        outcome = self.outcome or outcome or "aborted"
        m = self.state.metrics
        m.request_finished(outcome)
        m.e2e.observe(max(0.0, time.monotonic() - self.http_arrival))
        usage = self.stream.usage
        if self.last is not None or usage.prompt_tokens:
            m.prompt_tokens.inc(usage.prompt_tokens)
            m.cached_prompt_tokens.inc(usage.cached_tokens)
            m.generation_tokens.inc(usage.completion_tokens)
            if self.record_usage and _record_usage is not None:
                _record_usage(
                    self.http_request,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    cached_tokens=usage.cached_tokens,
                    ttft=self.ttft,
                )
        if self._texts is not None:
            for i, parts in enumerate(self._texts):
                log.info("%s choice %d output=%r", self.request_id, i, "".join(parts))
        log.debug(
            "%s %s: prompt %d tokens, completion %d tokens",
            self.request_id,
            outcome,
            usage.prompt_tokens,
            usage.completion_tokens,
        )


def _outcome(finish_reasons: object) -> str:
    return "length" if "length" in set(finish_reasons) else "stop"  # type: ignore[call-overload]
