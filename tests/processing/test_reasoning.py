"""Tests for glmv.processing.reasoning: splitting GLM output into reasoning and content."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmv.processing.reasoning import ReasoningParser, prompt_opens_thinking, split


def _stream(
    deltas: Sequence[str], starts_in_thinking: bool = False, keep_box_tags: bool = False
) -> tuple[str, str, list[tuple[str, str]]]:
    parser = ReasoningParser(starts_in_thinking=starts_in_thinking, keep_box_tags=keep_box_tags)
    outs = [parser.feed(d) for d in deltas]
    outs.append(parser.flush())
    return "".join(r for r, _ in outs), "".join(c for _, c in outs), outs


def _as_split(reasoning: str, content: str) -> tuple[str | None, str]:
    return (reasoning or None), content


GLM41V = (
    "<think>\nThe image shows a cat.\nIt sits on a mat.\n</think>\n"
    "<answer>\nA cat at <|begin_of_box|>[120,40,560,610]<|end_of_box|>.\n</answer>"
)
GLM46V = "<think>先看图片。\n\n猫在垫子上。</think>\n\n图中是一只猫<|begin_of_box|>猫<|end_of_box|>。"

CASES: list[tuple[str, bool, tuple[str | None, str]]] = [
    # GLM-4.1V: think + answer, newlines next to tags dropped, box tags removed
    (GLM41V, False, ("The image shows a cat.\nIt sits on a mat.", "A cat at [120,40,560,610].")),
    # GLM-4.5V/4.6V style with Chinese; inner blank lines kept
    (GLM46V, False, ("先看图片。\n\n猫在垫子上。", "图中是一只猫猫。")),
    # no tags at all: everything is content
    ("Just an answer.\nSecond line.", False, (None, "Just an answer.\nSecond line.")),
    # thinking disabled: output starts with </think>
    ("</think>\nThe answer is 4.", False, (None, "The answer is 4.")),
    ("</think>The answer is 4.", True, (None, "The answer is 4.")),
    # the template opened <think> in the prompt
    ("\nLet me think.\n</think>\nFour.", True, ("Let me think.", "Four.")),
    # unterminated thinking (e.g. max_tokens hit): all reasoning
    ("<think>\nStill thinking about 中文", False, ("Still thinking about 中文", "")),
    ("Still thinking", True, ("Still thinking", "")),
    # empty thinking block is "no reasoning"
    ("<think></think>Hi", False, (None, "Hi")),
    ("<think>\n\n</think>\n\nHi", False, (None, "Hi")),
    # <answer> without </think> ends the reasoning
    ("<think>r<answer>a</answer>", False, ("r", "a")),
    # literal "<" and unknown tags are ordinary text
    ("a < b and <b>bold</b> <|x|> <thinking", False, (None, "a < b and <b>bold</b> <|x|> <thinking")),
    # a dangling partial tag at the very end stays as text
    ("<think>x</think>y <|begin_of", False, ("x", "y <|begin_of")),
    # trailing newlines of the output are dropped, inner ones kept
    ("</think>line1\n\nline2\n\n", False, (None, "line1\n\nline2")),
    # spaces are not stripped, only newlines
    ("<think> r </think> c ", False, (" r ", " c ")),
]


@pytest.mark.parametrize(("text", "starts", "expected"), CASES)
def test_split_cases(text: str, starts: bool, expected: tuple[str | None, str]) -> None:
    assert split(text, starts_in_thinking=starts) == expected
    assert ReasoningParser.split(text, starts_in_thinking=starts) == expected


@pytest.mark.parametrize(("text", "starts", "expected"), CASES)
def test_every_two_and_three_way_cut_matches_split(
    text: str, starts: bool, expected: tuple[str | None, str]
) -> None:
    n = len(text)
    for i in range(n + 1):
        r, c, _ = _stream([text[:i], text[i:]], starts)
        assert _as_split(r, c) == expected, i
    step = 1 if n <= 80 else 3
    for i in range(0, n + 1, step):
        for j in range(i, n + 1, step):
            r, c, _ = _stream([text[:i], text[i:j], text[j:]], starts)
            assert _as_split(r, c) == expected, (i, j)


@pytest.mark.parametrize("text", [GLM41V, GLM46V])
def test_character_by_character_stream(text: str) -> None:
    r, c, outs = _stream(list(text))
    assert _as_split(r, c) == split(text)
    # no delta ever contains a (piece of a) tag
    for rd, cd in outs:
        for frag in ("<think", "</think", "<answer", "</answer", "<|begin_of_box", "<|end_of_box"):
            assert frag not in rd and frag not in cd


def test_tag_split_inside_is_held_back_then_resolved() -> None:
    p = ReasoningParser()
    assert p.feed("<thi") == ("", "")
    assert p.feed("nk>abc</th") == ("abc", "")
    assert p.in_reasoning
    assert p.feed("ink>") == ("", "")
    assert not p.in_reasoning
    assert p.feed("\n\nAnswer <") == ("", "Answer ")
    assert p.feed("3") == ("", "<3")
    assert p.flush() == ("", "")
    assert p.saw_reasoning


def test_trailing_newlines_held_until_text_follows() -> None:
    p = ReasoningParser(starts_in_thinking=True)
    assert p.feed("step 1\n") == ("step 1", "")
    assert p.feed("\nstep 2\n") == ("\n\nstep 2", "")
    assert p.feed("</think>\nok") == ("", "ok")


def test_keep_box_tags() -> None:
    text = "<think>r</think><|begin_of_box|>[1,2,3,4]<|end_of_box|>"
    assert split(text, keep_box_tags=True) == ("r", "<|begin_of_box|>[1,2,3,4]<|end_of_box|>")
    for i in range(len(text) + 1):
        r, c, _ = _stream([text[:i], text[i:]], keep_box_tags=True)
        assert (r, c) == ("r", "<|begin_of_box|>[1,2,3,4]<|end_of_box|>")


def test_box_tags_do_not_break_newline_handling() -> None:
    text = "<answer>\n<|begin_of_box|>\nA\n<|end_of_box|>\n</answer>"
    assert split(text) == (None, "A")
    assert split("x\n<|begin_of_box|>y<|end_of_box|>\nz") == (None, "x\ny\nz")


def test_prompt_opens_thinking() -> None:
    assert prompt_opens_thinking("[gMASK]<sop><|user|>\nhi<|assistant|><think>")
    assert prompt_opens_thinking("<|user|>hi<|assistant|>\n<think>\n")
    assert not prompt_opens_thinking("<|user|>hi/nothink<|assistant|>\n<think></think>\n")
    assert not prompt_opens_thinking("<|user|>hi<|assistant|></think>")
    assert not prompt_opens_thinking("<|user|>hi<|assistant|>\n")
    # a <think> in an earlier turn does not count
    assert not prompt_opens_thinking("<|assistant|><think>old<|user|>q<|assistant|>")


FRAGMENTS = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "<|begin_of_box|>",
        "<|end_of_box|>",
        "\n",
        "\n\n",
        " ",
        "<",
        "<thi",
        "</",
        "<|",
        "<|begin_of",
        ">",
        "a",
        "word",
        "中文",
        "答案是",
        "😀",
        "x<y",
    ]
)


def _cut(text: str, cuts: Sequence[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    parts, last = [], 0
    for p in points:
        parts.append(text[last:p])
        last = p
    parts.append(text[last:])
    return parts


@settings(max_examples=500, deadline=None)
@given(
    pieces=st.lists(FRAGMENTS, max_size=25),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
    starts=st.booleans(),
    keep_box=st.booleans(),
)
def test_streaming_equals_split_for_random_cuts(
    pieces: list[str], cuts: list[int], starts: bool, keep_box: bool
) -> None:
    text = "".join(pieces)
    r, c, _ = _stream(_cut(text, cuts), starts, keep_box)
    assert _as_split(r, c) == split(text, starts_in_thinking=starts, keep_box_tags=keep_box)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(FRAGMENTS, max_size=25), starts=st.booleans())
def test_split_output_never_contains_section_tags_or_edge_newlines(pieces: list[str], starts: bool) -> None:
    reasoning, content = split("".join(pieces), starts_in_thinking=starts)
    for part in (reasoning or "", content):
        for tag in ("<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>"):
            assert tag not in part
    assert not content.startswith("\n") and not content.endswith("\n")
    if reasoning is not None:
        assert reasoning and not reasoning.startswith("\n") and not reasoning.endswith("\n")
