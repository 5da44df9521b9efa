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
