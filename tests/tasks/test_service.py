"""The generation service: typed streams and results (reasoning split per choice, logprobs with
exact bytes, usage), admission and capacity, aborts when a stream is closed early, engine errors;
and one end-to-end run on the tiny model with an in-process engine."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from glmv.engine.request import TokenLogprob
from glmv.errors import EngineError, OverloadedError
from glmv.processing.loader import load_tokenizer
from glmv.processing.reasoning import split
from glmv.tasks.config import EngineConfig, ServiceConfig
from glmv.tasks.images import ImageRef
from glmv.tasks.service import GenerationService, create_service, is_random_checkpoint
from glmv.tasks.types import GenerationRequest, SamplingParams

from .scripted import ScriptedClient

REASONING = ["<think>\nI look", " at the pic", "ture.</think>\n<answer>A red", " square<|begin_of_box|>[1,2]", "<|end_of_box|></answer>"]  # fmt: skip


def scripted_service(model_dir: Path, client: ScriptedClient) -> GenerationService:
    return create_service(ServiceConfig(EngineConfig(model=str(model_dir)), image_workers=0), client=client)


def ask(text: str = "What is it?", n: int = 1, **params: object) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": text}], params=SamplingParams(n=n, **params))  # type: ignore[arg-type]


async def test_stream_and_generate_split_reasoning_per_choice(tiny41_dir: Path) -> None:
    client = ScriptedClient(tiny41_dir, [(t, [1], None) for t in REASONING])
    service = scripted_service(tiny41_dir, client)
    stream = service.stream(ask(n=2))
    chunks = [c async for c in stream]
    await stream.aclose()
    whole = "".join(REASONING)
    want_reasoning, want_content = split(whole)
    assert want_reasoning == "I look at the picture." and want_content == "A red square[1,2]"
    for index in (0, 1):
        deltas = [d for c in chunks for d in c.deltas if d.index == index]
        assert "".join(d.reasoning for d in deltas) == want_reasoning
        assert "".join(d.content for d in deltas) == want_content
        assert "".join(d.text for d in deltas) == whole
        assert [d.finish_reason for d in deltas] == [None] * 4 + ["stop"]
    assert chunks[-1].finished and chunks[0].queue_time == pytest.approx(0.25)
    assert stream.usage.completion_tokens == 10 and stream.usage.cached_tokens == 16
    assert stream.prompt_token_ids == client.requests[0].prompt_token_ids

    result = await service.generate(ask(n=2))
    assert [c.reasoning for c in result.choices] == [want_reasoning] * 2
    assert [c.content for c in result.choices] == [want_content] * 2
    assert [c.text for c in result.choices] == [whole] * 2
    assert result.usage.prompt_tokens == len(result.prompt_token_ids) > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + 10
    assert service.num_inflight == 0


async def test_logprobs_carry_exact_token_bytes(tiny41_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny41_dir)
    text = "总金额 1,234.50 元 😀"
    ids = tokenizer.encode(text)
    top = [(i, tokenizer.decode([i]), -1.5) for i in ids[:3]]
    lps = [TokenLogprob(i, tokenizer.decode([i]), -0.5, top) for i in ids]
    client = ScriptedClient(tiny41_dir, [(text, ids, lps)])
    result = await scripted_service(tiny41_dir, client).generate(ask(logprobs=2))
    entries = result.choices[0].logprobs
    assert entries is not None and [e.token_id for e in entries] == ids
    assert b"".join(bytes(e.bytes) for e in entries) == text.encode("utf-8")
    assert all(len(e.top) == 2 and e.top[0].token_id == ids[0] for e in entries)  # top cut to logprobs=2
    assert (await scripted_service(tiny41_dir, client).generate(ask())).choices[0].logprobs is None


async def test_an_engine_error_ends_the_stream_and_keeps_the_usage(tiny41_dir: Path) -> None:
    client = ScriptedClient(tiny41_dir, [("Hello", [1], None), EngineError("a core died"), (".", [2], None)])
    service = scripted_service(tiny41_dir, client)
    stream = service.stream(ask())
    first = await stream.__anext__()
    assert first.deltas[0].content == "Hello"
    with pytest.raises(EngineError, match="a core died"):
        await stream.__anext__()
    await stream.aclose()
    assert stream.usage.completion_tokens == 1 and service.num_inflight == 0
    with pytest.raises(EngineError):
        await service.generate(ask())


async def test_capacity_counts_requests_in_flight_and_closing_aborts(tiny41_dir: Path) -> None:
    gate = asyncio.Event()
    client = ScriptedClient(tiny41_dir, [("a", [1], None), gate, ("b", [2], None)], max_pending=1)
    service = scripted_service(tiny41_dir, client)
    stream = service.stream(ask())
    await stream.__anext__()
    assert service.num_inflight == 1
    with pytest.raises(OverloadedError, match="capacity"):
        await service.generate(ask())
    await stream.aclose()  # closing before the end aborts the request in the engine
    assert client.closed == [stream.request_id] and service.num_inflight == 0
    gate.set()
    assert (await service.generate(ask())).choices[0].content == "ab"
    client.dead = RuntimeError("gone")
    assert not service.running
    with pytest.raises(OverloadedError):
        await service.generate(ask())


@pytest.fixture(scope="module")
def real_service(tiny41_dir: Path) -> Iterator[GenerationService]:
    engine = EngineConfig(model=str(tiny41_dir), max_model_len=1024, kv_cache_gb=0.05, engine_mode="inprocess")
    service = create_service(ServiceConfig(engine, image_workers=0))
    yield service
    service.shutdown()


async def test_end_to_end_on_the_tiny_model(real_service: GenerationService, tiny41_dir: Path) -> None:
    assert real_service.random_weights is is_random_checkpoint(tiny41_dir) is True
    image = Image.new("RGB", (64, 48), (200, 30, 30))

    def request() -> GenerationRequest:
        return GenerationRequest(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
            [ImageRef(image, "messages[0].content[0]")],
            SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
        )

    first = await real_service.generate(request())
    second = await real_service.generate(request())
    [choice] = first.choices
    assert len(choice.token_ids) == 5 and choice.finish_reason == "length"
    assert second.choices[0].token_ids == choice.token_ids  # greedy
    assert first.usage.prompt_tokens == len(first.prompt_token_ids) > 5
    assert second.usage.cached_tokens >= 16  # the second time the prompt's blocks were cached
    assert real_service.stats().num_blocks > 0 and len(real_service.core_stats()) >= 1
