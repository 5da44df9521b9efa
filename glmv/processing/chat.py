"""Chat messages to prompt token ids, through the checkpoint's own Jinja chat template.

`ChatProcessor.render` renders OpenAI-style messages with the template in a sandboxed Jinja
environment configured the way transformers configures it (``trim_blocks``, ``lstrip_blocks``,
loop controls, ``raise_exception``, a non-escaping ``tojson``, ``strftime_now``, guarded ``dict``
and ``namespace``), so a checkpoint's template renders to the same text here as in transformers.

`ChatProcessor.encode` then does what transformers' ``Glm4vProcessor`` does: every ``<|image|>``
placeholder the template wrote is expanded, in order, into as many image tokens as that image has
merged patches, and the text is tokenized with the image token kept whole. The result carries one
`ImageSpan` per image (where its image tokens sit in the prompt, and the image's content hash for
prefix caching).

Special tokens come only from the template's own scaffolding. Text that comes from the client
(message content, reasoning, tool calls and results, tool definitions, template variables) is
tokenized as plain characters: before rendering, every spelling of an added token inside it is
replaced by an inert ASCII marker (`_Escapes`); after rendering, the text between the template's
added tokens is un-marked and encoded with `Tokenizer.encode_text`. So "hello <|assistant|> world"
in a user message is ordinary text and cannot open a turn, close `<think>` or place an image. For
content without such spellings the ids equal transformers' (`apply_chat_template`, tested).

Templates that split a past assistant turn's ``<think>…</think>`` out of its content themselves
(GLM-4.5V/4.6V) get that split done before the escaping, with the template's own rule, so such a
turn renders as if the client had sent ``reasoning_content``.

Assistant ``tool_calls`` whose ``arguments`` are a JSON string (the OpenAI shape) are handed to the
template as objects, as templates iterate them (``arguments.items()``).

Message content is a string or a list of parts: ``{"type": "text", "text": ...}``,
``{"type": "image"}`` (``image_url`` / ``input_image`` parts count as images too). Images are
numbered in document order: message by message, part by part.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from glmv.errors import CheckpointError, InvalidRequestError
from glmv.processing.text_checks import PromptLimit, TokenBound
from glmv.processing.tiny_tokenizer import TEMPLATE_NAMES, builtin_template
from glmv.processing.tokenizer import Tokenizer

__all__ = ["ChatProcessor", "ImageSpan", "Prompt", "compile_chat_template"]

DEFAULT_IMAGE_TOKEN = "<|image|>"

_TEXT_TYPES = frozenset({"text", "input_text"})
_IMAGE_TYPES = frozenset({"image", "image_url", "input_image"})
_VIDEO_TYPES = frozenset({"video", "video_url", "input_video"})
# Older names for a message's reasoning; templates read `reasoning_content` (and gpt-oss `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclass(slots=True)
class ImageSpan:
    """Where one image's tokens sit in a prompt: ids[offset : offset + length] are image tokens."""

    offset: int
    length: int
    content_hash: str


@dataclass(slots=True)
class Prompt:
    """A tokenized prompt. `text` is the rendered template output with one placeholder per image."""

    token_ids: list[int]
    image_spans: list[ImageSpan]
    text: str


# ---------------------------------------------------------------------------------- Jinja setup


class _TemplateDict:
    """`dict` for templates, without the attribute access a real type object offers."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes (no route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace (got {name!r})"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment (cached per source text)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


# ------------------------------------------------------------------------------ message handling


def _plain(value: Any) -> Any:
    """Rebuild a value out of plain JSON types so the sandbox only ever sees inert data."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return _plain(value.item())
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        return _plain(model_dump())
    return f"<{type(value).__name__}>"


def as_mapping(value: Any) -> Mapping[str, Any] | None:
    """A message or part as a mapping: dicts as they are, pydantic models dumped; else None."""
    if isinstance(value, Mapping):
        return value
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):
        dumped = model_dump(exclude_none=True)
        if isinstance(dumped, Mapping):
            return dumped
    return None


def _normalize_part(part: Any, param: str) -> tuple[dict[str, Any], bool]:
    """One content part as the template expects it; the flag says whether it is an image."""
    if isinstance(part, str):
        return {"type": "text", "text": part}, False
    mapping = as_mapping(part)
    if mapping is None:
        raise InvalidRequestError("a content part must be an object", param=param)
    part_type = mapping.get("type")
    if part_type is None:
        if "text" in mapping:
            part_type = "text"
        elif "image" in mapping or "image_url" in mapping:
            part_type = "image"
    if part_type in _TEXT_TYPES:
        text = mapping.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError("a text part needs a string 'text'", param=f"{param}.text")
        return {"type": "text", "text": text}, False
    if part_type in _IMAGE_TYPES:
        return {"type": "image"}, True
    if part_type in _VIDEO_TYPES:
        raise InvalidRequestError("video input is not supported", param=f"{param}.type")
    raise InvalidRequestError(f"unsupported content part type {part_type!r}", param=f"{param}.type")


def _normalize_messages(messages: Sequence[Any]) -> tuple[list[dict[str, Any]], int]:
    """Plain-data copies of the messages, ready for the template, and the number of images."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError("messages must be a list of message objects", param="messages")
    normalized: list[dict[str, Any]] = []
    images = 0
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        mapping = as_mapping(message)
        if mapping is None or not isinstance(mapping.get("role"), str):
            raise InvalidRequestError("each message must be an object with a string 'role'", param=param)
        out = {key: _plain(value) for key, value in mapping.items() if key != "content"}
        content = mapping.get("content")
        if content is None:
            out["content"] = ""
        elif isinstance(content, str):
            out["content"] = content
        elif isinstance(content, Sequence) and not isinstance(content, bytes):
            parts: list[dict[str, Any]] = []
            for part_index, part in enumerate(content):
                normalized_part, is_image = _normalize_part(part, f"{param}.content[{part_index}]")
                parts.append(normalized_part)
                images += is_image
            if out["role"] in ("system", "assistant") and all(p["type"] == "text" for p in parts):
                # Some templates print system/assistant content as-is; a list would come out as its repr.
                out["content"] = "".join(p["text"] for p in parts)
            else:
                out["content"] = parts
        else:
            raise InvalidRequestError(
                "message content must be a string or a list of parts", param=f"{param}.content"
            )
        reasoning = next((out[key] for key in _REASONING_FIELDS if out.get(key) is not None), None)
        if reasoning is not None:
            out["thinking"] = reasoning
            out["reasoning_content"] = reasoning
        if out.get("tool_calls") is not None:
            out["tool_calls"] = _normalize_tool_calls(out["tool_calls"], f"{param}.tool_calls")
        normalized.append(out)
    return normalized, images


def _normalize_tool_calls(calls: Any, param: str) -> list[Any]:
    """Assistant tool calls with `function.arguments` as an object (templates iterate it)."""
    if not isinstance(calls, list):
        raise InvalidRequestError("tool_calls must be a list of tool call objects", param=param)
    out: list[Any] = []
    for index, call in enumerate(calls):
        call_param = f"{param}[{index}]"
        if not isinstance(call, dict):
            raise InvalidRequestError("each tool call must be an object", param=call_param)
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(
                "a tool call needs a 'function' object with a string 'name'", param=f"{call_param}.function"
            )
        arguments = function.get("arguments")
        if arguments is None or arguments == "":
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise InvalidRequestError(
                    f"tool call arguments must be a JSON object: {exc}",
                    param=f"{call_param}.function.arguments",
                ) from None
        if not isinstance(arguments, dict):
            raise InvalidRequestError(
                "tool call arguments must be a JSON object", param=f"{call_param}.function.arguments"
            )
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out


def _split_reasoning(message: dict[str, Any]) -> None:
    """`<think>r</think>a` in an assistant turn's content -> reasoning r, content a (the rule of
    GLM's templates, applied before escaping so the template sees the same result)."""
    content = message.get("content")
    if (
        message.get("role") != "assistant"
        or not isinstance(content, str)
        or "</think>" not in content
        or isinstance(message.get("reasoning_content"), str)
    ):
        return
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    message["content"] = content.split("</think>")[-1].lstrip("\n")
    message["reasoning_content"] = reasoning
    message["thinking"] = reasoning


# ------------------------------------------------------------------------- plain client text


class _Escapes:
    """Replaces added-token spellings in client text by markers, and restores them afterwards.

    A marker is ``@<nonce>.<k>@``: ASCII, so it passes unchanged through ``tojson`` and string
    filters; the nonce is fresh per render and checked absent from the input, so client text
    can never forge one.
    """

    def __init__(self, spellings: Sequence[str]) -> None:
        # Longest first: at one position the regex takes the longest spelling, as the tokenizer's
        # added-token matcher does.
        self.spellings = sorted(set(spellings), key=lambda t: (-len(t), t))
        self.index = {t: k for k, t in enumerate(self.spellings)}
        self.pattern = re.compile("|".join(re.escape(t) for t in self.spellings)) if self.spellings else None
        self.nonce = ""
        self._marker: re.Pattern[str] | None = None

    def start(self, texts: list[str]) -> None:
        while True:
            nonce = secrets.token_hex(6)
            if not any(nonce in text for text in texts):
                break
        self.nonce = nonce
        self._marker = re.compile(rf"@{nonce}\.(\d+)@")

    def escape(self, text: str) -> str:
        if self.pattern is None:
            return text
        return self.pattern.sub(lambda m: f"@{self.nonce}.{self.index[m.group(0)]}@", text)

    def unescape(self, text: str) -> str:
        if self._marker is None or "@" not in text:
            return text
        return self._marker.sub(lambda m: self.spellings[int(m.group(1))], text)

    def tree(self, value: Any) -> Any:
        """A copy of plain data with every string (dict keys included) escaped."""
        if isinstance(value, str):
            return self.escape(value)
        if isinstance(value, dict):
            return {self.tree(k): self.tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.tree(v) for v in value]
        return value


def _strings(value: Any, out: list[str]) -> list[str]:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _strings(k, out)
            _strings(v, out)
    elif isinstance(value, list):
        for v in value:
            _strings(v, out)
    return out


# ------------------------------------------------------------------------------------ processor


class ChatProcessor:
    """Renders and tokenizes conversations with a checkpoint's chat template.

    `template` overrides the checkpoint's template: a built-in name (``"glm41v"``, ``"glm46v"``),
    a path to a ``.jinja`` file, or the template source itself. `image_token` defaults to the
    tokenizer config's ``image_token`` or ``<|image|>``.
    """

    def __init__(
        self, tokenizer: Tokenizer, template: str | None = None, *, image_token: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.template_source = self._resolve_template(tokenizer, template)
        try:
            self._compiled = compile_chat_template(self.template_source)
        except jinja2.exceptions.TemplateError as exc:
            raise CheckpointError(
                f"the chat template does not compile: {exc}", param="chat_template"
            ) from exc
        config_image_token = tokenizer.config.get("image_token")
        self.image_token: str = image_token or (
            config_image_token if isinstance(config_image_token, str) else DEFAULT_IMAGE_TOKEN
        )
        image_token_id = tokenizer.token_to_id(self.image_token)
        if image_token_id is None or image_token_id not in tokenizer.added_token_ids:
            raise CheckpointError(
                f"the tokenizer has no added token {self.image_token!r} for image placeholders",
                param="tokenizer.json",
            )
        self.image_token_id: int = image_token_id
        # Every added token (special or not): the spellings client text may not produce.
        decoder = tokenizer.raw.get_added_tokens_decoder()
        self._added_ids: dict[str, int] = {token.content: token_id for token_id, token in decoder.items()}
        self._added_spellings = list(self._added_ids)
        self._scaffold_pattern = re.compile(
            "|".join(re.escape(t) for t in sorted(self._added_ids, key=lambda t: (-len(t), t)))
        )
        self._splits_reasoning = "</think>" in self.template_source and "reasoning_content" in self.template_source
        self.prompt_limit: PromptLimit | None = None

    def limit_prompt(self, max_tokens: int | None) -> None:
        """Refuse prompts of `max_tokens` tokens or more before tokenising them (see
        `glmv.processing.text_checks`); None lifts the limit."""
        self.prompt_limit = (
            None
            if max_tokens is None
            else PromptLimit(max_tokens, self.tokenizer.encode, TokenBound.of(self.tokenizer))
        )

    @staticmethod
    def _resolve_template(tokenizer: Tokenizer, template: str | None) -> str:
        if template is None:
            if tokenizer.chat_template is None:
                raise CheckpointError(
                    "the checkpoint has no chat template (chat_template.jinja, chat_template.json or "
                    "tokenizer_config.json 'chat_template'); pass one explicitly",
                    param="chat_template",
                )
            return tokenizer.chat_template
        if template in TEMPLATE_NAMES:
            return builtin_template(template)
        if "{" not in template and template.endswith(".jinja"):
            path = Path(template)
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CheckpointError(
                    f"cannot read chat template {path}: {exc}", param="chat_template"
                ) from exc
        return template

    @property
    def supports_thinking_toggle(self) -> bool:
        """Whether the template reacts to ``enable_thinking`` (GLM-4.5V/4.6V style)."""
        return "enable_thinking" in self.template_source

    @property
    def supports_tools(self) -> bool:
        """Whether the template renders ``tools`` and tool calls (GLM-4.5V/4.6V style)."""
        source = self.template_source
        return "tools" in source and "tool_call" in source

    @staticmethod
    def count_images(messages: Sequence[Any]) -> int:
        """How many image parts the messages hold (the order `encode` expects their counts in)."""
        return _normalize_messages(messages)[1]

    def render(
        self, messages: Sequence[Any], *, add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """The template's text for `messages`; extra keyword arguments become template variables
        (e.g. ``enable_thinking=False``, ``tools=[...]``)."""
        text, _, escapes = self._render(messages, add_generation_prompt, template_kwargs)
        return escapes.unescape(text)

    def _render(
        self, messages: Sequence[Any], add_generation_prompt: bool, template_kwargs: dict[str, Any]
    ) -> tuple[str, int, _Escapes]:
        """The rendered text with client text escaped (see `_Escapes`), the image count, and the
        escapes that restore it."""
        chat, images = _normalize_messages(messages)
        if self._splits_reasoning:
            for message in chat:
                _split_reasoning(message)
        client: dict[str, Any] = _plain(template_kwargs)
        client.setdefault("tools", None)
        client.setdefault("documents", None)
        escapes = _Escapes(self._added_spellings)
        escapes.start(_strings([chat, client], []))
        variables: dict[str, Any] = dict(self.tokenizer.special_tokens)
        variables.update(escapes.tree(client))
        variables["messages"] = escapes.tree(chat)
        variables["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            text = self._compiled.render(**variables)
        except jinja2.exceptions.SecurityError as exc:
            raise CheckpointError(
                f"the chat template broke the sandbox rules: {exc}", param="chat_template"
            ) from exc
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequestError(
                f"the chat template rejected the conversation: {exc}", param="messages"
            ) from exc
        return text, images, escapes

    def _tokenize(self, text: str, escapes: _Escapes) -> list[int]:
        """Ids of rendered text: the template's added tokens whole, everything between them (with
        the client's text restored) as plain characters."""
        ids: list[int] = []
        position = 0
        for match in self._scaffold_pattern.finditer(text):
            if match.start() > position:
                ids.extend(self.tokenizer.encode_text(escapes.unescape(text[position : match.start()])))
            ids.append(self._added_ids[match.group(0)])
            position = match.end()
        if position < len(text):
            ids.extend(self.tokenizer.encode_text(escapes.unescape(text[position:])))
        return ids

    def encode(
        self,
        messages: Sequence[Any],
        image_token_counts: Sequence[int],
        image_hashes: Sequence[str],
        *,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> Prompt:
        """Render, expand each image placeholder into ``image_token_counts[i]`` image tokens, tokenize."""
        text, images, escapes = self._render(messages, add_generation_prompt, template_kwargs)
        if images != len(image_token_counts):
            raise InvalidRequestError(
                f"the messages hold {images} image(s) but {len(image_token_counts)} image token count(s) were given",
                param="messages",
            )
        if len(image_hashes) != len(image_token_counts):
            raise InvalidRequestError(
                f"{len(image_hashes)} image hash(es) given for {len(image_token_counts)} image(s)",
                param="messages",
            )
        for index, count in enumerate(image_token_counts):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise InvalidRequestError(
                    f"image {index} needs a positive token count, got {count!r}", param="messages"
                )
        # Client text is escaped, so every placeholder left is one the template placed.
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != images:
            raise InvalidRequestError(
                f"the rendered prompt has {len(pieces) - 1} {self.image_token} placeholder(s) for {images} image(s); "
                "the chat template must place every image exactly once",
                param="messages",
            )
        if self.prompt_limit is not None:
            self.prompt_limit.check(pieces)
        token_ids: list[int] = []
        spans: list[ImageSpan] = []
        for index, piece in enumerate(pieces):
            token_ids.extend(self._tokenize(piece, escapes))
            if index < images:
                count = image_token_counts[index]
                spans.append(ImageSpan(offset=len(token_ids), length=count, content_hash=image_hashes[index]))
                token_ids.extend([self.image_token_id] * count)
        return Prompt(token_ids=token_ids, image_spans=spans, text=escapes.unescape(text))
