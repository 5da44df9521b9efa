"""Streaming text output: an incremental, UTF-8-safe detokenizer and a stop-string matcher.

`IncrementalDetokenizer` turns a stream of generated token ids into text deltas. A byte-level
BPE vocabulary (GLM's) splits a Chinese character or an emoji over several tokens; decoding such a
partial sequence yields U+FFFD, so the detokenizer holds the incomplete tail back until the
character is complete. It never re-decodes the whole output: each step decodes a short window of
token ids that starts at a *prefix offset* (a few tokens of already-emitted context, so decoders
that treat the start of a sequence specially see the same context as a full decode) and compares
it with the text of the window up to the *read offset* (what was already emitted).

`StopStringMatcher` truncates the text stream before the first stop string, holding back any tail
that could still turn into one.

Invariant (tested): the concatenation of all deltas of `add` plus `finish` equals
`tokenizer.decode(all_output_ids, skip_special_tokens=...)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from glmv.errors import EngineError

__all__ = [
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "TokenizerLike",
    "find_stop",
]

REPLACEMENT_CHAR = "\ufffd"

# Tokens of prompt context placed in front of the output so that its first token decodes as it
# would inside the full sequence (same idea, same size as vLLM's initial offset).
_PROMPT_CONTEXT_TOKENS = 5
# While the decoded tail ends in U+FFFD the window grows. A genuinely incomplete character spans at
# most 4 bytes, so a longer hold means invalid bytes; past this many tokens the window start is
# moved forward to a verified clean boundary so the per-token work stays bounded.
_MAX_HELD_TOKENS = 8
_CHECKPOINT_TRIES = 4


class TokenizerLike(Protocol):
    """The part of `glmv.processing.tokenizer.Tokenizer` the detokenizer uses."""

    special_token_ids: set[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> Sequence[str | None]: ...


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas without splitting UTF-8 characters.

    `prompt_token_ids`: the prompt, whose last few tokens serve as decoding context for the first
    output tokens (ignored if the prompt itself ends inside a character).
    `add(ids)` returns the new text; `finish()` returns whatever was still held back (an invalid
    byte sequence at the very end comes out as U+FFFD, as `decode` renders it). `text` is all
    text emitted so far (the concatenation of the returned deltas).
    """

    __slots__ = (
        "_emitted",
        "_finished",
        "_ids",
        "_n_context",
        "_pieces",
        "_prefix",
        "_prefix_len",
        "_read",
        "_skip",
        "_special",
        "_tok",
    )

    def __init__(
        self,
        tokenizer: TokenizerLike,
        prompt_token_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = False,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._special: frozenset[int] = frozenset(getattr(tokenizer, "special_token_ids", ()) or ())
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]) if prompt_token_ids else []
        context_text = tokenizer.decode(context, skip_special_tokens=skip_special_tokens) if context else ""
        if context_text.endswith(REPLACEMENT_CHAR):
            # The prompt ends inside a character: its text is not stable, so use no context.
            context, context_text = [], ""
        # All ids (context + output). Window = _ids[_prefix:]; _ids[_prefix:_read] decodes to
        # text of length _prefix_len that was already emitted (or is prompt context).
        self._ids: list[int] = context
        self._n_context = len(context)
        self._prefix = 0
        self._read = len(context)
        self._prefix_len = len(context_text)
        # Characters of the window's text already accounted for (emitted or context).
        self._emitted = self._prefix_len
        self._pieces: list[str] = []
        self._finished = False

    # -- public API -------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def output_token_ids(self) -> list[int]:
        """The output token ids added so far (a copy)."""
        return self._ids[self._n_context :]

    @property
    def num_output_tokens(self) -> int:
        return len(self._ids) - self._n_context

    @property
    def finished(self) -> bool:
        return self._finished

    def add(self, token_ids: Iterable[int]) -> str:
        """Append generated token ids; return the newly completed text (may be empty)."""
        if self._finished:
            raise EngineError("detokenizer used after finish()")
        out: list[str] = []
        skip_special = self._skip and bool(self._special)
        for tid in token_ids:
            self._ids.append(tid)
            if skip_special and tid in self._special:
                continue  # renders as nothing; it stays in the window, which is all that matters
            piece = self._step()
            if piece:
                out.append(piece)
        return self._record("".join(out))

    def finish(self) -> str:
        """Flush the held-back tail (as `decode` would render it) and close the stream."""
        if self._finished:
            return ""
        self._finished = True
        if len(self._ids) == self._read:
            return ""
        text = self._decode(self._prefix, len(self._ids))
        return self._record(text[self._emitted :])

    # -- internals --------------------------------------------------------------------------------

    def _decode(self, start: int, end: int) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _record(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta

    def _step(self) -> str:
        n = len(self._ids)
        text = self._decode(self._prefix, n)
        held = text.endswith(REPLACEMENT_CHAR)
        # Everything before a trailing U+FFFD is final: a UTF-8 decoder's output only changes for
        # the last, possibly incomplete, byte sequence.
        end = len(text) - 1 if held else len(text)
        delta = text[self._emitted : end] if end > self._emitted else ""
        if not held:
            if len(text) > self._prefix_len:
                # Clean boundary at n: slide the window (the old read offset becomes the prefix).
                new_prefix_len = len(text) - self._prefix_len
                self._prefix, self._read = self._read, n
                self._prefix_len = self._emitted = new_prefix_len
        else:
            self._emitted = max(self._emitted, end)
            if n - self._read > _MAX_HELD_TOKENS:
                self._checkpoint(text)
        return delta

    def _checkpoint(self, text: str) -> None:
        """Move the read offset to a clean token boundary inside a long held run.

        j is clean when decode(window[:j]) + decode(window[j:]) == decode(window): a split inside
        an unfinished UTF-8 sequence always renders extra U+FFFD on one side, so equality means
        the text before j can no longer change.
        """
        n = len(self._ids)
        low = max(self._read + 1, n - _CHECKPOINT_TRIES)
        for j in range(n - 1, low - 1, -1):
            left = self._decode(self._prefix, j)
            if len(left) <= self._prefix_len or not text.startswith(left):
                continue
            if left + self._decode(j, n) != text:
                continue
            new_prefix_len = len(left) - self._prefix_len
            self._emitted -= self._prefix_len
            self._prefix, self._read = self._read, j
            self._prefix_len = new_prefix_len
            return


# -- stop strings ---------------------------------------------------------------------------------


def find_stop(text: str, stop: Sequence[str]) -> tuple[int, str] | None:
    """Where `text` must be cut for the stop strings: `(index, matched_stop)` or None.

    The cut is at the occurrence that *ends* first (what a stream can decide without looking
    ahead); among stop strings ending at the same place the longest wins. When no stop string
    contains another, this is simply the earliest occurrence.
    """
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for s in stop:
        if not s:
            continue
        i = text.find(s)
        if i < 0:
            continue
        cand = (i + len(s), i, s)
        if best is None or cand[:2] < best[:2]:
            best = cand
    return None if best is None else (best[1], best[2])


class StopStringMatcher:
    """Truncates a text stream before the first stop string.

    `feed(delta)` returns `(text safe to emit now, stopped)`. Text that could be the beginning of a
    stop string is held back until it is resolved; `flush()` releases it at the end of the stream
    when no stop string matched. After a stop, everything further is discarded; `matched` is the
    stop string that fired. Empty stop strings are ignored.
    """

    __slots__ = ("_buf", "_first_chars", "_max_len", "_stop", "matched", "stopped")

    def __init__(self, stop: Sequence[str] | None) -> None:
        self._stop: tuple[str, ...] = tuple(dict.fromkeys(s for s in (stop or ()) if s))
        self._first_chars = frozenset(s[0] for s in self._stop if len(s) > 1)
        self._max_len = max((len(s) for s in self._stop), default=0)
        self._buf = ""
        self.stopped = False
        self.matched: str | None = None

    @property
    def active(self) -> bool:
        """Whether there is anything to match at all."""
        return bool(self._stop)

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stop:
            return delta, False
        buf = self._buf + delta
        hit = find_stop(buf, self._stop)
        if hit is not None:
            idx, matched = hit
            self._buf = ""
            self.stopped = True
            self.matched = matched
            return buf[:idx], True
        # Hold back the longest suffix that is a proper prefix of some stop string.
        hold = 0
        for k in range(min(len(buf), self._max_len - 1), 0, -1):
            if buf[-k] in self._first_chars:
                tail = buf[-k:]
                if any(len(s) > k and s.startswith(tail) for s in self._stop):
                    hold = k
                    break
        self._buf = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Release the held-back text at the end of the stream (empty after a stop)."""
        out, self._buf = self._buf, ""
        return "" if self.stopped else out
