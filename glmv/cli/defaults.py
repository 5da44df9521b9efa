"""Where the embedded default checkpoint lives, and creating it on first use."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DEFAULT_VARIANT = "glm41v"


def cache_dir() -> Path:
    base = os.environ.get("GLMV_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glmv" if "GLMV_CACHE_DIR" not in os.environ else Path(base)


def default_model_dir() -> Path:
    """The embedded tiny checkpoint, created once (seeded) under the user's cache directory."""
    from glmv.models.tiny import create_tiny_model

    path = cache_dir() / f"tiny-{DEFAULT_VARIANT}"
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        create_tiny_model(tmp, variant=DEFAULT_VARIANT, seed=0)
        if path.exists():
            shutil.rmtree(path)
        tmp.replace(path)
    return path
