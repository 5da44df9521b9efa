"""The one way the API process reaches an engine: the `EngineClient` surface and `start_engine`.

Everything above the engine (the service in `glmv.tasks`, hence the server, the offline `LLM`
and `glmv extract`) holds an `EngineClient` and nothing else of the engine: it submits
`EngineRequest`s and iterates `RequestOutput`s. Whether the engine core runs in this process (a
thread, for tests and debugging) or in its own process(es) is a choice of `start_engine`.
`EngineInfo` (from `info`) is what the front end may know about the served model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from glmv.engine.config import EngineConfig
from glmv.engine.info import EngineInfo
from glmv.engine.request import EngineRequest, RequestOutput
from glmv.engine.stats import EngineStats

__all__ = ["EngineClient", "EngineInfo", "EngineStats", "start_engine"]


class EngineClient(Protocol):
    """What the front end may call. Implemented by the in-process `AsyncEngine` and the
    multi-process client; both pass the same tests."""

    info: EngineInfo
    max_pending: int  # admitted-but-unfinished requests beyond which `check_admission` answers 503
    dead: BaseException | None  # set when the engine (or a core) died

    @property
    def running(self) -> bool: ...

    @property
    def num_pending(self) -> int: ...

    def start(self) -> None: ...

    def shutdown(self, timeout: float = 5.0) -> None: ...

    def check_admission(self) -> None:
        """Raise `OverloadedError` when the engine cannot take a request now (cheap)."""

    def validate(self, request: EngineRequest) -> None:
        """Raise a client error for a request that can never run (cheap, no side effects)."""

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Incremental outputs until the request finishes; closing the iterator aborts it."""

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats:
        """The engine's counters, summed over its cores."""

    def core_stats(self) -> list[EngineStats]:
        """Per core (one entry in-process)."""


def start_engine(config: EngineConfig, *, tokenizer: Any = None) -> EngineClient:
    """Load the model of `config` and start its engine; the caller owns (and shuts down) the client.

    `config.engine_mode` "process" starts `config.data_parallel_size` core processes behind an
    `MPEngineClient`; "inprocess" runs the core on a thread of this process (`AsyncEngine`).
    `tokenizer`: the checkpoint's tokenizer when the caller has already loaded it."""
    if config.engine_mode == "inprocess":
        from glmv.engine.async_engine import AsyncEngine
        from glmv.engine.engine import LLMEngine

        engine = AsyncEngine(LLMEngine(config, tokenizer=tokenizer))
        engine.start()
        return engine
    from glmv.engine.mp_client import MPEngineClient

    client = MPEngineClient(config, tokenizer=tokenizer)
    client.start()
    return client
