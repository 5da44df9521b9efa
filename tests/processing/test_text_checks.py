"""`glmv.processing.text_checks`: what is checked before tokenising — valid Unicode anywhere in a
JSON body, and prompts that cannot fit, refused from their byte length alone or after a count
that stops once past the limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmv.errors import ContextLengthExceededError
from glmv.processing.loader import load_tokenizer
from glmv.processing.text_checks import (
    PromptLimit,
    TokenBound,
    count_tokens_upto,
    first_invalid_text,
    invalid_text_path,
)


def test_invalid_text_path_names_the_field() -> None:
    value = {"a": [{"b": "ok"}, {"c": ["x", "\ud800"]}], "d": "fine"}
    assert invalid_text_path(value) == "a[1].c[1]"
    assert invalid_text_path({"k\udfff": 1}) == "body"
    assert invalid_text_path({"x": {"k\udfff": 1}}) == "x"
    assert invalid_text_path({"x": ["\U0001f600", "你好"]}) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a": "\\ud800"}', ("surrogate", "a")),
        (b'{"a": "\\ud83d\\ude00"}', None),  # a pair: one valid character
        (b'{"a": "\\\\ud800"}', None),  # an escaped backslash, then text
        (b'{"a": "\xe9"}', ("encoding", None)),
        (b'{"a": "\xed\xa0\x80"}', ("encoding", None)),  # a surrogate spelled in raw bytes
        (b"not json \\ud800", None),  # the JSON parser reports this one itself
        (json.dumps({"m": ["\U0001f600" * 3, "\udc00"]}).encode(), ("surrogate", "m[1]")),
    ],
)
def test_first_invalid_text(body: bytes, expected: tuple[str, str | None] | None) -> None:
    assert first_invalid_text(body) == expected


def test_token_bound_of_the_tiny_tokenizer_is_a_real_bound(tiny41_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny41_dir)
    bound = TokenBound.of(tokenizer)
    assert bound.max_token_bytes is not None and 1 < bound.max_token_bytes < 100
    for text in ("hello world " * 300, "x" * 5000, "你好，世界" * 400, " " * 3000):
        assert len(tokenizer.encode(text)) >= bound.min_tokens(len(text.encode()))


class SpyEncoder:
    def __init__(self, encode: object) -> None:
        self.encode = encode
        self.chars = 0

    def __call__(self, text: str) -> list[int]:
        self.chars += len(text)
        return self.encode(text)  # type: ignore[operator,no-any-return]


def test_prompt_limit_refuses_huge_text_without_encoding(tiny41_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny41_dir)
    spy = SpyEncoder(tokenizer.encode)
    limit = PromptLimit(2048, spy, TokenBound.of(tokenizer))
    with pytest.raises(ContextLengthExceededError, match="at least"):
        limit.check(["hello world " * 2_000_000])
    assert spy.chars == 0


def test_prompt_limit_counts_no_more_than_the_context_could_hold(tiny41_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny41_dir)
    spy = SpyEncoder(tokenizer.encode)
    limit = PromptLimit(512, spy, TokenBound(10**6))  # no proof from bytes: it must count
    text = "hello world " * 200_000  # 2.4 MB, about 400k tokens
    with pytest.raises(ContextLengthExceededError):
        limit.check([text])
    assert 0 < spy.chars <= 64 * 1024  # a few pieces, not the whole text


def test_prompt_limit_lets_fitting_prompts_through(tiny41_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny41_dir)
    limit = PromptLimit(2048, tokenizer.encode, TokenBound.of(tokenizer))
    limit.check(["hello world " * 100, "short"])
    limit.check_bytes(["hello world " * 100])


def test_count_tokens_upto_is_close_to_the_whole_count(tiny41_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny41_dir)
    text = "the quick brown fox jumps over the lazy dog. " * 2000
    whole = len(tokenizer.encode(text))
    counted = count_tokens_upto(tokenizer.encode, [text], 10**9)
    assert whole - 20 <= counted <= whole


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_body_screen_fed_in_chunks_agrees_with_the_whole_body(size: int) -> None:
    from glmv.processing.text_checks import BodyScreen

    bodies = [
        b'{"a": "x\\ud800y", "b": "ok"}',
        b'{"a": "\\ud83d\\ude00", "b": "\xe4\xbd\xa0\xe5\xa5\xbd"}',
        b'{"a": "caf\xe9"}',
        b'{"a": "\\\\ud800"}',
        '{"m": ["你好", "\\udc00"]}'.encode(),
    ]
    for body in bodies:
        screen = BodyScreen()
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        for chunk in chunks:
            screen.feed(chunk)
        assert screen.finish(chunks) == first_invalid_text(body), body
