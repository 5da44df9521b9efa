"""The extraction and moderation tasks on given generations: schema resolution, the request they
make, and how an answer becomes a validated object, a 422 or a verdict."""

from __future__ import annotations

import json
import math

import pytest

from glmv.errors import EngineError, InvalidRequestError, UnprocessableEntityError
from glmv.tasks.extraction import extraction_request, extraction_result, extraction_spec, non_finite_numbers
from glmv.tasks.images import ImageRef
from glmv.tasks.moderation import ModerationPolicy
from glmv.tasks.moderator import ModerationInput, moderation_request, moderation_verdict
from glmv.tasks.schemas import BUILTIN_SCHEMAS
from glmv.tasks.types import Choice, Generation, LogprobEntry, TopLogprob, Usage

SCHEMA = {"type": "object", "properties": {"total": {"type": "integer", "minimum": 0}}, "required": ["total"]}


def answer(content: str, finish: str = "stop", completion_tokens: int = 10) -> Generation:
    choice = Choice(0, text=content, content=content, finish_reason=finish)
    return Generation("r", [choice], Usage(prompt_tokens=100, completion_tokens=completion_tokens))


def test_spec_of_a_built_in_and_an_inline_schema() -> None:
    spec = extraction_spec("invoice", "Page 2 matters.")
    assert spec.name == "invoice" and spec.schema == BUILTIN_SCHEMAS["invoice"].schema
    assert "Page 2 matters." in spec.prompt
    inline = extraction_spec(SCHEMA)
    assert inline.name is None and inline.schema == SCHEMA and "total" in inline.prompt
    with pytest.raises(InvalidRequestError) as info:
        extraction_spec("passport")
    assert (info.value.param, info.value.code) == ("schema", "invalid_value")
    with pytest.raises(InvalidRequestError) as info:
        extraction_spec({"type": "object", "properties": {"a": {"not": {}}}})
    assert info.value.param == "schema" and info.value.code == "unsupported_schema"


def test_the_request_puts_the_images_first_and_constrains_the_answer() -> None:
    spec = extraction_spec(SCHEMA)
    images = [ImageRef("data:x", "images[0]"), ImageRef("data:y", "images[1]")]
    request = extraction_request(spec, images, max_tokens=64, thinking=False, thinking_toggle=True)
    [message] = request.messages
    assert [p["type"] for p in message["content"]] == ["image", "image", "text"]
    assert request.images == images and request.template_kwargs == {"enable_thinking": False}
    params = request.params
    assert params.temperature == 0.0 and params.max_tokens == 64
    assert params.structured.close_on_budget and not params.structured.allow_thinking
    assert extraction_request(spec, [], thinking_toggle=False).template_kwargs is None


def test_result_validation_and_truncation() -> None:
    spec = extraction_spec(SCHEMA)
    result = extraction_result(spec, answer('{"total": 12}'), max_tokens=None, max_model_len=2048)
    assert result.data == {"total": 12} and not result.truncated and result.finish_reason == "stop"
    # 40 of a 48-token budget: past the point where the grammar starts closing the object.
    closed = extraction_result(spec, answer('{"total": 1}', completion_tokens=40), max_tokens=48, max_model_len=2048)
    assert closed.truncated
    with pytest.raises(UnprocessableEntityError) as info:
        extraction_result(spec, answer('{"tot', "length"), max_tokens=5, max_model_len=2048)
    assert (info.value.param, info.value.code) == ("max_tokens", "incomplete_output")
    with pytest.raises(UnprocessableEntityError) as info:
        extraction_result(spec, answer('{"total": -1}'), max_tokens=None, max_model_len=2048)
    assert (info.value.param, info.value.code) == ("schema", "schema_validation_failed")
    with pytest.raises(EngineError) as err:
        extraction_result(spec, answer("not json"), max_tokens=None, max_model_len=2048)
    assert err.value.code == "invalid_output"


def _entry(token: str, logprob: float, top: list[tuple[str, float]]) -> LogprobEntry:
    return LogprobEntry(0, token, logprob, list(token.encode()), [TopLogprob(0, t, v, list(t.encode())) for t, v in top])


def test_moderation_request_and_verdict() -> None:
    policy = ModerationPolicy.from_table({"threshold": 0.5, "thresholds": {"violence": 0.9}})
    item = ModerationInput("a text", [ImageRef("data:x", "input[1].image_url")])
    request = moderation_request(policy, item, thinking_toggle=True)
    assert request.params.logprobs == 8 and request.params.temperature == 0.0
    assert [p["type"] for p in request.messages[0]["content"]] == ["image", "text"]
    # The model's answer: every category false, except violence true with P = 0.8 and hate with P = 0.6.
    names = policy.names
    entries = [_entry("{", 0.0, [])]
    for i, name in enumerate(names):
        entries.append(_entry(('"' if i == 0 else ', "') + name + '": ', 0.0, []))
        p_true = {"violence": 0.8, "hate": 0.6}.get(name, 0.1)
        value = "true" if p_true > 0.5 else "false"
        entries.append(_entry(value, math.log(max(p_true, 1 - p_true)), [("true", math.log(p_true)), ("false", math.log(1 - p_true))]))
    entries.append(_entry("}", 0.0, []))
    text = "".join(e.token for e in entries)
    assert json.loads(text)["violence"] is True
    generation = Generation("m", [Choice(0, text=text, content=text, logprobs=entries, finish_reason="stop")], Usage())
    verdict = moderation_verdict(policy, item, generation)
    assert verdict.category_scores["violence"] == pytest.approx(0.8)
    assert verdict.categories["violence"] is False  # below its own threshold 0.9
    assert verdict.categories["hate"] is True and verdict.flagged
    assert verdict.category_applied_input_types["violence"] == ["text", "image"]
    with pytest.raises(EngineError):
        moderation_verdict(policy, item, answer("{", "length"))


def test_a_number_json_cannot_carry_is_a_422() -> None:
    spec = extraction_spec({"type": "object", "properties": {"total": {"type": "number"}}})
    with pytest.raises(UnprocessableEntityError) as info:
        extraction_result(spec, answer('{"total": -1e999}'), max_tokens=None, max_model_len=2048)
    assert (info.value.param, info.value.code) == ("schema", "non_finite_number") and "$.total" in info.value.message
    assert non_finite_numbers({"a": [1.0, {"b": math.nan}], "c": math.inf, "d": 10**400}) == ["$.a[1].b", "$.c"]
    result = extraction_result(spec, answer('{"total": 1e308}'), max_tokens=None, max_model_len=2048)
    assert result.data == {"total": 1e308}
