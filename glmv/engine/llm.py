"""`glmv.LLM`: the offline API for batch jobs.

    llm = LLM("path/to/checkpoint")
    results = llm.chat([[{"role": "user", "content": [{"type": "image", "image": "invoice.png"},
                                                      {"type": "text", "text": "总金额是多少？"}]}]],
                       SamplingParams(temperature=0, max_tokens=128))

Every conversation is submitted at once and the engine batches them continuously; a progress
bar counts finished conversations.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from glmv.engine.engine import EngineConfig, LLMEngine
from glmv.engine.inputs import load_processors
from glmv.engine.request import TokenLogprob
from glmv.engine.sampling import SamplingParams
from glmv.errors import GlmvError, InvalidRequestError

Message = dict[str, Any]


@dataclass(slots=True)
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class ChatResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    cached_tokens: int = 0
    error: GlmvError | None = None


def _load_image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        text = str(value)
        if text.startswith("data:"):
            from glmv.processing.media import ImageLimits, decode_data_url, load_image

            limits = ImageLimits()
            return load_image(
                decode_data_url(text, param="image", limits=limits), param="image", limits=limits
            )
        with Image.open(text) as im:
            im.load()
            return im.copy()
    raise InvalidRequestError(f"unsupported image value of type {type(value).__name__}", param="image")


def split_images(messages: list[Message]) -> tuple[list[Message], list[Image.Image]]:
    """Replace image parts (`image`, `image_url`) by `{"type": "image"}` and collect the images."""
    images: list[Image.Image] = []
    out: list[Message] = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(dict(msg))
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "image":
                images.append(_load_image(part.get("image")))
                parts.append({"type": "image"})
            elif kind == "image_url":
                url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                images.append(_load_image(url))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**msg, "content": parts})
    return out, images


class LLM:
    def __init__(self, model: str | Path, **engine_kwargs: Any) -> None:
        tokenizer, self.inputs = load_processors(model)  # the checkpoint's own architecture
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_kwargs), tokenizer=tokenizer)
        self._ids = itertools.count()

    def chat(
        self,
        conversations: Sequence[list[Message]] | list[Message],
        sampling_params: SamplingParams | None = None,
        *,
        use_tqdm: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[ChatResult]:
        convs: list[list[Message]]
        if conversations and isinstance(conversations[0], dict):
            convs = [conversations]  # type: ignore[list-item]
        else:
            convs = list(conversations)  # type: ignore[arg-type]
        params = sampling_params or SamplingParams()
        results: dict[str, ChatResult] = {}
        order: list[str] = []
        for conv in convs:
            rid = f"offline-{next(self._ids)}"
            messages, images = split_images(conv)
            request = self.inputs.build(
                rid,
                messages,
                self.inputs.preprocess(images),
                params,
                chat_template_kwargs=chat_template_kwargs,
            )
            self.engine.add_request(request)
            results[rid] = ChatResult(
                rid, list(request.prompt_token_ids), [Completion(i) for i in range(params.n)]
            )
            order.append(rid)
        with tqdm(total=len(order), desc="chat", disable=not use_tqdm, unit="conv") as bar:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    res = results[out.request_id]
                    res.cached_tokens = out.cached_tokens
                    res.error = out.error or res.error
                    for d in out.deltas:
                        c = res.outputs[d.index]
                        c.text += d.text
                        c.token_ids += d.token_ids
                        if d.logprobs is not None:
                            c.logprobs = (c.logprobs or []) + d.logprobs
                        if d.finish_reason is not None:
                            c.finish_reason = d.finish_reason
                    if out.finished:
                        bar.update(1)
        return [results[r] for r in order]
