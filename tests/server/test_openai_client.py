"""The official `openai` client against a real `glmv serve` process (and, for the guard and the
503 paths, against in-process apps through the client's own ASGI transport)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest

from glmv.processing.image import ImageProcessor
from glmv.processing.reasoning import split as split_reasoning
from glmv.server.guard import GuardSettings

MODEL = "tiny-glm41v"


@pytest.fixture(scope="module")
def oai(live_server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.api_url, api_key="not-needed", max_retries=0, timeout=60)


def asgi_openai(app: Any, api_key: str = "not-needed") -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://testserver")
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=api_key, max_retries=0, http_client=http
    )


def content(text: str, images: list[str]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": u, "detail": "auto"}} for u in images
    ]
    return [*parts, {"type": "text", "text": text}]


def test_chat_with_0_1_2_images_streaming_and_not(
    oai: openai.OpenAI, image_url: Callable[..., str], server_model_dir: Any
) -> None:
    sizes = [(64, 48), (300, 120)]
    images = [
        image_url(sizes[0][0], sizes[0][1], (250, 10, 10)),
        image_url(sizes[1][0], sizes[1][1], (10, 10, 250)),
    ]
    prompt_tokens = []
    for count in (0, 1, 2):
        messages = [{"role": "user", "content": content("What do you see?", images[:count])}]
        whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, seed=11)  # type: ignore[arg-type]
        assert whole.object == "chat.completion" and whole.model == MODEL
        [choice] = whole.choices
        assert choice.message.role == "assistant"
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        assert whole.usage is not None
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        prompt_tokens.append(whole.usage.prompt_tokens)

        stream = oai.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, seed=11, stream=True
        )  # type: ignore[arg-type]
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == choice.message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            choice.finish_reason
        ]
    # Every image adds its image tokens plus <|begin_of_image|> and <|end_of_image|> to the prompt.
    processor = ImageProcessor.from_pretrained(server_model_dir)
    expected = [processor.num_tokens(h, w) + 2 for w, h in sizes]
    assert expected[0] != expected[1]
    assert [prompt_tokens[1] - prompt_tokens[0], prompt_tokens[2] - prompt_tokens[1]] == expected


def test_include_usage_chunk(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 5
    assert (
        last.usage.prompt_tokens_details is not None and last.usage.prompt_tokens_details.cached_tokens >= 0
    )
    assert all(c.usage is None for c in chunks[:-1])


def test_n_2_gives_two_different_choices(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        n=2,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage is not None and r.usage.completion_tokens == 16


def test_stop_string_ends_the_answer_before_it(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write something long."}]
    base = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )
    text = base.choices[0].message.content or ""
    # A stop string whose first occurrence is well inside the text.
    cut, stop = next((p, text[p : p + 3]) for p in range(4, len(text) - 3) if text.find(text[p : p + 3]) == p)
    r = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )
    assert r.choices[0].message.content == text[:cut]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop  # type: ignore[index]


def test_seed_reproducibility_at_temperature_1(oai: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        r = oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say anything."}],
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].message.content or ""

    first = ask(42)
    assert ask(42) == first
    assert ask(43) != first


def test_logprobs_shape(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    logprobs = r.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == 4
    for entry in logprobs.content:
        assert entry.logprob <= 0
        assert entry.bytes is not None and len(entry.bytes) >= 1
        assert len(entry.top_logprobs) == 2
        assert all(t.logprob <= 0 for t in entry.top_logprobs)
    # The logprob tokens are the raw output; the message is that output after the reasoning
    # parser took out `<think>`-style tags (a random model may sample them anywhere).
    joined = b"".join(bytes(e.bytes or []) for e in logprobs.content).decode("utf-8", errors="replace")
    _, expected = split_reasoning(joined)
    assert expected == (r.choices[0].message.content or "")


def test_models_list(oai: openai.OpenAI) -> None:
    models = list(oai.models.list())
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "glmv"
    assert models[0].model_extra["glmv"]["random_weights"] is True  # type: ignore[index]
    assert oai.models.retrieve(MODEL).id == MODEL


def test_sdk_exception_classes(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5)
    assert bad.value.status_code == 400
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as image:
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content("x", ["data:image/png;base64,AAAA"])}],  # type: ignore[list-item]
        )
    assert image.value.body["param"] == "messages[0].content[0].image_url"  # type: ignore[index]
    assert image.value.code == "invalid_image"


async def test_503_is_the_sdks_internal_server_error(make_app: Callable[..., Any]) -> None:
    app = make_app()
    app.state.glmv.draining = True
    client = asgi_openai(app)
    with pytest.raises(openai.InternalServerError) as exc:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    # openai maps every status >= 500 to InternalServerError; 503 carries Retry-After.
    assert exc.value.status_code == 503
    assert exc.value.response.headers["retry-after"] == "5"
    assert exc.value.type == "overloaded_error"  # type: ignore[attr-defined]


async def test_guard_401_and_429(make_app: Callable[..., Any]) -> None:
    guard = GuardSettings(api_keys=["sk-right"], requests_per_minute=2, access_log=False)
    app = make_app(guard=guard)
    with pytest.raises(openai.AuthenticationError) as denied:
        await asgi_openai(app, api_key="sk-wrong").models.list()
    assert denied.value.status_code == 401
    client = asgi_openai(app, api_key="sk-right")
    for _ in range(2):
        r = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
        assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    assert limited.value.status_code == 429
    assert int(limited.value.response.headers["retry-after"]) >= 1
