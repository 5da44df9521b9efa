"""GLM-4v-9b on glmv's engine against a plain eager reference written from the architecture.

The reference (`tests/models/glm4v_9b_reference.py`) runs the original's way: unexpanded
three-token image placeholders, vision features spliced in, the original's position ids, float64,
no cache. glmv runs its way: expanded spans, paged KV cache, chunked prefill, float32.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from glmv.engine.engine import EngineConfig, LLMEngine
from glmv.engine.request import EngineRequest
from glmv.engine.sampling import SamplingParams
from glmv.errors import CheckpointError, InvalidRequestError
from glmv.kernels.metadata import AttentionMetadata
from glmv.models.glm4v_9b import Glm4v9bModel, image_positions
from glmv.models.registry import load_model
from glmv.models.tiny_glm4v_9b import create_tiny_glm4v_9b
from glmv.processing.chatglm_tokenizer import ChatGLMTokenizer
from glmv.processing.image_9b import ImageProcessor9b, ImageProcessor9bConfig
from glmv.tasks.inputs import InputBuilder, load_processors
from tests.models.glm4v_9b_reference import ReferenceGlm4v9b, TiktokenReference, original_prompt, preprocess
from tests.models.weightless import weightless_copy

TOL = 1e-4
_ids = itertools.count()


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


IMG_A = noise(300, 200, 1)
IMG_B = noise(90, 160, 2)


def conversations() -> dict[str, tuple[list[dict[str, Any]], list[Image.Image], list[dict[str, Any]]]]:
    """name -> (OpenAI-style messages, images in order, the same in the original's item form)."""
    img = {"type": "image"}
    return {
        "text_only": (
            [
                {"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": "Summarise the invoice: total $1,895.34, due 2024-04-14."},
            ],
            [],
            [
                {"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": "Summarise the invoice: total $1,895.34, due 2024-04-14."},
            ],
        ),
        "one_image": (
            [{"role": "user", "content": [{"type": "text", "text": "这张图片里有什么？"}, img]}],
            [IMG_A],
            [{"role": "user", "content": "这张图片里有什么？", "image": True}],
        ),
        "multi_turn": (
            [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [img, {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": "A red bus in front of a brick building."},
                {"role": "user", "content": "What colour is the building?"},
            ],
            [IMG_A],
            [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Describe the image.", "image": True},
                {"role": "assistant", "content": "A red bus in front of a brick building."},
                {"role": "user", "content": "What colour is the building?"},
            ],
        ),
        "multi_image": (
            [
                {"role": "user", "content": [img, {"type": "text", "text": "Read the receipt."}]},
                {"role": "assistant", "content": "The total is 14.75."},
                {"role": "user", "content": [{"type": "text", "text": "And this one?"}, img]},
            ],
            [IMG_A, IMG_B],
            [
                {"role": "user", "content": "Read the receipt.", "image": True},
                {"role": "assistant", "content": "The total is 14.75."},
                {"role": "user", "content": "And this one?", "image": True},
            ],
        ),
    }


CASES = sorted(conversations())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_glm4v_9b(tmp_path_factory.mktemp("tiny9b") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> ReferenceGlm4v9b:
    return ReferenceGlm4v9b(ckpt)


@pytest.fixture(scope="module")
def model(ckpt: Path) -> Glm4v9bModel:
    m = load_model(ckpt, dtype="float32", device="cpu")
    assert isinstance(m, Glm4v9bModel)
    return m


@pytest.fixture(scope="module")
def processors(ckpt: Path) -> tuple[ChatGLMTokenizer, InputBuilder]:
    tok, builder = load_processors(ckpt)
    assert isinstance(tok, ChatGLMTokenizer)
    return tok, builder


def build(builder: InputBuilder, case: str, **kw: Any) -> EngineRequest:
    messages, images, _ = conversations()[case]
    kwargs = {"multi_image": True} if case == "multi_image" else None
    return builder.build(
        f"r{next(_ids)}",
        messages,
        builder.preprocess(images),
        SamplingParams(**kw),
        chat_template_kwargs=kwargs,
    )


def collapse(request: EngineRequest, boi: int, eot: int, eoi: int) -> list[int]:
    """The expanded prompt with each image span folded back to the original's three tokens."""
    ids = list(request.prompt_token_ids)
    for im in sorted(request.images, key=lambda i: -i.offset):
        ids[im.offset : im.offset + im.length] = [boi, eot, eoi]
    return ids


def paged_logits(
    model: Glm4v9bModel, request: EngineRequest, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-position logits through the paged cache, `chunk` tokens per forward pass."""
    ids = torch.tensor(request.prompt_token_ids)
    n = ids.numel()
    bs = 16
    nb = (n + bs - 1) // bs
    table = list(reversed(range(nb)))  # a non-trivial block order
    shape = (nb, bs, model.num_kv_heads, model.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(model.num_layers)]
    pos, _ = model.prompt_positions(n, request.images)
    mask = torch.zeros(n, dtype=torch.bool)
    embeds = None
    if request.images:
        from glmv.processing.image_9b import ImageProcessor9b

        rows = [
            im.pixel_values if im.pixel_values is not None else ImageProcessor9b().to_patches(im.pixels)
            for im in request.images
        ]
        pixels = torch.cat(rows)
        embeds = torch.cat(model.encode_images(pixels, [im.grid_thw for im in request.images]))
        for im in request.images:
            mask[im.offset : im.offset + im.length] = True
    outs = []
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        meta = AttentionMetadata.build(
            query_lens=[end - start], seq_lens=[end], block_tables=[table], block_size=bs
        )
        e = None
        if embeds is not None and mask[start:end].any():
            before = int(mask[:start].sum())
            e = embeds[before : before + int(mask[start:end].sum())]
        with torch.inference_mode():
            h = model(ids[start:end], pos[:, start:end], caches, meta, e, mask[start:end])
            outs.append(model.compute_logits(h))
    return torch.cat(outs), pos


# ------------------------------------------------------------------------------ tokenizer, prompt


def test_tokenizer_is_tiktokens_algorithm(
    ckpt: Path, processors: tuple[ChatGLMTokenizer, InputBuilder]
) -> None:
    tok, _ = processors
    ref = TiktokenReference(ckpt)
    texts = [
        "Hello, world! How are you today?",
        "The invoice total is $1,895.34 including tax.",
        "这张图片里有什么？图片中有一辆红色的公交车。",
        "  leading spaces,\ttabs\n\nnew lines \r\n and trailing   ",
        "Emoji 🙂👍 and accents: café naïve Ærø",
        "<|user|> typed by a user stays text [gMASK]<sop>",
        "numbers 1234567890 3.14159 -42",
        '{"vendor": "Northwind", "total": 1895.34}',
        "x" * 50,
    ]
    for text in texts:
        ids = tok.encode_text(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text
    assert tok.encode("<|user|>") == [ref.special["<|user|>"]]  # `encode` parses added tokens
    assert tok.eos_token_ids == [ref.special[s] for s in ("<|endoftext|>", "<|user|>", "<|observation|>")]


_TEXT = st.text(
    alphabet=st.sampled_from(list("abcxyz ABC 012345 \n\t.,!?'s'll $€¥ 你好世界发票 🙂 <|>[]"))
    | st.characters(exclude_categories=("Cs",)),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_TEXT)
def test_tokenizer_matches_tiktoken_on_any_text(
    ckpt: Path, processors: tuple[ChatGLMTokenizer, InputBuilder], text: str
) -> None:
    tok, _ = processors
    assert tok.encode_text(text) == _tiktoken(ckpt).encode(text)


def test_lone_surrogates_become_replacement_characters(
    processors: tuple[ChatGLMTokenizer, InputBuilder],
) -> None:
    tok, _ = processors
    assert tok.encode_text("a\ud800b") == tok.encode_text("a\ufffd\ufffd\ufffdb")


_TIKTOKEN: dict[Path, TiktokenReference] = {}


def _tiktoken(ckpt: Path) -> TiktokenReference:
    if ckpt not in _TIKTOKEN:
        _TIKTOKEN[ckpt] = TiktokenReference(ckpt)
    return _TIKTOKEN[ckpt]


@pytest.mark.parametrize("case", CASES)
def test_prompt_follows_original_rules(
    ckpt: Path, processors: tuple[ChatGLMTokenizer, InputBuilder], model: Glm4v9bModel, case: str
) -> None:
    _, builder = processors
    ref = TiktokenReference(ckpt)
    _, images, items = conversations()[case]
    req = build(builder, case)
    s = ref.special
    assert collapse(
        req, s["<|begin_of_image|>"], s["<|endoftext|>"], s["<|end_of_image|>"]
    ) == original_prompt(ref, items)
    assert len(req.images) == len(images)
    for im in req.images:
        assert im.length == 16 + 2  # 112×112: (112/28)² merged patches + boi + eoi
        assert set(req.prompt_token_ids[im.offset : im.offset + im.length]) == {model.image_token_id}
    n_placeholder = sum(1 for t in req.prompt_token_ids if t == model.image_token_id)
    assert n_placeholder == sum(im.length for im in req.images)  # what LLMEngine.validate checks


def test_render_text_and_rules(processors: tuple[ChatGLMTokenizer, InputBuilder]) -> None:
    _, builder = processors
    chat = builder.chat
    messages, _, _ = conversations()["multi_turn"]
    assert chat.render(messages) == (
        "[gMASK]<sop><|system|>\nAnswer briefly.<|user|>\n<|begin_of_image|><|endoftext|><|end_of_image|>"
        "Describe the image.<|assistant|>\nA red bus in front of a brick building.<|user|>\n"
        "What colour is the building?<|assistant|>"
    )
    assert chat.render(messages, add_generation_prompt=False).endswith("building?")
    # Empty messages are left out, as the original does; developer is system.
    assert chat.render(
        [
            {"role": "developer", "content": "Be terse."},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "Hi"},
        ]
    ) == ("[gMASK]<sop><|system|>\nBe terse.<|user|>\nHi<|assistant|>")
    assert chat.supports_thinking_toggle is False
    # A tool result is GLM-4's observation turn.
    assert chat.render([{"role": "tool", "content": "x"}]) == "[gMASK]<sop><|observation|>\nx<|assistant|>"
    with pytest.raises(InvalidRequestError) as bad_role:
        chat.render([{"role": "narrator", "content": "x"}])
    assert bad_role.value.param == "messages[0].role"
    with pytest.raises(InvalidRequestError):
        chat.render([{"role": "user", "content": [{"type": "video"}]}])


def test_second_image_is_a_400_unless_multi_image(processors: tuple[ChatGLMTokenizer, InputBuilder]) -> None:
    _, builder = processors
    messages, images, _ = conversations()["multi_image"]
    with pytest.raises(InvalidRequestError) as exc:
        builder.build("x", messages, builder.preprocess(images), SamplingParams())
    assert exc.value.status_code == 400
    assert exc.value.param == "messages[2].content[1]"
    assert "multi_image" in exc.value.message
    with pytest.raises(InvalidRequestError):
        builder.chat.render(messages, multi_image="yes")
    req = builder.build(
        "y",
        messages,
        builder.preprocess(images),
        SamplingParams(),
        chat_template_kwargs={"multi_image": True},
    )
    assert len(req.images) == 2


# ------------------------------------------------------------------------------------ positions


def test_positions_of_an_image_prompt_are_the_original_scheme(
    ckpt: Path,
    processors: tuple[ChatGLMTokenizer, InputBuilder],
    model: Glm4v9bModel,
    reference: ReferenceGlm4v9b,
) -> None:
    _, builder = processors
    req = build(builder, "one_image")
    n = len(req.prompt_token_ids)
    (im,) = req.images
    pos, delta = model.prompt_positions(n, req.images)
    b = im.offset  # [gMASK] <sop> <|user|> "\n" then the image: nothing before it is shifted
    expected = list(range(b)) + [b] + [b + 1] * 16 + [b + 2] + list(range(b + 3, b + 3 + n - im.offset - 18))
    assert pos.shape == (1, n)
    assert pos[0].tolist() == expected
    assert delta == -15
    assert model.positions_after_prompt(n, n + 3, delta)[0].tolist() == [
        expected[-1] + 1,
        expected[-1] + 2,
        expected[-1] + 3,
    ]
    # ... and the reference's splice of the original prompt gives the very same ids.
    c = reference.cfg
    ref_ids = collapse(req, c["boi_token_id"], model.image_token_id, c["eoi_token_id"])
    _, ref_pos = reference.expand(ref_ids, [preprocess(IMG_A, 112)])
    assert ref_pos == expected


def test_image_positions_with_two_images() -> None:
    pos, delta = image_positions(14, [2, 8], 5)
    # boi, 3 image tokens, eoi → 3 positions per image
    assert pos.tolist() == [0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 7, 7, 8, 9]
    assert delta == -4


# ---------------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(
    processors: tuple[ChatGLMTokenizer, InputBuilder],
    model: Glm4v9bModel,
    reference: ReferenceGlm4v9b,
    case: str,
) -> None:
    _, builder = processors
    _, images, _ = conversations()[case]
    req = build(builder, case)
    c = reference.cfg
    ids = collapse(req, c["boi_token_id"], c["pad_token_id"], c["eoi_token_id"])
    expected, ref_pos = reference.logits(ids, [preprocess(im, 112) for im in images])
    assert model.prompt_positions(len(req.prompt_token_ids), req.images)[0][0].tolist() == ref_pos
    for chunk in (len(req.prompt_token_ids), 7):  # whole prompt, and chunks that cut through images
        got, _ = paged_logits(model, req, chunk)
        assert got.shape == expected.shape
        err = (got.double() - expected).abs().max().item()
        assert err <= TOL, (case, chunk, err)
    assert expected.std().item() > 1.0  # the logits are well spread, so the check has teeth


def test_vision_input_preprocessing_matches_reference(
    processors: tuple[ChatGLMTokenizer, InputBuilder],
) -> None:
    _, builder = processors
    for image in (IMG_A, IMG_B):
        got = builder.image_processor.preprocess(image).pixel_values.double()
        assert (got - preprocess(image, 112)).abs().max().item() < 1e-5


def engine_for(ckpt: Path, tok: ChatGLMTokenizer, **kw: Any) -> LLMEngine:
    config = EngineConfig(model=str(ckpt), dtype="float32", kv_cache_gb=0.02, **kw)
    return LLMEngine(config, tokenizer=tok)


def run(engine: LLMEngine, reqs: list[EngineRequest]) -> dict[str, dict[str, Any]]:
    res: dict[str, dict[str, Any]] = {r.request_id: {"tokens": [], "logprobs": [], "cached": 0} for r in reqs}
    for r in reqs:
        engine.add_request(r)
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            res[out.request_id]["cached"] = out.cached_tokens
            for d in out.deltas:
                res[out.request_id]["tokens"] += d.token_ids
                res[out.request_id]["logprobs"] += [lp.logprob for lp in d.logprobs or []]
    return res


def test_engine_greedy_matches_reference(
    ckpt: Path, processors: tuple[ChatGLMTokenizer, InputBuilder], reference: ReferenceGlm4v9b
) -> None:
    """Through LLMEngine: batching of all cases together, chunked prefill, decode positions."""
    tok, builder = processors
    steps = 6
    params = {"temperature": 0.0, "max_tokens": steps, "ignore_eos": True, "logprobs": 0}
    reqs = {case: build(builder, case, **params) for case in CASES}
    c = reference.cfg
    for max_batched in (4096, 12):  # one prefill pass per prompt; prefill chunks of 12 tokens
        got = run(
            engine_for(ckpt, tok, max_num_batched_tokens=max_batched),
            [build(builder, case, **params) for case in CASES],
        )
        for (case, req), res in zip(reqs.items(), got.values(), strict=True):
            _, images, _ = conversations()[case]
            ids = collapse(req, c["boi_token_id"], c["pad_token_id"], c["eoi_token_id"])
            tokens, logprobs = reference.greedy(ids, [preprocess(im, 112) for im in images], steps)
            assert res["tokens"] == tokens, (case, max_batched)
            assert np.allclose(res["logprobs"], logprobs, atol=TOL, rtol=0), (case, max_batched)


def test_prefix_and_image_caches(ckpt: Path, processors: tuple[ChatGLMTokenizer, InputBuilder]) -> None:
    tok, builder = processors
    params = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True, "logprobs": 0}
    engine = engine_for(ckpt, tok, block_size=4)
    first = run(engine, [build(builder, "multi_turn", **params)])
    again = run(engine, [build(builder, "multi_turn", **params)])
    (a,), (b,) = first.values(), again.values()
    assert b["cached"] > 18 and a["tokens"] == b["tokens"]
    assert np.allclose(a["logprobs"], b["logprobs"], atol=TOL, rtol=0)
    # The same words about a different image reuse nothing past the image's start.
    messages, _, _ = conversations()["multi_turn"]
    other = builder.build("other", messages, builder.preprocess([IMG_B]), SamplingParams(**params))
    (c,) = run(engine, [other]).values()
    assert c["cached"] <= other.images[0].offset
    fresh = run(
        engine_for(ckpt, tok),
        [builder.build("fresh", messages, builder.preprocess([IMG_B]), SamplingParams(**params))],
    )
    (d,) = fresh.values()
    assert c["tokens"] == d["tokens"] and np.allclose(c["logprobs"], d["logprobs"], atol=TOL, rtol=0)
    assert engine.stats().prefix_cache_hits > 0


# ---------------------------------------------------------------------------------------- loading


def test_sharded_checkpoint_loads_the_same(tmp_path: Path, ckpt: Path, model: Glm4v9bModel) -> None:
    sharded = create_tiny_glm4v_9b(tmp_path / "sharded", seed=0, shards=3)
    assert len(list(sharded.glob("model-*.safetensors"))) == 3
    assert (sharded / "model.safetensors.index.json").is_file()
    other = load_model(sharded, dtype="float32", device="cpu")
    for (name, p), (_, q) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_loader_rejects_bad_checkpoints(tmp_path: Path, ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    names = {
        "missing": lambda t: t.pop("transformer.vision.boi"),
        "unexpected": lambda t: t.__setitem__("transformer.extra.weight", torch.zeros(2)),
        "shape": lambda t: t.__setitem__("transformer.vision.conv.bias", torch.zeros(3)),
    }
    messages = {
        "missing": "transformer.vision.boi",
        "unexpected": "transformer.extra.weight",
        "shape": "vision.conv.bias",
    }
    for kind, edit in names.items():
        d = tmp_path / kind
        shutil.copytree(ckpt, d)
        t = dict(tensors)
        edit(t)
        save_file(t, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError) as exc:
            load_model(d, dtype="float32", device="cpu")
        assert messages[kind] in exc.value.message, exc.value.message
    d = tmp_path / "rope"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["original_rope"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="original_rope"):
        load_model(d, dtype="float32", device="cpu")


def test_bfloat16_runs_close_to_float32(
    ckpt: Path, processors: tuple[ChatGLMTokenizer, InputBuilder], model: Glm4v9bModel
) -> None:
    _, builder = processors
    req = build(builder, "one_image")
    bf16 = load_model(ckpt, dtype="bfloat16", device="cpu")
    assert bf16.dtype == torch.bfloat16
    ref, _ = paged_logits(model, req, 64)
    got = paged_logits_bf16(bf16, req)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 5e-2


def paged_logits_bf16(model: Glm4v9bModel, req: EngineRequest) -> torch.Tensor:
    ids = torch.tensor(req.prompt_token_ids)
    n = ids.numel()
    shape = (n, 1, model.num_kv_heads, model.head_dim)
    caches = [
        (torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16))
        for _ in range(model.num_layers)
    ]
    pos, _ = model.prompt_positions(n, req.images)
    (im,) = req.images
    mask = torch.zeros(n, dtype=torch.bool)
    mask[im.offset : im.offset + im.length] = True
    rows = ImageProcessor9b().to_patches(im.pixels, dtype=torch.bfloat16)
    embeds = model.encode_images(rows, [im.grid_thw])[0]
    meta = AttentionMetadata.build(query_lens=[n], seq_lens=[n], block_tables=[list(range(n))], block_size=1)
    with torch.inference_mode():
        return model.compute_logits(model(ids, pos, caches, meta, embeds, mask))


# --------------------------------------------------------------------------------------- images


def test_image_processor_squash_and_letterbox(ckpt: Path) -> None:
    squash = ImageProcessor9b.from_pretrained(ckpt)
    assert squash.config == ImageProcessor9bConfig(image_size=112, patch_size=14)
    wide = noise(400, 100, 3)
    a = squash.preprocess(wide)
    assert a.pixel_values.shape == (1, 3, 112, 112) and a.grid_thw == (1, 8, 8) and a.num_tokens == 18
    letter = ImageProcessor9b.from_pretrained(ckpt, resize_mode="letterbox")
    b = letter.preprocess(wide)
    assert b.pixel_values.shape == (1, 3, 112, 112) and b.num_tokens == 18
    # 400×100 fits as 112×28, centred: rows 0-41 and 70-111 are the mean colour (≈ 0 after normalising).
    pad = torch.cat([b.pixel_values[..., :42, :], b.pixel_values[..., 70:, :]], dim=-2)
    assert pad.abs().max().item() < 0.02
    assert b.pixel_values[..., 42:70, :].std().item() > 0.1  # the (noise) content
    assert a.content_hash != b.content_hash  # the mode is part of the cache key
    assert squash.preprocess(wide).content_hash == a.content_hash
    # Real config: 1120×1120 → 1600 merged patches + boi + eoi.
    full = ImageProcessor9b(ImageProcessor9bConfig())
    assert full.preprocess(noise(64, 48, 4)).num_tokens == 1602
    # A transparent image is composited onto white.
    rgba = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    white = squash.preprocess(rgba).pixel_values
    assert torch.allclose(white, squash.preprocess(Image.new("RGB", (50, 50), (255, 255, 255))).pixel_values)


def test_letterbox_from_preprocessor_config(tmp_path: Path, ckpt: Path) -> None:
    d = tmp_path / "lb"
    shutil.copytree(ckpt, d)
    (d / "preprocessor_config.json").write_text(json.dumps({"resize_mode": "letterbox"}))
    _, builder = load_processors(d)
    assert builder.image_processor.config.resize_mode == "letterbox"
    (d / "preprocessor_config.json").write_text(json.dumps({"resize_mode": "stretch"}))
    with pytest.raises(CheckpointError):
        load_processors(d)


# ------------------------------------------------------------------------------ CLI and full size


def test_cli_writes_tiny_and_full_size_checkpoints(tmp_path: Path) -> None:
    from glmv.cli import main
    from glmv.models.glm4v_9b import Glm4v9bConfig

    assert main(["create-tiny-model", "--arch", "glm4v-9b", str(tmp_path / "tiny")]) == 0
    assert isinstance(load_model(tmp_path / "tiny", dtype="float32", device="cpu"), Glm4v9bModel)
    assert main(["create-tiny-model", "--arch", "glm4v-9b", "--variant", "full", str(tmp_path / "full")]) == 0
    assert not list((tmp_path / "full").glob("*.safetensors"))
    cfg = Glm4v9bConfig.from_pretrained(tmp_path / "full")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim) == (
        4096,
        40,
        2,
        128,
        64,
    )
    assert (cfg.vision.num_hidden_layers, cfg.vision.hidden_size, cfg.image_span_length) == (63, 1792, 1602)
    with torch.device("meta"):
        full = Glm4v9bModel(cfg)
    counts = {"text": 0, "vision": 0}
    for name, p in full.named_parameters():
        counts["vision" if name.startswith("vision.") else "text"] += p.numel()
    # 13.9 B parameters: GLM-4-9B text 9.40 B + EVA2-CLIP-E vision and adapter 4.51 B.
    assert counts == {"text": 9_399_951_360, "vision": 4_506_369_536}


def test_weightless_checkpoint_draws_random_weights(tmp_path: Path, ckpt: Path) -> None:
    d = weightless_copy(ckpt, tmp_path / "weightless", seed=1)
    m = load_model(d, dtype="float32", device="cpu")
    _, builder = load_processors(d)
    logits, _ = paged_logits(m, build(builder, "one_image"), 64)  # type: ignore[arg-type]
    assert torch.isfinite(logits).all() and logits.std().item() > 0.1
