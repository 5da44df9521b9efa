"""Conversations with tools, rendered and tokenized id for id as transformers does it.

The tiny GLM-4.6V-template checkpoint (`create_tiny_model(variant="glm46v")`): `tools` in the
system block, assistant turns with `tool_calls` (OpenAI shape, `arguments` as JSON text: glmv hands
the template objects, as transformers users must), `role: "tool"` results as text, as several
consecutive results, and with an image inside a tool result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer, Glm4vImageProcessor

from glmv.processing.chat import ChatProcessor
from glmv.processing.tokenizer import Tokenizer
from tests.processing.test_chat import ReferenceProcessor, _image

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city. 天气。",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "snapshot", "description": "Take a picture of the dashboard."}},
]


def call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "tools_only": [{"role": "user", "content": "What's the weather in Paris?"}],
    "one_call_round_trip": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("c1", "get_weather", {"city": "Paris", "days": 2})],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21, "sky": "clear"}'},
    ],
    "parallel_calls": [
        {"role": "user", "content": "Paris and 北京?"},
        {
            "role": "assistant",
            "content": "Checking both.",
            "reasoning_content": "Two cities, two calls.",
            "tool_calls": [
                call("a", "get_weather", {"city": "Paris"}),
                call("b", "get_weather", {"city": "北京", "days": 1}),
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
        {"role": "assistant", "content": "Paris is sunny, 北京 has rain."},
        {"role": "user", "content": "Thanks"},
    ],
    "text_parts_in_a_result": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call("c", "get_weather", {"city": "Oslo"})]},
        {
            "role": "tool",
            "tool_call_id": "c",
            "content": [{"type": "text", "text": "snow, "}, {"type": "text", "text": "-3C"}],
        },
    ],
}

IMAGE_RESULT = [
    {"role": "user", "content": "Show me the dashboard."},
    {"role": "assistant", "content": "", "tool_calls": [call("s", "snapshot", {})]},
    {
        "role": "tool",
        "tool_call_id": "s",
        "content": [{"type": "text", "text": "Here it is:"}, {"type": "image", "image": _image(112, 84, 7)}],
    },
]


class Setup:
    def __init__(self, directory: Path) -> None:
        self.chat = ChatProcessor(Tokenizer.from_pretrained(directory))
        self.hf = AutoTokenizer.from_pretrained(directory)
        self.reference = ReferenceProcessor(
            image_processor=Glm4vImageProcessor(), tokenizer=self.hf, chat_template=self.hf.chat_template
        )


@pytest.fixture(scope="module")
def setup(tiny46_dir: Path) -> Setup:
    return Setup(tiny46_dir)


def for_transformers(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """transformers passes messages to the template as they are: arguments must be objects."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [True, False])
def test_tool_conversations_match_transformers(setup: Setup, name: str, thinking: bool) -> None:
    messages = CONVERSATIONS[name]
    assert setup.chat.supports_tools
    kwargs: dict[str, Any] = {} if thinking else {"enable_thinking": False}
    text = setup.hf.apply_chat_template(
        for_transformers(messages), tools=TOOLS, tokenize=False, add_generation_prompt=True, **kwargs
    )
    ids = setup.hf.apply_chat_template(
        for_transformers(messages), tools=TOOLS, tokenize=True, add_generation_prompt=True, **kwargs
    )["input_ids"]
    prompt = setup.chat.encode(messages, [], [], tools=TOOLS, **kwargs)
    assert prompt.text == text
    assert prompt.token_ids == list(ids)
    assert "<tool_call>" in text or name == "tools_only"
    assert '"name": "get_weather"' in text


def test_image_in_a_tool_result_matches_transformers(setup: Setup) -> None:
    out = setup.reference.apply_chat_template(
        for_transformers(IMAGE_RESULT),
        tools=TOOLS,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
    )
    merge = setup.reference.image_processor.merge_size**2
    counts = [int(np.prod(grid)) // merge for grid in out["image_grid_thw"]]
    assert ChatProcessor.count_images(IMAGE_RESULT) == 1 == len(counts)
    stripped = [
        {**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in IMAGE_RESULT
    ]
    prompt = setup.chat.encode(stripped, counts, ["h"], tools=TOOLS)
    assert prompt.token_ids == [int(i) for i in out["input_ids"][0]]
    assert (
        "<tool_response>\nHere it is:<|begin_of_image|><|image|><|end_of_image|>\n</tool_response>"
        in prompt.text
    )
    span = prompt.image_spans[0]
    assert span.length == counts[0]
