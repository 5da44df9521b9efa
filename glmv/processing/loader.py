"""The front-end processors of a checkpoint directory, chosen by its `config.json` `model_type`.

`load_tokenizer(path)` and `load_image_processor(path)` are what both sides of the engine need:
the API process renders prompts and decodes images with them, the engine core builds grammar
masks from the tokenizer and turns resized pixels into patch rows with the image processor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmv.errors import CheckpointError


def checkpoint_model_type(path: str | Path) -> str:
    """`model_type` of `path/config.json` ("" when it names none)."""
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file}: not found (a checkpoint directory needs config.json)") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not valid JSON: {exc}") from exc
    return str(data.get("model_type")) if isinstance(data, dict) else ""


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer (GLM-4v-9b: its tiktoken-format vocabulary; else tokenizer.json)."""
    path = Path(path)
    if checkpoint_model_type(path) == "chatglm":
        from glmv.processing.chatglm_tokenizer import ChatGLMTokenizer

        return ChatGLMTokenizer.from_pretrained(path)
    from glmv.processing.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)


def load_image_processor(path: str | Path) -> Any:
    """The checkpoint's image processor (GLM-4v-9b: fixed-size squares; else GLM-4.1V's smart resize)."""
    path = Path(path)
    if checkpoint_model_type(path) == "chatglm":
        from glmv.processing.image_9b import ImageProcessor9b

        return ImageProcessor9b.from_pretrained(path)
    from glmv.processing.image import ImageProcessor

    return ImageProcessor.from_pretrained(path)
