"""Conversations sent again whole each turn (as Open WebUI does): earlier turns' images beyond
--max-history-images become a placeholder, the current turn's stay capped by
--max-images-per-request."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from glmv.server.app import create_app
from glmv.tasks.history import HISTORY_IMAGE_PLACEHOLDER
from tests.server.conftest import asgi_client, make_settings
from tests.tasks.scripted import ScriptedClient


def chat_with_images(url: Callable[..., str], earlier: int, current: int) -> list[dict[str, Any]]:
    """`earlier` turns with one image each (and the assistant's answers), then a user turn with
    `current` images."""
    messages: list[dict[str, Any]] = []
    for k in range(earlier):
        colour = (20 * k % 256, 40, 200)
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"turn {k}"},
                    {"type": "image_url", "image_url": {"url": url(colour=colour)}},
                ],
            }
        )
        messages.append({"role": "assistant", "content": f"answer {k}"})
    parts: list[dict[str, Any]] = [{"type": "text", "text": "and now?"}]
    parts += [{"type": "image_url", "image_url": {"url": url(colour=(0, 0, 10 * j))}} for j in range(current)]
    messages.append({"role": "user", "content": parts})
    return messages


def turns(prompt_text: str) -> list[str]:
    """What stands in each user turn's image slot: "image" or "placeholder"."""
    out = []
    for turn in prompt_text.split("<|user|>")[1:]:
        body = turn.split("<|assistant|>")[0]
        out.append(
            "placeholder" if HISTORY_IMAGE_PLACEHOLDER in body else "image" if "<|image|>" in body else "none"
        )
    return out


async def test_a_long_chat_with_an_image_per_turn_keeps_working(
    server_model_dir: Path, image_url: Callable[..., str]
) -> None:
    """The defaults (8 per request, 8 of earlier turns): the 11th image of a chat is fine."""
    engine = ScriptedClient(server_model_dir, [("ok", [1], None)])
    async with asgi_client(create_app(make_settings(server_model_dir), engine)) as c:
        r = await c.post(
            "/v1/chat/completions", json={"messages": chat_with_images(image_url, 10, 1), "max_tokens": 1}
        )
        assert r.status_code == 200, r.text
        too_many = await c.post(
            "/v1/chat/completions", json={"messages": chat_with_images(image_url, 1, 9), "max_tokens": 1}
        )
    (request,) = engine.requests
    assert len(request.images) == 9  # the 8 most recent earlier ones and the new one
    assert turns(request.prompt_text) == ["placeholder"] * 2 + ["image"] * 9
    assert too_many.status_code == 400
    error = too_many.json()["error"]
    assert (error["param"], error["code"]) == ("messages[2].content[9].image_url", "invalid_image")
    assert "9 in this turn" in error["message"]


async def test_history_and_current_limits(server_model_dir: Path, image_url: Callable[..., str]) -> None:
    engine = ScriptedClient(server_model_dir, [("ok", [1], None)])
    settings = make_settings(server_model_dir, max_images_per_request=2, max_history_images=1)
    async with asgi_client(create_app(settings, engine)) as c:
        ok = await c.post(
            "/v1/chat/completions", json={"messages": chat_with_images(image_url, 3, 2), "max_tokens": 1}
        )
        refused = await c.post(
            "/v1/chat/completions", json={"messages": chat_with_images(image_url, 3, 3), "max_tokens": 1}
        )
        models = (await c.get("/v1/models")).json()
    assert ok.status_code == 200, ok.text
    (request,) = engine.requests
    assert len(request.images) == 3
    assert turns(request.prompt_text) == ["placeholder", "placeholder", "image", "image"]
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages[6].content[3].image_url"
    assert models["data"][0]["glmv"]["max_history_images"] == 1


async def test_no_history_images(server_model_dir: Path, image_url: Callable[..., str]) -> None:
    engine = ScriptedClient(server_model_dir, [("ok", [1], None)])
    settings = make_settings(server_model_dir, max_history_images=0)
    async with asgi_client(create_app(settings, engine)) as c:
        r = await c.post(
            "/v1/chat/completions", json={"messages": chat_with_images(image_url, 2, 1), "max_tokens": 1}
        )
    assert r.status_code == 200, r.text
    (request,) = engine.requests
    assert len(request.images) == 1
    assert turns(request.prompt_text) == ["placeholder", "placeholder", "image"]
