"""`MPEngineClient`: the engine cores in their own processes, one client in the API process.

Each core (`glmv.engine.core_proc.run_core`, started with the spawn method) runs the scheduler,
runner and sampler in a busy loop. The client talks to core i over two ZeroMQ sockets (commands
in, outputs out) carrying msgspec-encoded messages (`glmv.engine.messages`); a request's image
arrays go through one shared-memory segment (`glmv.engine.shm`). One I/O thread of the client
receives every core's outputs, runs them through the shared `OutputProcessor` (detokenisation,
stop strings, logprob texts: the same code as the in-process engine, so both modes answer alike)
and hands each request's `RequestOutput`s to its async generator's queue on the event loop.

Routing (`data_parallel_size` > 1): `PrefixRouter` sends a request to the core that already holds
its prompt's leading blocks unless that core is much busier than the least-loaded one.

Core failure policy:
* The I/O thread waits on every core's process sentinel next to its sockets, so a core that dies
  (even by SIGKILL) is noticed at once. The core's outputs already sent are delivered first; then
  every request in flight on that core ends with `EngineError` (code `engine_core_died`, HTTP
  500 / an SSE error event), its shared-memory segments are unlinked, and its counters are kept in
  `stats()` so they do not go backwards.
* `running` is False while no core is alive; `check_admission` answers 503 meanwhile (with data
  parallelism the surviving cores keep serving).
* The client restarts a dead core in the background, after a back-off of 0.25 s, 0.5 s, 1 s, …
  (at most 30 s). A core is restarted at most `max_core_restarts` times in a row (a core that
  stayed up for 10 minutes starts a fresh count); when one more is needed, or a restart fails as
  often, the client gives up: `dead` is set and `running` stays False, so the server can exit
  non-zero for its supervisor to restart it.
* Cores die with the client: each watches its parent's sentinel and exits when the API process
  dies; `shutdown` stops them (then terminates, then kills stragglers) and unlinks every segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from multiprocessing.process import BaseProcess
from typing import Any

import zmq

from glmv.engine.config import EngineConfig
from glmv.engine.core_proc import run_core
from glmv.engine.info import EngineInfo
from glmv.engine.messages import (
    Abort,
    AddRequest,
    CoreOutputs,
    Ready,
    Shutdown,
    StartFailed,
    StopSeqs,
    client_decoder,
    encoder,
    to_error,
)
from glmv.engine.output_processor import OutputProcessor
from glmv.engine.request import EngineRequest, RequestOutput, merge_outputs, validate_request
from glmv.engine.router import PrefixRouter, prompt_block_hashes
from glmv.engine.shm import pack_images, release
from glmv.engine.stats import COUNTERS, EngineStats, sum_stats
from glmv.errors import EngineError, GlmvError, OverloadedError
from glmv.timeline import Timeline, timeline

log = logging.getLogger("glmv.engine")

START_TIMEOUT_S = 900.0  # loading a large checkpoint and capturing CUDA graphs takes minutes
HEALTHY_AFTER_S = 600.0  # a core up this long has its restart count reset
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 30.0

Sink = asyncio.Queue[RequestOutput | GlmvError]
_Batch = dict[asyncio.AbstractEventLoop, list[tuple[Sink, "RequestOutput | GlmvError"]]]


def _put_all(items: list[tuple[Sink, RequestOutput | GlmvError]]) -> None:
    for sink, item in items:
        sink.put_nowait(item)


@dataclass(slots=True)
class _Entry:
    core: int
    sink: Sink
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class _Core:
    index: int
    process: BaseProcess | None = None
    commands: zmq.Socket[Any] | None = None  # PUSH, sent to under the client's lock
    outputs: zmq.Socket[Any] | None = None  # PULL, read by the I/O thread
    alive: bool = False
    started_at: float = 0.0
    restarts: int = 0  # restarts in a row
    stats: EngineStats = field(default_factory=EngineStats.empty)
    requests: set[str] = field(default_factory=set)
    segments: dict[str, shared_memory.SharedMemory] = field(default_factory=dict)
    restarting: threading.Thread | None = None


def _address(tag: str) -> str:
    """A fresh local ZeroMQ address: the abstract namespace on Linux (no file to leave behind)."""
    name = f"glmv-{os.getpid()}-{tag}-{secrets.token_hex(6)}"
    if sys.platform.startswith("linux"):
        return f"ipc://@{name}"
    import tempfile

    return f"ipc://{os.path.join(tempfile.gettempdir(), name)}"


class MPEngineClient:
    """The `EngineClient` of process mode; see the module docstring."""

    def __init__(self, config: EngineConfig, *, tokenizer: Any = None) -> None:
        self.config = config
        if tokenizer is None:
            from glmv.processing.loader import load_tokenizer

            tokenizer = load_tokenizer(config.model)
        self.tokenizer = tokenizer
        n = config.data_parallel_size
        self.max_pending = n * (config.max_num_seqs + config.max_waiting)
        self.dead: BaseException | None = None
        self.info: EngineInfo = None  # type: ignore[assignment]  # set by start()
        self._processor = OutputProcessor(tokenizer)
        self._router: PrefixRouter | None = None
        self._cores = [_Core(i) for i in range(n)]
        self._entries: dict[str, _Entry] = {}
        self._pending = 0
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)  # notified when a request leaves
        self._zmq = zmq.Context()
        self._encoder = encoder()
        self._decoder = client_decoder()
        self._mp = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._control: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        self._io: threading.Thread | None = None
        self._retired = EngineStats.empty()  # counters of cores that died, so sums never go back
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every core and wait for their handshakes (raises the first start-up error)."""
        if self._started:
            return
        self._started = True
        launched = [self._launch(core.index) for core in self._cores]
        try:
            ready = [self._handshake(*item) for item in launched]
        except BaseException:
            for proc, commands, outputs in launched:
                self._discard(proc, commands, outputs)
            self._close_zmq()
            raise
        self.info = ready[0][0]
        for core, (proc, commands, outputs), (_, stats) in zip(self._cores, launched, ready, strict=True):
            self._install(core, proc, commands, outputs, stats)
        blocks = self.info.num_blocks
        self._router = PrefixRouter(len(self._cores), self.info.block_size, capacity=max(blocks, 1024))
        self._io = threading.Thread(target=self._io_loop, name="glmv-engine-client", daemon=True)
        self._io.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Let requests in flight finish (up to `timeout`), stop the cores, release everything."""
        if self._stopping.is_set():
            return
        deadline = time.monotonic() + timeout
        with self._lock:
            self._stopping.set()
            while self._entries and self.running and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))
            for core in self._cores:
                if core.alive:
                    self._send(core, Shutdown())
        for core in self._cores:
            thread = core.restarting
            if thread is not None:
                thread.join(timeout)
        for core in self._cores:
            if core.process is not None:
                core.process.join(max(0.5, deadline - time.monotonic()))
        self._wake("stop")
        if self._io is not None:
            self._io.join(timeout)
        with self._lock:
            for core in self._cores:
                self._fail_requests(core, EngineError("The engine shut down before the request finished."))
                self._discard(core.process, core.commands, core.outputs)
                core.process = core.commands = core.outputs = None
                core.alive = False
        self._close_zmq()

    def _close_zmq(self) -> None:
        self._zmq.term()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def running(self) -> bool:
        return self.dead is None and not self._stopping.is_set() and any(c.alive for c in self._cores)

    @property
    def num_pending(self) -> int:
        return self._pending

    @property
    def pids(self) -> list[int | None]:
        """Process id of each core (None while it is down)."""
        return [c.process.pid if c.process is not None and c.alive else None for c in self._cores]

    def core_stats(self) -> list[EngineStats]:
        with self._lock:
            return [dataclasses.replace(c.stats) for c in self._cores]

    def stats(self) -> EngineStats:
        with self._lock:
            total = sum_stats([c.stats for c in self._cores])
            for name in COUNTERS:
                setattr(total, name, getattr(total, name) + getattr(self._retired, name))
            return total

    @property
    def router(self) -> PrefixRouter | None:
        return self._router

    # --- starting a core ------------------------------------------------------------------------

    def _launch(self, index: int) -> tuple[BaseProcess, zmq.Socket[Any], zmq.Socket[Any]]:
        cmd_addr, out_addr = _address(f"in{index}"), _address(f"out{index}")
        outputs = self._zmq.socket(zmq.PULL)
        outputs.setsockopt(zmq.LINGER, 0)
        outputs.bind(out_addr)
        commands = self._zmq.socket(zmq.PUSH)
        commands.setsockopt(zmq.LINGER, 0)
        commands.setsockopt(zmq.SNDHWM, 0)
        # Connecting (not binding) queues commands until the core has bound its end.
        commands.connect(cmd_addr)
        proc = self._mp.Process(
            target=run_core,
            args=(self.config, index, cmd_addr, out_addr),
            name=f"glmv-engine-core-{index}",
            daemon=True,
        )
        proc.start()
        return proc, commands, outputs

    def _handshake(
        self, proc: BaseProcess, commands: zmq.Socket[Any], outputs: zmq.Socket[Any]
    ) -> tuple[EngineInfo, EngineStats]:
        """Wait for the core's `Ready` (its info and stats); raise its start-up error."""
        poller = zmq.Poller()
        poller.register(outputs, zmq.POLLIN)
        poller.register(proc.sentinel, zmq.POLLIN)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineError(f"the engine core did not start within {START_TIMEOUT_S:.0f} s")
            events = dict(poller.poll(min(left, 1.0) * 1000))
            if outputs in events:
                msg = self._decoder.decode(outputs.recv())
                if isinstance(msg, Ready):
                    info = dict(msg.info)
                    info["eos_token_ids"] = tuple(info["eos_token_ids"])
                    return EngineInfo(**info), msg.stats
                if isinstance(msg, StartFailed):
                    log.debug("engine core failed to start:\n%s", msg.traceback)
                    raise to_error(msg.error)
            elif proc.sentinel in events or not proc.is_alive():
                proc.join(1.0)
                raise EngineError(f"the engine core exited with status {proc.exitcode} while starting")

    def _install(
        self,
        core: _Core,
        proc: BaseProcess,
        commands: zmq.Socket[Any],
        outputs: zmq.Socket[Any],
        stats: EngineStats,
    ) -> None:
        if core.process is not None and core.process is not proc:
            with contextlib.suppress(ValueError):
                core.process.close()  # the dead one's sentinel
        core.process, core.commands, core.outputs = proc, commands, outputs
        core.alive = True
        core.started_at = time.monotonic()
        core.stats = stats

    def _discard(
        self, proc: BaseProcess | None, commands: zmq.Socket[Any] | None, outputs: zmq.Socket[Any] | None
    ) -> None:
        for sock in (commands, outputs):
            if sock is not None:
                sock.close(linger=0)
        if proc is not None:
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
            with contextlib.suppress(ValueError):
                proc.close()

    # --- requests -------------------------------------------------------------------------------

    def check_admission(self) -> None:
        """Raise `OverloadedError` when no request can be taken now (cheap)."""
        if self._stopping.is_set():
            raise OverloadedError("The server is shutting down.", retry_after=5)
        if not self.running:
            raise OverloadedError("The engine is not running.", retry_after=5)
        if self._pending >= self.max_pending:
            raise OverloadedError(
                f"The server is at capacity ({self._pending} requests in flight); retry shortly.",
                retry_after=1,
            )

    def validate(self, request: EngineRequest) -> None:
        validate_request(
            request,
            max_model_len=self.info.max_model_len,
            vocab_size=self.info.vocab_size,
            image_token_id=self.info.image_token_id,
            max_sequences=self.config.max_waiting,
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Yield incremental outputs until the request finishes; closing the iterator aborts it."""
        self.check_admission()
        self.validate(request)
        loop = asyncio.get_running_loop()
        sink: Sink = asyncio.Queue()
        self._submit(request, sink, loop)
        finished = False
        try:
            while True:
                item = await sink.get()
                if isinstance(item, GlmvError):
                    finished = True
                    raise item
                # A consumer that fell behind takes everything already queued as one output.
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
                self.abort(request.request_id)

    def _submit(self, request: EngineRequest, sink: Sink, loop: asyncio.AbstractEventLoop) -> None:
        rid = request.request_id
        trace = timeline()
        if trace is not None:
            trace.mark(rid, "submit")
        segment, metas = pack_images(request.images) if request.images else (None, [])
        hashes = prompt_block_hashes(request, self.info.block_size) if len(self._cores) > 1 else []
        msg = AddRequest(
            rid,
            list(request.prompt_token_ids),
            request.params,
            request.arrival_time,
            metas,
            segment.name if segment is not None else None,
        )
        with self._lock:
            try:
                if rid in self._entries:
                    from glmv.errors import InvalidRequestError

                    raise InvalidRequestError(f"Duplicate request id {rid!r}.")
                loads = [len(c.requests) if c.alive else None for c in self._cores]
                if not any(load is not None for load in loads):
                    raise OverloadedError("The engine is not running.", retry_after=5)
                assert self._router is not None
                index = self._router.choose(hashes, loads) if len(self._cores) > 1 else 0
                core = self._cores[index]
                self._send(core, msg)
            except BaseException:
                if segment is not None:
                    release(segment)
                raise
            self._router.record(index, hashes)
            if segment is not None:
                core.segments[rid] = segment
            self._entries[rid] = _Entry(index, sink, loop)
            core.requests.add(rid)
            self._processor.add(request)
            self._pending += 1
        if trace is not None:
            trace.mark(rid, "sent")

    def abort(self, request_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(request_id, None)
            self._processor.abort(request_id)
            if entry is None:
                return
            core = self._cores[entry.core]
            core.requests.discard(request_id)
            self._idle.notify_all()
            if core.alive:
                self._send(core, Abort([request_id]))

    def _send(self, core: _Core, msg: Any) -> None:
        """Queue a command for a core (caller holds the lock)."""
        assert core.commands is not None
        core.commands.send(self._encoder.encode(msg), flags=zmq.NOBLOCK, copy=False)

    def _deliver(
        self, request_id: str, item: RequestOutput | GlmvError, batch: _Batch | None = None
    ) -> None:
        """Hand an output or error to the request's generator (caller holds the lock); with
        `batch`, collect it there for `_post` to hand over with the rest of a core message."""
        entry = self._entries.get(request_id)
        if entry is None:
            return
        if isinstance(item, GlmvError) or item.finished:
            del self._entries[request_id]
            self._cores[entry.core].requests.discard(request_id)
            self._processor.abort(request_id)
            self._idle.notify_all()
        if batch is not None:
            batch.setdefault(entry.loop, []).append((entry.sink, item))
            return
        with contextlib.suppress(RuntimeError):  # the loop may be closed during shutdown
            entry.loop.call_soon_threadsafe(entry.sink.put_nowait, item)

    @staticmethod
    def _post(batch: _Batch) -> None:
        """One wake-up per event loop for all of a core message's outputs, not one per request
        (64 requests in a step were 64 callbacks and 64 writes to the loop's self-pipe)."""
        for loop, items in batch.items():
            with contextlib.suppress(RuntimeError):  # the loop may be closed during shutdown
                loop.call_soon_threadsafe(_put_all, items)

    # --- the I/O thread -------------------------------------------------------------------------

    def _wake(self, what: str) -> None:
        self._control.put(what)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _io_loop(self) -> None:
        try:
            self._io_run()
        except BaseException as exc:  # a bug here must not leave requests hanging
            log.exception("engine client I/O thread crashed")
            self.dead = exc
            with self._lock:
                for core in self._cores:
                    self._fail_requests(core, EngineError(f"the engine client stopped: {exc}"))

    def _io_run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        watched: dict[Any, tuple[str, _Core]] = {}

        def refresh() -> None:
            for key in list(watched):
                poller.unregister(key)
                del watched[key]
            with self._lock:
                for core in self._cores:
                    if core.alive and core.outputs is not None and core.process is not None:
                        watched[core.outputs] = ("outputs", core)
                        watched[core.process.sentinel] = ("sentinel", core)
            for key in watched:
                poller.register(key, zmq.POLLIN)

        refresh()
        while True:
            events = poller.poll()
            changed = False
            for key, _ in events:
                if key == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                    while True:
                        try:
                            what = self._control.get_nowait()
                        except queue.Empty:
                            break
                        if what == "stop":
                            return
                        changed = True  # a core came back
                    continue
                kind, core = watched.get(key, ("", None))  # type: ignore[assignment]
                if core is None or not core.alive:
                    continue
                if kind == "outputs":
                    self._drain(core)
                else:
                    self._core_died(core)
                    changed = True
            if changed:
                refresh()

    def _drain(self, core: _Core) -> None:
        """Handle every message the core has sent."""
        sock = core.outputs
        assert sock is not None
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = self._decoder.decode(frame.buffer)
            if isinstance(msg, CoreOutputs):
                self._handle(core, msg)

    def _handle(self, core: _Core, msg: CoreOutputs) -> None:
        with self._lock:
            core.stats = msg.stats
            for rid in msg.consumed:
                segment = core.segments.pop(rid, None)
                if segment is not None:
                    release(segment)
            batch: _Batch = {}
            for failed in msg.failed:
                self._deliver(failed.request_id, to_error(failed.error), batch)
            if msg.outputs:
                results, stops = self._processor.process(msg.outputs)
                trace = timeline()
                if trace is not None:
                    _trace_outputs(trace, results)
                for out in results:
                    self._deliver(out.request_id, out, batch)
                if stops and core.alive:
                    self._send(core, StopSeqs(stops))
            self._post(batch)

    # --- failure and restart --------------------------------------------------------------------

    def _fail_requests(self, core: _Core, error: GlmvError) -> None:
        for rid in list(core.requests):
            self._deliver(rid, error)
        core.requests.clear()
        for segment in core.segments.values():
            release(segment)
        core.segments.clear()

    def _core_died(self, core: _Core) -> None:
        proc = core.process
        assert proc is not None
        proc.join(1.0)
        code = proc.exitcode
        self._drain(core)  # what it said before it died still counts
        with self._lock:
            core.alive = False
            error = EngineError(
                f"The engine core {core.index} stopped (exit status {code}) before the request finished.",
                code="engine_core_died",
            )
            self._fail_requests(core, error)
            for name in COUNTERS:
                setattr(self._retired, name, getattr(self._retired, name) + getattr(core.stats, name))
            core.stats = EngineStats.empty(core.stats.num_blocks)
            if self._router is not None:
                self._router.forget(core.index)
            self._discard(None, core.commands, core.outputs)
            core.commands = core.outputs = None
            if self._stopping.is_set():
                return
            if time.monotonic() - core.started_at >= HEALTHY_AFTER_S:
                core.restarts = 0
            log.error("engine core %d (pid %s) died with exit status %s", core.index, proc.pid, code)
            self._schedule_restart(core)

    def _schedule_restart(self, core: _Core) -> None:
        """Restart `core` in the background, or give up (caller holds the lock)."""
        if core.restarts >= self.config.max_core_restarts:
            self.dead = EngineError(
                f"The engine core {core.index} failed {core.restarts + 1} times in a row; not restarting it.",
                code="engine_core_died",
            )
            log.error("%s", self.dead)
            return
        core.restarts += 1
        delay = min(BACKOFF_FIRST_S * 2 ** (core.restarts - 1), BACKOFF_MAX_S)
        core.restarting = threading.Thread(
            target=self._restart, args=(core, delay), name=f"glmv-core-restart-{core.index}", daemon=True
        )
        core.restarting.start()

    def _restart(self, core: _Core, delay: float) -> None:
        if self._stopping.wait(delay):
            return
        log.warning("restarting engine core %d (restart %d in a row)", core.index, core.restarts)
        launched = None
        try:
            launched = self._launch(core.index)
            _, stats = self._handshake(*launched)
        except BaseException as exc:
            if launched is not None:
                self._discard(*launched)
            log.error("engine core %d did not restart: %s", core.index, exc)
            with self._lock:
                if not self._stopping.is_set():
                    self._schedule_restart(core)
            return
        with self._lock:
            if self._stopping.is_set():
                self._discard(*launched)
                return
            self._install(core, *launched, stats)
        log.warning("engine core %d is back (pid %s)", core.index, launched[0].pid)
        self._wake("core")


def _trace_outputs(trace: Timeline, results: list[RequestOutput]) -> None:
    """The core's own marks of each request, and when its outputs reached this process."""
    now = time.monotonic()
    for out in results:
        rid = out.request_id
        if out.first_scheduled_time is not None:
            trace.mark(rid, "scheduled", out.first_scheduled_time)
        if out.first_token_time is not None:
            trace.mark(rid, "core_first_token", out.first_token_time)
        if any(d.token_ids for d in out.deltas):
            trace.mark(rid, "io_first_token", now)
            trace.set(rid, "io_last_token", now)
            trace.add(rid, "io_outputs")
