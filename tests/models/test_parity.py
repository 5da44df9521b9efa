"""glmv's native model against transformers' Glm4vForConditionalGeneration on tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glmv.kernels.metadata import AttentionMetadata
from glmv.models.generate import ImageInput, generate
from glmv.models.loader import load_model
from glmv.models.positions import ImageGrid, mrope_positions
from tests.models.reference import conversations, hf_inputs, hf_model

CASES = sorted(conversations())


def _image_inputs(inputs: dict[str, torch.Tensor], image_token_id: int) -> list[ImageInput]:
    if "pixel_values" not in inputs:
        return []
    ids = inputs["input_ids"][0]
    grids = [tuple(int(x) for x in g) for g in inputs["image_grid_thw"]]
    sizes = [t * h * w for t, h, w in grids]
    pixel_chunks = inputs["pixel_values"].split(sizes)
    offsets = []
    is_img = (ids == image_token_id).tolist()
    for i, flag in enumerate(is_img):
        if flag and (i == 0 or not is_img[i - 1]):
            offsets.append(i)
    return [ImageInput(p, g, o) for p, g, o in zip(pixel_chunks, grids, offsets, strict=True)]  # type: ignore[arg-type]


def _glmv_logits(model, ids: torch.Tensor, images: list[ImageInput], chunk: int | None = None) -> torch.Tensor:
    """All-position logits, computed in chunks of `chunk` tokens through the paged cache."""
    cfg = model.config
    n = ids.numel()
    bs = 16
    nb = (n + bs - 1) // bs
    table = list(reversed(range(nb)))  # a non-trivial block order
    t = cfg.text
    shape = (nb, bs, t.num_key_value_heads, t.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(t.num_hidden_layers)]
    m = cfg.vision.spatial_merge_size
    grids = [ImageGrid(im.offset, im.grid_thw[0], im.grid_thw[1] // m, im.grid_thw[2] // m) for im in images]
    pos, _ = mrope_positions(n, grids)
    embeds = None
    mask = ids == cfg.image_token_id
    if images:
        embeds = torch.cat(model.encode_images(torch.cat([im.pixel_values for im in images]),
                                               [im.grid_thw for im in images]))
    step = chunk or n
    outs = []
    done = 0
    while done < n:
        end = min(n, done + step)
        meta = AttentionMetadata.build(query_lens=[end - done], seq_lens=[end], block_tables=[table], block_size=bs)
        e = None
        if embeds is not None:
            before = int(mask[:done].sum())
            e = embeds[before : before + int(mask[done:end].sum())]
        with torch.inference_mode():
            h = model(ids[done:end], pos[:, done:end], caches, meta, e, mask[done:end])
            outs.append(model.compute_logits(h))
        done = end
    return torch.cat(outs)


@pytest.fixture(scope="module", params=["tiny41_dir", "tiny46_dir"])
def ckpt(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(ckpt: Path, case: str) -> None:
    messages, images = conversations()[case]
    inputs = hf_inputs(ckpt, messages, images)
    ref = hf_model(str(ckpt))
    with torch.no_grad():
        expected = ref(**inputs).logits[0]
    model = load_model(ckpt, dtype="float32", device="cpu")
    ids = inputs["input_ids"][0]
    got = _glmv_logits(model, ids, _image_inputs(inputs, model.config.image_token_id))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    # Chunked prefill through the paged cache gives the same numbers.
    got_chunked = _glmv_logits(model, ids, _image_inputs(inputs, model.config.image_token_id), chunk=7)
    assert (got_chunked - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers(ckpt: Path, case: str) -> None:
    messages, images = conversations()[case]
    inputs = hf_inputs(ckpt, messages, images)
    ref = hf_model(str(ckpt))
    with torch.no_grad():
        expected = ref.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)[0]
    expected_new = expected[inputs["input_ids"].shape[1] :].tolist()
    model = load_model(ckpt, dtype="float32", device="cpu")
    ids = inputs["input_ids"][0].tolist()
    got = generate(model, ids, _image_inputs(inputs, model.config.image_token_id), max_new_tokens=32)
    assert got == expected_new
    assert len(got) == 32
