"""`LLMEngine`: the synchronous in-process engine, requests in, text outputs out, one step at a time.

It is an `EngineCore` (scheduler, runner, sampler: token ids) followed by the front end's
`OutputProcessor` (detokenisation, stop strings, logprob texts), exactly the pipeline that the
multi-process client runs across two processes; a choice ended by a stop string is stopped in the
core within the same step. `AsyncEngine` drives it from a thread; the offline `LLM` and the tests
drive it directly.

`EngineConfig`, `EngineStats` and `MemoryReport` are re-exported here for older imports.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from glmv.engine.config import EngineConfig
from glmv.engine.core import EngineCore, MemoryReport
from glmv.engine.output_processor import OutputProcessor
from glmv.engine.request import EngineRequest, RequestOutput
from glmv.engine.stats import EngineStats
from glmv.models.base import ServedModel

if TYPE_CHECKING:
    from glmv.engine.block_manager import BlockManager
    from glmv.engine.encoder_cache import EncoderCache
    from glmv.engine.info import EngineInfo
    from glmv.engine.runner import ModelRunner
    from glmv.engine.scheduler import Scheduler
    from glmv.engine.structured import GrammarBackend

__all__ = ["EngineConfig", "EngineStats", "LLMEngine", "MemoryReport"]


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        *,
        model: ServedModel | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.core = EngineCore(config, model=model, tokenizer=tokenizer)
        self.output_processor = OutputProcessor(self.core.tokenizer)

    # --- the core's parts, for callers that look inside (tests, the offline API) ----------------

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def model(self) -> ServedModel:
        return self.core.model

    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def block_manager(self) -> BlockManager:
        return self.core.block_manager

    @property
    def encoder_cache(self) -> EncoderCache:
        return self.core.encoder_cache

    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def memory(self) -> MemoryReport | None:
        return self.core.memory

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.core.eos_token_ids

    @property
    def images_encoded(self) -> int:
        return self.core.images_encoded

    @property
    def preprocess_key(self) -> str:
        return self.core.preprocess_key

    def info(self) -> EngineInfo:
        return self.core.info()

    def grammar_backend(self) -> GrammarBackend:
        return self.core.grammar_backend()

    def stats(self) -> EngineStats:
        return self.core.stats()

    # --- requests -------------------------------------------------------------------------------

    def validate(self, request: EngineRequest) -> None:
        self.core.validate(request)

    def add_request(self, request: EngineRequest) -> None:
        self.core.add_request(request)  # may raise; then nothing is registered
        self.output_processor.add(request)

    def abort(self, request_id: str) -> bool:
        self.output_processor.abort(request_id)
        return self.core.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    @property
    def num_requests(self) -> int:
        return self.core.num_requests

    def step(self) -> list[RequestOutput]:
        outputs, stops = self.output_processor.process(self.core.step())
        for request_id, index in stops:
            self.core.stop_seq(request_id, index)
        return outputs

    def run_until_done(self, request_ids: Iterable[str] | None = None) -> None:
        wanted = set(request_ids) if request_ids is not None else None
        while self.has_unfinished() and (wanted is None or any(r in self.output_processor for r in wanted)):
            self.step()
