"""The byte-level BPE alphabet: each of the 256 bytes as one printable character (GPT-2's map),
the way `tokenizers` spells byte-level tokens in its vocabulary."""

from __future__ import annotations

from functools import cache


@cache
def bytes_to_unicode() -> dict[int, str]:
    """byte → the printable character that stands for it."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


@cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse map: printable character → byte."""
    return {c: b for b, c in bytes_to_unicode().items()}
