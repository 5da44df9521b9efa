"""glmv: a self-hosted, OpenAI-compatible server for the GLM vision-language models.

`glmv.LLM` and `glmv.SamplingParams` are the offline API (imported lazily: `import glmv` stays
cheap for the CLI).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from glmv.tasks.llm import LLM

        return LLM
    if name == "SamplingParams":
        from glmv.tasks.types import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'glmv' has no attribute {name!r}")
