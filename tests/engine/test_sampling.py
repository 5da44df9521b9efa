"""SamplingParams: defaults, greedy detection, and one InvalidRequestError per bad value."""

from __future__ import annotations

import math

import pytest

from glmv.engine.sampling import SamplingParams
from glmv.errors import ContextLengthExceededError, InvalidRequestError


def test_defaults_are_valid_and_not_greedy() -> None:
    params = SamplingParams()
    params.validate()
    params.validate(max_model_len=4096)
    assert params.n == 1
    assert params.max_tokens is None
    assert params.stop == [] and params.stop_token_ids == []
    assert not params.greedy
    assert not params.top_k_enabled
    assert not params.uses_penalties


def test_default_lists_are_not_shared() -> None:
    a, b = SamplingParams(), SamplingParams()
    a.stop.append("x")
    assert b.stop == []


@pytest.mark.parametrize(
    ("temperature", "greedy"), [(0.0, True), (0, True), (1e-6, True), (0.01, False), (2.0, False)]
)
def test_greedy(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).greedy is greedy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 16},
        {"max_tokens": 1},
        {"min_tokens": 5, "max_tokens": 5},
        {"temperature": 2.0},
        {"temperature": 0},
        {"top_p": 1e-9},
        {"top_k": -1},
        {"top_k": 50},
        {"min_p": 1.0},
        {"repetition_penalty": 0.01},
        {"repetition_penalty": 3.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"seed": -5},
        {"stop": ["a"] * 16},
        {"stop_token_ids": [0, 151329]},
        {"logprobs": 0},
        {"logprobs": 20},
        {"ignore_eos": True, "skip_special_tokens": True},
    ],
)
def test_valid_values(kwargs: dict) -> None:
    SamplingParams(**kwargs).validate(max_model_len=4096)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"n": 1.5}, "n"),
        ({"n": True}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 6, "max_tokens": 5}, "min_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"seed": 1.0}, "seed"),
        ({"stop": "x"}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": ["ok", ""]}, "stop[1]"),
        ({"stop": [3]}, "stop[0]"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids[1]"),
        ({"stop_token_ids": ["1"]}, "stop_token_ids[0]"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"skip_special_tokens": "yes"}, "skip_special_tokens"),
    ],
)
def test_invalid_values_name_the_param(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs).validate()
    assert info.value.param == param
    assert info.value.status_code == 400
    assert info.value.message  # a sentence a user can act on
    assert info.value.to_dict()["error"]["param"] == param


def test_max_tokens_beyond_context() -> None:
    SamplingParams(max_tokens=100).validate(max_model_len=100)
    with pytest.raises(ContextLengthExceededError) as info:
        SamplingParams(max_tokens=101).validate(max_model_len=100)
    assert info.value.param == "max_tokens"
    assert info.value.code == "context_length_exceeded"
    # Without a known context length only the range is checked.
    SamplingParams(max_tokens=10**9).validate()


def test_first_bad_value_is_reported_with_a_clear_message() -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(temperature=5.0).validate()
    assert "temperature" in info.value.message and "5.0" in info.value.message
