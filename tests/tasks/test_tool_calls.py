"""Tool calls: the request plan, the incremental output parser, and the call grammar."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from glmv.engine.structured import GrammarBackend, fill_masks
from glmv.errors import InvalidRequestError
from glmv.processing.chat import ChatProcessor
from glmv.processing.tiny_tokenizer import write_tiny_tokenizer
from glmv.processing.tokenizer import Tokenizer
from glmv.tasks.tool_calls import (
    Function,
    ToolCallParser,
    finish_reason,
    parse_tool_calls,
    plan_tools,
    tool_call_grammar,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 1, "maxLength": 40},
                "filters": {
                    "type": "object",
                    "properties": {
                        "year": {"type": "integer"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["year"],
                },
                "exact": {"type": "boolean"},
            },
            "required": ["query", "filters"],
        },
    },
}
NO_ARGS = {"type": "function", "function": {"name": "get_time"}}
FREE = {"type": "function", "function": {"name": "note", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, SEARCH, NO_ARGS, FREE]


def functions() -> dict[str, Function]:
    return plan_tools(TOOLS, supports_tools=True).functions  # type: ignore[return-value]


def ids() -> Any:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


TWO_CALLS = (
    'Let me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris, "FR"\n</arg_value>\n'
    "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
    "<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>invoice 42</arg_value>\n"
    '<arg_key>filters</arg_key>\n<arg_value>{"year": 2024, "tags": ["a", "b"]}</arg_value>\n'
    "<arg_key>exact</arg_key>\n<arg_value>true</arg_value>\n</tool_call>"
)


# --- parser --------------------------------------------------------------------------------------


def test_whole_answer_with_parallel_calls() -> None:
    content, calls = parse_tool_calls(TWO_CALLS, functions())
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "search"]
    assert json.loads(calls[0].arguments) == {"city": 'Paris, "FR"\n', "days": 3}
    assert json.loads(calls[1].arguments) == {
        "query": "invoice 42",
        "filters": {"year": 2024, "tags": ["a", "b"]},
        "exact": True,
    }
    # The arguments text is what json.dumps gives for the object.
    for call in calls:
        assert call.arguments == json.dumps(json.loads(call.arguments), ensure_ascii=False)
        assert call.complete
    assert all(functions()[c.name].argument_errors(json.loads(c.arguments)) == [] for c in calls)
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")


def test_answer_without_calls_is_unchanged() -> None:
    for text in ("plain answer", "  spaced  answer \n", "a < b and <tool and </tool_call> text", ""):
        content, calls = parse_tool_calls(text)
        assert (content, calls) == (text, [])


def test_values_without_a_schema_are_json_when_they_parse() -> None:
    text = (
        "<tool_call>unknown\n<arg_key>n</arg_key>\n<arg_value>12</arg_value>\n"
        "<arg_key>s</arg_key>\n<arg_value>twelve</arg_value>\n"
        "<arg_key>l</arg_key>\n<arg_value>[1, 2]</arg_value>\n</tool_call>"
    )
    _, calls = parse_tool_calls(text, functions())
    assert json.loads(calls[0].arguments) == {"n": 12, "s": "twelve", "l": [1, 2]}
    # A string parameter stays a string even when it looks like JSON.
    _, calls = parse_tool_calls(
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>123</arg_value>\n</tool_call>",
        functions(),
    )
    assert json.loads(calls[0].arguments) == {"city": "123"}


def test_call_without_arguments() -> None:
    content, calls = parse_tool_calls("<tool_call>get_time\n</tool_call>", functions())
    assert content == "" and calls[0].name == "get_time" and calls[0].arguments == "{}"
    _, calls = parse_tool_calls("<tool_call>get_time</tool_call>")
    assert calls[0].name == "get_time" and calls[0].arguments == "{}"


def _stream(text: str, cuts: list[int]) -> tuple[str, list[dict[str, Any]], ToolCallParser]:
    parser = ToolCallParser(functions(), new_id=ids())
    pieces = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
    content = ""
    calls: list[dict[str, Any]] = []
    for delta in [*(parser.feed(p) for p in pieces), parser.finish()]:
        content += delta.content
        for d in delta.calls:
            if d.id is not None:
                assert d.index == len(calls) and d.name
                calls.append({"id": d.id, "name": d.name, "arguments": d.arguments})
            else:
                assert d.name is None and d.index == len(calls) - 1
                calls[d.index]["arguments"] += d.arguments
    return content, calls, parser


@pytest.mark.parametrize("seed", range(40))
def test_streaming_equals_whole_for_any_cuts(seed: int) -> None:
    rng = random.Random(seed)
    text = TWO_CALLS if seed % 2 else "Here: " + TWO_CALLS + "\nDone."
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(60, len(text) - 1))))
    content, calls, parser = _stream(text, cuts)
    whole_content, whole_calls = parse_tool_calls(text, functions())
    assert content == whole_content == parser.content
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    assert [c["id"] for c in calls] == [c.id for c in parser.calls]


def test_every_character_alone() -> None:
    content, calls, _ = _stream(TWO_CALLS, list(range(1, len(TWO_CALLS))))
    assert content == "Let me check."
    assert json.loads(calls[1]["arguments"])["filters"] == {"year": 2024, "tags": ["a", "b"]}


def test_names_come_before_arguments_and_strings_stream() -> None:
    parser = ToolCallParser(functions(), new_id=ids())
    assert parser.feed("<tool_call>get_wea").calls == []
    named = parser.feed("ther\n").calls
    assert [d.to_openai() for d in named] == [
        {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    ]
    parser = ToolCallParser(functions(), new_id=ids())
    parser.feed("<tool_call>get_wea")
    first = parser.feed("ther\n<arg_key>city</arg_key>\n<arg_value>Par").calls
    assert first[0].to_openai() == {
        "index": 0,
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Par'},
    }
    more = parser.feed("is</arg_va").calls
    assert [d.to_openai() for d in more] == [{"index": 0, "function": {"arguments": "is"}}]
    more = parser.feed("lue>\n<arg_key>days</arg_key>\n<arg_value>4").calls
    assert [d.arguments for d in more] == ['"']
    more = parser.feed("</arg_value>\n</tool_call>").calls
    assert [d.arguments for d in more] == [', "days": 4}']
    assert parser.calls[0].arguments == '{"city": "Paris", "days": 4}'


def test_cut_off_call_still_has_valid_arguments() -> None:
    for text in (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par",
        "<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>4",
        "<tool_call>get_weather\n<arg_key>ci",
        "<tool_call>get_weather\n",
    ):
        _, calls, parser = _stream(text, [len(text) // 2])
        assert len(calls) == 1 and not parser.calls[0].complete
        assert isinstance(json.loads(calls[0]["arguments"]), dict)
        assert calls[0]["arguments"] == parser.calls[0].arguments
    content, calls = parse_tool_calls("text <tool_call>get_we")
    assert (content, calls) == ("text <tool_call>get_we", [])


def test_finish_reason() -> None:
    assert finish_reason("stop", 2) == "tool_calls"
    assert finish_reason("stop", 0) == "stop"
    assert finish_reason("length", 1) == "length"


def test_template_round_trip(tmp_path: Path) -> None:
    """Calls rendered by the GLM-4.6V template for history parse back to the same calls."""
    write_tiny_tokenizer(tmp_path, template="glm46v")
    chat = ChatProcessor(Tokenizer.from_pretrained(tmp_path))
    calls = [
        {
            "id": "a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'},
        },
        {
            "id": "b",
            "type": "function",
            "function": {
                "name": "search",
                "arguments": json.dumps(
                    {"query": "x y", "filters": {"year": 2020, "tags": []}, "exact": False}
                ),
            },
        },
    ]
    text = chat.render(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": calls}],
        add_generation_prompt=False,
        tools=TOOLS,
    )
    answer = text.split("<|assistant|>")[-1].split("</think>", 1)[1]
    content, parsed = parse_tool_calls(answer, functions())
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
    ]


# --- plan ------------------------------------------------------------------------------------------


def test_plan_modes() -> None:
    auto = plan_tools(TOOLS, None, supports_tools=True)
    assert auto.mode == "auto" and auto.parse and auto.constraint is None and len(auto.tools or []) == 4
    assert plan_tools(TOOLS, "auto", supports_tools=True).tools == auto.tools
    none = plan_tools(TOOLS, "none", supports_tools=True)
    assert none.tools is None and not none.parse and none.parser() is None
    required = plan_tools(TOOLS, "required", supports_tools=True)
    assert required.constraint is not None and required.constraint.kind == "lark" and required.parallel
    assert not plan_tools(TOOLS, "required", False, supports_tools=True).parallel
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "search"}}, supports_tools=True)
    assert named.named == "search" and named.constraint is not None and not named.parallel
    assert plan_tools(None, "auto", supports_tools=True).tools is None
    assert plan_tools([], None, supports_tools=False).warning is None


def test_models_without_tool_calling_ignore_or_refuse() -> None:
    for choice in (None, "auto", "none"):
        plan = plan_tools(TOOLS, choice, supports_tools=False)
        assert plan.tools is None and not plan.parse and plan.constraint is None
        assert plan.warning and "ignoring 4 tool(s)" in plan.warning
    for choice in ("required", {"type": "function", "function": {"name": "search"}}):
        with pytest.raises(InvalidRequestError) as info:
            plan_tools(TOOLS, choice, supports_tools=False)
        assert info.value.param == "tool_choice" and info.value.code == "unsupported_parameter"


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        (TOOLS, "sometimes", "tool_choice"),
        (None, "required", "tool_choice"),
        ([WEATHER, WEATHER], None, "tools[1].function.name"),
        ([{"type": "retrieval"}], None, "tools[0].type"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
            None,
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            None,
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tool_requests(tools: Any, choice: Any, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        plan_tools(tools, choice, supports_tools=True)
    assert info.value.param == param


def test_required_call_cannot_have_a_response_format() -> None:
    with pytest.raises(InvalidRequestError) as info:
        plan_tools(TOOLS, "required", supports_tools=True, has_response_format=True)
    assert info.value.param == "response_format"
    assert plan_tools(TOOLS, "auto", supports_tools=True, has_response_format=True).constraint is None


# --- grammar -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, GrammarBackend]:
    directory = tmp_path_factory.mktemp("tok46")
    write_tiny_tokenizer(directory, template="glm46v")
    tok = Tokenizer.from_pretrained(directory)
    stops = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    return tok, GrammarBackend(tok, tok.vocab_size, stops)


def _sample(
    tok: Tokenizer, backend: GrammarBackend, plan: Any, seed: int, steps: int = 400
) -> tuple[str, bool]:
    """Random tokens under the grammar mask; (text, ended with a stop token)."""
    prompt = tok.encode("<|user|>\nq<|assistant|>\n<think></think>\n")
    state = backend.new_state(plan.constraint, prompt, steps)
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for _ in range(steps):
        masks = fill_masks([state])
        assert masks is not None
        bits = np.unpackbits(masks.bitmask.numpy().view(np.uint8), bitorder="little")[: tok.vocab_size]
        allowed = np.flatnonzero(bits)
        # Prefer ending once possible half of the time, so documents finish.
        stops = [t for t in allowed if t in backend.stop_token_ids]
        token = int(stops[0]) if stops and rng.random() < 0.5 else int(rng.choice(allowed))
        state.advance(token)
        assert state.error is None
        if token in backend.stop_token_ids:
            return tok.decode(out), True
        out.append(token)
    return tok.decode(out), False


@pytest.mark.parametrize("choice", ["required", "get_weather", "search", "get_time", "note"])
def test_grammar_forces_valid_calls(backend: tuple[Tokenizer, GrammarBackend], choice: str) -> None:
    tok, grammar_backend = backend
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    plan = plan_tools(TOOLS, tool_choice, supports_tools=True)
    finished = 0
    for seed in range(12):
        text, ended = _sample(tok, grammar_backend, plan, seed)
        if not ended:
            continue
        finished += 1
        content, calls = parse_tool_calls(text, plan.functions)
        assert content == "" and calls, text
        if choice != "required":
            assert len(calls) == 1 and calls[0].name == choice
        for call in calls:
            assert call.complete
            assert plan.functions[call.name].argument_errors(json.loads(call.arguments)) == [], text
    assert finished > 0


def test_grammar_text_for_string_constraints() -> None:
    spec = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "word": {"type": "string", "minLength": 2, "maxLength": 5},
            "color": {"enum": ["red", "green"]},
        },
        "required": ["code", "word", "color"],
    }
    functions = {"f": Function("f", None, spec)}
    grammar = tool_call_grammar(functions, ["f"], multiple=False)
    assert '<tool_call> "f"' in grammar and '"red" | "green"' in grammar
    assert "(?s:.{2,5})" in grammar and "[A-Z]{3}-[0-9]{2}" in grammar


def test_grammar_samples_follow_string_constraints(backend: tuple[Tokenizer, GrammarBackend]) -> None:
    tok, grammar_backend = backend
    tools = [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                        "word": {"type": "string", "minLength": 2, "maxLength": 5},
                        "color": {"enum": ["red", "green"]},
                        "n": {"type": ["integer", "null"]},
                    },
                    "required": ["code", "word", "color", "n"],
                },
            },
        }
    ]
    plan = plan_tools(tools, "required", supports_tools=True)
    finished = 0
    for seed in range(10):
        text, ended = _sample(tok, grammar_backend, plan, seed)
        if not ended:
            continue
        finished += 1
        _, calls = parse_tool_calls(text, plan.functions)
        for call in calls:
            assert plan.functions["f"].argument_errors(json.loads(call.arguments)) == [], text
    assert finished > 0


# --- through the engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine46(tiny46_dir: Path) -> Any:
    from tests.engine.test_engine import make_engine

    return make_engine(tiny46_dir, max_model_len=2048, kv_cache_gb=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("thinking", [True, False])
def test_engine_required_and_named_calls(engine46: Any, thinking: bool) -> None:
    """The tiny random GLM-4.6V model, sampling freely under the constraint: every answer that ends
    with "stop" is one or more well-formed calls whose arguments validate."""
    from glmv.engine.sampling import SamplingParams
    from tests.engine.test_engine import request, run

    engine, builder = engine46
    backend = engine.grammar_backend()
    messages = [{"role": "user", "content": "Weather in Paris, then search invoices."}]
    cases = []
    for i, choice in enumerate(["required", "get_weather", "search", "get_time"] * 2):
        tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
        plan = plan_tools(TOOLS, tool_choice, supports_tools=True)
        assert plan.constraint is not None
        kwargs = {} if thinking else {"enable_thinking": False}
        prompt = builder.chat.encode(messages, [], [], tools=plan.tools, **kwargs)
        structured = plan.constraint.with_thinking(thinking)
        req = request(
            builder,
            messages,
            [],
            SamplingParams(temperature=1.0, seed=i, max_tokens=96, structured=structured),
        )
        req.prompt_token_ids = list(prompt.token_ids)
        if thinking:  # the template leaves thinking to the model; open it as GLM-4.6V's would
            req.prompt_token_ids.append(backend.think_start_id)
        cases.append((choice, plan, req))
    results = run(engine, [req for _, _, req in cases])
    stopped = 0
    for choice, plan, req in cases:
        result = results[req.request_id]
        assert result.get("error") is None
        if result["finish"][0] != "stop":
            continue
        stopped += 1
        tokens = result["tokens"][0]
        if thinking:
            assert backend.think_end_id in tokens
            tokens = tokens[tokens.index(backend.think_end_id) + 1 :]
        text = engine.tokenizer.decode([t for t in tokens if t not in backend.stop_token_ids])
        content, calls = parse_tool_calls(text, plan.functions)
        assert content == "" and calls, text
        if choice != "required":
            assert [c.name for c in calls] == [choice]
        for c in calls:
            assert plan.functions[c.name].argument_errors(json.loads(c.arguments)) == [], text
        assert finish_reason("stop", len(calls)) == "tool_calls"
    assert stopped >= 2
