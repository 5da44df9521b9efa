"""Images of earlier turns, in conversations that clients send again whole every turn.

Chat front ends (Open WebUI and most others) send the whole conversation with each new message,
the images of earlier turns included. Counted against the per-request image limit, a chat with
one image per turn would fail for good at its ninth image. `limit_history_images` splits a
conversation's images into the current turn's (the messages after the last assistant message:
the new question, or the tool results the model asked for), which stay under the per-request
limit, and the earlier turns', of which the most recent `keep` are kept and marked
`ImageRef.history`; older ones become a short text part (`HISTORY_IMAGE_PLACEHOLDER`), so the
model still sees that an image was there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from glmv.tasks.images import ImageRef

__all__ = ["HISTORY_IMAGE_PLACEHOLDER", "HistoryImages", "current_turn_start", "limit_history_images"]

HISTORY_IMAGE_PLACEHOLDER = "[an image from earlier in the conversation, no longer shown]"


@dataclass(slots=True)
class HistoryImages:
    """The conversation after `limit_history_images`: its messages and image refs (in document
    order), how many earlier-turn images were kept and how many were replaced."""

    messages: list[dict[str, Any]]
    images: list[ImageRef]
    current: list[ImageRef]  # the current turn's images (the per-request limit applies to these)
    kept: int
    dropped: int


def current_turn_start(messages: Sequence[dict[str, Any]]) -> int:
    """The index of the first message of the current turn: the one after the last assistant
    message (0 when there is none)."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            return index + 1
    return 0


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def limit_history_images(
    messages: list[dict[str, Any]], images: Sequence[ImageRef], keep: int | None
) -> HistoryImages:
    """Keep the most recent `keep` images of earlier turns (None: all of them) and replace older
    ones by a text placeholder. `messages` are template-ready (`{"type": "image"}` parts, one
    per entry of `images`, in document order); they are not changed in place."""
    start = current_turn_start(messages)
    owners: list[int] = []  # the message index of each image, in document order
    for index, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            owners.extend(index for part in content if _is_image(part))
    if len(owners) != len(images):
        raise ValueError(f"{len(owners)} image parts for {len(images)} image refs")
    earlier = sum(1 for owner in owners if owner < start)
    drop = 0 if keep is None else max(0, earlier - max(0, keep))
    refs: list[ImageRef] = []
    current: list[ImageRef] = []
    out = messages
    if drop:
        out = []
        seen = 0
        for message in messages:
            content = message.get("content")
            if not isinstance(content, list) or seen >= drop:
                out.append(message)
                seen += sum(1 for part in content if _is_image(part)) if isinstance(content, list) else 0
                continue
            parts: list[Any] = []
            for part in content:
                if _is_image(part):
                    seen += 1
                    if seen <= drop:
                        parts.append({"type": "text", "text": HISTORY_IMAGE_PLACEHOLDER})
                        continue
                parts.append(part)
            out.append({**message, "content": parts})
    for position, (ref, owner) in enumerate(zip(images, owners, strict=True)):
        if position < drop:
            continue
        if owner < start:
            refs.append(ref if ref.history else replace(ref, history=True))
        else:
            refs.append(ref)
            current.append(ref)
    return HistoryImages(out, refs, current, earlier - drop, drop)
