"""`EngineStats`: one engine core's counters and gauges, as `/metrics` and the router read them.

A client with several cores reports one `EngineStats` per core (`core_stats()`) and their sum
(`stats()`, `sum_stats`). Pure Python: the API process reads these without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # share of the KV blocks in use (0..1)
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    encoder_cache_hits: int
    encoder_cache_misses: int
    images_encoded: int
    num_generated_tokens: int = 0  # tokens sampled over the core's life (all choices)
    kernel_builds: int = 0  # GPU kernels built in the core's process after its start-up (0 is right)

    @classmethod
    def empty(cls, num_blocks: int = 0) -> EngineStats:
        return cls(0, 0, 0.0, num_blocks, 0, 0, 0, 0, 0)


# Counters only grow over a core's life; the rest are gauges of the moment.
COUNTERS = (
    "prefix_cache_queries",
    "prefix_cache_hits",
    "encoder_cache_hits",
    "encoder_cache_misses",
    "images_encoded",
    "num_generated_tokens",
    "kernel_builds",
)


def sum_stats(parts: list[EngineStats]) -> EngineStats:
    """Counts and gauges added up; `kv_usage` is the share of all cores' blocks in use."""
    total = EngineStats.empty()
    used = 0.0
    for part in parts:
        for f in fields(EngineStats):
            if f.name != "kv_usage":
                setattr(total, f.name, getattr(total, f.name) + getattr(part, f.name))
        used += part.kv_usage * part.num_blocks
    total.kv_usage = used / total.num_blocks if total.num_blocks else 0.0
    return total
