"""`ChunkEvents.text`, the streaming fast path of a text delta, writes byte for byte the event
that the general `ChunkEvents.event` serialises from the chunk dict, for every kind of text."""

from __future__ import annotations

import json
from typing import Any

import pytest

from glmv.server.chat import ChunkEvents

TEXTS = [
    "",
    "hello",
    " world",
    'a "quoted" word',
    "back\\slash",
    "new\nline\ttab\r",
    "\x00\x01\x1f\x7f",
    "发票总额：¥1,234.00",
    "emoji 🧾 and é",
    "\u2028\u2029",
    "\ufffd",
    "</think>",
    "{}[]:,",
]


def bases() -> list[dict[str, Any]]:
    base: dict[str, Any] = {
        "id": "chatcmpl-0123",
        "object": "chat.completion.chunk",
        "created": 1764700000,
        "model": 'glmv-模型 "x"',
        "system_fingerprint": "fp_glmv_1",
    }
    return [base, {**base, "usage": None}]


def delta(reasoning: str, content: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if reasoning:
        out["reasoning_content"] = reasoning
    if content:
        out["content"] = content
    return out


@pytest.mark.parametrize("base", bases())
def test_text_events_equal_the_general_serialisation(base: dict[str, Any]) -> None:
    events = ChunkEvents(base)
    checked = 0
    for index in (0, 1, 7):
        for reasoning in TEXTS:
            for content in TEXTS:
                fast = events.text(index, reasoning, content)
                assert fast == events.event(index, delta(reasoning, content))
                checked += 1
    assert checked == 3 * len(TEXTS) ** 2


def test_text_event_parses_back() -> None:
    events = ChunkEvents(bases()[1])
    line = events.text(2, "因为", 'say "hi"\n')
    assert line.startswith("data: ") and line.endswith("\n\n")
    obj = json.loads(line[6:])
    assert obj["usage"] is None
    assert obj["choices"] == [
        {
            "index": 2,
            "delta": {"reasoning_content": "因为", "content": 'say "hi"\n'},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
