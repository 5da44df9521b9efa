"""Checks on request text that must run before anything tokenises it.

Two questions are answered here, and only here:

* **Is it text?** JSON lets a client send a lone surrogate (`"\\ud800"`), which Python keeps in a
  `str` but which has no UTF-8 form: the tokenizer, the log and the JSON writer all fail on it.
  `invalid_text_path` walks a parsed JSON value and names the first string (or key) that is not
  valid Unicode, as an OpenAI-style `param` path (`messages[0].content[1].text`).
* **Can it fit?** Tokenising tens of megabytes costs minutes of CPU and gigabytes of memory, only
  to learn that the prompt is longer than the context. `TokenBound` answers from the byte length
  alone when that already proves the text is too long: no token of the vocabulary covers more
  than `max_token_bytes` bytes of input, so a text of `n` UTF-8 bytes has at least
  `n / max_token_bytes` tokens. Between that proof and the context length, `count_tokens_upto`
  tokenises piece by piece and stops as soon as the count passes the limit, so the work done for
  a text is bounded by what the context could ever hold, whatever the text's size.

`PromptLimit` puts both together for a prompt processor: `check_bytes` (the proof only, cheap
enough for the event loop) and `check` (proof, then the bounded count; for a worker thread).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from glmv.errors import ContextLengthExceededError

__all__ = [
    "BodyScreen",
    "PromptLimit",
    "TokenBound",
    "count_tokens_upto",
    "first_invalid_text",
    "invalid_text_path",
    "is_valid_text",
    "utf8_size",
]

# Where a body holds a surrogate escape (`\ud800`..`\udfff`); a body without one cannot produce a
# lone surrogate once parsed (raw UTF-8 bytes of a surrogate are rejected as invalid UTF-8).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")

# Pieces `count_tokens_upto` encodes at a time (characters).
_PIECE_CHARS = 16 * 1024
# Tokens a cut between two pieces may add to the count (a merge that the cut prevented).
_CUT_SLACK = 2


def is_valid_text(text: str) -> bool:
    """True when `text` has a UTF-8 form (no lone surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_size(text: str) -> int:
    """The UTF-8 length of `text` in bytes (lone surrogates count three bytes, as escaped)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def invalid_text_path(value: Any, path: str = "") -> str | None:
    """The `param` path of the first string or object key in `value` (parsed JSON) that is not
    valid Unicode, or None when all are. The root itself is named `body` when it is a string."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not is_valid_text(item):
                return where or "body"
        elif isinstance(item, dict):
            entries = list(item.items())
            for key, child in reversed(entries):
                if isinstance(key, str) and not is_valid_text(key):
                    return where or "body"
                stack.append((child, _join(where, str(key))))
        elif isinstance(item, list):
            for index in range(len(item) - 1, -1, -1):
                stack.append((item[index], _join(where, index)))
    return None


class BodyScreen:
    """`first_invalid_text` fed chunk by chunk as a body arrives, so that no single step scans the
    whole body: UTF-8 is validated incrementally and surrogate escapes are looked for in each
    chunk (with the end of the previous one); only a body holding one is parsed, at `finish`."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._bad_encoding = False
        self._escape_seen = False
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        if not self._bad_encoding:
            try:
                self._decoder.decode(chunk)
            except UnicodeDecodeError:
                self._bad_encoding = True
        if not self._escape_seen:
            window = self._tail + chunk
            self._escape_seen = _SURROGATE_ESCAPE.search(window) is not None
            self._tail = window[-3:]  # an escape is four bytes: three may end the previous chunk

    def finish(self, chunks: Sequence[bytes]) -> tuple[str, str | None] | None:
        """The verdict on the body made of `chunks` (those fed): as `first_invalid_text`."""
        if not self._bad_encoding:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self._bad_encoding = True
        if self._bad_encoding:
            return ("encoding", None)
        if not self._escape_seen:
            return None
        return _surrogate_path(b"".join(chunks))


def _surrogate_path(body: bytes) -> tuple[str, str | None] | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    where = invalid_text_path(parsed)
    return None if where is None else ("surrogate", where)


def first_invalid_text(body: bytes) -> tuple[str, str | None] | None:
    """Screen a raw JSON request body: None when its text is valid, else (reason, param).

    `reason` is `"encoding"` for bytes that are not UTF-8 (JSON bodies must be UTF-8) and
    `"surrogate"` for a string holding a lone surrogate, with `param` naming the field. A body that
    is not JSON at all passes (the JSON parser reports it in its own words)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return ("encoding", None)
    if _SURROGATE_ESCAPE.search(body) is None:
        return None
    return _surrogate_path(body)


@dataclass(frozen=True, slots=True)
class TokenBound:
    """What a tokenizer's vocabulary proves about token counts from byte lengths.

    `max_token_bytes` is the most input bytes one token can stand for (None: no proof possible,
    e.g. a normalizer that may delete characters)."""

    max_token_bytes: int | None

    @classmethod
    def of(cls, tokenizer: Any) -> TokenBound:
        """The bound of a glmv `Tokenizer` (anything with a `tokenizers.Tokenizer` as `.raw`)."""
        raw = getattr(tokenizer, "raw", None)
        if raw is None:
            return cls(None)
        try:
            vocab = raw.get_vocab(with_added_tokens=True)
            normalizer = raw.normalizer
        except Exception:
            return cls(None)
        if not vocab:
            return cls(None)
        # A token's text in UTF-8 is never shorter than the input bytes it covers: byte-level
        # tokens spell each byte as one character, byte-fallback tokens (`<0xE4>`) as six.
        longest = max(len(token.encode("utf-8", "surrogatepass")) for token in vocab)
        factor = _normalizer_factor(normalizer)
        return cls(None if factor is None else longest * factor)

    def min_tokens(self, num_bytes: int) -> int:
        """A lower bound on the tokens of a text of `num_bytes` UTF-8 bytes (0 when unknown)."""
        if self.max_token_bytes is None or num_bytes <= 0:
            return 0
        return -(-num_bytes // self.max_token_bytes)

    def proves_over(self, num_bytes: int, limit: int) -> bool:
        """True when a text of `num_bytes` bytes certainly has more than `limit` tokens."""
        return self.min_tokens(num_bytes) > limit


def _normalizer_factor(normalizer: Any) -> int | None:
    """How much a normalizer can shrink text (bytes in per byte out), None when unbounded."""
    if normalizer is None:
        return 1
    name = type(normalizer).__name__
    # Composition joins at most three code points (a Hangul L+V+T jamo run) into one character.
    if name in ("NFC", "NFKC", "NFD", "NFKD"):
        return 3
    return None


def count_tokens_upto(encode: Any, texts: Iterable[str], limit: int) -> int:
    """Tokens of `texts` together, counted piece by piece and stopping once past `limit`.

    The count of separately encoded pieces can exceed the count of the whole text by a merge per
    cut, so `_CUT_SLACK` tokens per cut are taken off before comparing; the result is then a
    lower bound on the real count when it exceeds `limit` (texts no longer than one piece are
    encoded whole, and counted exactly). `encode(text) -> list[int]`."""
    total = 0
    cuts = 0
    for text in texts:
        if len(text) <= _PIECE_CHARS:
            total += len(encode(text))
        else:
            start = 0
            while start < len(text):
                end = _cut(text, start + _PIECE_CHARS)
                total += len(encode(text[start:end]))
                if end < len(text):
                    cuts += 1
                start = end
                if total - _CUT_SLACK * cuts > limit:
                    return total - _CUT_SLACK * cuts
        if total - _CUT_SLACK * cuts > limit:
            return total - _CUT_SLACK * cuts
    return max(total - _CUT_SLACK * cuts, 0)


def _cut(text: str, end: int) -> int:
    """A cut position near `end`: before a space when one is close (a pre-token boundary)."""
    if end >= len(text):
        return len(text)
    space = text.rfind(" ", end - 256, end)
    return space if space > 0 and space > end - 256 else end


@dataclass(slots=True)
class PromptLimit:
    """The most tokens a prompt may have, checked before the prompt is tokenised.

    `encode` is the processor's own text encoder, `bound` its vocabulary's `TokenBound`."""

    max_tokens: int
    encode: Callable[[str], Sequence[int]]
    bound: TokenBound = field(default_factory=lambda: TokenBound(None))

    def _too_long(self, at_least: int, param: str) -> ContextLengthExceededError:
        return ContextLengthExceededError(
            f"This model's maximum context length is {self.max_tokens} tokens, but the messages "
            f"hold at least {at_least} tokens of text.",
            param=param,
        )

    def check_bytes(self, texts: Iterable[str], param: str = "messages") -> None:
        """Raise `ContextLengthExceededError` when the byte length of `texts` alone proves them
        too long. Costs one pass over the text, no tokenisation."""
        size = sum(utf8_size(t) for t in texts)
        if self.bound.proves_over(size, self.max_tokens - 1):
            raise self._too_long(self.bound.min_tokens(size), param)

    def check(self, texts: Sequence[str], param: str = "messages") -> None:
        """`check_bytes`, then count tokens piece by piece (stopping past the limit) when the text
        is long enough to possibly not fit: at most about `max_tokens` tokens are encoded."""
        size = sum(utf8_size(t) for t in texts)
        if self.bound.proves_over(size, self.max_tokens - 1):
            raise self._too_long(self.bound.min_tokens(size), param)
        if size < self.max_tokens:  # every token covers at least one byte: it fits
            return
        count = count_tokens_upto(self.encode, texts, self.max_tokens - 1)
        if count >= self.max_tokens:
            raise self._too_long(count, param)
