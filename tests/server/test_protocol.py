"""The OpenAI protocol models: parsing, error locations turned into `param` paths, response shapes,
and the exact bytes reported for each token in logprobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from glmv.errors import InvalidRequestError
from glmv.processing.bytelevel import unicode_to_bytes
from glmv.processing.tokenizer import Tokenizer
from glmv.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ImageContentPart,
    TextContentPart,
    loc_to_param,
    validation_error_to_glmv,
)
from glmv.tasks.tokens import TokenBytes


def error_for(body: Any) -> InvalidRequestError:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    return validation_error_to_glmv(info.value.errors())


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (
            ("body", "messages", 2, "content", "content:parts", 1, "part:image_url", "image_url"),
            "messages[2].content[1].image_url",
        ),
        (("body", "stop", "list[str]", 3), "stop[3]"),
        (("body", "stop", "str"), "stop"),
        (("body", "temperature"), "temperature"),
        (("body",), None),
        (("messages", 0, "role"), "messages[0].role"),
        (("body", "stop_token_ids", 2), "stop_token_ids[2]"),
    ],
)
def test_loc_to_param(loc: tuple[Any, ...], param: str | None) -> None:
    assert loc_to_param(loc) == param


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "messages", "missing_required_parameter"),
        ({"messages": "hi"}, "messages", "invalid_value"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 1}}]}]},
            "messages[0].content[0].image_url.url",
            "invalid_value",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0].type",
            "invalid_value",
        ),
        (
            {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
            "messages[0].content[0].type",
            "invalid_value",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}],
                    }
                ]
            },
            "messages[0].content[0].image_url.detail",
            "invalid_value",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["ok", 1]}, "stop[1]", "invalid_value"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": 1}, "stop", "invalid_value"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 17}, "n", "invalid_value"),
        (
            {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
            "invalid_value",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": "maybe"}},
            "stream_options.include_usage",
            "invalid_value",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [1, -2]},
            "stop_token_ids[1]",
            "invalid_value",
        ),
    ],
)
def test_validation_errors_name_the_field(body: Any, param: str, code: str) -> None:
    error = error_for(body)
    assert error.param == param
    assert error.code == code
    assert error.status_code == 400
    assert param in error.message


def test_union_errors_are_merged_into_one_message() -> None:
    error = error_for({"messages": [{"role": "user", "content": "x"}], "stop": 1})
    assert (
        error.message
        == "Invalid value for 'stop': Input should be a valid string or Input should be a valid list."
    )


def test_invalid_json_error() -> None:
    error = validation_error_to_glmv(
        [
            {
                "type": "json_invalid",
                "loc": ("body", 7),
                "msg": "JSON decode error",
                "ctx": {"error": "Expecting value"},
            }
        ]
    )
    assert error.code == "invalid_json" and error.param is None
    assert "Expecting value" in error.message


def test_parsing_accepts_what_openai_clients_send() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi"},
                        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
                    ],
                },
                {"role": "assistant", "content": None, "reasoning_content": "thought"},
            ],
            "stop": "END",
            "stream": True,
            "stream_options": {"include_usage": True},
            "seed": -(2**63),
            "unknown_field": [1, 2, 3],
        }
    )
    assert req.messages[0].role == "developer"
    parts = req.messages[1].content
    assert isinstance(parts, list)
    assert isinstance(parts[0], TextContentPart)
    assert isinstance(parts[1], ImageContentPart) and parts[1].image_url.url == "data:image/png;base64,AAAA"
    assert req.messages[2].reasoning_content == "thought"
    assert req.stop == "END" and req.seed == -(2**63)
    assert not hasattr(req, "unknown_field")


def test_non_finite_numbers_are_rejected() -> None:
    assert error_for({"messages": [{"role": "user", "content": "x"}], "top_p": float("nan")}).param == "top_p"
    assert (
        error_for({"messages": [{"role": "user", "content": "x"}], "repetition_penalty": float("inf")}).param
        == "repetition_penalty"
    )


def test_response_models_match_what_the_handler_sends() -> None:
    response = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "system_fingerprint": "glmv-0.1.0",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "a",
                    "reasoning_content": None,
                    "refusal": None,
                    "tool_calls": [],
                },
                "logprobs": {
                    "content": [
                        {
                            "token": "a",
                            "logprob": -0.1,
                            "bytes": [97],
                            "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}],
                        }
                    ],
                    "refusal": None,
                },
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "total_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    assert ChatCompletionResponse.model_validate(response).model_dump() == response
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": None, "finish_reason": None}],
    }
    assert ChatCompletionChunk.model_validate(chunk).choices[0].delta.content == "a"


def test_byte_decoder_covers_every_byte() -> None:
    decoder = unicode_to_bytes()
    assert len(decoder) == 256
    assert sorted(decoder.values()) == list(range(256))
    assert decoder["!"] == ord("!") and decoder["Ġ"] == ord(" ")


def test_token_bytes_rebuild_the_text_exactly(server_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained(server_model_dir)
    token_bytes = TokenBytes(tokenizer)
    text = "发票总金额是 1,234.50 元。Invoice total: €1,234.50 <think>ok</think> 龘😀"
    ids = tokenizer.encode(text)
    pieces = [token_bytes(i, tokenizer.decode([i])) for i in ids]
    assert b"".join(bytes(p) for p in pieces) == text.encode("utf-8")
    # Some token holds only part of a multi-byte character: its text is a replacement character,
    # its bytes are exact.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
