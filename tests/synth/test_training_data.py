"""Training sequences are the served prompt format: glmv's template and tokenizer, answers ended
by `<|user|>`, glmv's M-RoPE positions; and the padded vision attention equals transformers' loop."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from glmv.synth import FontsMissingError

pytest.importorskip("transformers")

CHECKPOINT = Path(__file__).resolve().parents[2] / "glmv" / "checkpoints" / "glmv-demo"


@pytest.fixture(scope="module")
def encoder():  # type: ignore[no-untyped-def]
    from training.data import Encoder

    try:
        from glmv.synth.fonts import find_fonts

        find_fonts()
    except FontsMissingError as exc:  # pragma: no cover
        pytest.skip(str(exc))
    return Encoder(CHECKPOINT)


def test_sequences_match_the_served_rendering(encoder) -> None:  # type: ignore[no-untyped-def]
    from glmv.models.positions import ImageGrid, mrope_positions
    from glmv.synth import generate
    from glmv.synth.tasks import qa_example
    from training.data import encode_example

    doc = generate("receipt", 3)
    pixels = encoder.images.resize(doc.image)
    grid = (1, pixels.shape[0] // 14, pixels.shape[1] // 14)
    n_image = grid[1] * grid[2] // 4
    ex = qa_example(doc, random.Random(1), turns=2)
    enc = encode_example(encoder, ex, grid)
    rendered = encoder.chat.encode(ex.messages(), [n_image], ["x"], add_generation_prompt=False).token_ids
    assert enc.ids.tolist() == [*rendered, encoder.end_of_turn]
    # the answer tokens (and each turn's <|user|>) are the targets, nothing else
    answers = [[*encoder.tokenizer.encode(a), encoder.end_of_turn] for _, a in ex.turns]
    assert enc.ids[enc.targets].tolist() == [t for a in answers for t in a]
    offset = enc.ids.tolist().index(encoder.chat.image_token_id)
    pos, _ = mrope_positions(len(enc.ids), [ImageGrid(offset, 1, grid[1] // 2, grid[2] // 2)])
    assert np.array_equal(enc.positions, pos.numpy())


def test_padded_vision_attention_equals_the_loop(encoder) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoConfig, Glm4vForConditionalGeneration

    from glmv.synth import generate
    from training.model import _image_embeddings, image_rows, install_padded_vision_attention

    config = AutoConfig.from_pretrained(CHECKPOINT)
    config.vision_config.depth = 2
    torch.manual_seed(0)
    model = Glm4vForConditionalGeneration(config).eval()
    pixels = [encoder.images.resize(generate(k, 1).image) for k in ("business_card", "id_card")]
    grids = torch.tensor([(1, p.shape[0] // 14, p.shape[1] // 14) for p in pixels])
    rows = image_rows(encoder.images, pixels, torch.device("cpu"))
    with torch.no_grad():
        loop = _image_embeddings(model, rows, grids)
        install_padded_vision_attention(model)
        padded = _image_embeddings(model, rows, grids)
    assert torch.allclose(loop, padded, atol=1e-5)


def test_workers_pack_whole_batches(encoder) -> None:  # type: ignore[no-untyped-def]
    """BatchStream's batches keep each budget, pad like the served format expects (positions run on
    after the end), and their images become the same rows as one `to_patches` per image."""
    import torch

    from training.data import BatchStream, DocumentStream, group_sequences
    from training.model import Batch

    stream = BatchStream(
        DocumentStream(CHECKPOINT, seed=5, lines_share=0.5),
        pad_id=0,
        max_tokens=3000,
        max_patches=4000,
        pool_docs=6,
    )
    batches = iter(stream)
    seen = 0
    for _ in range(4):
        packed = next(batches)
        b, length = packed.ids.shape
        patches_per_image = [int(t * h * w) for t, h, w in packed.grids]
        assert b == len(packed.tasks) == len(packed.lengths) and max(packed.lengths) == length
        assert b == 1 or (b * length <= 3000 and sum(patches_per_image) <= 4000)
        assert packed.patches.shape == (sum(patches_per_image), 3, 14, 14)
        for i, n in enumerate(packed.lengths):
            assert not packed.targets[i, n:].any() and (packed.ids[i, n:] == 0).all()
            tail = packed.positions[:, i, n - 1 :]
            assert (np.diff(tail, axis=1) == 1).all()  # positions keep counting through the padding
        batch = Batch.from_packed(packed, encoder.images, torch.device("cpu"))
        assert batch.rows.shape == (sum(patches_per_image), 1176)
        start = 0
        for n_patches, image in zip(
            patches_per_image, np.split(packed.patches, np.cumsum(patches_per_image)[:-1]), strict=True
        ):
            assert torch.equal(
                batch.rows[start : start + n_patches],
                encoder.images.normalise_patches(torch.from_numpy(image)),
            )
            start += n_patches
        seen += b
    assert seen > 4

    # grouping alone: budgets hold for every group, nothing is lost
    pool = [
        (np.zeros(n, np.int64), np.zeros(n, bool), np.zeros((3, n), np.int64), "qa", np.zeros(1), (1, 4, 8))
        for n in (5, 9, 30, 31, 7, 64)
    ]
    groups = group_sequences(pool, max_tokens=64, max_patches=96, rng=random.Random(0))
    assert sorted(len(s[0]) for g in groups for s in g) == [5, 7, 9, 30, 31, 64]
    for g in groups:
        assert len(g) == 1 or (max(len(s[0]) for s in g) * len(g) <= 64 and 32 * len(g) <= 96)
