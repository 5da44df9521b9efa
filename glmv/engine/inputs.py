"""From chat messages and decoded images to an `EngineRequest`.

Shared by the HTTP server, the offline `LLM` API and the CLI: preprocess each image (resize on
uint8, then one vectorised normalise/patchify), render the checkpoint's chat template with one
`<|image|>` per image, expand each into its image tokens, and record where every image's tokens
sit together with its content hash (the key of the prefix and embedding caches).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from glmv.engine.request import EngineRequest, ImageInput
from glmv.engine.sampling import SamplingParams
from glmv.processing.chat import ChatProcessor
from glmv.processing.image import ImageProcessor
from glmv.processing.loader import checkpoint_model_type, load_image_processor, load_tokenizer


class InputBuilder:
    """`chat` renders messages to a `Prompt` (`encode(messages, counts, hashes, ...)`) and
    `image_processor` turns images into `ProcessedImage`s; each architecture brings its own."""

    def __init__(self, chat: ChatProcessor, image_processor: ImageProcessor) -> None:
        self.chat = chat
        self.image_processor = image_processor

    def preprocess_one(self, image: Image.Image) -> Any:
        """Resize on the CPU; where the processor can, leave normalise/patchify to the device."""
        proc = self.image_processor
        if hasattr(proc, "prepare") and hasattr(proc, "to_patches"):
            return proc.prepare(image)  # uint8 pixels: 4x fewer bytes to the GPU than float32 rows
        return proc.preprocess(image)

    def preprocess(self, images: Sequence[Image.Image]) -> list[Any]:
        return [self.preprocess_one(im) for im in images]

    @staticmethod
    def _pixels(image: Any) -> tuple[Any, Any]:
        """(float rows, None) from processors that make rows on the CPU, else (None, uint8 pixels)."""
        if getattr(image, "pixel_values", None) is not None:
            return image.pixel_values, None
        return None, image.pixels

    def build(
        self,
        request_id: str,
        messages: list[dict[str, Any]],
        images: Sequence[Any],
        params: SamplingParams,
        *,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> EngineRequest:
        """`messages` hold `{"type": "image"}` parts where the `images` go, in order."""
        prompt = self.chat.encode(
            messages,
            [im.num_tokens for im in images],
            [im.content_hash for im in images],
            add_generation_prompt=add_generation_prompt,
            **(chat_template_kwargs or {}),
        )
        inputs = []
        for span, im in zip(prompt.image_spans, images, strict=True):
            values, pixels = self._pixels(im)
            inputs.append(
                ImageInput(
                    offset=span.offset,
                    length=span.length,
                    content_hash=span.content_hash,
                    grid_thw=im.grid_thw,
                    pixel_values=values,
                    pixels=pixels,
                )
            )
        return EngineRequest(request_id, prompt.token_ids, params, inputs, prompt_text=prompt.text)


def load_processors(path: str | Path) -> tuple[Any, InputBuilder]:
    """The tokenizer and input builder for a checkpoint directory, by its model_type."""
    path = Path(path)
    tokenizer = load_tokenizer(path)
    if checkpoint_model_type(path) == "chatglm":
        # GLM-4v-9b: tiktoken-format tokenizer, rule-based prompt, fixed-size square images.
        from glmv.processing.chatglm_prompt import ChatGLMPromptBuilder

        chat: Any = ChatGLMPromptBuilder(tokenizer)
    else:
        chat = ChatProcessor(tokenizer)
    return tokenizer, InputBuilder(chat, load_image_processor(path))
