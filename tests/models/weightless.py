"""A weightless random-init copy of a checkpoint folder, as `create-tiny-model --variant full` writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def weightless_copy(src: Path, dst: Path, seed: int) -> Path:
    """`src` copied to `dst` without its safetensors, `glmv_random_init` set in its config."""
    shutil.copytree(src, dst)
    for weights in dst.glob("*.safetensors"):
        weights.unlink()
    config = json.loads((dst / "config.json").read_text())
    config["glmv_random_init"] = {"seed": seed, "branch_scale": 0.2}
    (dst / "config.json").write_text(json.dumps(config))
    return dst
