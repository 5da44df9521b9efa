"""The requests a real Open WebUI 0.12 sent to glmv, replayed against a live `glmv serve`.

The fixtures in `tests/fixtures/openwebui/` were captured by `make test-openwebui` (Open WebUI in
default settings, native function calling, driven by Chromium through a text chat, an image chat
with a second turn, and a stopped answer): chat requests with Open WebUI's ~36 built-in tools and
no `tool_choice`, and its title, tag and follow-up tasks. Each is sent as captured, except that
`model` names the test server and `max_tokens` is capped so the replay stays short on a CPU.

The server runs a tiny GLM-4.6V-template checkpoint with a 32k context: with the tiny
tokenizer's small vocabulary, Open WebUI's tool definitions alone are ~15k prompt tokens.

Chat requests carry `tools` without `tool_choice`: the GLM-4.6V template renders them and the
answer is parsed for calls (a random model may make one: `finish_reason` `tool_calls`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from glmv.models.tiny import create_tiny_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "openwebui"
SERVED = "openwebui-replay"
MAX_TOKENS = 8

pytestmark = pytest.mark.slow


def _fixtures() -> list[Any]:
    return [
        pytest.param(json.loads(path.read_text(encoding="utf-8")), id=path.stem)
        for path in sorted(FIXTURES.glob("[0-9]*.json"))
    ]


@pytest.fixture(scope="module")
def replay_server(start_live_server: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = create_tiny_model(tmp_path_factory.mktemp("owui") / "tiny46", variant="glm46v", seed=1)
    config = json.loads((directory / "config.json").read_text())
    for section in (config, config.get("text_config", {})):
        if "max_position_embeddings" in section:
            section["max_position_embeddings"] = 32768
    (directory / "config.json").write_text(json.dumps(config))
    # One prefill step for the ~15k-token prompts of Open WebUI's tool definitions (faster on a CPU).
    server = start_live_server(
        directory, "--served-model-name", SERVED, "--max-model-len", "32768", "--max-num-batched-tokens", "16384"
    )
    yield server
    server.stop()


def test_fixtures_cover_every_kind() -> None:
    kinds = [json.loads(p.read_text())["kind"] for p in sorted(FIXTURES.glob("[0-9]*.json"))]
    assert {"chat", "title", "tags", "follow_ups"} <= set(kinds)
    chats = [json.loads(p.read_text())["request"] for p in sorted(FIXTURES.glob("[0-9]*_chat.json"))]
    assert all(len(c["tools"]) >= 30 and "tool_choice" not in c and c["stream"] for c in chats)
    images = [
        part
        for c in chats
        for m in c["messages"]
        if isinstance(m["content"], list)
        for part in m["content"]
        if part["type"] == "image_url"
    ]
    assert images and all(p["image_url"]["url"].startswith("data:image/") for p in images)


@pytest.mark.parametrize("fixture", _fixtures())
def test_replay(
    replay_server: Any, fixture: dict[str, Any], sse: Callable[[str], tuple[list[dict[str, Any]], bool]]
) -> None:
    body = dict(fixture["request"])
    body["model"] = SERVED
    body["max_tokens"] = min(int(body.get("max_tokens") or MAX_TOKENS), MAX_TOKENS)
    response = httpx.post(replay_server.api_url + "/chat/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text[:2000]
    if not body.get("stream"):
        answer = response.json()
        choice = answer["choices"][0]
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length", "tool_calls")
        assert answer["usage"]["completion_tokens"] <= MAX_TOKENS
        return
    assert response.headers["content-type"].startswith("text/event-stream")
    events, done = sse(response.text)
    assert done and events
    assert not [e for e in events if "error" in e]
    assert events[0]["choices"][0]["delta"].get("role") == "assistant"
    finishes = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length", "tool_calls")
    for event in events:
        assert event["object"] == "chat.completion.chunk" and event["model"] == SERVED
