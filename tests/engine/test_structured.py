"""Structured output on the tiny checkpoint: random weights, yet every answer fits its schema.

Hypothesis draws schemas from the supported subset (objects, arrays, strings with bounds,
patterns, formats and enums, bounded integers and numbers, booleans, null, const, anyOf, type
lists, $defs/$ref), each is decoded greedily and the answer must validate with `jsonschema`.
Also: json_object answers parse, constrained rows leave their unconstrained batch neighbours'
greedy tokens unchanged, the thinking rules, masks, the compile cache and the 400s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmv.engine.engine import LLMEngine
from glmv.engine.sampling import SamplingParams
from glmv.engine.structured import (
    BatchMasks,
    GrammarBackend,
    StructuredOutput,
    apply_masks,
    closing_reserve,
    fill_masks,
    json_object_output,
    json_schema_output,
    parse_response_format,
    schema_errors,
    token_bytes_table,
)
from glmv.errors import InvalidRequestError
from glmv.tasks.inputs import InputBuilder
from tests.engine.test_engine import make_engine, request, run

PROMPT = [{"role": "user", "content": "Fill in the JSON."}]


@pytest.fixture(scope="module")
def engine41(tiny41_dir: Path) -> tuple[LLMEngine, InputBuilder]:
    return make_engine(tiny41_dir, max_model_len=2048, kv_cache_gb=0.05)


def generate(
    engine: LLMEngine, builder: InputBuilder, structured: StructuredOutput | None, **kw: Any
) -> dict[str, Any]:
    messages = kw.pop("messages", PROMPT)
    params = SamplingParams(structured=structured, **{"temperature": 0.0, "max_tokens": 512, **kw})
    req = request(builder, messages, [], params)
    return run(engine, [req])[req.request_id]


# --- hypothesis schemas ----------------------------------------------------------------------------

NAMES = st.text("abcdefgh_", min_size=1, max_size=6)
SHORT = st.text("abcxyz 中文-", max_size=4)


@st.composite
def _string(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["bounded", "pattern", "format", "enum"]))
    if kind == "bounded":
        hi = draw(st.integers(0, 6))
        out: dict[str, Any] = {"type": "string", "maxLength": hi}
        if draw(st.booleans()):
            out["minLength"] = draw(st.integers(0, min(hi, 2)))
        return out
    if kind == "pattern":
        return {
            "type": "string",
            "pattern": draw(st.sampled_from(["^[a-z]{1,4}$", "^[0-9]{2,3}$", "^(yes|no)$"])),
        }
    if kind == "format":
        return {"type": "string", "format": draw(st.sampled_from(["date", "time", "uuid"]))}
    return {"type": "string", "enum": draw(st.lists(SHORT, min_size=1, max_size=3, unique=True))}


@st.composite
def _number(draw: st.DrawFn) -> dict[str, Any]:
    lo = draw(st.integers(-50, 50))
    hi = draw(st.integers(lo, lo + 100))
    if draw(st.booleans()):
        return {"type": "integer", "minimum": lo, "maximum": hi}
    return {
        "type": "number",
        "minimum": lo,
        "maximum": hi,
        "multipleOf": draw(st.sampled_from([0.5, 0.25, 1])),
    }


SCALAR = st.one_of(
    st.sampled_from([{"type": "boolean"}, {"type": "null"}]),
    _string(),
    _number(),
    st.builds(lambda v: {"const": v}, st.one_of(st.integers(-9, 9), SHORT, st.booleans(), st.none())),
    st.builds(
        lambda vs: {"enum": vs},
        st.lists(
            st.one_of(st.integers(-9, 9), SHORT, st.booleans()), min_size=1, max_size=3, unique_by=json.dumps
        ),
    ),
    st.builds(lambda n: {"type": ["string", "null"], "maxLength": n}, st.integers(0, 4)),
)


@st.composite
def _object(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    props = draw(st.dictionaries(NAMES, children, min_size=0, max_size=3))
    out: dict[str, Any] = {"type": "object", "properties": props}
    out["required"] = [k for k in props if draw(st.booleans())]
    if draw(st.booleans()):
        out["additionalProperties"] = False
    return out


@st.composite
def _array(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    hi = draw(st.integers(0, 3))
    return {"type": "array", "items": draw(children), "minItems": draw(st.integers(0, hi)), "maxItems": hi}


def _compound(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        _object(children),
        _array(children),
        st.builds(lambda a, b: {"anyOf": [a, b]}, children, children),
    )


SUBSCHEMA = st.recursive(SCALAR, _compound, max_leaves=6)


@st.composite
def top_schemas(draw: st.DrawFn) -> dict[str, Any]:
    props = draw(st.dictionaries(NAMES, SUBSCHEMA, min_size=1, max_size=4))
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": sorted(props)}
    if draw(st.booleans()):  # one property through $defs / $ref
        name = sorted(props)[0]
        schema["$defs"] = {"shared": props[name]}
        props[name] = {"$ref": "#/$defs/shared"}
    return schema


@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(schema=top_schemas())
def test_random_schemas_yield_valid_json(
    engine41: tuple[LLMEngine, InputBuilder], schema: dict[str, Any]
) -> None:
    engine, builder = engine41
    jsonschema.Draft202012Validator.check_schema(schema)
    out = generate(engine, builder, json_schema_output(schema).with_thinking(False), max_tokens=768)
    assert out["finish"][0] == "stop", (schema, out["text"][0])
    value = json.loads(out["text"][0])
    jsonschema.validate(value, schema)
    assert list(value) == list(schema["properties"])  # every property is required, in schema order


# --- json_object, neighbours, thinking ---------------------------------------------------------------


def test_json_object_answers_parse(engine41: tuple[LLMEngine, InputBuilder]) -> None:
    engine, builder = engine41
    out = generate(
        engine,
        builder,
        json_object_output().with_thinking(False),
        n=16,
        temperature=1.0,
        seed=100,
        max_tokens=256,
    )
    finished = [i for i, reason in out["finish"].items() if reason == "stop"]
    assert finished, out["text"]  # random weights: some choices close their strings in time
    for i in range(16):
        text = out["text"][i]
        assert text.startswith("{")
        if i in finished:
            assert isinstance(json.loads(text), dict), text


def test_unconstrained_neighbours_are_unaffected(engine41: tuple[LLMEngine, InputBuilder]) -> None:
    engine, builder = engine41
    free = [{"role": "user", "content": f"Tell me about invoices, part {i}."} for i in range(2)]

    def free_request(i: int) -> Any:
        return request(
            builder, [free[i]], [], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        )

    alone = [run(engine, [r])[r.request_id]["tokens"][0] for r in (free_request(0), free_request(1))]
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}, "required": ["a"]}
    constrained = request(
        builder,
        PROMPT,
        [],
        SamplingParams(
            temperature=0.0, max_tokens=64, structured=json_schema_output(schema).with_thinking(False)
        ),
    )
    mixed = [free_request(0), constrained, free_request(1)]
    together = run(engine, mixed)
    assert together[mixed[0].request_id]["tokens"][0] == alone[0]
    assert together[mixed[2].request_id]["tokens"][0] == alone[1]
    assert json.loads(together[constrained.request_id]["text"][0])["a"] is not None


def test_thinking_prompt_forces_end_of_thinking_first(engine41: tuple[LLMEngine, InputBuilder]) -> None:
    engine, builder = engine41
    backend = engine.grammar_backend()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    params = SamplingParams(
        temperature=0.0, max_tokens=32, structured=json_schema_output(schema).with_thinking(False)
    )
    req = request(builder, PROMPT, [], params)
    assert backend.think_start_id is not None and backend.think_end_id is not None
    req.prompt_token_ids = [*req.prompt_token_ids, backend.think_start_id]  # the prompt opens <think>
    result = run(engine, [req])[req.request_id]
    tokens = result["tokens"][0]
    assert tokens[0] == backend.think_end_id
    text = result["text"][0]
    assert text.startswith("</think>")
    assert json.loads(text.removeprefix("</think>"))["ok"] in (True, False)


def test_grammar_state_thinking_rules(engine41: tuple[LLMEngine, InputBuilder]) -> None:
    engine, _ = engine41
    backend = engine.grammar_backend()
    tok = engine.tokenizer
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
    }
    output = json_schema_output(schema)
    assistant = [backend.assistant_id]

    def allowed(state: Any) -> set[int]:
        masks = fill_masks([state])
        assert masks is not None
        bits = np.unpackbits(masks.bitmask.numpy().view(np.uint8), bitorder="little")
        return set(np.flatnonzero(bits).tolist())

    # Thinking allowed, prompt silent: the first token may open <think>; the grammar waits for </think>.
    state = backend.new_state(output, assistant)
    first = allowed(state)
    assert backend.think_start_id in first and len(first) >= 2
    state.advance(backend.think_start_id)
    # Free reasoning, except that it cannot end the sequence (nor open <think> again).
    reasoning = allowed(state)
    assert not reasoning & set(backend.stop_token_ids)
    assert backend.think_start_id not in reasoning
    assert backend.think_end_id in reasoning and set(tok.encode("let me think")) <= reasoning
    for t in tok.encode("let me think"):
        state.advance(t)
    assert allowed(state) == reasoning
    state.advance(backend.think_end_id)
    assert state.constrains and backend.think_start_id not in allowed(state)
    for t in tok.encode('{"n": 7}'):
        state.advance(t)
    assert state.is_complete and state.error is None
    assert allowed(state) == set(backend.stop_token_ids)  # only the end remains

    # Thinking off: no <think> at the first step.
    state = backend.new_state(output.with_thinking(False), assistant)
    assert backend.think_start_id not in allowed(state)
    # The prompt already closed thinking (<think></think>): no <think> either.
    closed = [*assistant, backend.think_start_id, backend.think_end_id]
    assert backend.think_start_id not in allowed(backend.new_state(output, closed))
    # The prompt opened thinking and thinking is allowed: free until </think>, but no end.
    opened = backend.new_state(output, [*assistant, backend.think_start_id])
    assert allowed(opened) == reasoning


def test_thinking_is_closed_within_the_budget(engine41: tuple[LLMEngine, InputBuilder]) -> None:
    engine, _ = engine41
    backend = engine.grammar_backend()
    output = json_object_output()
    prompt = [backend.assistant_id, backend.think_start_id]

    def allowed(state: Any) -> set[int]:
        masks = fill_masks([state])
        assert masks is not None
        bits = np.unpackbits(masks.bitmask.numpy().view(np.uint8), bitorder="little")
        return set(np.flatnonzero(bits).tolist())

    budget = 100
    reserve = closing_reserve(budget)
    state = backend.new_state(output, prompt, budget)
    text = engine.tokenizer.encode("a")[0]
    for _ in range(budget - reserve):
        assert backend.think_end_id in allowed(state) and len(allowed(state)) > 1
        state.advance(text)
    # Only the answer's reserve is left: </think> is the one token allowed.
    assert allowed(state) == {backend.think_end_id}
    state.advance(backend.think_end_id)
    assert state.active and not state.closing  # close_on_budget not asked: no narrowing
    assert allowed(state) and not allowed(state) & set(backend.stop_token_ids)
    # A budget smaller than the reserve: a silent prompt may not open thinking at all.
    small = backend.new_state(output, [backend.assistant_id], 16)
    assert backend.think_start_id not in allowed(small)
    assert backend.think_start_id in allowed(backend.new_state(output, [backend.assistant_id], 4096))


# --- masks, cache, errors -----------------------------------------------------------------------------


def test_masks_touch_only_constrained_rows(engine41: tuple[LLMEngine, InputBuilder]) -> None:
    engine, _ = engine41
    backend = engine.grammar_backend()
    state = backend.new_state(json_object_output().with_thinking(False), [backend.assistant_id])
    logits = torch.randn(3, engine.model.vocab_size)
    before = logits.clone()
    masks = fill_masks([None, state, None])
    assert masks is not None and masks.rows == [1]
    apply_masks(logits, masks)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(engine.tokenizer.decode([t]).startswith("{") for t in allowed)
    # After dropping row 0 (e.g. non-finite logits) the mask follows its row.
    cut = masks.select([1, 2])
    assert isinstance(cut, BatchMasks) and cut.rows == [0]
    assert masks.select([0, 2]) is None


def test_token_table_keeps_special_tokens_out_of_the_grammar(
    engine41: tuple[LLMEngine, InputBuilder],
) -> None:
    engine, _ = engine41
    tok = engine.tokenizer
    table, special = token_bytes_table(tok, engine.model.vocab_size)
    assert len(table) == engine.model.vocab_size
    assert set(tok.added_token_ids) <= special
    assert set(range(tok.vocab_size, engine.model.vocab_size)) <= special  # padding ids
    for text in ("{", ' "', "发票"):
        ids = tok.encode(text)
        assert b"".join(table[i] for i in ids) == text.encode()


def test_compiled_grammars_are_cached_by_schema(engine41: tuple[LLMEngine, InputBuilder]) -> None:
    engine, _ = engine41
    backend = engine.grammar_backend()
    schema = {"type": "object", "properties": {"cache_probe": {"type": "boolean"}}}
    hits = backend.cache_hits
    a = json_schema_output(schema)
    b = json_schema_output(json.loads(json.dumps(schema)))
    assert a.key == b.key and a.key != json_object_output().key
    backend.matcher(a)
    backend.matcher(b)
    assert backend.cache_hits == hits + 1


@pytest.mark.parametrize(
    ("value", "param", "needle"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}},
            "response_format.json_schema.schema",
            "not",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            },
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
            "response_format.json_schema.schema",
            "not a valid JSON Schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
            "response_format.json_schema.schema",
            "JSON object",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
            "response_format.json_schema.name",
            "name",
        ),
        ({"type": "json_schema"}, "response_format.json_schema", "json_schema"),
        ({"type": "yaml"}, "response_format.type", "yaml"),
    ],
)
def test_bad_response_formats_name_the_problem(value: dict[str, Any], param: str, needle: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_response_format(value)
    assert info.value.param == param
    assert needle in info.value.message
    assert info.value.status_code == 400


def test_response_format_forms() -> None:
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}).kind == "json_object"  # type: ignore[union-attr]
    out = parse_response_format(
        {"type": "json_schema", "json_schema": {"name": "inv", "strict": True, "schema": {"type": "object"}}}
    )
    assert out is not None and (out.kind, out.name, out.strict, out.allow_thinking) == (
        "json_schema",
        "inv",
        True,
        True,
    )
    assert not out.with_thinking(False).allow_thinking and out.with_thinking(False).key == out.key
    # Objects without a rule for other keys get none; an explicit rule is kept.
    loose = json_schema_output({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert '"additionalProperties":false' in loose.grammar.replace(" ", "")
    open_ = json_schema_output({"type": "object", "properties": {"a": {}}, "additionalProperties": True})
    assert '"additionalProperties":true' in open_.grammar.replace(" ", "")


def test_decimal_multiple_of() -> None:
    schema = {"type": "number", "multipleOf": 0.01}
    assert schema_errors(schema, 0.07) == [] and schema_errors(schema, 2300.88) == []
    assert schema_errors(schema, 1.005)
    assert schema_errors({"type": "object", "required": ["a"]}, {}) == ["'a' is a required property"]


def test_backend_needs_a_stop_token(engine41: tuple[LLMEngine, InputBuilder]) -> None:
    engine, _ = engine41
    with pytest.raises(Exception, match="end-of-sequence"):
        GrammarBackend(engine.tokenizer, engine.model.vocab_size, [])


def test_bitmask_unpacking_on_host_and_with_shifts() -> None:
    from glmv.engine.structured import _unpack_with_shifts, unpack_bitmask

    vocab = 100  # not a multiple of 32: the last word is partly padding
    gen = torch.Generator().manual_seed(0)
    allowed = torch.rand(3, vocab, generator=gen) < 0.3
    packed = np.packbits(np.pad(allowed.numpy(), ((0, 0), (0, 28))), axis=1, bitorder="little")
    bitmask = torch.from_numpy(packed.view(np.int32).copy())
    host = unpack_bitmask(bitmask, vocab, torch.device("cpu"))
    assert torch.equal(host, allowed)
    assert torch.equal(_unpack_with_shifts(bitmask, vocab), allowed)  # the accelerator path
    wider = unpack_bitmask(bitmask, vocab + 40, torch.device("cpu"))  # ids past the mask are never allowed
    assert torch.equal(wider[:, :vocab], allowed) and not wider[:, vocab:].any()
