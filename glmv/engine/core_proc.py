"""The engine core process: `run_core` is the target that the client spawns, once per core.

Start-up: watch the parent (if the API process dies, so does the core: no orphans), connect the two
ZeroMQ sockets, load the model into an `EngineCore` (on `cuda:<index>` when the machine has GPUs)
and answer the handshake with `Ready` (the core's `EngineInfo`) or `StartFailed` (the load error,
which the client raises as the same exception class).

Then the busy loop: take every command that has arrived (blocking only while idle), run one step
(schedule → execute → update), send one `CoreOutputs` message with the step's token outputs, the
requests whose images were copied out of shared memory, the requests refused on arrival and the
core's stats. The loop exits on `Shutdown`; an unexpected exception ends the process with a
non-zero status, which the client sees as a dead core.

This module imports nothing heavy at import time: the spawned interpreter loads torch and the
model code only inside `run_core`.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from glmv.engine.config import EngineConfig
from glmv.engine.messages import (
    Abort,
    AddFailed,
    AddRequest,
    CoreOutputs,
    Ready,
    Shutdown,
    StartFailed,
    StopSeqs,
    core_decoder,
    encoder,
    error_info,
)
from glmv.timeline import Timeline, timeline

if TYPE_CHECKING:
    import zmq

    from glmv.engine.core import EngineCore
    from glmv.engine.request import EngineRequest

log = logging.getLogger("glmv.engine.core")


def _watch_parent() -> None:
    """Exit at once when the process that spawned this one dies (its sentinel becomes readable)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        from multiprocessing.connection import wait

        wait([sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="glmv-parent-watch", daemon=True).start()


def core_device(config: EngineConfig, index: int) -> str | None:
    """The device of core `index`: `cuda:<index>` on a GPU machine (each core its own GPU), else
    the configured device (all cores share the CPU)."""
    import torch

    wanted = config.device
    if wanted is not None and not wanted.startswith("cuda"):
        return wanted
    if wanted is None and not torch.cuda.is_available():
        return None
    if config.data_parallel_size == 1 and wanted is not None and ":" in wanted:
        return wanted  # one core on the GPU the user named
    count = torch.cuda.device_count()
    if index >= count:
        from glmv.errors import ConfigError

        raise ConfigError(
            f"data_parallel_size {config.data_parallel_size} needs one GPU per core; this machine "
            f"has {count}.",
            param="data_parallel_size",
        )
    torch.cuda.set_device(index)  # Triton launches and CUDA graphs use the current device
    return f"cuda:{index}"


class CoreLoop:
    """Receive commands → step → send outputs, until `Shutdown`."""

    def __init__(self, core: EngineCore, inbox: zmq.Socket[Any], outbox: zmq.Socket[Any]) -> None:
        self.core = core
        self.inbox = inbox
        self.outbox = outbox
        self.decoder = core_decoder()
        self.encoder = encoder()
        self.consumed: list[str] = []
        self.failed: list[AddFailed] = []
        self.stopping = False

    def run(self) -> None:
        trace = timeline()
        while not self.stopping:
            t_wait = time.monotonic() if trace is not None else 0.0
            idle = not self.core.has_unfinished()
            handled = self.receive(block=idle)
            if self.stopping:
                break
            t_step = time.monotonic() if trace is not None else 0.0
            stepped = self.core.has_unfinished()
            outputs = self.core.step() if stepped else []
            t_send = time.monotonic() if trace is not None else 0.0
            if outputs or handled or self.consumed or self.failed:
                self.outbox.send(
                    self.encoder.encode(CoreOutputs(outputs, self.core.stats(), self.consumed, self.failed)),
                    copy=False,
                )
                self.consumed, self.failed = [], []
            if trace is not None:
                self.trace_step(trace, t_wait, t_step, t_send, handled, idle, stepped, len(outputs))

    def trace_step(
        self,
        trace: Timeline,
        t_wait: float,
        t_step: float,
        t_send: float,
        handled: int,
        idle: bool,
        stepped: bool,
        outputs: int,
    ) -> None:
        """One loop iteration's line: waiting for (`idle`: blocking) and handling commands
        [t_wait, t_step), the step [t_step, t_send), sending [t_send, end); the shape of the step
        it launched."""
        scheduled = self.core.last_scheduled if stepped else None
        record = {
            "kind": "step",
            "pid": os.getpid(),
            "t_wait": t_wait,
            "t_step": t_step,
            "t_send": t_send,
            "t_end": time.monotonic(),
            "commands": handled,
            "idle": idle,
            "outputs": outputs,
            "running": self.core.scheduler.num_running,
            "waiting": self.core.scheduler.num_waiting,
        }
        if scheduled is not None:
            record.update(scheduled.shape())
        trace.write(record)

    def receive(self, *, block: bool) -> int:
        """Handle every command that has arrived (waiting for the first one when `block`)."""
        import zmq

        handled = 0
        while True:
            try:
                frame = self.inbox.recv(0 if block and not handled else zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return handled
            self.handle(self.decoder.decode(frame.buffer))
            handled += 1
            if self.stopping:
                return handled

    def handle(self, msg: Any) -> None:
        if isinstance(msg, AddRequest):
            try:
                self.core.add_request(self.request(msg))
            except Exception as exc:  # refused: the client raises it as the same error class
                self.failed.append(AddFailed(msg.request_id, error_info(exc)))
        elif isinstance(msg, Abort):
            for request_id in msg.request_ids:
                self.core.abort(request_id)
        elif isinstance(msg, StopSeqs):
            for request_id, index in msg.seqs:
                self.core.stop_seq(request_id, index)
        elif isinstance(msg, Shutdown):
            self.stopping = True

    def request(self, msg: AddRequest) -> EngineRequest:
        from glmv.engine.request import EngineRequest
        from glmv.engine.shm import unpack_images

        try:
            images = unpack_images(msg.shm_name, msg.images) if msg.images else []
        finally:
            if msg.shm_name is not None:
                self.consumed.append(msg.request_id)  # the client may unlink the segment now
        return EngineRequest(
            msg.request_id, msg.prompt_token_ids, msg.params, images, arrival_time=msg.arrival_time
        )


def share_cpu_threads(config: EngineConfig, device: str | None) -> None:
    """Cores that share the CPU split its threads: N cores each running all of them only thrash."""
    import torch

    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if on_cpu and config.data_parallel_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.data_parallel_size))


def run_core(config: EngineConfig, index: int, input_address: str, output_address: str) -> None:
    """Entry point of a core process (the spawn target)."""
    _watch_parent()
    import zmq

    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.bind(input_address)
    outbox = ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)
    outbox.connect(output_address)
    enc = encoder()
    status = 0
    try:
        try:
            from glmv.engine.core import EngineCore

            device = core_device(config, index)
            share_cpu_threads(config, device)
            core = EngineCore(dataclasses.replace(config, device=device))
        except BaseException as exc:
            outbox.send(enc.encode(StartFailed(error_info(exc), traceback.format_exc())))
            status = 1
            return
        outbox.send(enc.encode(Ready(info=asdict(core.info()), stats=core.stats())))
        # Structured output's token tables, built while the first requests are still on their way.
        threading.Thread(target=_warm_up, args=(core,), name="glmv-grammar-warm-up", daemon=True).start()
        CoreLoop(core, inbox, outbox).run()
    except BaseException:
        log.exception("engine core %d crashed", index)
        status = 1
    finally:
        inbox.close(linger=0)
        outbox.close(linger=2000)  # let the last message (e.g. StartFailed) reach the client
        ctx.term()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # Nothing of this process needs tearing down (the client owns every shared resource);
        # skipping the interpreter's teardown of torch saves a second or more per core.
        os._exit(status)


def _warm_up(core: EngineCore) -> None:
    try:
        core.grammar_backend()
    except Exception:  # structured requests will report it themselves
        log.debug("structured-output warm-up failed", exc_info=True)
