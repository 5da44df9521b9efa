"""`ScriptedClient`: an `EngineClient` that answers from a script instead of running a model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from glmv.engine.client import EngineInfo, EngineStats
from glmv.engine.request import CompletionDelta, EngineRequest, RequestOutput, TokenLogprob
from glmv.errors import OverloadedError

# A step: a text delta (with its token ids and logprobs), an exception to raise, or an event to wait for.
Step = tuple[str, list[int], list[TokenLogprob] | None] | BaseException | asyncio.Event


def info_for(model_dir: Path, max_model_len: int = 2048) -> EngineInfo:
    return EngineInfo(
        model_dir=str(model_dir),
        model_type="glm4v",
        device="cpu",
        max_model_len=max_model_len,
        vocab_size=1 << 20,
        image_token_id=0,
        eos_token_ids=(),
        num_blocks=64,
        block_size=16,
    )


def _stats() -> EngineStats:
    return EngineStats(0, 0, 0.0, 64, 0, 0, 0, 0, 0)


class ScriptedClient:
    """Every choice of every request gets the script's deltas; the last one finishes with `finish`."""

    def __init__(self, model_dir: Path, script: list[Step], *, finish: str = "stop", max_pending: int = 8) -> None:
        self.info = info_for(model_dir)
        self.script = script
        self.finish = finish
        self.max_pending = max_pending
        self.dead: BaseException | None = None
        self.requests: list[EngineRequest] = []
        self.closed: list[str] = []  # request ids whose output iterator was closed
        self._closing = asyncio.Event()

    async def wait_closed(self, count: int) -> None:
        """Until `count` output iterators have been closed: the server may close one after the
        response's last bytes went out (a cancelled task runs its clean-up when next scheduled)."""
        while len(self.closed) < count:
            self._closing.clear()
            await asyncio.wait_for(self._closing.wait(), 60)

    @property
    def running(self) -> bool:
        return self.dead is None

    @property
    def num_pending(self) -> int:
        return 0

    def start(self) -> None:
        pass

    def shutdown(self, timeout: float = 5.0) -> None:
        pass

    def check_admission(self) -> None:
        if self.dead is not None:
            raise OverloadedError("The engine is not running.", retry_after=5)

    def validate(self, request: EngineRequest) -> None:
        pass

    def abort(self, request_id: str) -> None:
        self.closed.append(request_id)
        self._closing.set()

    def stats(self) -> EngineStats:
        return _stats()

    def core_stats(self) -> list[EngineStats]:
        return [_stats(), _stats()]

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.requests.append(request)
        texts = [s for s in self.script if isinstance(s, tuple)]
        produced = 0
        try:
            for step in self.script:
                if isinstance(step, BaseException):
                    raise step
                if isinstance(step, asyncio.Event):
                    await step.wait()
                    continue
                text, ids, logprobs = step
                produced += len(ids)
                last = step is texts[-1]
                yield RequestOutput(
                    request_id=request.request_id,
                    deltas=[
                        CompletionDelta(i, text, list(ids), logprobs, self.finish if last else None)
                        for i in range(request.params.n)
                    ],
                    prompt_tokens=len(request.prompt_token_ids),
                    cached_tokens=16,
                    completion_tokens=produced * request.params.n,
                    finished=last,
                    arrival_time=request.arrival_time,
                    first_scheduled_time=request.arrival_time + 0.25,
                )
        finally:
            self.closed.append(request.request_id)
            self._closing.set()
