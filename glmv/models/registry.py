"""Which native model class serves a checkpoint, chosen by its `config.json` `model_type`."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from glmv.errors import CheckpointError, ConfigError
from glmv.models.base import ServedModel
from glmv.models.quant.methods import QUANTIZATIONS

Loader = Callable[..., Any]
log = logging.getLogger("glmv.models")


def _load_glm4v(
    path: Path, dtype: str | torch.dtype | None, device: str | torch.device | None
) -> ServedModel:
    from glmv.models.loader import load_model as load_glm4v

    return load_glm4v(path, dtype=dtype, device=device)  # type: ignore[return-value]


def _load_chatglm(
    path: Path, dtype: str | torch.dtype | None, device: str | torch.device | None
) -> ServedModel:
    from glmv.models.glm4v_9b import load_glm4v_9b

    return load_glm4v_9b(path, dtype=dtype, device=device)  # type: ignore[return-value]


LOADERS: dict[str, Loader] = {"glm4v": _load_glm4v, "chatglm": _load_chatglm}


def register(model_type: str, loader: Loader) -> None:
    LOADERS[model_type] = loader


def model_type_of(path: str | Path) -> str:
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file}: not found (a checkpoint directory needs config.json)") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not valid JSON: {exc}") from exc
    return str(data.get("model_type")) if isinstance(data, dict) else ""




def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    quantization: str | None = None,
) -> ServedModel:
    """Load any supported checkpoint directory as a `ServedModel`; `quantization="fp8"` rounds the
    large linear layers to FP8 weights after loading (INT4 and FP8 checkpoints say so in their
    config; on an FP8 checkpoint the flag is a no-op)."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r} (supported: {', '.join(QUANTIZATIONS)})")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    kind = model_type_of(path)
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        # cuDNN's SDPA builds a new plan for every new sequence length (about 2 ms of CPU per
        # call, measured on an H100): prefill and vision use the flash / memory-efficient kernels.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if kind not in LOADERS:
        raise CheckpointError(
            f"{path / 'config.json'}: model_type {kind!r} is not supported (supported: {', '.join(sorted(LOADERS))})"
        )
    model = LOADERS[kind](path, dtype, device)
    if quantization == "fp8":
        from glmv.models.quant.checkpoint import read_quant_spec
        from glmv.models.quant.fp8_checkpoint import Fp8Spec

        if isinstance(read_quant_spec(path), Fp8Spec):
            # Already FP8: its layers load as FP8 (dequantized where FP8 cannot run) and the ones
            # its authors kept in bf16 stay so; the flag has nothing to add.
            log.info("%s is an FP8 checkpoint already; --quantization fp8 changes nothing", path)
            return model
        from glmv.models.quant.fp8 import convert_to_fp8

        convert_to_fp8(model)  # type: ignore[arg-type]
    return model
