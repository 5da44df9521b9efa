"""The one configuration object of the application layer: `ServiceConfig`.

It holds the engine's own `EngineConfig` (checkpoint, memory, batching, engine mode, data
parallelism) and what the service itself needs: a chat-template override, the image limits and
remote-image policy that every image passes, and the size of the image-decoding process pool.
`glmv serve` builds it from its settings in one place (`Settings.service_config()`); the offline
`LLM` and `glmv extract` build it from their arguments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# The engine's configuration module is pure Python: `glmv serve --help` needs no torch.
from glmv.engine.config import QUANTIZATIONS, EngineConfig
from glmv.processing.media import ImageLimits, RemoteImagePolicy

__all__ = ["QUANTIZATIONS", "EngineConfig", "ServiceConfig", "default_image_workers"]


def default_image_workers() -> int:
    """Image-decoding processes when none are configured: half the CPUs, 1 to 8 (the other half
    is left to the event loop, the tokenizer and, on a CPU-only machine, the engine)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass(slots=True)
class ServiceConfig:
    engine: EngineConfig
    chat_template: str | None = None  # a .jinja file, template text or a built-in name
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    remote_images: RemoteImagePolicy = field(default_factory=RemoteImagePolicy)
    # Processes that decode and resize images; None: `default_image_workers()`; 0: no processes,
    # a worker thread of this process does it (tests, debugging).
    image_workers: int | None = None

    @property
    def model(self) -> str:
        return str(self.engine.model)

    def resolved_image_workers(self) -> int:
        return default_image_workers() if self.image_workers is None else max(0, int(self.image_workers))
