"""glmv: a self-hosted, OpenAI-compatible server for the GLM vision-language models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
