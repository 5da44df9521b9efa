"""The checkpoint's tokenizer: ids in and out, special tokens, eos ids and the chat template.

`Tokenizer.from_pretrained(dir)` reads a Hugging Face layout checkpoint without transformers:
``tokenizer.json`` through the `tokenizers` library, ``tokenizer_config.json`` for added and named
special tokens and the legacy ``chat_template`` field, ``chat_template.jinja`` /
``chat_template.json`` for the chat template, and ``generation_config.json`` / ``config.json``
for the ids that end a generation. Encoding and decoding are delegated to `tokenizers`, so ids
equal what `transformers.AutoTokenizer` produces for the same directory.

`encode` parses added tokens (``<|user|>`` becomes the role token); `encode_text` takes every
character literally, which is how text that comes from a client (messages, tool results, tool
definitions) must be tokenized: only the chat template's own scaffolding may produce special tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _RawTokenizer

from glmv.errors import CheckpointError

__all__ = ["Tokenizer"]

# Named special-token slots of tokenizer_config.json; chat templates may read them as variables.
_NAMED_SPECIAL_TOKENS: tuple[str, ...] = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path.name} in {path.parent}: {exc}", param=path.name) from exc


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json is either a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [value]
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return list(value)
    return None


class Tokenizer:
    """A loaded checkpoint tokenizer.

    Attributes:
        raw: the underlying `tokenizers.Tokenizer`.
        chat_template: the checkpoint's Jinja chat template, or None.
        eos_token_ids: ids that end a generation (generation_config.json, then config.json, then the
            tokenizer's ``eos_token``), in file order without duplicates.
        special_token_ids: ids of every added token flagged special.
        special_tokens: named special tokens (``eos_token``, ``pad_token``, ...) as text.
        pad_token_id: id of ``pad_token`` or None.
    """

    def __init__(
        self,
        raw: _RawTokenizer,
        *,
        config: dict[str, Any] | None = None,
        chat_template: str | None = None,
        eos_token_ids: list[int] | None = None,
    ) -> None:
        self.raw = raw
        self._plain_raw: _RawTokenizer | None = None
        self.config: dict[str, Any] = dict(config or {})
        self.chat_template = chat_template
        self.special_tokens: dict[str, str] = {}
        for name in _NAMED_SPECIAL_TOKENS:
            content = _token_content(self.config.get(name))
            if content is not None:
                self.special_tokens[name] = content
        decoder = raw.get_added_tokens_decoder()
        self.special_token_ids: set[int] = {token_id for token_id, token in decoder.items() if token.special}
        self.added_token_ids: set[int] = set(decoder)
        if eos_token_ids is None:
            eos_text = self.special_tokens.get("eos_token")
            eos_id = self.token_to_id(eos_text) if eos_text is not None else None
            eos_token_ids = [eos_id] if eos_id is not None else []
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_token_ids))
        pad_text = self.special_tokens.get("pad_token")
        self.pad_token_id: int | None = self.token_to_id(pad_text) if pad_text is not None else None

    # ----------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a checkpoint directory (see the module docstring for the files read)."""
        directory = Path(path)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist", param="model")
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"tokenizer.json is missing from {directory}", param="tokenizer.json")
        try:
            raw = _RawTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises plain Exception subclasses for bad files
            raise CheckpointError(
                f"cannot load tokenizer.json in {directory}: {exc}", param="tokenizer.json"
            ) from exc

        config: dict[str, Any] = {}
        config_file = directory / "tokenizer_config.json"
        if config_file.is_file():
            loaded = _read_json(config_file)
            if not isinstance(loaded, dict):
                raise CheckpointError(
                    f"tokenizer_config.json in {directory} is not a JSON object",
                    param="tokenizer_config.json",
                )
            config = loaded
            _add_missing_tokens(raw, config, directory)

        return cls(
            raw,
            config=config,
            chat_template=_load_chat_template(directory, config),
            eos_token_ids=_load_eos_token_ids(directory),
        )

    # ------------------------------------------------------------------------------------- ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.raw.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; spellings of added tokens become those tokens."""
        return self.raw.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` with every character taken literally: ``"<|user|>"`` typed in a message
        becomes ordinary byte-level pieces, never the added token."""
        if not text:
            return []
        plain = self._plain()
        try:
            ids = plain.encode(text, add_special_tokens=False).ids
        except TypeError:
            # Lone surrogates (JSON allows "\ud800") have no UTF-8 form: encode them as U+FFFD.
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            ids = plain.encode(text, add_special_tokens=False).ids
        if self.added_token_ids.isdisjoint(ids):
            return ids
        return self._split_added(ids)

    def _plain(self) -> _RawTokenizer:
        """The tokenizer without its added tokens (built once, on first use)."""
        if self._plain_raw is None:
            data = json.loads(self.raw.to_str())
            data["added_tokens"] = []
            self._plain_raw = _RawTokenizer.from_str(json.dumps(data))
        return self._plain_raw

    def _split_added(self, ids: list[int]) -> list[int]:
        """A vocabulary whose BPE can merge up to an added token's id (the token is also a model
        piece): re-encode such a token's text in two halves so the id never appears."""
        out: list[int] = []
        for token_id in ids:
            if token_id not in self.added_token_ids:
                out.append(token_id)
                continue
            text = self.raw.decode([token_id], skip_special_tokens=False)
            if len(text) < 2:
                raise CheckpointError(
                    f"the tokenizer cannot spell {text!r} without its added token id {token_id}",
                    param="tokenizer.json",
                )
            half = len(text) // 2
            out.extend(self.encode_text(text[:half]))
            out.extend(self.encode_text(text[half:]))
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.raw.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.raw.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.raw.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.raw.id_to_token(token_id) for token_id in ids]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )


def _add_missing_tokens(raw: _RawTokenizer, config: dict[str, Any], directory: Path) -> None:
    """Add tokens listed in ``added_tokens_decoder`` that tokenizer.json lacks (transformers does too)."""
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        return
    entries: list[tuple[int, dict[str, Any]]] = []
    for key, entry in decoder.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            continue
        if isinstance(entry, dict) and isinstance(entry.get("content"), str):
            entries.append((token_id, entry))
    for token_id, entry in sorted(entries, key=lambda item: item[0]):
        content = entry["content"]
        if raw.token_to_id(content) is not None:
            continue
        token = AddedToken(
            content,
            single_word=bool(entry.get("single_word", False)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", not entry.get("special", False))),
            special=bool(entry.get("special", False)),
        )
        if token.special:
            raw.add_special_tokens([token])
        else:
            raw.add_tokens([token])
        if raw.token_to_id(content) != token_id:
            raise CheckpointError(
                f"tokenizer_config.json in {directory} lists {content!r} as id {token_id}, "
                f"but tokenizer.json gives it id {raw.token_to_id(content)}",
                param="tokenizer_config.json",
            )


def _load_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's ``chat_template``."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"cannot read chat_template.jinja in {directory}: {exc}", param="chat_template.jinja"
            ) from exc
    json_file = directory / "chat_template.json"
    if json_file.is_file():
        data = _read_json(json_file)
        template = _pick_template(data.get("chat_template") if isinstance(data, dict) else None)
        if template is None:
            raise CheckpointError(
                f"chat_template.json in {directory} has no 'chat_template' string", param="chat_template.json"
            )
        return template
    return _pick_template(config.get("chat_template"))


def _pick_template(value: Any) -> str | None:
    """A template field is a string, or a list of ``{"name", "template"}`` where "default" wins."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            item.get("name"): item.get("template")
            for item in value
            if isinstance(item, dict) and isinstance(item.get("template"), str)
        }
        if "default" in named:
            return named["default"]
    return None


def _load_eos_token_ids(directory: Path) -> list[int] | None:
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if not path.is_file():
            continue
        data = _read_json(path)
        if not isinstance(data, dict):
            raise CheckpointError(f"{name} in {directory} is not a JSON object", param=name)
        ids = _as_id_list(data.get("eos_token_id"))
        if ids is None and isinstance(data.get("text_config"), dict):
            ids = _as_id_list(data["text_config"].get("eos_token_id"))
        if ids is not None:
            return ids
    return None
