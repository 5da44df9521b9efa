"""`glmv.LLM`: the offline API for batch jobs.

    llm = LLM("path/to/checkpoint")
    results = llm.chat([[{"role": "user", "content": [{"type": "image", "image": "invoice.png"},
                                                      {"type": "text", "text": "总金额是多少？"}]}]],
                       SamplingParams(temperature=0, max_tokens=128))

It generates through the same service as the server (`create_service`): every conversation is
submitted at once (at most as many as the engine admits, the rest as earlier ones finish) and the
engine batches them continuously; a progress bar counts finished conversations. An image part
(`image` or `image_url`) is a file path, a `data:` URL or a PIL image. A conversation the engine
cannot take (a bad image, a prompt longer than the context) raises; a failure while generating
is kept in its result's `error`. Close the `LLM` (or use it in a `with` block) to stop its engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image
from tqdm import tqdm

from glmv.errors import GlmvError, InvalidRequestError
from glmv.tasks.config import EngineConfig, ServiceConfig
from glmv.tasks.images import ImageRef, ImageSource
from glmv.tasks.service import GenerationService, create_service
from glmv.tasks.types import GenerationRequest, LogprobEntry, SamplingParams

__all__ = ["LLM", "ChatResult", "Completion", "split_images"]

Message = dict[str, Any]
T = TypeVar("T")


@dataclass(slots=True)
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class ChatResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    cached_tokens: int = 0
    error: GlmvError | None = None


def _image_source(value: Any, param: str) -> ImageSource:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        text = str(value)
        return text if text.startswith("data:") else Path(text)
    raise InvalidRequestError(f"unsupported image value of type {type(value).__name__}", param=param)


def split_images(messages: list[Message]) -> tuple[list[Message], list[ImageRef]]:
    """Replace image parts (`image`, `image_url`) by `{"type": "image"}` and collect their sources."""
    images: list[ImageRef] = []
    out: list[Message] = []
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if not isinstance(content, list):
            out.append(dict(msg))
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type")
            param = f"messages[{i}].content[{j}]"
            if kind == "image":
                images.append(ImageRef(_image_source(part.get("image"), param), param))
                parts.append({"type": "image"})
            elif kind == "image_url":
                url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                images.append(ImageRef(_image_source(url, param), param))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**msg, "content": parts})
    return out, images


class LLM:
    """`LLM(model, **engine_settings)`: `engine_settings` are `EngineConfig` fields (`dtype`,
    `max_model_len`, `engine_mode`, ...); `chat_template` and `image_workers` are the service's."""

    def __init__(
        self,
        model: str | Path,
        *,
        chat_template: str | None = None,
        image_workers: int | None = None,
        **engine_settings: Any,
    ) -> None:
        config = ServiceConfig(
            EngineConfig(model=str(model), **engine_settings),
            chat_template=chat_template,
            image_workers=image_workers,
        )
        # The image workers start with the first image: many offline jobs have none.
        self.service: GenerationService = create_service(config, warm_up=False)
        self._finalizer = weakref.finalize(self, self.service.shutdown)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine (and the image workers); the `LLM` cannot be used afterwards."""
        self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        requests = []
        for conv in convs:
            messages, images = split_images(conv)
            requests.append(
                GenerationRequest(messages, images, params, chat_template_kwargs, f"offline-{next(self._ids)}")
            )
        return _run_sync(self._chat(requests, use_tqdm))

    async def _chat(self, requests: list[GenerationRequest], use_tqdm: bool) -> list[ChatResult]:
        admitted = asyncio.Semaphore(max(1, self.service.client.max_pending))
        with tqdm(total=len(requests), desc="chat", disable=not use_tqdm, unit="conv") as bar:

            async def one(request: GenerationRequest) -> ChatResult:
                async with admitted:
                    result = await self._one(request)
                bar.update(1)
                return result

            tasks = [asyncio.ensure_future(one(r)) for r in requests]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for task in tasks:  # a conversation that cannot run stops the batch
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]

    async def _one(self, request: GenerationRequest) -> ChatResult:
        n = request.params.n
        want_logprobs = request.params.logprobs is not None
        result = ChatResult(
            str(request.request_id), [], [Completion(i, logprobs=[] if want_logprobs else None) for i in range(n)]
        )
        stream = self.service.stream(request)
        started = False
        try:
            async for chunk in stream:
                started = True
                result.prompt_token_ids = stream.prompt_token_ids
                result.cached_tokens = chunk.usage.cached_tokens
                for d in chunk.deltas:
                    c = result.outputs[d.index]
                    c.text += d.text
                    c.token_ids += d.token_ids
                    if c.logprobs is not None and d.logprobs:
                        c.logprobs += d.logprobs
                    if d.finish_reason is not None:
                        c.finish_reason = d.finish_reason
                if chunk.finished:
                    break
        except GlmvError as exc:
            if exc.status_code < 500 and not started:
                raise  # the conversation itself cannot run (a bad image, too long a prompt)
            result.error = exc
        finally:
            await stream.aclose()
        result.prompt_token_ids = list(stream.prompt_token_ids)
        return result


def _run_sync(coroutine: Any) -> Any:
    """Run `coroutine` to its end from synchronous code (in a thread of its own when this one
    already runs an event loop, as in a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
