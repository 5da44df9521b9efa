"""transformers as the reference: build prompts, logits and greedy generations to compare with."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@lru_cache(maxsize=4)
def hf_model(path: str) -> Any:
    from transformers import Glm4vForConditionalGeneration

    return Glm4vForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@lru_cache(maxsize=4)
def hf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@lru_cache(maxsize=4)
def hf_image_processor(path: str) -> Any:
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    return Glm4vImageProcessorPil.from_pretrained(path)


def hf_inputs(path: Path, messages: list[dict[str, Any]], images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """input_ids (+ pixel_values, image_grid_thw, mm_token_type_ids) the way Glm4vProcessor builds them."""
    tok = hf_tokenizer(str(path))
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out: dict[str, torch.Tensor] = {}
    if images:
        proc = hf_image_processor(str(path))
        pix = proc(images=images, return_tensors="pt")
        out["pixel_values"] = pix["pixel_values"]
        out["image_grid_thw"] = pix["image_grid_thw"]
        merge = proc.merge_size**2
        pieces = text.split("<|image|>")
        assert len(pieces) == len(images) + 1
        text = pieces[0]
        for grid, rest in zip(pix["image_grid_thw"], pieces[1:], strict=True):
            text += "<|image|>" * (int(grid.prod()) // merge) + rest
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out["input_ids"] = ids
    image_id = tok.convert_tokens_to_ids("<|image|>")
    out["mm_token_type_ids"] = (ids == image_id).int()
    return out


def conversations() -> dict[str, tuple[list[dict[str, Any]], list[Image.Image]]]:
    """The parity cases: text only; one image; two images; three turns; a system prompt."""
    img_a = noise_image(300, 200, 1)
    img_b = noise_image(90, 160, 2)
    img_c = noise_image(224, 224, 3)
    return {
        "text": ([{"role": "user", "content": "Describe the invoice total, please. 发票金额是多少？"}], []),
        "one_image": (
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}],
            [img_a],
        ),
        "two_images": (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "image"},
                        {"type": "text", "text": "Compare the two charts."},
                    ],
                }
            ],
            [img_a, img_b],
        ),
        "three_turns": (
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the receipt."}]},
                {"role": "assistant", "content": "It shows a total of 42 yuan."},
                {"role": "user", "content": "Which shop issued it?"},
                {"role": "assistant", "content": "A small café."},
                {"role": "user", "content": "And the date?"},
            ],
            [img_c],
        ),
        "system": (
            [
                {"role": "system", "content": "You are a careful accountant. 请用中文回答。"},
                {"role": "user", "content": "Summarise the table."},
            ],
            [],
        ),
    }
