"""GLM-4v-9b (`model_type: chatglm`) served end to end through /v1/chat/completions on a tiny
checkpoint in the original layout: in process over ASGI, and once through `glmv serve`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from glmv.engine.client import EngineClient
from glmv.models.tiny_glm4v_9b import create_tiny_glm4v_9b
from glmv.server.app import create_app
from glmv.tasks.inputs import load_processors

from .conftest import LiveServer, asgi_client, build_engine, make_settings, parse_sse


@pytest.fixture(scope="module")
def ckpt9b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_glm4v_9b(tmp_path_factory.mktemp("server9b") / "tiny-glm-4v-9b", seed=3)


@pytest.fixture(scope="module")
def engine9b(ckpt9b: Path) -> Iterator[EngineClient]:
    engine = build_engine(make_settings(ckpt9b))
    yield engine
    engine.shutdown()


@pytest.fixture
async def client9b(ckpt9b: Path, engine9b: EngineClient) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(create_app(make_settings(ckpt9b), engine9b)) as c:
        yield c


def ask(text: str, *images: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": parts}]


def expected_prompt_tokens(ckpt: Path, messages: list[dict[str, Any]], num_images: int) -> int:
    _, builder = load_processors(ckpt)
    parts = [{"type": "image"}] * num_images + [{"type": "text", "text": messages[-1]["content"][0]["text"]}]
    prompt = builder.chat.encode([{"role": "user", "content": parts}], [18] * num_images, ["h"] * num_images)
    return len(prompt.token_ids)


async def test_models_endpoint_names_the_architecture(client9b: httpx.AsyncClient) -> None:
    r = await client9b.get("/v1/models")
    assert r.status_code == 200
    card = r.json()["data"][0]
    assert card["glmv"]["model_type"] == "chatglm"
    assert card["glmv"]["random_weights"] is True
    assert card["glmv"]["supports_thinking_toggle"] is False
    assert card["max_model_len"] == 2048


async def test_image_chat_stream_and_non_stream(
    client9b: httpx.AsyncClient, ckpt9b: Path, image_url: Callable[..., str]
) -> None:
    messages = ask("What is in this picture?", image_url(300, 120))
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    r = await client9b.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    whole = r.json()
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 8
    # [gMASK]<sop><|user|>\n + one 18-position image span + the question + <|assistant|>
    assert whole["usage"]["prompt_tokens"] == expected_prompt_tokens(ckpt9b, messages, 1)
    assert isinstance(choice["message"]["content"], str)

    r = await client9b.post(
        "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events, done = parse_sse(r.text)
    assert done
    *chunks, last = events
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in chunks if e["choices"])
    reasoning = "".join(
        e["choices"][0]["delta"].get("reasoning_content") or "" for e in chunks if e["choices"]
    )
    assert content == (choice["message"]["content"] or "")
    assert (reasoning or None) == choice["message"].get("reasoning_content")
    assert [e["choices"][0]["finish_reason"] for e in chunks if e["choices"]][-1] == "length"
    assert last["usage"]["completion_tokens"] == 8
    # The same image and question again: the prefix cache covers the image span.
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16


async def test_text_only_and_multi_turn(client9b: httpx.AsyncClient, image_url: Callable[..., str]) -> None:
    r = await client9b.post(
        "/v1/chat/completions",
        json={
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url()}},
                        {"type": "text", "text": "Describe it."},
                    ],
                },
                {"role": "assistant", "content": "A red square."},
                {"role": "user", "content": "Is it bright?"},
            ],
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    r = await client9b.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    )
    assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens"] < 10


async def test_second_image_is_a_clear_400_unless_multi_image(
    client9b: httpx.AsyncClient, image_url: Callable[..., str]
) -> None:
    body = {
        "messages": ask("Compare them.", image_url(64, 48), image_url(48, 64, (0, 0, 200))),
        "max_tokens": 3,
    }
    r = await client9b.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "too_many_images"
    assert err["param"] == "messages[0].content[2]"
    assert "one image per conversation" in err["message"]

    r = await client9b.post(
        "/v1/chat/completions", json={**body, "chat_template_kwargs": {"multi_image": True}}
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def live9b(ckpt9b: Path, start_live_server: Callable[..., LiveServer]) -> Iterator[LiveServer]:
    server = start_live_server(ckpt9b)
    yield server
    server.stop()


def test_glmv_serve_process_streams(live9b: LiveServer, image_url: Callable[..., str]) -> None:
    body = {
        "messages": ask("这张图片里有什么？", image_url(200, 200)),
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", live9b.api_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    events, done = parse_sse(text)
    assert done
    assert sum(1 for e in events if e["choices"] and e["choices"][0]["finish_reason"] == "length") == 1
    models = httpx.get(live9b.api_url + "/models", timeout=10).json()
    assert models["data"][0]["glmv"]["model_type"] == "chatglm"
    assert live9b.stop() == 0
