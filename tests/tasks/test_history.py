"""Images of earlier turns: the most recent ones kept, older ones replaced by a placeholder, the
current turn's left alone."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from glmv.tasks.history import HISTORY_IMAGE_PLACEHOLDER, current_turn_start, limit_history_images
from glmv.tasks.images import ImageRef

IMAGE = {"type": "image"}


def turn(text: str, images: int) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}, *[dict(IMAGE) for _ in range(images)]],
    }


def conversation() -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """Three earlier turns with 2, 1 and 2 images, then the current one with 2."""
    messages = []
    for k, images in enumerate((2, 1, 2)):
        messages += [turn(f"q{k}", images), {"role": "assistant", "content": f"a{k}"}]
    messages.append(turn("now", 2))
    refs = [ImageRef(f"data:{k}", f"img{k}") for k in range(7)]
    return messages, refs


def image_texts(messages: list[dict[str, Any]]) -> list[list[str]]:
    """Per user message: "img" or "placeholder" for each image slot."""
    out = []
    for m in messages:
        if m["role"] != "user":
            continue
        slots = []
        for part in m["content"][1:]:
            slots.append(
                "img"
                if part == IMAGE
                else ("placeholder" if part["text"] == HISTORY_IMAGE_PLACEHOLDER else "?")
            )
        out.append(slots)
    return out


@pytest.mark.parametrize(
    ("keep", "slots", "kept"),
    [
        (None, [["img", "img"], ["img"], ["img", "img"], ["img", "img"]], 5),
        (5, [["img", "img"], ["img"], ["img", "img"], ["img", "img"]], 5),
        (3, [["placeholder", "placeholder"], ["img"], ["img", "img"], ["img", "img"]], 3),
        (2, [["placeholder", "placeholder"], ["placeholder"], ["img", "img"], ["img", "img"]], 2),
        (
            0,
            [["placeholder", "placeholder"], ["placeholder"], ["placeholder", "placeholder"], ["img", "img"]],
            0,
        ),
    ],
)
def test_the_most_recent_earlier_images_are_kept(keep: int | None, slots: list[list[str]], kept: int) -> None:
    messages, refs = conversation()
    before = copy.deepcopy(messages)
    out = limit_history_images(messages, refs, keep)
    assert messages == before  # not changed in place
    assert image_texts(out.messages) == slots
    assert (out.kept, out.dropped) == (kept, 5 - kept)
    assert [r.param for r in out.images] == [f"img{k}" for k in range(5 - kept, 7)]
    assert [r.history for r in out.images] == [True] * kept + [False, False]
    assert [r.param for r in out.current] == ["img5", "img6"]
    assert [m["role"] for m in out.messages] == [m["role"] for m in messages]


def test_the_current_turn_starts_after_the_last_assistant_message() -> None:
    tool_turn = [
        turn("q", 1),
        {"role": "assistant", "content": "", "tool_calls": []},
        {"role": "tool", "content": [{"type": "text", "text": "shot"}, dict(IMAGE)]},
    ]
    assert current_turn_start(tool_turn) == 2
    assert current_turn_start([turn("q", 1)]) == 0
    out = limit_history_images(tool_turn, [ImageRef("a", "p0"), ImageRef("b", "p1")], 0)
    assert [r.param for r in out.current] == ["p1"] and [r.param for r in out.images] == ["p1"]
    assert out.messages[0]["content"][1] == {"type": "text", "text": HISTORY_IMAGE_PLACEHOLDER}
    assert out.messages[2] is tool_turn[2]


def test_refs_must_match_the_image_parts() -> None:
    with pytest.raises(ValueError):
        limit_history_images([turn("q", 2)], [ImageRef("a")], 1)
