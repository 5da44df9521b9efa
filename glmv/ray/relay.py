"""The HTTP front of glmv on Ray Serve: read the request, pick its keys, forward it, relay the answer.

Ray Serve's HTTP proxy hands an ingress replica only the request's headers up front (the body
follows on demand), so a router placed there cannot see which conversation a request belongs to.
glmv therefore runs two deployments: this thin front, which reads the body (up to the guard's
limit), computes the request's `AffinityKeys` and forwards the raw request (ASGI scope + body) to
the engine deployment through a deployment handle; and the engine replicas, each running the
whole glmv app (routes, guards, errors, streaming). The handle's request router
(`glmv.ray.router`) picks the replica from the keys. Nothing of the API is implemented here.

Failures of the replica (it died, or became unreachable):

* before the answer started (nothing was sent to the client yet) the request is sent again, to
  another replica, up to `max_attempts` times; then 503 in OpenAI's error shape;
* after a streaming answer started, the stream ends with an error event
  (`data: {"error": {..., "code": "replica_failed"}}` then `data: [DONE]`), as glmv streams do
  for any error after the first byte;
* anything else unexpected is a 500 in OpenAI's error shape (or the error event).

`RelayApp` is an ASGI app and knows nothing of Ray: it is given the forwarding function and a
predicate that tells replica failures from other errors (see `glmv.ray.serve`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from glmv.errors import EngineError, GlmvError, OverloadedError
from glmv.ray.affinity import AffinityKeys, affinity_keys

__all__ = ["AppLifespan", "Forward", "RelayApp", "call_asgi", "forwardable_scope", "keys_for_request"]

log = logging.getLogger("glmv.ray")

# forward(scope, body, keys) -> batches of ASGI messages the app sent (response start and body parts)
Forward = Callable[[dict[str, Any], bytes, AffinityKeys], AsyncIterator[list[Message]]]

_SCOPE_KEYS = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "root_path",
    "query_string",
    "headers",
    "client",
    "server",
)
_PARSE_INLINE_BYTES = 256 * 1024  # larger bodies are parsed in a thread (base64 images)


def forwardable_scope(scope: Scope) -> dict[str, Any]:
    """The plain, picklable part of an HTTP scope (what the replica's app needs to see)."""
    out = {k: scope[k] for k in _SCOPE_KEYS if k in scope}
    out["headers"] = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    if out.get("client") is not None:
        out["client"] = tuple(out["client"])
    if out.get("server") is not None:
        out["server"] = tuple(out["server"])
    out.setdefault("root_path", "")
    return out


async def keys_for_request(scope: Scope, body: bytes) -> AffinityKeys:
    """The routing keys of a JSON POST body (empty for anything that does not parse)."""
    if scope.get("method") != "POST" or not body or body.lstrip()[:1] != b"{":
        return AffinityKeys()

    def parse() -> AffinityKeys:
        try:
            return affinity_keys(json.loads(body))
        except (ValueError, RecursionError):
            return AffinityKeys()

    if len(body) <= _PARSE_INLINE_BYTES:
        return parse()
    return await asyncio.to_thread(parse)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, cut after `limit` bytes (the replica's guard then refuses it with 413);
    None when the client went away."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if size < limit and chunk:
            parts.append(chunk[: limit - size])
            size += len(parts[-1])
        if not message.get("more_body", False) or size >= limit:
            return b"".join(parts)


def _json_error(exc: GlmvError, headers: dict[str, str] | None = None) -> list[Message]:
    body = json.dumps(exc.to_dict()).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return [
        {"type": "http.response.start", "status": exc.status_code, "headers": raw_headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


def _error_event(exc: GlmvError) -> bytes:
    return f"data: {json.dumps(exc.to_dict(), separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()


def _is_event_stream(start: Message) -> bool:
    for key, value in start.get("headers", []):
        if bytes(key).lower() == b"content-type":
            return bytes(value).lower().startswith(b"text/event-stream")
    return False


class RelayApp:
    """ASGI app forwarding every HTTP request through `forward` (see the module docstring)."""

    def __init__(
        self,
        forward: Forward,
        *,
        is_replica_failure: Callable[[BaseException], bool],
        is_overload: Callable[[BaseException], bool] = lambda exc: False,
        max_body_bytes: int = 32 * 1024 * 1024,
        max_attempts: int = 3,
        drop_response_headers: tuple[bytes, ...] = (),
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.forward = forward
        self.is_replica_failure = is_replica_failure
        self.is_overload = is_overload
        self.max_body_bytes = max_body_bytes
        self.max_attempts = max_attempts
        # Headers the server in front of this app sets itself (Serve's proxy: x-request-id).
        self.drop_response_headers = frozenset(h.lower() for h in drop_response_headers)
        self.retried = 0  # requests sent again after a replica failed before answering
        self.broken_streams = 0  # answers cut by a replica failure after they started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # glmv serves no websockets
            await send({"type": "websocket.close", "code": 1000})
            return
        body = await _read_body(receive, self.max_body_bytes + 1)
        if body is None:
            return
        keys = await keys_for_request(scope, body)
        forwarded = forwardable_scope(scope)
        for attempt in range(1, self.max_attempts + 1):
            outcome = await self._attempt(forwarded, body, keys, send)
            if outcome is None:
                return
            if attempt < self.max_attempts:
                self.retried += 1
                log.warning(
                    "%s %s: replica failed before answering (%s: %s); sending it again (%d/%d)",
                    scope.get("method"), scope.get("path"), type(outcome).__name__, outcome,
                    attempt + 1, self.max_attempts,
                )  # fmt: skip
        for message in _json_error(
            OverloadedError("No replica could serve the request; retry later.", code="no_replica"),
            {"Retry-After": "1"},
        ):
            await send(message)

    async def _attempt(
        self, scope: dict[str, Any], body: bytes, keys: AffinityKeys, send: Send
    ) -> BaseException | None:
        """Relay one forwarded call. Returns the replica failure when nothing was sent yet (the
        caller may try again), None when the request is answered (well or with an error)."""
        start: Message | None = None  # held back until the first body part: then it is committed
        started = False
        stream = False
        finished = False
        try:
            async for batch in self.forward(scope, body, keys):
                for message in batch:
                    if message["type"] == "http.response.start":
                        start = self._without_dropped_headers(message)
                        stream = _is_event_stream(message)
                        continue
                    if message["type"] != "http.response.body":
                        continue
                    if not started:
                        if start is None:  # an app that sends a body first is broken; refuse it
                            raise RuntimeError("the replica sent a body before the response start")
                        await send(start)
                        started = True
                    await send(message)
                    if not message.get("more_body", False):
                        finished = True
            if not finished:
                if not started:
                    if start is None:
                        raise RuntimeError("the replica ended the call without an answer")
                    await send(start)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            replica_failed = self.is_replica_failure(exc)
            if not started:
                if replica_failed:
                    return exc
                if self.is_overload(exc):
                    error: GlmvError = OverloadedError("The server is overloaded; retry later.")
                    messages = _json_error(error, {"Retry-After": "1"})
                else:
                    log.error(
                        "%s %s: forwarding failed", scope.get("method"), scope.get("path"), exc_info=exc
                    )
                    messages = _json_error(
                        EngineError(
                            "The server had an error while processing your request.", code="internal_error"
                        )
                    )
                for message in messages:
                    await send(message)
                return None
            if finished:
                return None
            self.broken_streams += 1
            if replica_failed:
                log.warning(
                    "%s %s: the replica failed during the answer: %s",
                    scope.get("method"),
                    scope.get("path"),
                    exc,
                )
                error = EngineError(
                    "The replica serving this request stopped; the answer is incomplete. Retry the request.",
                    code="replica_failed",
                )
            else:
                log.error("%s %s: relaying failed", scope.get("method"), scope.get("path"), exc_info=exc)
                error = EngineError(
                    "The server had an error while processing your request.", code="internal_error"
                )
            await send(
                {
                    "type": "http.response.body",
                    "body": _error_event(error) if stream else b"",
                    "more_body": False,
                }
            )
            return None

    def _without_dropped_headers(self, start: Message) -> Message:
        if not self.drop_response_headers:
            return start
        headers = [
            (k, v) for k, v in start.get("headers", []) if bytes(k).lower() not in self.drop_response_headers
        ]
        return {**start, "headers": headers}

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def call_asgi(
    app: Callable[[Scope, Receive, Send], Any],
    scope: dict[str, Any],
    body: bytes,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[list[Message]]:
    """Run one HTTP request through an ASGI app and yield what it sends, in batches (what has
    piled up since the last batch: one per token when the consumer keeps up, fewer when not).

    The app reads `body` as the whole request body; closing this generator (the caller went away)
    tells the app the client disconnected and cancels it, so the engine aborts the request."""
    outbox: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start" and extra_headers:
            message = {**message, "headers": [*message.get("headers", []), *extra_headers]}
        await outbox.put(message)

    async def run() -> None:
        try:
            await app(dict(scope, headers=list(scope.get("headers", []))), receive, send)
        finally:
            await outbox.put(None)

    task = asyncio.create_task(run())
    try:
        done = False
        while not done:
            first = await outbox.get()
            if first is None:
                break
            batch = [first]
            while not outbox.empty():
                message = outbox.get_nowait()
                if message is None:
                    done = True
                    break
                batch.append(message)
            yield batch
        await task  # an exception of the app itself surfaces here
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the app failed while being cancelled: nothing left to tell
                log.debug("the app failed after its caller left: %s", exc)


class AppLifespan:
    """Runs an ASGI app's lifespan (start-up, then shut-down on request) outside a server, for an
    app that is called directly rather than served (the engine replicas)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Any]) -> None:
        self.app = app
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.state: dict[str, Any] = {}

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        try:
            await self.app(scope, self._inbox.get, self._outbox.put)
        except Exception as exc:  # an app without lifespan support: nothing to run
            log.debug("the app's lifespan ended with %s", exc)
            await self._outbox.put({"type": "lifespan.unsupported"})

    async def startup(self) -> None:
        self._task = asyncio.create_task(self._run())
        await self._inbox.put({"type": "lifespan.startup"})
        reply = await self._outbox.get()
        if reply["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"the app failed to start: {reply.get('message', '')}")

    async def shutdown(self, timeout: float = 30.0) -> None:
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self._task, timeout)
        except (asyncio.TimeoutError, Exception) as exc:
            log.warning("the app's shut-down did not finish cleanly: %s", exc)
