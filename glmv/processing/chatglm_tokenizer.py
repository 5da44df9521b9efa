"""The GLM-4 / GLM-4v-9b tokenizer, read from the files that checkpoint ships.

GLM-4v-9b (`model_type: chatglm`) has no ``tokenizer.json``: its tokenizer is a tiktoken-style
byte-level BPE stored as ``tokenizer.model`` (one ``<base64 token bytes> <rank>`` line per token,
ranks = ids) plus ``tokenizer_config.json``, whose ``added_tokens_decoder`` places the fourteen
GLM special tokens (``<|endoftext|>`` … ``<|end_of_video|>``) right after the ranks. The
checkpoint's own Python tokenizer is remote code; glmv never runs it.

`ChatGLMTokenizer.from_pretrained(dir)` turns the ranks into an equivalent `tokenizers` BPE (the
vocabulary keyed by byte-level strings; one merge per way of splitting a token into two tokens,
ordered by the rank of the merged token, and whole-piece lookup first, which is exactly how
tiktoken's ranked merging behaves), with the GLM-4 split regex in front. It is a
`glmv.processing.tokenizer.Tokenizer`, so the detokenizer and the server use it unchanged.

`encode_text` encodes text with no special-token parsing (tiktoken's ``disallowed_special=()``),
which is how the original builds prompts: a user who types ``<|user|>`` gets the characters, not
the control token. `encode` parses added tokens, like the original's ``tokenizer.encode``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _RawTokenizer

from glmv.errors import CheckpointError
from glmv.processing.bytelevel import bytes_to_unicode
from glmv.processing.tiny_tokenizer import GLM_CORE_SPECIAL_TOKENS, GLM_PRETOKENIZE_REGEX
from glmv.processing.tokenizer import Tokenizer

__all__ = [
    "CHATGLM_SPECIAL_TOKENS",
    "TIKTOKEN_FILE",
    "ChatGLMTokenizer",
    "byte_level_string",
    "read_tiktoken_ranks",
    "write_tiktoken_ranks",
]

TIKTOKEN_FILE = "tokenizer.model"

# The added tokens of GLM-4 / GLM-4v-9b, in id order right after the BPE ranks.
CHATGLM_SPECIAL_TOKENS: tuple[str, ...] = GLM_CORE_SPECIAL_TOKENS


_BYTE_CHARS = bytes_to_unicode()


def byte_level_string(token: bytes) -> str:
    """A token's bytes as the byte-level string `tokenizers` keys its vocabulary with."""
    return "".join(_BYTE_CHARS[b] for b in token)


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken ``tokenizer.model`` file into {token bytes: rank}.

    Ranks must be unique and cover 0 … n-1 (they are the token ids), and every single byte must be
    a token, or some text could not be encoded at all.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}", param=TIKTOKEN_FILE) from exc
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError("expected '<base64 token> <rank>'")
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (ValueError, binascii.Error) as exc:
            raise CheckpointError(
                f"{path}:{number}: not a tiktoken rank line: {exc}", param=TIKTOKEN_FILE
            ) from exc
        if not token or token in ranks:
            raise CheckpointError(f"{path}:{number}: empty or repeated token", param=TIKTOKEN_FILE)
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(
            f"{path}: ranks must be the ids 0 … {len(ranks) - 1}, each once", param=TIKTOKEN_FILE
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} single bytes have no token (e.g. 0x{missing[0]:02x})",
            param=TIKTOKEN_FILE,
        )
    return ranks


def write_tiktoken_ranks(path: str | Path, ranks: dict[bytes, int]) -> None:
    """Write {token bytes: rank} in tiktoken's ``tokenizer.model`` format, by rank."""
    lines = [
        f"{base64.b64encode(tok).decode('ascii')} {rank}"
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")


def _bpe_from_ranks(ranks: dict[bytes, int]) -> models.BPE:
    vocab = {byte_level_string(tok): rank for tok, rank in ranks.items()}
    # tiktoken merges, at every step, the adjacent pair whose concatenation has the lowest rank.
    # A BPE whose merge list holds every (left, right) split of every token, ordered by the rank
    # of the token they make, picks the very same pair.
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            left_rank = ranks.get(left)
            right_rank = ranks.get(right)
            if left_rank is not None and right_rank is not None:
                merges.append((rank, left_rank, right_rank, left, right))
    merges.sort()
    pairs = [(byte_level_string(left), byte_level_string(right)) for _, _, _, left, right in merges]
    # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does.
    return models.BPE(vocab=vocab, merges=pairs, ignore_merges=True, fuse_unk=False, byte_fallback=False)


def _raw_tokenizer(ranks: dict[bytes, int]) -> _RawTokenizer:
    raw = _RawTokenizer(_bpe_from_ranks(ranks))
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    return raw


@lru_cache(maxsize=4)
def _plain_tokenizer_json(path: str, mtime_ns: int, size: int) -> str:
    """The converted BPE (no added tokens) as JSON, cached per file version: building the merge
    list of a 150k vocabulary takes a moment and a server loads the tokenizer more than once."""
    del mtime_ns, size  # part of the cache key only
    return _raw_tokenizer(read_tiktoken_ranks(path)).to_str()


def _special_tokens(config: dict[str, Any], base: int, directory: Path) -> list[tuple[int, str, bool]]:
    """(id, content, special) of the added tokens, from ``added_tokens_decoder`` or GLM's defaults."""
    decoder = config.get("added_tokens_decoder")
    entries: list[tuple[int, str, bool]] = []
    if isinstance(decoder, dict) and decoder:
        for key, entry in decoder.items():
            try:
                token_id = int(key)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(
                    f"tokenizer_config.json in {directory}: added token id {key!r} is not an integer",
                    param="tokenizer_config.json",
                ) from exc
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
                raise CheckpointError(
                    f"tokenizer_config.json in {directory}: added token {key} has no 'content'",
                    param="tokenizer_config.json",
                )
            entries.append((token_id, entry["content"], bool(entry.get("special", True))))
    else:
        entries = [(base + i, content, True) for i, content in enumerate(CHATGLM_SPECIAL_TOKENS)]
    entries.sort()
    expected = list(range(base, base + len(entries)))
    if [token_id for token_id, _, _ in entries] != expected:
        raise CheckpointError(
            f"tokenizer_config.json in {directory}: added tokens must take the ids {base} … "
            f"{base + len(entries) - 1} right after the {base} BPE ranks",
            param="tokenizer_config.json",
        )
    return entries


def _read_json_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}", param=path.name) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object", param=path.name)
    return data


def _eos_ids(directory: Path) -> list[int] | None:
    for name in ("generation_config.json", "config.json"):
        data = _read_json_object(directory / name)
        if data is None:
            continue
        value = data.get("eos_token_id")
        if isinstance(value, int) and not isinstance(value, bool):
            return [value]
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            return list(value)
    return None


class ChatGLMTokenizer(Tokenizer):
    """A GLM-4 tiktoken-format tokenizer as a glmv `Tokenizer` (see the module docstring).

    Attributes beyond `Tokenizer`'s: `plain` (the BPE without added tokens) and `num_bpe_tokens`
    (the number of ranks; the added tokens follow it).
    """

    def __init__(
        self,
        raw: _RawTokenizer,
        plain: _RawTokenizer,
        *,
        config: dict[str, Any] | None = None,
        eos_token_ids: list[int] | None = None,
    ) -> None:
        super().__init__(raw, config=config, chat_template=None, eos_token_ids=eos_token_ids)
        self.plain = plain
        self._plain_raw = plain
        self.num_bpe_tokens = plain.get_vocab_size(with_added_tokens=False)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChatGLMTokenizer:
        """Load ``tokenizer.model`` + ``tokenizer_config.json`` (+ eos ids from
        ``generation_config.json`` / ``config.json``) from a checkpoint directory."""
        directory = Path(path)
        model_file = directory / TIKTOKEN_FILE
        if not model_file.is_file():
            raise CheckpointError(f"{TIKTOKEN_FILE} is missing from {directory}", param=TIKTOKEN_FILE)
        stat = os.stat(model_file)
        plain_json = _plain_tokenizer_json(str(model_file.resolve()), stat.st_mtime_ns, stat.st_size)
        plain = _RawTokenizer.from_str(plain_json)
        raw = _RawTokenizer.from_str(plain_json)
        config = _read_json_object(directory / "tokenizer_config.json") or {}
        base = plain.get_vocab_size(with_added_tokens=False)
        for token_id, content, special in _special_tokens(config, base, directory):
            token = AddedToken(
                content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
            )
            if special:
                raw.add_special_tokens([token])
            else:
                raw.add_tokens([token])
            if raw.token_to_id(content) != token_id:
                raise CheckpointError(
                    f"tokenizer_config.json in {directory}: {content!r} should be id {token_id} "
                    f"but is {raw.token_to_id(content)} (is it also a BPE token?)",
                    param="tokenizer_config.json",
                )
        config.setdefault("eos_token", "<|endoftext|>")
        config.setdefault("pad_token", "<|endoftext|>")
        return cls(raw, plain, config=config, eos_token_ids=_eos_ids(directory))

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with every character taken literally (special tokens are not parsed)."""
        if not text:
            return []
        try:
            return self.plain.encode(text, add_special_tokens=False).ids
        except TypeError:
            # Lone surrogates (JSON allows "\ud800") have no UTF-8 form: encode them as U+FFFD.
            clean = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            return self.plain.encode(clean, add_special_tokens=False).ids

    def special_id(self, token: str) -> int:
        """The id of one added token, or `CheckpointError` naming it."""
        token_id = self.token_to_id(token)
        if token_id is None or token_id not in self.added_token_ids:
            raise CheckpointError(
                f"the tokenizer has no special token {token!r}", param="tokenizer_config.json"
            )
        return token_id

    def __repr__(self) -> str:
        return f"ChatGLMTokenizer(vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"
