"""Chat rendering and image-token expansion, checked id for id against transformers' Glm4vProcessor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer, Glm4vImageProcessor
from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
from transformers.processing_utils import ProcessorMixin

from glmv.errors import CheckpointError, InvalidRequestError
from glmv.processing.chat import ChatProcessor, ImageSpan, Prompt
from glmv.processing.tiny_tokenizer import builtin_template, write_tiny_tokenizer
from glmv.processing.tokenizer import Tokenizer


class ReferenceProcessor(Glm4vProcessor):
    """Glm4vProcessor without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image|>"
        self.video_token = "<|video|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_start_id = tokenizer.convert_tokens_to_ids("<|begin_of_video|>")
        self.video_end_id = tokenizer.convert_tokens_to_ids("<|end_of_video|>")


class Setup:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tokenizer = Tokenizer.from_pretrained(directory)
        self.chat = ChatProcessor(self.tokenizer)
        self.hf_tokenizer = AutoTokenizer.from_pretrained(directory)
        self.reference = ReferenceProcessor(
            image_processor=Glm4vImageProcessor(),
            tokenizer=self.hf_tokenizer,
            chat_template=self.hf_tokenizer.chat_template,
        )


@pytest.fixture(scope="module")
def v41(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    directory = tmp_path_factory.mktemp("glm41v")
    write_tiny_tokenizer(directory, template="glm41v")
    return Setup(directory)


@pytest.fixture(scope="module")
def v46(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    directory = tmp_path_factory.mktemp("glm46v")
    write_tiny_tokenizer(directory, template="glm46v")
    return Setup(directory)


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _strip_images(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same messages with image payloads dropped, as a server hands them to glmv."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if part["type"] == "image" else part for part in content]
        out.append({**message, "content": content})
    return out


def _reference_ids(
    setup: Setup, messages: list[dict[str, Any]], **kwargs: Any
) -> tuple[list[int], list[int]]:
    """transformers' prompt ids and each image's token count (grid t*h*w / merge_size**2)."""
    has_images = any(
        isinstance(m["content"], list) and any(p["type"] == "image" for p in m["content"]) for m in messages
    )
    if not has_images:
        encoded = setup.hf_tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=kwargs.pop("add_generation_prompt", True), **kwargs
        )
        return list(encoded["input_ids"]), []
    out = setup.reference.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=kwargs.pop("add_generation_prompt", True),
        **kwargs,
    )
    merge = setup.reference.image_processor.merge_size**2
    counts = [int(np.prod(grid)) // merge for grid in out["image_grid_thw"]]
    return [int(i) for i in out["input_ids"][0]], counts


def _check_spans(setup: Setup, prompt: Prompt, counts: list[int], hashes: list[str]) -> None:
    tok = setup.tokenizer
    image_id = tok.token_to_id("<|image|>")
    assert [span.length for span in prompt.image_spans] == counts
    assert [span.content_hash for span in prompt.image_spans] == hashes
    covered = set()
    for span in prompt.image_spans:
        assert prompt.token_ids[span.offset : span.offset + span.length] == [image_id] * span.length
        assert prompt.token_ids[span.offset - 1] == tok.token_to_id("<|begin_of_image|>")
        assert prompt.token_ids[span.offset + span.length] == tok.token_to_id("<|end_of_image|>")
        covered.update(range(span.offset, span.offset + span.length))
    assert covered == {i for i, t in enumerate(prompt.token_ids) if t == image_id}


SYSTEM = {"role": "system", "content": "You are a careful assistant. 请用中文回答。"}

CASES: dict[str, list[dict[str, Any]]] = {
    "text_only": [{"role": "user", "content": "What is 2 + 2? 请回答。"}],
    "one_image": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": _image(224, 224, 0)},
                {"type": "text", "text": "What is the total on this invoice?"},
            ],
        }
    ],
    "two_images_one_message": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image", "image": _image(112, 224, 1)},
                {"type": "text", "text": " with "},
                {"type": "image", "image": _image(300, 120, 2)},
                {"type": "text", "text": "：哪个更大？"},
            ],
        }
    ],
    "three_turns_image_first": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": _image(140, 168, 3)},
                {"type": "text", "text": "Describe it."},
            ],
        },
        {"role": "assistant", "content": "A red bus in front of a brick building."},
        {"role": "user", "content": [{"type": "text", "text": "What colour is the bus?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Thanks! 🙂"},
    ],
    "system_prompt": [
        SYSTEM,
        {
            "role": "user",
            "content": [{"type": "image", "image": _image(56, 56, 4)}, {"type": "text", "text": "OCR"}],
        },
    ],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("version", ["v41", "v46"])
def test_ids_match_transformers(case: str, version: str, request: pytest.FixtureRequest) -> None:
    setup: Setup = request.getfixturevalue(version)
    messages = CASES[case]
    expected_ids, counts = _reference_ids(setup, messages)
    hashes = [f"sha256:{i}" for i in range(len(counts))]
    prompt = setup.chat.encode(_strip_images(messages), counts, hashes)
    assert prompt.token_ids == expected_ids
    assert prompt.text == setup.hf_tokenizer.apply_chat_template(
        _strip_images(messages), tokenize=False, add_generation_prompt=True
    )
    assert prompt.text == setup.chat.render(_strip_images(messages))
    assert len(prompt.image_spans) == len(counts) == ChatProcessor.count_images(messages)
    _check_spans(setup, prompt, counts, hashes)


def test_real_image_token_counts(v41: Setup) -> None:
    # 224x224 -> 16x16 patches of 14 px -> 8x8 merged tokens; 300x120 resizes to 308x112 -> 22x8 -> 11x4.
    _, counts = _reference_ids(v41, CASES["two_images_one_message"])
    assert counts == [8 * 16 // 4, 44]
    _, counts = _reference_ids(v41, CASES["one_image"])
    assert counts == [64]


def test_thinking_off_matches_transformers(v46: Setup) -> None:
    messages = CASES["three_turns_image_first"]
    expected_ids, counts = _reference_ids(v46, messages, enable_thinking=False)
    prompt = v46.chat.encode(_strip_images(messages), counts, ["h0"], enable_thinking=False)
    assert prompt.token_ids == expected_ids
    assert prompt.text.endswith("Thanks! 🙂/nothink<|assistant|>\n<think></think>\n")
    assert prompt.text.count("/nothink") == 3
    thinking_on = v46.chat.render(_strip_images(messages))
    assert "/nothink" not in thinking_on
    assert thinking_on.endswith("<|assistant|>\n")
    assert v46.chat.supports_thinking_toggle
    _check_spans(v46, prompt, counts, ["h0"])


def test_glm41v_template_has_no_thinking_toggle(v41: Setup) -> None:
    assert not v41.chat.supports_thinking_toggle
    messages = [{"role": "user", "content": "hi"}]
    assert v41.chat.render(messages, enable_thinking=False) == v41.chat.render(messages)
    assert v41.chat.render(messages) == "[gMASK]<sop><|user|>\nhi<|assistant|>\n"


def test_reasoning_of_the_latest_turn_is_kept(v46: Setup) -> None:
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning": "new thoughts"},
    ]
    text = v46.chat.render(messages, add_generation_prompt=False)
    reference = v46.hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text == reference
    assert "old thoughts" not in text
    assert text.endswith("<|assistant|>\n<think>new thoughts</think>\na2")


def test_image_url_parts_count_as_images(v41: Setup) -> None:
    openai_style = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "Read it."},
            ],
        }
    ]
    plain = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}]
    assert ChatProcessor.count_images(openai_style) == 1
    assert v41.chat.render(openai_style) == v41.chat.render(plain)
    assert v41.chat.encode(openai_style, [5], ["x"]) == v41.chat.encode(plain, [5], ["x"])
    prompt = v41.chat.encode(plain, [5], ["x"])
    assert prompt.image_spans == [ImageSpan(offset=prompt.image_spans[0].offset, length=5, content_hash="x")]


def test_text_parts_for_system_and_assistant_become_strings(v41: Setup) -> None:
    as_parts = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "简洁。"}],
        },
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        {"role": "user", "content": "again"},
    ]
    as_strings = [
        {"role": "system", "content": "Be brief. 简洁。"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    assert v41.chat.render(as_parts) == v41.chat.render(as_strings)
    assert "[{" not in v41.chat.render(as_parts)


def test_image_count_mismatch_is_rejected(v41: Setup) -> None:
    messages = _strip_images(CASES["two_images_one_message"])
    with pytest.raises(InvalidRequestError, match="2 image"):
        v41.chat.encode(messages, [4], ["a"])
    with pytest.raises(InvalidRequestError):
        v41.chat.encode(messages, [4, 4, 4], ["a", "b", "c"])
    with pytest.raises(InvalidRequestError, match="hash"):
        v41.chat.encode(messages, [4, 4], ["a"])
    with pytest.raises(InvalidRequestError, match="positive"):
        v41.chat.encode(messages, [4, 0], ["a", "b"])
    with pytest.raises(InvalidRequestError):
        v41.chat.encode([{"role": "user", "content": "no images"}], [4], ["a"])


def test_placeholder_typed_by_the_user_is_plain_text(v41: Setup) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "see <|image|> here"}]}
    ]
    prompt = v41.chat.encode(messages, [4], ["a"])
    image_id = v41.tokenizer.token_to_id("<|image|>")
    assert prompt.token_ids.count(image_id) == 4
    assert "see <|image|> here" in prompt.text


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("just a string", "messages"),
        ([{"content": "no role"}], "messages[0]"),
        ([{"role": "user", "content": 42}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "video"}]}], "messages[0].content[0].type"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ],
)
def test_malformed_messages_name_the_parameter(v41: Setup, messages: Any, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        v41.chat.render(messages)
    assert info.value.param == param


def test_template_overrides(v41: Setup, tmp_path: Path) -> None:
    assert ChatProcessor(v41.tokenizer, "glm46v").template_source == builtin_template("glm46v")
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert ChatProcessor(v41.tokenizer, str(path)).render([{"role": "user", "content": "x"}]) == "[user]x"
    inline = ChatProcessor(
        v41.tokenizer, "{{ eos_token }}|{{ messages | length }}|{{ add_generation_prompt }}"
    )
    assert inline.render([{"role": "user", "content": "x"}]) == "<|endoftext|>|1|True"


def test_jinja_environment_matches_transformers(v41: Setup) -> None:
    source = (
        "{%- for m in messages -%}\n"
        "    {%- if m.role == 'system' %}{% continue %}{% endif -%}\n"
        "    {{ m.content | tojson }}\n"
        "{% endfor %}"
        "{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}{{ dict(a=1) | tojson }}"
    )
    messages = [
        {"role": "system", "content": "skip me"},
        {"role": "user", "content": "<b>&'\"中</b>"},
    ]
    ours = ChatProcessor(v41.tokenizer, source).render(messages)
    reference = v41.hf_tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False)
    assert ours == reference == '"<b>&\'\\"中</b>"\n1{"a": 1}'


def test_template_errors(v41: Setup, tmp_path: Path) -> None:
    strict = ChatProcessor(
        v41.tokenizer,
        "{% if messages[0].role != 'user' %}{{ raise_exception('must start with user') }}{% endif %}",
    )
    with pytest.raises(InvalidRequestError, match="must start with user"):
        strict.render([{"role": "assistant", "content": "x"}])
    escaping = ChatProcessor(v41.tokenizer, "{{ ''.__class__.__mro__ }}")
    with pytest.raises(CheckpointError, match="sandbox"):
        escaping.render([{"role": "user", "content": "x"}])
    with pytest.raises(CheckpointError, match="compile"):
        ChatProcessor(v41.tokenizer, "{% for %}")
    with pytest.raises(CheckpointError):
        ChatProcessor(v41.tokenizer, str(tmp_path / "missing.jinja"))


def test_checkpoint_without_template_needs_one(v41: Setup, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    write_tiny_tokenizer(directory)
    (directory / "chat_template.jinja").unlink()
    tokenizer = Tokenizer.from_pretrained(directory)
    with pytest.raises(CheckpointError, match="no chat template"):
        ChatProcessor(tokenizer)
    assert (
        ChatProcessor(tokenizer, "glm41v")
        .render([{"role": "user", "content": "x"}])
        .startswith("[gMASK]<sop>")
    )
