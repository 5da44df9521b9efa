"""The tiny GLM tokenizer builder and glmv's Tokenizer, checked against transformers."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from glmv.errors import CheckpointError
from glmv.processing.tiny_tokenizer import (
    GLM41V_ADDED_TOKENS,
    GLM46V_ADDED_TOKENS,
    builtin_template,
    write_tiny_tokenizer,
)
from glmv.processing.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! The total amount due is $1,895.34 (tax 8%).",
    "增值税专用发票 价税合计：壹仟捌佰玖拾伍元叁角肆分",
    "订单号 Order #A-1029 于 2024/06/01 发货, ETA June 5th.",
    "Emoji 🙂👍🏽 🦓 and rare words: quixotic zephyr, ☕→📈",
    "  leading spaces\n\n\ttabs and\r\nwindows lines   ",
    "[gMASK]<sop><|system|>\nsys<|user|>\n<|begin_of_image|><|image|><|end_of_image|>Q?<|assistant|>\n",
    "<think>reasoning</think><answer>The box is <|begin_of_box|>[12, 40, 300, 500]<|end_of_box|></answer>",
    "<|endoftext|><|observation|>/nothink<tool_call>f<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>",
    "",
]


@pytest.fixture(scope="module", params=["glm41v", "glm46v"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(request.param)
    write_tiny_tokenizer(out, template=request.param)
    return request.param, out


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint: tuple[str, Path]):
    return AutoTokenizer.from_pretrained(checkpoint[1])


def _tree(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_builder_is_deterministic(tmp_path: Path) -> None:
    first = write_tiny_tokenizer(tmp_path / "a", template="glm41v", seed=0)
    second = write_tiny_tokenizer(tmp_path / "b", template="glm41v", seed=0)
    assert first == second
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert set(_tree(tmp_path / "a")) == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    }


@pytest.mark.parametrize(
    ("template", "layout"), [("glm41v", GLM41V_ADDED_TOKENS), ("glm46v", GLM46V_ADDED_TOKENS)]
)
def test_layout_and_returned_ids(tmp_path: Path, template: str, layout: tuple[tuple[str, bool], ...]) -> None:
    info = write_tiny_tokenizer(tmp_path, template=template)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert info.template == template
    assert info.vocab_size == tok.vocab_size == len(tok)
    base = info.vocab_size - len(layout)
    assert 1900 <= base <= 2000
    # Added tokens sit right after the BPE vocabulary, in GLM's order.
    assert [tok.id_to_token(base + i) for i in range(len(layout))] == [content for content, _ in layout]
    assert info.added_tokens == {content: base + i for i, (content, _) in enumerate(layout)}
    assert tok.special_token_ids == {base + i for i, (_, special) in enumerate(layout) if special}
    ids = info.special_ids
    assert ids["image_token_id"] == tok.token_to_id("<|image|>")
    assert ids["video_token_id"] == tok.token_to_id("<|video|>")
    assert ids["image_start_token_id"] == tok.token_to_id("<|begin_of_image|>")
    assert ids["image_end_token_id"] == tok.token_to_id("<|end_of_image|>")
    assert ids["video_start_token_id"] == tok.token_to_id("<|begin_of_video|>")
    assert ids["video_end_token_id"] == tok.token_to_id("<|end_of_video|>")
    assert ids["eos_token_ids"] == [
        tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")
    ]
    assert ids["pad_token_id"] == tok.pad_token_id == base
    assert tok.eos_token_ids == [base]  # no generation_config.json: the tokenizer's eos_token
    # Every byte has a token, so any text encodes without an unknown token.
    vocab = tok.raw.get_vocab()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    assert all(symbol in vocab for symbol in alphabet)


def test_thinking_tags_follow_the_published_flags(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path / "v41", template="glm41v")
    write_tiny_tokenizer(tmp_path / "v46", template="glm46v")
    v41 = Tokenizer.from_pretrained(tmp_path / "v41")
    v46 = Tokenizer.from_pretrained(tmp_path / "v46")
    # GLM-4.1V keeps <think>/<answer> as ordinary added tokens; GLM-4.6V lists them all as special.
    assert v41.token_to_id("<think>") not in v41.special_token_ids
    assert v41.token_to_id("<answer>") not in v41.special_token_ids
    assert v41.token_to_id("<|begin_of_box|>") in v41.special_token_ids
    assert v46.token_to_id("<think>") in v46.special_token_ids
    assert v46.token_to_id("<answer>") is None
    ids = v41.encode("<think>a</think><answer>b</answer>")
    assert v41.decode(ids, skip_special_tokens=True) == "<think>a</think><answer>b</answer>"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(checkpoint: tuple[str, Path], hf_tokenizer, text: str) -> None:
    tok = Tokenizer.from_pretrained(checkpoint[1])
    ids = tok.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_tokenizer.encode(text)
    assert tok.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)
    # Round trip, and the same text as transformers with and without special tokens.
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_tokenizer.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_single_ids(checkpoint: tuple[str, Path], hf_tokenizer) -> None:
    template, directory = checkpoint
    tok = Tokenizer.from_pretrained(directory)
    layout = GLM41V_ADDED_TOKENS if template == "glm41v" else GLM46V_ADDED_TOKENS
    for content, _ in layout:
        token_id = tok.token_to_id(content)
        assert token_id is not None
        assert tok.encode(content) == [token_id] == hf_tokenizer.encode(content, add_special_tokens=False)
        assert tok.id_to_token(token_id) == content
    assert tok.eos_token_ids == [hf_tokenizer.eos_token_id]
    assert tok.pad_token_id == hf_tokenizer.pad_token_id
    assert tok.vocab_size == len(hf_tokenizer)
    assert tok.token_to_id("<|no_such_token|>") is None


def test_chat_template_text_is_stable_across_reloads(checkpoint: tuple[str, Path], hf_tokenizer) -> None:
    template, directory = checkpoint
    source = builtin_template(template)
    assert (directory / "chat_template.jinja").read_text(encoding="utf-8") == source
    assert Tokenizer.from_pretrained(directory).chat_template == source
    assert Tokenizer.from_pretrained(directory).chat_template == source
    assert hf_tokenizer.chat_template == source


def test_glm41v_template_is_the_published_text() -> None:
    source = builtin_template("glm41v")
    assert hashlib.sha256(source.encode()).hexdigest() == (
        "847603d3ed14387a2b45c197f8d07ddee0f9938051549c727cbc894facfea78b"
    )
    assert source.startswith("[gMASK]<sop>\n{%- for msg in messages %}")
    assert "enable_thinking" in builtin_template("glm46v")
    with pytest.raises(ValueError):
        builtin_template("glm5")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_chat_template_precedence(checkpoint: tuple[str, Path], tmp_path: Path) -> None:
    directory = _copy(checkpoint[1], tmp_path / "ckpt")
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = "from tokenizer_config"
    config_file.write_text(json.dumps(config))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    (directory / "chat_template.jinja").write_text("from chat_template.jinja")

    assert Tokenizer.from_pretrained(directory).chat_template == "from chat_template.jinja"
    assert AutoTokenizer.from_pretrained(directory).chat_template == "from chat_template.jinja"
    (directory / "chat_template.jinja").unlink()
    assert Tokenizer.from_pretrained(directory).chat_template == "from chat_template.json"
    (directory / "chat_template.json").unlink()
    assert Tokenizer.from_pretrained(directory).chat_template == "from tokenizer_config"
    assert AutoTokenizer.from_pretrained(directory).chat_template == "from tokenizer_config"
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "the default"},
    ]
    config_file.write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(directory).chat_template == "the default"
    del config["chat_template"]
    config_file.write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(directory).chat_template is None


def test_eos_ids_come_from_generation_config_then_config(
    checkpoint: tuple[str, Path], tmp_path: Path
) -> None:
    directory = _copy(checkpoint[1], tmp_path / "ckpt")
    tok = Tokenizer.from_pretrained(directory)
    eos = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    (directory / "config.json").write_text(
        json.dumps({"model_type": "glm4v", "text_config": {"eos_token_id": eos}})
    )
    assert Tokenizer.from_pretrained(directory).eos_token_ids == eos
    (directory / "config.json").write_text(json.dumps({"model_type": "glm4v", "eos_token_id": eos[:2]}))
    assert Tokenizer.from_pretrained(directory).eos_token_ids == eos[:2]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos[2], eos[0], eos[2]]}))
    assert Tokenizer.from_pretrained(directory).eos_token_ids == [eos[2], eos[0]]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos[1]}))
    assert Tokenizer.from_pretrained(directory).eos_token_ids == [eos[1]]


def test_tokens_listed_only_in_tokenizer_config_are_added(
    checkpoint: tuple[str, Path], tmp_path: Path
) -> None:
    directory = _copy(checkpoint[1], tmp_path / "ckpt")
    data = json.loads((directory / "tokenizer.json").read_text())
    dropped = data["added_tokens"].pop()
    (directory / "tokenizer.json").write_text(json.dumps(data))
    tok = Tokenizer.from_pretrained(directory)
    hf = AutoTokenizer.from_pretrained(directory)
    assert (
        tok.token_to_id(dropped["content"]) == dropped["id"] == hf.convert_tokens_to_ids(dropped["content"])
    )
    assert (dropped["id"] in tok.special_token_ids) == dropped["special"]
    text = f"a{dropped['content']}b"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(
    ("name", "payload"),
    [
        ("tokenizer.json", '{"version": "1.0", "model": {"type": "BPE"'),
        ("tokenizer.json", "not json at all"),
        ("tokenizer_config.json", "{broken"),
        ("tokenizer_config.json", "[1, 2]"),
        ("chat_template.json", "{}"),
        ("generation_config.json", "{"),
        ("config.json", "[]"),
    ],
)
def test_corrupt_files_raise_checkpoint_error(
    checkpoint: tuple[str, Path], tmp_path: Path, name: str, payload: str
) -> None:
    directory = _copy(checkpoint[1], tmp_path / "ckpt")
    if name == "chat_template.json":
        (directory / "chat_template.jinja").unlink()  # it would win and the .json would go unread
    (directory / name).write_text(payload)
    with pytest.raises(CheckpointError) as info:
        Tokenizer.from_pretrained(directory)
    assert name in str(info.value)
    assert info.value.param == name


def test_missing_files_raise_checkpoint_error(checkpoint: tuple[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    directory = _copy(checkpoint[1], tmp_path / "ckpt")
    (directory / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is missing"):
        Tokenizer.from_pretrained(directory)


def test_tokenizer_config_is_optional(checkpoint: tuple[str, Path], tmp_path: Path) -> None:
    directory = _copy(checkpoint[1], tmp_path / "ckpt")
    (directory / "tokenizer_config.json").unlink()
    (directory / "special_tokens_map.json").unlink()
    tok = Tokenizer.from_pretrained(directory)
    assert tok.eos_token_ids == []
    assert tok.pad_token_id is None
    assert tok.encode("hello <|image|>")[-1] == tok.token_to_id("<|image|>")
