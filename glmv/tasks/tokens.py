"""The exact bytes of a token, for logprobs (`bytes` of OpenAI's logprob entries).

A byte-level BPE token may hold part of a UTF-8 character; its decoded text is then a
replacement character, while its bytes are exact, and joining the bytes of a choice's tokens
gives back its text.
"""

from __future__ import annotations

from typing import Any

from glmv.processing.bytelevel import unicode_to_bytes

__all__ = ["TokenBytes"]


class TokenBytes:
    """`token_bytes(token_id, text)`: the raw bytes of a token id (cached)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._decoder = unicode_to_bytes()
        self._added: set[int] = set(getattr(tokenizer, "added_token_ids", set()))
        self._cache: dict[int, list[int]] = {}

    def __call__(self, token_id: int, text: str) -> list[int]:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        piece = self._tokenizer.id_to_token(token_id)
        if token_id in self._added or piece is None or any(ch not in self._decoder for ch in piece):
            out = list(text.encode("utf-8"))
        else:
            out = [self._decoder[ch] for ch in piece]
        if len(self._cache) < 200_000:
            self._cache[token_id] = out
        return out
