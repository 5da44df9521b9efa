"""`EngineInfo`: what the front end may know about the served model without touching it.

A leaf of the engine package, so the core (which reports it) and the clients (which hand it up)
share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """Facts about the served model and the core's capacity, fixed once the core has started."""

    model_dir: str
    model_type: str
    device: str  # "cpu" / "cuda"
    max_model_len: int
    vocab_size: int
    image_token_id: int
    eos_token_ids: tuple[int, ...]
    num_blocks: int
    block_size: int
    memory: str | None = None  # the core's memory report (GPU), one line
    startup: str | None = None  # the core's start-up report (phases, kernels built), one line
    startup_seconds: float = 0.0  # the core's start-up, weights to ready
