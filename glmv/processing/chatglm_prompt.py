"""GLM-4v-9b's prompt format, as rules (the checkpoint ships no chat template).

What the checkpoint's own tokenizer code builds, token by token:

    [gMASK]<sop>                                       once, at the start
    <|system|> "\\n" system text                        for a system message
    <|user|> "\\n" <|begin_of_image|><|endoftext|><|end_of_image|> question
    <|assistant|> "\\n" answer                           a past answer (no end token between turns)
    <|assistant|>                                      the generation prompt (the model writes "\\n" itself)

The role header's ``"\\n"`` and the message text are tokenized separately, and message text is
tokenized literally: special-token spellings typed by a user stay plain characters. A message
with no text and no image is left out, as the original does. An OpenAI ``tool`` (or ``function``)
message is GLM-4's ``observation`` turn; assistant ``tool_calls`` are not rendered (GLM-4v-9b has
no tool calling; the server ignores or refuses ``tools`` for it).

Images: GLM-4v-9b was trained with one image per conversation, placed right after the role
header of the message that carries it (wherever the image part sits among that message's parts).
A second image is refused with a 400 (`InvalidRequestError`) unless glmv's multi-image mode is on
(``ChatGLMPromptBuilder(multi_image=True)`` for a server, or ``chat_template_kwargs:
{"multi_image": true}`` per request). In that mode every image gets its own block, each built
exactly like the single image (its 1600 tokens share one position id; see
`glmv.models.glm4v_9b`), in document order. The model never saw such prompts in training, so
answers about several images are best effort.

In the expanded prompt each image's three placeholder tokens become one span of
``1 + 1600 + 1`` positions (for 1120×1120 input; the vision tower yields the begin/end-of-image
vectors as the span's first and last rows), every one holding the image placeholder id
(``<|endoftext|>``, the id the original puts between the begin/end-of-image tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from glmv.errors import InvalidRequestError
from glmv.processing.chat import ImageSpan, Prompt, as_mapping
from glmv.processing.chatglm_tokenizer import ChatGLMTokenizer
from glmv.processing.text_checks import PromptLimit, TokenBound

__all__ = ["IMAGE_PLACEHOLDER", "ChatGLMPromptBuilder"]

IMAGE_PLACEHOLDER = "<|begin_of_image|><|endoftext|><|end_of_image|>"

_ROLES = ("system", "user", "assistant", "observation")
_ROLE_ALIASES = {"developer": "system", "tool": "observation", "function": "observation"}
_TEXT_TYPES = frozenset({"text", "input_text"})
_IMAGE_TYPES = frozenset({"image", "image_url", "input_image"})
_VIDEO_TYPES = frozenset({"video", "video_url", "input_video"})


@dataclass(slots=True)
class _Message:
    role: str
    text: str
    images: list[str]  # the `param` path of each image part, in order


def _parse(messages: Sequence[Any]) -> list[_Message]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError("messages must be a list of message objects", param="messages")
    out: list[_Message] = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        mapping = as_mapping(message)
        if mapping is None or not isinstance(mapping.get("role"), str):
            raise InvalidRequestError("each message must be an object with a string 'role'", param=param)
        role = mapping["role"]
        role = _ROLE_ALIASES.get(role, role)
        if role not in _ROLES:
            raise InvalidRequestError(
                f"role {role!r} is not supported by this model (use system, user or assistant)",
                param=f"{param}.role",
            )
        content = mapping.get("content")
        texts: list[str] = []
        images: list[str] = []
        if content is None:
            pass
        elif isinstance(content, str):
            texts.append(content)
        elif isinstance(content, Sequence) and not isinstance(content, bytes):
            for part_index, part in enumerate(content):
                part_param = f"{param}.content[{part_index}]"
                if isinstance(part, str):
                    texts.append(part)
                    continue
                part_map = as_mapping(part)
                if part_map is None:
                    raise InvalidRequestError("a content part must be an object", param=part_param)
                kind = part_map.get("type")
                if kind is None:
                    kind = (
                        "text"
                        if "text" in part_map
                        else "image"
                        if ("image" in part_map or "image_url" in part_map)
                        else None
                    )
                if kind in _TEXT_TYPES:
                    text = part_map.get("text")
                    if not isinstance(text, str):
                        raise InvalidRequestError(
                            "a text part needs a string 'text'", param=f"{part_param}.text"
                        )
                    texts.append(text)
                elif kind in _IMAGE_TYPES:
                    images.append(part_param)
                elif kind in _VIDEO_TYPES:
                    raise InvalidRequestError("video input is not supported", param=f"{part_param}.type")
                else:
                    raise InvalidRequestError(
                        f"unsupported content part type {kind!r}", param=f"{part_param}.type"
                    )
        else:
            raise InvalidRequestError(
                "message content must be a string or a list of parts", param=f"{param}.content"
            )
        out.append(_Message(role, "".join(texts), images))
    return out


class ChatGLMPromptBuilder:
    """Renders and tokenizes conversations the way GLM-4v-9b expects (module docstring).

    The same interface as `glmv.processing.chat.ChatProcessor`: `render`, `encode`,
    `count_images`, `supports_thinking_toggle`, `supports_tools`. `image_token_id` is the id
    every position of an image span holds in the expanded prompt.
    """

    supports_thinking_toggle = False
    supports_tools = False
    accepts_tool_messages = True  # tool results render as GLM-4's observation turn

    def __init__(self, tokenizer: ChatGLMTokenizer, *, multi_image: bool = False) -> None:
        self.tokenizer = tokenizer
        self.multi_image = multi_image
        self.gmask_id = tokenizer.special_id("[gMASK]")
        self.sop_id = tokenizer.special_id("<sop>")
        self.role_ids = {role: tokenizer.special_id(f"<|{role}|>") for role in _ROLES}
        self.boi_id = tokenizer.special_id("<|begin_of_image|>")
        self.eoi_id = tokenizer.special_id("<|end_of_image|>")
        self.image_token_id = tokenizer.special_id("<|endoftext|>")
        self._newline = tokenizer.encode_text("\n")
        self.prompt_limit: PromptLimit | None = None

    def limit_prompt(self, max_tokens: int | None) -> None:
        """Refuse prompts of `max_tokens` tokens or more before tokenising them."""
        self.prompt_limit = (
            None
            if max_tokens is None
            else PromptLimit(max_tokens, self.tokenizer.encode_text, TokenBound.of(self.tokenizer))
        )

    @staticmethod
    def count_images(messages: Sequence[Any]) -> int:
        return sum(len(m.images) for m in _parse(messages))

    def _check(self, parsed: list[_Message], template_kwargs: Mapping[str, Any]) -> None:
        multi = template_kwargs.get("multi_image", self.multi_image)
        if not isinstance(multi, bool):
            raise InvalidRequestError(
                "chat_template_kwargs.multi_image must be true or false",
                param="chat_template_kwargs.multi_image",
            )
        if multi:
            return
        params = [p for m in parsed for p in m.images]
        if len(params) > 1:
            raise InvalidRequestError(
                "GLM-4v-9b takes one image per conversation; this conversation has "
                f"{len(params)}. Send one image, or enable glmv's multi-image mode with "
                'chat_template_kwargs {"multi_image": true} (best effort: the model was trained with one image).',
                param=params[1],
                code="too_many_images",
            )

    def render(
        self, messages: Sequence[Any], *, add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> str:
        """The prompt as text, with the three-token placeholder for each image."""
        parsed = _parse(messages)
        self._check(parsed, template_kwargs)
        pieces = ["[gMASK]<sop>"]
        for m in parsed:
            if not m.text and not m.images:
                continue
            pieces.append(f"<|{m.role}|>\n" + IMAGE_PLACEHOLDER * len(m.images) + m.text)
        if add_generation_prompt:
            pieces.append("<|assistant|>")
        return "".join(pieces)

    def encode(
        self,
        messages: Sequence[Any],
        image_token_counts: Sequence[int],
        image_hashes: Sequence[str],
        *,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> Prompt:
        """Token ids with each image's span expanded to ``image_token_counts[i]`` placeholder ids
        (begin/end-of-image included), and one `ImageSpan` per image."""
        parsed = _parse(messages)
        self._check(parsed, template_kwargs)
        total = sum(len(m.images) for m in parsed)
        if total != len(image_token_counts):
            raise InvalidRequestError(
                f"the messages hold {total} image(s) but {len(image_token_counts)} image token count(s) were given",
                param="messages",
            )
        if len(image_hashes) != len(image_token_counts):
            raise InvalidRequestError(
                f"{len(image_hashes)} image hash(es) given for {len(image_token_counts)} image(s)",
                param="messages",
            )
        for count in image_token_counts:
            if isinstance(count, bool) or not isinstance(count, int) or count < 3:
                raise InvalidRequestError(
                    f"image token counts must be integers >= 3, got {count!r}", param="messages"
                )
        if self.prompt_limit is not None:
            self.prompt_limit.check([m.text for m in parsed])
        ids = [self.gmask_id, self.sop_id]
        spans: list[ImageSpan] = []
        image_index = 0
        for m in parsed:
            if not m.text and not m.images:
                continue
            ids.append(self.role_ids[m.role])
            ids.extend(self._newline)
            for _ in m.images:
                count = image_token_counts[image_index]
                spans.append(ImageSpan(len(ids), count, image_hashes[image_index]))
                ids.extend([self.image_token_id] * count)
                image_index += 1
            ids.extend(self.tokenizer.encode_text(m.text))
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
        text = self.render(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return Prompt(ids, spans, text)
