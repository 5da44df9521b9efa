"""The body of a streamed response goes to the server without passing every middleware layer.

A streamed token is one ASGI `http.response.body` message. Between the route and the server it
used to pass through a `send` wrapper per layer (Starlette's two exception layers and its error
layer, FastAPI's body limit, the 500 guard, the guard, the response counter): seven coroutine
calls per token and stream, none of which does anything with a body message except the guard,
which counts its bytes and notes the end of the response.

The outermost of our middleware (`install`, in the response counter) puts the `send` it was
given into the scope as a `BodySend`; a layer inside it that must see body messages registers a
tap there (`add_tap`: a plain function called with each message, before it goes out). A response
sends its start through the normal chain, so that every layer sees the status and adds its
headers, and its body messages through `body_send(scope, send)`: the `BodySend` with the taps, or
`send` itself when the app runs without the middleware (e.g. mounted elsewhere).

A middleware layer that changes or needs body messages (compression, say) must register a tap
or take the scope key away for the requests it handles (`scope.pop(SCOPE_KEY, None)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import Message, Scope, Send

__all__ = ["SCOPE_KEY", "BodySend", "add_tap", "body_send", "install"]

SCOPE_KEY = "glmv.body_send"


class BodySend:
    """The outer `send` of a request and the taps that see each body message sent through it."""

    __slots__ = ("send", "taps")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.taps: list[Callable[[Message], Any]] = []

    async def __call__(self, message: Message) -> None:
        for tap in self.taps:
            tap(message)
        await self.send(message)


def install(scope: Scope, send: Send) -> None:
    """Offer `send` (the outermost layer's) to the responses of this request."""
    scope[SCOPE_KEY] = BodySend(send)


def add_tap(scope: Scope, tap: Callable[[Message], Any]) -> None:
    """Have `tap` see the body messages that skip this layer (no-op without `install`)."""
    direct = scope.get(SCOPE_KEY)
    if direct is not None:
        direct.taps.append(tap)


def body_send(scope: Scope, send: Send) -> Send:
    """The `send` for a response's body messages (see the module docstring)."""
    direct = scope.get(SCOPE_KEY)
    return direct if direct is not None else send
