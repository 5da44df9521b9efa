"""`AsyncEngine`: the engine loop on its own thread, async generators on the event loop.

The HTTP event loop never runs model code. Requests and aborts travel to the engine thread
through a command queue; outputs come back through per-request asyncio queues. torch releases
the GIL inside its kernels, so the loop stays responsive while a step runs. When a client goes
away its generator is closed and the request is aborted at once, freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from glmv.engine.engine import LLMEngine
from glmv.engine.request import EngineRequest, RequestOutput, merge_outputs
from glmv.engine.stats import EngineStats
from glmv.errors import EngineError, GlmvError, InvalidRequestError, OverloadedError

log = logging.getLogger("glmv.engine")


@dataclass(slots=True)
class _Add:
    request: EngineRequest
    sink: asyncio.Queue[RequestOutput | GlmvError]
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, max_pending: int | None = None) -> None:
        self.engine = engine
        cfg = engine.config
        # Requests admitted but not finished: running + waiting. Beyond this we answer 503.
        self.max_pending = max_pending if max_pending is not None else cfg.max_num_seqs + cfg.max_waiting
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._sinks: dict[
            str, tuple[asyncio.Queue[RequestOutput | GlmvError], asyncio.AbstractEventLoop]
        ] = {}
        self._pending = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead: BaseException | None = None
        self._stats = engine.stats()
        self.info = engine.info()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="glmv-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    @property
    def num_pending(self) -> int:
        return self._pending

    def stats(self) -> EngineStats:
        return self._stats

    def core_stats(self) -> list[EngineStats]:
        return [self._stats]

    def validate(self, request: EngineRequest) -> None:
        self.engine.validate(request)

    # --- requests -------------------------------------------------------------------------------

    def check_admission(self) -> None:
        """Raise `OverloadedError` when the queue is full; call before any expensive work."""
        if self._stopping:
            raise OverloadedError("The server is shutting down.", retry_after=5)
        if not self.running:
            raise OverloadedError("The engine is not running.", retry_after=5)
        if self._pending >= self.max_pending:
            raise OverloadedError(
                f"The server is at capacity ({self._pending} requests in flight); retry shortly.",
                retry_after=1,
            )

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Yield incremental outputs until the request finishes; closing the iterator aborts it."""
        self.check_admission()
        self.validate(request)
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue[RequestOutput | GlmvError] = asyncio.Queue()
        with self._lock:
            self._pending += 1
        finished = False
        try:
            self._commands.put(_Add(request, sink, loop))
            while True:
                item = await sink.get()
                if isinstance(item, GlmvError):
                    finished = True
                    raise item
                # A consumer that fell behind takes everything already queued as one output:
                # fewer, larger stream chunks instead of a growing backlog.
                while not item.finished and not sink.empty():
                    nxt = sink.get_nowait()
                    if isinstance(nxt, GlmvError):
                        sink.put_nowait(nxt)  # deliver what came before, then the error
                        break
                    item = merge_outputs(item, nxt)
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._pending -= 1
            if not finished:
                self._commands.put(_Abort(request.request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # --- the engine thread ----------------------------------------------------------------------

    def _deliver(self, request_id: str, item: RequestOutput | GlmvError) -> None:
        entry = self._sinks.get(request_id)
        if entry is None:
            return
        sink, loop = entry
        with contextlib.suppress(RuntimeError):  # the loop may be closed during shutdown
            loop.call_soon_threadsafe(sink.put_nowait, item)
        if isinstance(item, GlmvError) or item.finished:
            self._sinks.pop(request_id, None)

    def _handle(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Add):
            rid = cmd.request.request_id
            if rid in self._sinks:  # answer the duplicate alone; the running request keeps its sink
                error = InvalidRequestError(f"Duplicate request id {rid!r}.")
                with contextlib.suppress(RuntimeError):
                    cmd.loop.call_soon_threadsafe(cmd.sink.put_nowait, error)
                return
            self._sinks[rid] = (cmd.sink, cmd.loop)
            try:
                self.engine.add_request(cmd.request)
            except GlmvError as exc:
                self._deliver(rid, exc)
            except Exception as exc:
                log.exception("adding request %s failed", rid)
                self._deliver(rid, EngineError(f"could not add the request: {exc}"))
        else:
            self.engine.abort(cmd.request_id)
            self._sinks.pop(cmd.request_id, None)

    def _loop(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished()
                try:
                    cmd = self._commands.get(block=block, timeout=0.5 if block else None)
                except queue.Empty:
                    cmd = None
                    if self._stopping:
                        break
                while cmd is not None or not self._commands.empty():
                    if cmd is None:
                        cmd = self._commands.get_nowait()
                    if cmd is None:
                        break
                    self._handle(cmd)
                    cmd = None
                if self._stopping and not self.engine.has_unfinished():
                    break
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._deliver(out.request_id, out)
                self._stats = self.engine.stats()
        except BaseException as exc:  # a crash here must not hang the clients
            self.dead = exc
            log.exception("engine loop crashed")
            for rid in list(self._sinks):
                self._deliver(rid, EngineError(f"the engine stopped: {exc}"))
