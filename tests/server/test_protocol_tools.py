"""The OpenAI tool-calling shapes of the protocol models: requests, history, responses, deltas."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from glmv.errors import InvalidRequestError
from glmv.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    NamedToolChoice,
    validation_error_to_glmv,
)

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True,
    },
}


def error_for(body: Any) -> InvalidRequestError:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    return validation_error_to_glmv(info.value.errors())


def test_tool_requests_parse() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                        },
                        {
                            "id": "c2",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {
                    "role": "tool",
                    "tool_call_id": "c2",
                    "content": [
                        {"type": "text", "text": "map:"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                    ],
                },
            ],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
        }
    )
    assert body.tools is not None and body.tools[0].function.name == "get_weather"
    assert body.tools[0].function.parameters == TOOL["function"]["parameters"]
    assert isinstance(body.tool_choice, NamedToolChoice) and body.tool_choice.function.name == "get_weather"
    calls = body.messages[1].tool_calls
    assert calls is not None and [c.function.arguments for c in calls] == [
        '{"city": "Rome"}',
        '{"city": "Oslo"}',
    ]
    assert body.messages[2].tool_call_id == "c1"
    for choice in ("none", "auto", "required"):
        assert (
            ChatCompletionRequest.model_validate(
                {"messages": [{"role": "user", "content": "x"}], "tool_choice": choice}
            ).tool_choice
            == choice
        )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
        ),
        ({"parallel_tool_calls": "sometimes"}, "parallel_tool_calls"),
    ],
)
def test_bad_tool_fields_name_the_parameter(body: dict[str, Any], param: str) -> None:
    error = error_for({"messages": [{"role": "user", "content": "x"}], **body})
    assert error.param == param


def test_bad_history_names_the_parameter() -> None:
    error = error_for(
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": "f"}}],
                }
            ]
        }
    )
    assert error.param == "messages[0].tool_calls[0].id"


def test_tool_call_response_shapes() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
    }
    response = ChatCompletionResponse.model_validate(
        {
            "id": "x",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"content": None, "tool_calls": [call]},
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        }
    )
    assert response.choices[0].message.tool_calls[0].model_dump() == call
    chunk = ChatCompletionChunk.model_validate(
        {
            "id": "x",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            },
                            {"index": 1, "function": {"arguments": '{"ci'}},
                        ]
                    },
                }
            ],
        }
    )
    deltas = chunk.choices[0].delta.tool_calls
    assert deltas is not None and deltas[0].function.name == "get_weather" and deltas[1].id is None
