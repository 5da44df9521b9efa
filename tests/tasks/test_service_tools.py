"""Tool calling in the generation service: the plan reaches the template, each choice's answer is
parsed for calls (stream and whole alike), and finish reasons say `tool_calls`."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from glmv.errors import InvalidRequestError
from glmv.tasks.config import EngineConfig, ServiceConfig
from glmv.tasks.service import GenerationService, create_service
from glmv.tasks.types import GenerationRequest, SamplingParams

from .scripted import ScriptedClient
from .test_tool_calls import TOOLS, TWO_CALLS

ANSWER = "<think>Two lookups.</think>" + TWO_CALLS
WANT = [
    ("get_weather", {"city": 'Paris, "FR"\n', "days": 3}),
    ("search", {"query": "invoice 42", "filters": {"year": 2024, "tags": ["a", "b"]}, "exact": True}),
]


def service_for(model_dir: Path, client: ScriptedClient) -> GenerationService:
    return create_service(ServiceConfig(EngineConfig(model=str(model_dir)), image_workers=0), client=client)


def cuts(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + rng.randint(1, 9))
        pieces.append(text[start:end])
        start = end
    return pieces


def ask(service: GenerationService, tool_choice: object = None, n: int = 1) -> GenerationRequest:
    plan = service.plan_tools(TOOLS, tool_choice)
    return GenerationRequest(
        [{"role": "user", "content": "Weather in Paris and invoice 42?"}],
        params=SamplingParams(n=n),
        tools=plan,
    )


@pytest.mark.parametrize("seed", range(3))
async def test_stream_and_generate_parse_calls_per_choice(tiny46_dir: Path, seed: int) -> None:
    client = ScriptedClient(tiny46_dir, [(piece, [1], None) for piece in cuts(ANSWER, seed)])
    service = service_for(tiny46_dir, client)
    stream = service.stream(ask(service, n=2))
    chunks = [c async for c in stream]
    await stream.aclose()
    for index in (0, 1):
        deltas = [d for c in chunks for d in c.deltas if d.index == index]
        assert "".join(d.reasoning for d in deltas) == "Two lookups."
        assert "".join(d.content for d in deltas) == "Let me check."
        pieces = [p for d in deltas for p in d.tool_calls]
        firsts = [p for p in pieces if p.id is not None]
        assert [p.name for p in firsts] == ["get_weather", "search"]
        for call_index, (name, arguments) in enumerate(WANT):
            mine = [p for p in pieces if p.index == call_index]
            assert mine[0].id is not None and mine[0].name == name  # the name comes first
            assert all(p.id is None and p.name is None for p in mine[1:])
            assert json.loads("".join(p.arguments for p in mine)) == arguments
        assert [d.finish_reason for d in deltas if d.finish_reason] == ["tool_calls"]
        assert "".join(d.text for d in deltas) == ANSWER  # the raw text keeps every tag

    result = await service.generate(ask(service, n=2))
    for choice in result.choices:
        assert choice.finish_reason == "tool_calls" and choice.content == "Let me check."
        assert [(c.name, json.loads(c.arguments)) for c in choice.tool_calls] == WANT
        assert all(c.id.startswith("call_") for c in choice.tool_calls)
    ids = [c.id for choice in result.choices for c in choice.tool_calls]
    assert len(set(ids)) == len(ids) == 4


async def test_answers_without_calls_and_cut_calls(tiny46_dir: Path) -> None:
    service = service_for(
        tiny46_dir, ScriptedClient(tiny46_dir, [("Just ", [1], None), ("text.", [2], None)])
    )
    result = await service.generate(ask(service))
    assert (result.choices[0].content, result.choices[0].tool_calls, result.choices[0].finish_reason) == (
        "Just text.",
        [],
        "stop",
    )
    cut = TWO_CALLS[: TWO_CALLS.index("invoice") + 3]
    client = ScriptedClient(tiny46_dir, [(cut, [1], None)], finish="length")
    service = service_for(tiny46_dir, client)
    result = await service.generate(ask(service))
    choice = result.choices[0]
    assert choice.finish_reason == "length"  # only an answer that ended normally is "tool_calls"
    assert [c.name for c in choice.tool_calls] == ["get_weather", "search"]
    assert json.loads(choice.tool_calls[1].arguments) == {"query": "inv"}  # still valid JSON


async def test_the_plan_reaches_the_template(tiny46_dir: Path) -> None:
    client = ScriptedClient(tiny46_dir, [("ok", [1], None)])
    service = service_for(tiny46_dir, client)
    assert service.supports_tools and service.accepts_tool_messages
    await service.generate(ask(service))
    await service.generate(ask(service, tool_choice="none"))
    await service.generate(
        GenerationRequest([{"role": "user", "content": "Weather in Paris and invoice 42?"}])
    )
    with_tools, choice_none, without = client.requests
    assert "# Tools" in with_tools.prompt_text and '"name": "get_weather"' in with_tools.prompt_text
    assert choice_none.prompt_token_ids == without.prompt_token_ids  # "none": the model is not told


async def test_required_and_named_calls_carry_the_grammar(tiny46_dir: Path) -> None:
    service = service_for(tiny46_dir, ScriptedClient(tiny46_dir, [("x", [1], None)]))
    required = service.plan_tools(TOOLS, "required")
    named = service.plan_tools(TOOLS, {"type": "function", "function": {"name": "search"}})
    assert required.constraint is not None and required.constraint.kind == "lark"
    assert named.constraint is not None and named.named == "search"
    assert service.plan_tools(TOOLS, "auto").constraint is None
    with pytest.raises(InvalidRequestError) as refused:
        service.plan_tools(TOOLS, "required", has_response_format=True)
    assert refused.value.param == "response_format"


async def test_models_without_tool_calling_ignore_tools_with_a_warning(
    tiny41_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = ScriptedClient(tiny41_dir, [("ok", [1], None)])
    service = service_for(tiny41_dir, client)
    assert not service.supports_tools and not service.accepts_tool_messages
    with caplog.at_level(logging.WARNING, logger="glmv.tasks"):
        plan = service.plan_tools(TOOLS, None)
        service.plan_tools(TOOLS, "auto")  # said once: clients send their tools with every message
    assert plan.tools is None and not plan.parse
    assert [r.getMessage() for r in caplog.records if r.name == "glmv.tasks"] == [
        "ignoring 4 tool(s): this model's chat template has no tool calling"
    ]
    result = await service.generate(
        GenerationRequest([{"role": "user", "content": "hi"}], params=SamplingParams(), tools=plan)
    )
    assert result.choices[0].content == "ok" and result.choices[0].tool_calls == []
    assert "get_weather" not in client.requests[0].prompt_text
    for choice in ("required", {"type": "function", "function": {"name": "search"}}):
        with pytest.raises(InvalidRequestError) as refused:
            service.plan_tools(TOOLS, choice)
        assert (refused.value.param, refused.value.code) == ("tool_choice", "unsupported_parameter")


async def test_parallel_tool_calls_false_keeps_the_first_call(tiny46_dir: Path) -> None:
    client = ScriptedClient(tiny46_dir, [(piece, [1], None) for piece in cuts(TWO_CALLS, 0)])
    service = service_for(tiny46_dir, client)
    request = GenerationRequest(
        [{"role": "user", "content": "Weather?"}], tools=service.plan_tools(TOOLS, "auto", False)
    )
    stream = service.stream(request)
    chunks = [c async for c in stream]
    await stream.aclose()
    assert {p.index for c in chunks for d in c.deltas for p in d.tool_calls} == {0}
    result = await service.generate(request)
    assert [(c.name, json.loads(c.arguments)) for c in result.choices[0].tool_calls] == WANT[:1]
    assert result.choices[0].finish_reason == "tool_calls"
