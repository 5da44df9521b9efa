"""`EngineConfig`: the one configuration object of the engine, from the settings down to the scheduler.

Every engine default is declared here once. The scheduler reads its limits from this object
directly, and the engine client reads how to run the core (`engine_mode`, `data_parallel_size`,
the restart policy). The module imports no torch, so the API process, the scheduler and the block
manager can use it without loading the model stack.

`engine_mode` defaults to the `GLMV_ENGINE_MODE` environment variable (`process` | `inprocess`,
else `process`), so a test run can switch every engine it starts between the two modes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from glmv.errors import ConfigError
from glmv.models.quant.methods import QUANTIZATIONS

ENGINE_MODES = ("process", "inprocess")
ENGINE_MODE_ENV = "GLMV_ENGINE_MODE"


def default_engine_mode() -> str:
    """`GLMV_ENGINE_MODE` if set (checked), else "process"."""
    raw = os.environ.get(ENGINE_MODE_ENV, "").strip().lower()
    if not raw:
        return "process"
    if raw not in ENGINE_MODES:
        raise ConfigError(
            f"{ENGINE_MODE_ENV}={raw!r} is not one of {', '.join(ENGINE_MODES)}.", param="engine_mode"
        )
    return raw


@dataclass(slots=True)
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str | None = None
    block_size: int = 16
    kv_cache_gb: float | None = None  # default: 0.5 GB on CPU, what is left of the GPU budget on a GPU
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory glmv may use in all
    gpu_memory_gb: float | None = None  # or an absolute cap, e.g. 24 for a 24 GB card
    enable_cuda_graphs: bool = True
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the model's own limit (capped by the KV cache)
    max_waiting: int = 1024
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # Schedule and launch step N+1 while step N still runs on the device; the sampled ids of step
    # N feed step N+1 there. Outputs are the same as with it off (synchronous: each step's results
    # are applied before the next one is scheduled). Steps that need the previous token on the
    # host (structured output, penalties) run synchronously either way. None: see
    # `uses_async_scheduling`.
    async_scheduling: bool | None = None
    encoder_cache_mb: int = 512
    seed: int | None = None
    # "fp8": the large linear layers get per-channel FP8 weights at load (GPUs with FP8 tensor
    # cores; a float reference path elsewhere). INT4 checkpoints say so in their own config.
    quantization: str | None = None
    # Let PyTorch's attention (vision tower, prefill) use cuDNN's kernels on CUDA. Off by default:
    # cuDNN builds an execution plan on the CPU for every new (batch, length) shape, hundreds of
    # milliseconds each, and prompt lengths, chunk boundaries and image sizes change all the time.
    # Flash / memory-efficient attention need no plan.
    cudnn_attention: bool = False
    # "process": the scheduler, runner and sampler run in their own process(es), reached over
    # ZeroMQ; "inprocess": on a thread of this process (tests, debugging).
    engine_mode: str = field(default_factory=default_engine_mode)
    # Engine cores behind one client (process mode): one per GPU on a GPU machine.
    data_parallel_size: int = 1
    # A core process that dies is restarted at most this many times in a row (see mp_client).
    max_core_restarts: int = 3

    def uses_async_scheduling(self, device_type: str) -> bool:
        """Whether the engine on a `device_type` device schedules asynchronously: as configured,
        else on for CUDA and off elsewhere. On the CPU the kernels run on the engine's own thread,
        so nothing would overlap and every step's tokens would only arrive one step later."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return device_type == "cuda"

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "data_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.", param=name)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(
                f"max_model_len must be >= 1, got {self.max_model_len!r}.", param="max_model_len"
            )
        for name in ("max_waiting", "max_core_restarts", "encoder_cache_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}.", param=name)
        if self.engine_mode not in ENGINE_MODES:
            raise ConfigError(
                f"engine_mode must be one of {', '.join(ENGINE_MODES)}, got {self.engine_mode!r}.",
                param="engine_mode",
            )
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}.",
                param="quantization",
            )
        if self.data_parallel_size > 1 and self.engine_mode != "process":
            raise ConfigError(
                "data_parallel_size > 1 needs engine_mode 'process' (one core process per replica).",
                param="data_parallel_size",
            )
