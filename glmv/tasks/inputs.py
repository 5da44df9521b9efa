"""From chat messages and resized images to an `EngineRequest`.

`InputBuilder` holds a checkpoint's prompt rules (`chat`: its chat template, or GLM-4v-9b's
rule-based prompt) and image processor. `prepare` is the CPU part of an image (RGB, resize to
the checkpoint's grid, content hash): its result, uint8 pixels with their patch grid, is the one
image type that travels on to the engine, which normalises and patchifies it on its device.
`build` renders the messages with one `<|image|>` per image, expands each into its image tokens
and records where every image's tokens sit together with its content hash (the key of the
prefix and embedding caches).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from glmv.engine.request import EngineRequest, ImageInput
from glmv.engine.sampling import SamplingParams
from glmv.processing.chat import ChatProcessor
from glmv.processing.loader import checkpoint_model_type, load_image_processor, load_tokenizer

__all__ = ["InputBuilder", "PreparedImage", "load_processors"]

log = logging.getLogger("glmv.tasks")


class PreparedImage(Protocol):
    """A resized image (`ResizedImage` of GLM-4.1V, `ResizedImage9b` of GLM-4v-9b)."""

    @property
    def pixels(self) -> Any: ...  # (H, W, 3) uint8 numpy array

    @property
    def grid_thw(self) -> tuple[int, int, int]: ...

    @property
    def content_hash(self) -> str: ...

    @property
    def num_tokens(self) -> int: ...


class InputBuilder:
    """`chat` renders messages to a `Prompt` (`encode(messages, counts, hashes, ...)`) and
    `image_processor` resizes images (`prepare`); each architecture brings its own."""

    def __init__(self, chat: Any, image_processor: Any) -> None:
        self.chat = chat
        self.image_processor = image_processor

    def preprocess_one(self, image: Image.Image) -> PreparedImage:
        """RGB and resize on the CPU; normalising and patchifying are the engine's, on its device."""
        return self.image_processor.prepare(image)  # type: ignore[no-any-return]

    def preprocess(self, images: Sequence[Image.Image]) -> list[PreparedImage]:
        return [self.preprocess_one(im) for im in images]

    def build(
        self,
        request_id: str,
        messages: list[dict[str, Any]],
        images: Sequence[PreparedImage],
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
        inputs = [
            ImageInput(
                offset=span.offset,
                length=span.length,
                content_hash=span.content_hash,
                grid_thw=im.grid_thw,
                pixel_values=None,
                pixels=im.pixels,
            )
            for span, im in zip(prompt.image_spans, images, strict=True)
        ]
        return EngineRequest(request_id, prompt.token_ids, params, inputs, prompt_text=prompt.text)


def load_processors(path: str | Path, *, chat_template: str | None = None) -> tuple[Any, InputBuilder]:
    """The tokenizer and input builder for a checkpoint directory, by its model_type.

    `chat_template` overrides the checkpoint's template (a .jinja file, template text or a
    built-in name); GLM-4v-9b's prompt format is built in, so there it is ignored (with a warning)."""
    path = Path(path)
    tokenizer = load_tokenizer(path)
    if checkpoint_model_type(path) == "chatglm":
        # GLM-4v-9b: tiktoken-format tokenizer, rule-based prompt, fixed-size square images.
        from glmv.processing.chatglm_prompt import ChatGLMPromptBuilder

        if chat_template is not None:
            log.warning("--chat-template is ignored: this model's prompt format is built in")
        chat: Any = ChatGLMPromptBuilder(tokenizer)
    else:
        chat = ChatProcessor(tokenizer, chat_template) if chat_template is not None else ChatProcessor(tokenizer)
    return tokenizer, InputBuilder(chat, load_image_processor(path))
