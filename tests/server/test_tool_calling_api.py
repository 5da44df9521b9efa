"""Tool calling through the official `openai` client against a real `glmv serve`.

The server runs the tiny random-weight GLM-4.6V-template checkpoint. Its answers are random, so
the tests rely on what constrained decoding guarantees (`tool_choice` "required" or a named
function: well-formed calls whose arguments validate) and on the response shapes; the functions'
parameters are bounded (enums, small integers) so constrained calls finish within a few tokens.
A GLM-4.1V-template checkpoint (no tool calling) ignores tools unless a call is required (400).

"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "北京"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
        },
    },
}
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "integer", "minimum": 0, "maximum": 99},
                "to": {"enum": ["EUR", "USD"]},
            },
            "required": ["amount", "to"],
        },
    },
}
TOOLS = [WEATHER, CONVERT]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
ASK = [{"role": "user", "content": "What's the weather in Paris, and 20 USD in EUR?"}]


@pytest.fixture(scope="module")
def tools_server(server_model46_dir: Path, start_live_server: Callable[..., Any]) -> Iterator[Any]:
    server = start_live_server(server_model46_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(tools_server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=tools_server.api_url, api_key="not-needed", max_retries=0, timeout=120)


def _model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _check_calls(calls: Any, names: set[str]) -> list[dict[str, Any]]:
    assert calls
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append({"id": call.id, "name": call.function.name, "arguments": arguments})
    return out


def test_required_call_non_streaming(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=_model(client),
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        seed=1,
        max_tokens=200,
        extra_body=NO_THINKING,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls, {"get_weather", "convert"})
    assert not choice.message.content


def test_named_call_streams_name_first_then_arguments(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=_model(client),
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "convert"}},
        stream=True,
        seed=2,
        max_tokens=200,
        extra_body=NO_THINKING,
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:
                    # The first piece of a call names it before any argument arrives.
                    assert delta.id and delta.type == "function" and delta.function.name == "convert"
                    calls[delta.index] = {"arguments": ""}
                else:
                    assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    jsonschema.validate(json.loads(calls[0]["arguments"]), SCHEMAS["convert"])


def test_parallel_calls(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=_model(client), messages=ASK, tools=TOOLS, tool_choice="required", n=8, seed=3, max_tokens=300,
        extra_body=NO_THINKING,
    )  # fmt: skip
    counts = [len(_check_calls(c.message.tool_calls, {"get_weather", "convert"})) for c in answer.choices]
    assert max(counts) >= 2  # one answer, several calls
    single = client.chat.completions.create(
        model=_model(client), messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, n=4,
        seed=3, max_tokens=200, extra_body=NO_THINKING,
    )  # fmt: skip
    assert all(len(c.message.tool_calls or []) == 1 for c in single.choices)


def test_tool_choice_none_and_auto(client: openai.OpenAI) -> None:
    none = client.chat.completions.create(
        model=_model(client), messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=16, seed=4
    )
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason in ("stop", "length")
    auto = client.chat.completions.create(
        model=_model(client), messages=ASK, tools=TOOLS, max_tokens=16, seed=4
    )
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert auto.usage is not None and auto.usage.prompt_tokens > none.usage.prompt_tokens  # tools rendered


def test_full_round_trip_with_an_image_result(client: openai.OpenAI, image_url: Callable[..., str]) -> None:
    first = client.chat.completions.create(
        model=_model(client),
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        seed=5,
        max_tokens=200,
        extra_body=NO_THINKING,
    )
    message = first.choices[0].message
    call = _check_calls(message.tool_calls, {"get_weather"})[0]
    history = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "clear", "temp": 21}'},
        {
            "role": "tool",
            "tool_call_id": call["id"],
            "content": [
                {"type": "text", "text": "radar:"},
                {"type": "image_url", "image_url": {"url": image_url()}},
            ],
        },
    ]
    stream = client.chat.completions.create(
        model=_model(client),
        messages=history,
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=12,
        seed=6,
        extra_body=NO_THINKING,
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > first.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the shared prefix was reused
    finishes = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
    assert finishes and finishes[-1] in ("stop", "length", "tool_calls")


def test_bad_tool_requests(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as missing:
        client.chat.completions.create(
            model=_model(client),
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert missing.value.body["param"] == "tool_choice.function.name"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}
    with pytest.raises(openai.BadRequestError) as schema:
        client.chat.completions.create(model=_model(client), messages=ASK, tools=[bad])
    assert schema.value.body["param"] == "tools[0].function.parameters"


def test_model_without_tool_calling(live_server: Any) -> None:
    """GLM-4.1V's template has no tools: ignored when no call is required, else a clear 400."""
    client = openai.OpenAI(base_url=live_server.api_url, api_key="x", max_retries=0, timeout=120)
    answer = client.chat.completions.create(model=_model(client), messages=ASK, tools=TOOLS, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length") and not answer.choices[0].message.tool_calls
    for choice in ("required", {"type": "function", "function": {"name": "convert"}}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=_model(client), messages=ASK, tools=TOOLS, tool_choice=choice
            )
        assert refused.value.body["param"] == "tool_choice"
        assert refused.value.body["code"] == "unsupported_parameter"
