"""Tool calling through the HTTP layer, in process, on scripted engines (exact shapes) and the
tiny checkpoints' real tokenizers and templates (prompt parity with transformers).

The live-server tests with the official `openai` client are in `test_tool_calling_api.py`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from glmv.server.app import create_app
from tests.processing.test_chat_tools import CONVERSATIONS, for_transformers
from tests.processing.test_chat_tools import TOOLS as TEMPLATE_TOOLS
from tests.server.conftest import asgi_client, make_settings, parse_sse
from tests.tasks.scripted import ScriptedClient
from tests.tasks.test_tool_calls import TOOLS, TWO_CALLS

WANT = [
    ("get_weather", {"city": 'Paris, "FR"\n', "days": 3}),
    ("search", {"query": "invoice 42", "filters": {"year": 2024, "tags": ["a", "b"]}, "exact": True}),
]
ASK = [{"role": "user", "content": "Weather in Paris and invoice 42?"}]
CALLS_ONLY = TWO_CALLS[len("Let me check.\n") :]


def pieces(text: str, size: int = 7) -> list[tuple[str, list[int], None]]:
    return [(text[i : i + size], [1], None) for i in range(0, len(text), size)]


def app_for(model_dir: Path, script: list[Any], **overrides: Any) -> tuple[httpx.AsyncClient, ScriptedClient]:
    engine = ScriptedClient(model_dir, script)
    return asgi_client(create_app(make_settings(model_dir, **overrides), engine)), engine


async def chat(c: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("messages", ASK)
    return await c.post("/v1/chat/completions", json=body)


# --- response shapes --------------------------------------------------------------------------------


async def test_streamed_calls_name_first_then_arguments(server_model46_dir: Path) -> None:
    client, _ = app_for(server_model46_dir, pieces("<think>Hm.</think>" + TWO_CALLS))
    async with client as c:
        r = await chat(c, tools=TOOLS, stream=True, n=2, stream_options={"include_usage": True})
    assert r.status_code == 200, r.text
    events, done = parse_sse(r.text)
    assert done and events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    for index in (0, 1):
        deltas = [ch["delta"] for e in events for ch in e["choices"] if ch["index"] == index]
        finishes = [ch["finish_reason"] for e in events for ch in e["choices"] if ch["index"] == index]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "Hm."
        assert "".join(d.get("content", "") for d in deltas) == "Let me check."
        calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
        assert all(len(piece) == 1 for piece in calls)  # one piece per event
        flat = [piece[0] for piece in calls]
        arguments: dict[int, str] = {}
        for piece in flat:
            if piece["index"] not in arguments:
                # A call's first event: its id, type and name, and no arguments yet.
                assert piece["id"].startswith("call_") and piece["type"] == "function"
                assert piece["function"] == {"name": WANT[piece["index"]][0], "arguments": ""}
                arguments[piece["index"]] = ""
            else:
                assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                arguments[piece["index"]] += piece["function"]["arguments"]
        assert [json.loads(arguments[i]) for i in sorted(arguments)] == [w[1] for w in WANT]
        assert [f for f in finishes if f] == ["tool_calls"]


async def test_whole_answers_with_and_without_text(server_model46_dir: Path) -> None:
    for script, content in ((pieces(TWO_CALLS), "Let me check."), (pieces(CALLS_ONLY), None)):
        client, _ = app_for(server_model46_dir, script)
        async with client as c:
            r = await chat(c, tools=TOOLS)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        message = choice["message"]
        assert message["content"] == content  # null when the answer is only calls, as OpenAI's
        assert [
            (t["type"], t["function"]["name"], json.loads(t["function"]["arguments"]))
            for t in message["tool_calls"]
        ] == [("function", name, arguments) for name, arguments in WANT]
        assert len({t["id"] for t in message["tool_calls"]}) == 2


async def test_tags_survive_skip_special_tokens_only_when_parsed(server_model46_dir: Path) -> None:
    client, engine = app_for(server_model46_dir, pieces(TWO_CALLS))
    async with client as c:
        assert (await chat(c, tools=TOOLS, skip_special_tokens=True)).status_code == 200
        assert (await chat(c, tools=TOOLS, tool_choice="none", skip_special_tokens=True)).status_code == 200
    parsed, plain = engine.requests
    assert parsed.params.skip_special_tokens is False and plain.params.skip_special_tokens is True


async def test_required_and_named_calls_are_constrained(server_model46_dir: Path) -> None:
    client, engine = app_for(server_model46_dir, pieces(CALLS_ONLY))
    async with client as c:
        for choice in ("required", {"type": "function", "function": {"name": "search"}}):
            r = await chat(
                c, tools=TOOLS, tool_choice=choice, chat_template_kwargs={"enable_thinking": False}
            )
            assert r.status_code == 200, r.text
        r = await chat(c, tools=TOOLS, response_format={"type": "json_object"})
        assert r.status_code == 200, r.text
        refused = await chat(c, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
        unknown = await chat(c, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
        no_tools = await chat(c, tool_choice="required")
    required, named, json_answer = engine.requests
    assert required.params.structured.kind == "lark" and not required.params.structured.allow_thinking
    assert (
        named.params.structured.kind == "lark"
        and named.params.structured.grammar != required.params.structured.grammar
    )
    assert json_answer.params.structured.kind == "json_object"
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format"
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tool_choice.function.name"
    assert no_tools.status_code == 400 and no_tools.json()["error"]["param"] == "tool_choice"


# --- prompts: parity with transformers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf46(server_model46_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(server_model46_dir)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [True, False])
async def test_prompts_with_tools_match_transformers(
    server_model46_dir: Path, hf46: Any, name: str, thinking: bool
) -> None:
    """An OpenAI request (history with tool calls as JSON text and tool results) becomes the same
    token ids as transformers' rendering of the same conversation with the same tools."""
    kwargs: dict[str, Any] = {} if thinking else {"enable_thinking": False}
    client, engine = app_for(server_model46_dir, [("ok", [1], None)])
    async with client as c:
        r = await chat(
            c, messages=CONVERSATIONS[name], tools=TEMPLATE_TOOLS, max_tokens=1, chat_template_kwargs=kwargs
        )
        assert r.status_code == 200, r.text
        r = await chat(
            c, messages=CONVERSATIONS[name], tools=TEMPLATE_TOOLS, tool_choice="none", max_tokens=1
        )
        assert r.status_code == 200, r.text
    with_tools, choice_none = engine.requests
    messages = for_transformers(CONVERSATIONS[name])
    want = hf46.apply_chat_template(
        messages, tools=TEMPLATE_TOOLS, tokenize=True, add_generation_prompt=True, **kwargs
    )
    assert with_tools.prompt_token_ids == list(want["input_ids"])
    # tool_choice "none": the tools are not rendered, the history still is.
    want_none = hf46.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert choice_none.prompt_token_ids == list(want_none["input_ids"])


async def test_images_in_tool_results(server_model46_dir: Path, image_url: Any) -> None:
    client, engine = app_for(server_model46_dir, [("ok", [1], None)])
    result = {
        "role": "tool",
        "tool_call_id": "s",
        "content": [
            {"type": "text", "text": "Here it is:"},
            {"type": "image_url", "image_url": {"url": image_url()}},
        ],
    }
    asked = {"role": "assistant", "content": None, "tool_calls": [{"id": "s", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}  # fmt: skip
    async with client as c:
        r = await chat(c, messages=[*ASK, asked, result], tools=TOOLS, max_tokens=1)
        assert r.status_code == 200, r.text
        bad = await chat(c, messages=[*ASK, {**asked, "tool_calls": [{**asked["tool_calls"][0], "function": {"name": "get_time", "arguments": "[1"}}]}])  # fmt: skip
        image_in_assistant = await chat(
            c, messages=[*ASK, {"role": "assistant", "content": result["content"]}]
        )
    (request,) = engine.requests
    assert len(request.images) == 1
    assert "<tool_response>\nHere it is:<|begin_of_image|>" in request.prompt_text
    assert (
        bad.status_code == 400
        and bad.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"
    )
    assert image_in_assistant.status_code == 400
    assert image_in_assistant.json()["error"]["param"] == "messages[1].content[1]"


# --- a model without tool calling ----------------------------------------------------------------------


async def test_model_without_tool_calling(server_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    client, engine = app_for(server_model_dir, [("ok", [1], None)])
    call = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    async with client as c:
        with caplog.at_level(logging.WARNING, logger="glmv.tasks"):
            ignored = await chat(c, tools=TOOLS)
            streamed = await chat(c, tools=TOOLS, tool_choice="auto", stream=True)
        required = await chat(c, tools=TOOLS, tool_choice="required")
        tool_message = await chat(c, messages=[*ASK, {"role": "tool", "tool_call_id": "c", "content": "x"}])
        history_call = await chat(
            c, messages=[*ASK, {"role": "assistant", "content": "", "tool_calls": [call]}]
        )
        models = (await c.get("/v1/models")).json()
    assert ignored.status_code == 200 and ignored.json()["choices"][0]["message"] == {
        "role": "assistant", "content": "ok", "reasoning_content": None, "refusal": None, "tool_calls": [],
    }  # fmt: skip
    assert streamed.status_code == 200 and parse_sse(streamed.text)[1]
    assert all("get_weather" not in r.prompt_text for r in engine.requests)
    warnings = [r.getMessage() for r in caplog.records if r.name == "glmv.tasks"]
    assert warnings == ["ignoring 4 tool(s): this model's chat template has no tool calling"]  # once
    assert (required.status_code, required.json()["error"]["param"], required.json()["error"]["code"]) == (
        400, "tool_choice", "unsupported_parameter",
    )  # fmt: skip
    assert (tool_message.status_code, tool_message.json()["error"]["param"]) == (400, "messages[1].role")
    assert (history_call.status_code, history_call.json()["error"]["param"]) == (
        400,
        "messages[1].tool_calls",
    )
    assert models["data"][0]["glmv"]["supports_tools"] is False
