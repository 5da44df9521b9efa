"""Structured output: whenever a constrained answer ends with "stop", its content is valid JSON.

200 random JSON Schemas, each with thinking on and off, on the tiny random-weight GLM-4.6V-template
model (sampling at temperature 1, so the model wanders as far as the constraint lets it):

* thinking on: the prompt opens `<think>` (as GLM-4.5V/4.6V templates do), or the model may open it
  with its first token. While it thinks the stop tokens are masked out, and `</think>` is forced
  when only the answer's reserve of the budget is left;
* thinking off: the prompt closes the thinking (`<think></think>`), the answer is JSON at once.

Every answer that finished with "stop" parses and validates against its schema; only "length"
may leave it incomplete. Budgets are small (max_tokens 16-48) so the run stays short.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from glmv.engine.engine import LLMEngine
from glmv.engine.sampling import SamplingParams
from glmv.engine.structured import StructuredOutput, json_object_output, json_schema_output
from glmv.tasks.inputs import InputBuilder
from tests.engine.test_engine import make_engine, request, run

SCHEMAS = 200
WORDS = ["red", "green", "blue", "invoice", "total", "发票", "tax", "a b", 'q"t']


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "enum", "integer", "number", "boolean", "null", "const", "short", "pattern"])
    if kind == "string":
        return {"type": "string"}
    if kind == "short":
        return {"type": "string", "maxLength": rng.randint(1, 6)}
    if kind == "pattern":
        return {"type": "string", "pattern": "^[a-z]{1,4}$"}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice([1, "x", True, None])}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000])}
    return {"type": kind}


def _schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    roll = rng.random()
    if depth < 2 and roll < 0.2:
        return {
            "type": "array",
            "items": _schema(rng, depth + 1),
            "minItems": rng.randint(0, 1),
            "maxItems": rng.randint(1, 3),
        }
    if depth < 2 and roll < 0.45:
        return _object(rng, depth + 1)
    if depth < 2 and roll < 0.55:
        return {"anyOf": [_leaf(rng), _leaf(rng)]}
    return _leaf(rng)


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    names = rng.sample(
        ["id", "name", "total", "items", "date", "ok", "tags", "note", "城市"], rng.randint(1, 4)
    )
    properties = {n: _schema(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": properties, "required": required}


def random_outputs(seed: int = 0) -> list[StructuredOutput]:
    rng = random.Random(seed)
    outputs = []
    for i in range(SCHEMAS):
        if i % 20 == 0:
            outputs.append(json_object_output())
        else:
            outputs.append(json_schema_output(_object(rng, 0), name=f"s{i}"))
    return outputs


@pytest.fixture(scope="module")
def engine46(tiny46_dir: Path) -> tuple[LLMEngine, InputBuilder]:
    return make_engine(tiny46_dir, max_model_len=1024, kv_cache_gb=0.1, max_num_seqs=128)


def _answer(engine: LLMEngine, tokens: list[int]) -> str:
    """The text after the reasoning: everything after the last `</think>` token."""
    backend = engine.grammar_backend()
    end = backend.think_end_id
    if end in tokens:
        tokens = tokens[len(tokens) - tokens[::-1].index(end) :]
    return engine.tokenizer.decode([t for t in tokens if t not in backend.stop_token_ids])


@pytest.mark.slow
def test_every_stop_answer_is_valid_json(engine46: tuple[LLMEngine, InputBuilder]) -> None:
    engine, builder = engine46
    backend = engine.grammar_backend()
    assert backend.think_start_id is not None and backend.think_end_id is not None
    messages = [{"role": "user", "content": "Extract the fields as JSON."}]
    outputs = random_outputs()
    rng = random.Random(1)
    cases = []
    for i, output in enumerate(outputs):
        for thinking in (True, False):
            structured = output.with_thinking(thinking)
            if i % 2:
                structured = structured.with_close_on_budget()
            params = SamplingParams(
                temperature=1.0, max_tokens=rng.choice([16, 32, 48]), seed=i, structured=structured
            )
            req = request(builder, messages, [], params) if thinking else None
            if thinking and i % 4 < 2:  # the template opened the reasoning
                req.prompt_token_ids = [*req.prompt_token_ids, backend.think_start_id]  # type: ignore[union-attr]
            if not thinking:
                prompt = builder.chat.encode(messages, [], [], enable_thinking=False)
                assert prompt.text.endswith("<think></think>\n")
                req = request(builder, messages, [], params)
                req.prompt_token_ids = list(prompt.token_ids)
            cases.append((thinking, output, req))
    results = run(engine, [req for _, _, req in cases])
    stops = {True: 0, False: 0}
    thought = 0
    for thinking, output, req in cases:
        result = results[req.request_id]
        assert result.get("error") is None, result["error"]
        reason = result["finish"][0]
        tokens = result["tokens"][0]
        assert reason in ("stop", "length"), reason
        if not thinking:
            assert backend.think_start_id not in tokens and backend.think_end_id not in tokens
        if reason != "stop":
            continue
        stops[thinking] += 1
        thought += backend.think_end_id in tokens
        text = _answer(engine, tokens)
        value = json.loads(text)
        assert output.validate_output(value) == [], (output.schema, text)
    # Both modes produced finished answers, and reasoning was closed before them.
    assert stops[True] >= 20 and stops[False] >= 20, stops
    assert thought >= 10
