"""Where the embedded default checkpoint lives.

The default is the demo model shipped in the package (`glmv/checkpoints/glmv-demo`, trained on
synthetic documents, see its README.md). Where that folder has no weights (a source tree without
them), the tiny random-weight checkpoint is created once (seeded) under the user's cache directory
instead, as before.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DEFAULT_VARIANT = "glm41v"
DEMO_MODEL_NAME = "glmv-demo"


def cache_dir() -> Path:
    base = os.environ.get("GLMV_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glmv" if "GLMV_CACHE_DIR" not in os.environ else Path(base)


def demo_model_dir() -> Path | None:
    """The shipped demo checkpoint, or None when its weights are not there."""
    path = Path(__file__).resolve().parents[1] / "checkpoints" / DEMO_MODEL_NAME
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return path if has_weights and (path / "config.json").is_file() else None


def tiny_model_dir() -> Path:
    """The tiny random-weight checkpoint, created once (seeded) under the user's cache directory."""
    from glmv.models.tiny import create_tiny_model

    path = cache_dir() / f"tiny-{DEFAULT_VARIANT}"
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        create_tiny_model(tmp, variant=DEFAULT_VARIANT, seed=0)
        if path.exists():
            shutil.rmtree(path)
        tmp.replace(path)
    return path


def default_model_dir() -> Path:
    """The checkpoint served when no --model is given: the demo model, else the tiny random one."""
    return demo_model_dir() or tiny_model_dir()
