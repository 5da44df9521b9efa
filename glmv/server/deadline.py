"""A request's deadline: one timer per request that interrupts whatever the request is awaiting.

A streamed request awaits its next chunk once per token. `asyncio.timeout` around each of those
awaits made a `Timeout` object, a timer handle and a heap push and pop per token and request,
which at 64 concurrent streams was a sixth of the API process's per-token work. `Deadline` arms
one timer for the whole request, the first time it waits, and only records which task is
waiting (`wait`); when the timer fires (or `interrupt` is called, e.g. by a server that stops its
requests) it cancels that task, and `wait` turns the cancellation into `Interrupted(reason)`.
A deadline that passes while nothing is waiting is noticed by the next `wait`, which then
raises at once without awaiting. A cancellation that did not come from the deadline (the client
left, the server shut down) passes through unchanged, as with `asyncio.timeout`.

Call `cancel()` when the request ends, so that its timer does not outlive it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["Deadline", "Interrupted"]

T = TypeVar("T")

TIMEOUT = "timeout"
# Task.uncancel, which tells our cancellation from anyone else's, came with Python 3.11.
_HAS_UNCANCEL = sys.version_info >= (3, 11)


class Interrupted(Exception):
    """A `Deadline.wait` ended early: `reason` is `TIMEOUT` or what `interrupt` was given."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _close(awaitable: Awaitable[object]) -> None:
    if asyncio.iscoroutine(awaitable):
        awaitable.close()  # never awaited: no "was never awaited" warning


class Deadline:
    """See the module docstring. `at` is a `time.monotonic()` time, None for no deadline."""

    __slots__ = ("_pending", "_reason", "_task", "_timer", "at")

    def __init__(self, at: float | None) -> None:
        self.at = at
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None  # the task inside `wait`, if any
        self._pending: str | None = None  # the reason of a cancellation we sent and it has not seen
        self._reason: str | None = None  # set once the deadline passed or `interrupt` was called

    @property
    def armed(self) -> bool:
        """Whether the request's timer is scheduled (it is armed by the first `wait`)."""
        return self._timer is not None

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """`awaitable`, ended by `Interrupted` when the deadline passes or `interrupt` is called."""
        if self._reason is None and self.at is not None and time.monotonic() >= self.at:
            self._reason = TIMEOUT
        if self._reason is not None:
            _close(awaitable)
            raise Interrupted(self._reason)
        if not _HAS_UNCANCEL:  # pragma: no cover - Python 3.10: a timeout per await
            if self.at is None:
                return await awaitable
            try:
                return await asyncio.wait_for(awaitable, max(self.at - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise Interrupted(TIMEOUT) from None
        task = asyncio.current_task()
        assert task is not None, "Deadline.wait runs inside a task"
        if self._timer is None and self.at is not None:
            loop = asyncio.get_running_loop()
            # The loop's clock need not be time.monotonic (uvloop has its own): convert.
            self._timer = loop.call_at(loop.time() + (self.at - time.monotonic()), self._expire)
        entry = task.cancelling()
        self._task = task
        cancelled = False
        try:
            return await awaitable
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self._task = None
            reason, self._pending = self._pending, None
            # Ours (and nobody else's) when the count of cancellations is back where it was.
            if reason is not None and task.uncancel() <= entry and cancelled:
                raise Interrupted(reason) from None

    def interrupt(self, reason: str) -> None:
        """End the wait in progress, and every later one, with `Interrupted(reason)`."""
        if self._reason is None:
            self._reason = reason
        if self._task is not None and self._pending is None:
            self._pending = self._reason
            self._task.cancel()

    def _expire(self) -> None:
        self._timer = None
        self.interrupt(TIMEOUT)

    def cancel(self) -> None:
        """The request ended: drop its timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
