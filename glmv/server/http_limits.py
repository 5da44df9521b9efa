"""Limits on the network side of the HTTP server: every read has a deadline, connections a cap.

uvicorn brings an idle keep-alive timeout (`timeout_keep_alive`) but no deadline for a client to
finish sending its request: a client that opens a connection and sends nothing, half a header or
half a body holds its socket forever. Two pieces close those gaps:

* `limited_protocol(limits)`: uvicorn's HTTP protocol with a **header timeout** (a connection
  waiting for a request, fresh or kept alive, must deliver complete headers within
  `header_timeout` seconds or is closed, with a 408 when it had sent part of them) and a
  **connection cap** (a connection beyond `max_connections` gets a 503 and is closed at once).
* `BodyReadMiddleware`: reads the body of every request that has one before the app sees it,
  within `body_timeout` seconds of the headers (else 408 and the connection closes), and hands the
  bytes to `glmv.processing.text_checks.BodyScreen`, so that a body that is not UTF-8, or
  whose JSON holds a lone surrogate in any field, is a 400 naming the field before any route,
  model-name lookup or tokenizer sees it.

The screen runs chunk by chunk as the body arrives (`BodyScreen`), so a 30 MB body is never
scanned in one step that would stall the requests beside it.

`HttpLimits` carries the four settings (`--header-timeout`, `--body-timeout`,
`--keep-alive-timeout`, `--max-connections`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmv.errors import GlmvError, InvalidRequestError, OverloadedError, RequestReadTimeoutError
from glmv.processing.text_checks import BodyScreen
from glmv.timeline import timeline

__all__ = ["BodyReadMiddleware", "HttpLimits", "limited_protocol", "raise_open_file_limit"]

log = logging.getLogger("glmv.server.http")

_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Seconds a client gets for its headers and its body, idle seconds between requests of a
    kept-alive connection, and the most connections open at once."""

    header_timeout: float
    body_timeout: float
    keep_alive_timeout: float
    max_connections: int


def _raw_response(exc: GlmvError, extra: tuple[bytes, ...] = ()) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, written below the app."""
    body = json.dumps(exc.to_dict()).encode()
    head = [
        b"HTTP/1.1 %d %s" % (exc.status_code, _REASONS.get(exc.status_code, b"Error")),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


_HEADER_TIMEOUT_RESPONSE = _raw_response(
    RequestReadTimeoutError("The request headers did not arrive in time.")
)
_OVER_CAP_RESPONSE = _raw_response(
    OverloadedError("The server has too many open connections; retry shortly."), (b"retry-after: 1",)
)


def limited_protocol(limits: HttpLimits, base: type[asyncio.Protocol] | None = None) -> type[Any]:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) with a header timeout
    and a connection cap; pass it as `uvicorn.Config(http=...)`."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    parent: Any = base

    class LimitedHTTPProtocol(parent):  # type: ignore[misc,valid-type]
        """Closes connections that wait too long for request headers, and those over the cap."""

        _timer: asyncio.TimerHandle | None = None
        _seen_cycle: Any = None
        _partial = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(_OVER_CAP_RESPONSE)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._after_io():
                self._partial = True  # bytes of a request whose headers are not complete yet

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._after_io()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _after_io(self) -> bool:
            """Disarm when new request headers completed; arm when waiting for the next request.
            True when a request is in progress."""
            cycle = self.cycle
            if cycle is not None and cycle is not self._seen_cycle:
                self._seen_cycle = cycle
                self._partial = False
                self._disarm()
                return True
            if cycle is None or cycle.response_complete:
                if self._timer is None and not self.transport.is_closing():
                    self._partial = False
                    self._arm()
                return False
            return True

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(limits.header_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _timed_out(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                return  # a request is being served: its body has its own deadline
            if self._partial:
                self.transport.write(_HEADER_TIMEOUT_RESPONSE)
            self.transport.close()

    return LimitedHTTPProtocol


def raise_open_file_limit(wanted: int) -> None:
    """Raise the soft limit on open files to `wanted` where the hard limit allows (each connection
    holds one), so that the connection cap, not the file table, decides."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # pragma: no cover - platform refuses
        log.warning("could not raise the open-file limit to %d: %s", wanted, exc)


class _BodyTimedOut(Exception):
    pass


class BodyReadMiddleware:
    """Reads each request body within `body_timeout` seconds and screens its text (see the module
    docstring), then replays it to the app as one message."""

    def __init__(self, app: ASGIApp, body_timeout: float) -> None:
        self.app = app
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _METHODS_WITH_BODY:
            await self.app(scope, receive, send)
            return
        screen = BodyScreen()
        trace = timeline()
        if trace is not None:  # a request id exists only later: the route marks these
            scope["glmv.timeline"] = {"headers": time.monotonic()}
        try:
            chunks = await self._read(receive, screen)
        except _BodyTimedOut:
            await _send_error(
                send,
                RequestReadTimeoutError(f"The request body did not arrive within {self.body_timeout:g} s."),
                close=True,
            )
            return
        if chunks is None:  # the client left before its body was complete
            return
        if trace is not None:
            scope["glmv.timeline"]["body"] = time.monotonic()
        problem = screen.finish(chunks)
        if problem is not None:
            reason, param = problem
            if reason == "encoding":
                error = InvalidRequestError(
                    "The request body is not valid UTF-8 (JSON bodies must be UTF-8).",
                    code="invalid_encoding",
                )
            else:
                error = InvalidRequestError(
                    f"'{param}' holds a lone surrogate (e.g. \\ud800): text must be valid Unicode.",
                    param=param,
                    code="invalid_unicode",
                )
            await _send_error(send, error)
            return
        if trace is not None:
            scope["glmv.timeline"]["screened"] = time.monotonic()
        # Replayed as it came (the app joins the chunks once, as it would have anyway).
        pending = chunks or [b""]
        sent = 0

        async def replay() -> Message:
            nonlocal sent
            if sent < len(pending):
                sent += 1
                return {"type": "http.request", "body": pending[sent - 1], "more_body": sent < len(pending)}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive, screen: BodyScreen) -> list[bytes] | None:
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(self.body_timeout if self.body_timeout > 0 else None):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return None
                    chunk = message.get("body", b"")
                    if chunk:
                        chunks.append(chunk)
                        screen.feed(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise _BodyTimedOut from None
        return chunks


async def _send_error(send: Send, exc: GlmvError, *, close: bool = False) -> None:
    body = json.dumps(exc.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
