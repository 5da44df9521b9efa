"""Glyph supervision: the canvas records where each printed character lands (after rotation and
resizing), and `training.data.glyph_targets` / `training.model.glyph_loss` turn that into a
per-image-token reading target."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from glmv.synth import DOCUMENT_KINDS, Augment, FontsMissingError, SyntheticDocument, generate

CHECKPOINT = Path(__file__).resolve().parents[2] / "glmv" / "checkpoints" / "glmv-demo"


@pytest.fixture(scope="module", autouse=True)
def _fonts() -> None:
    from glmv.synth.fonts import find_fonts

    try:
        find_fonts()
    except FontsMissingError as exc:  # pragma: no cover
        pytest.skip(str(exc))


def _on_ink(doc: SyntheticDocument, scatter: bool = False) -> float:
    """Share of glyph centres with ink within 3 px (a pixel far from the paper); `scatter` puts the
    same number of points anywhere on the page instead."""
    grey = np.asarray(doc.image.convert("L"), np.float32)
    paper = float(np.median(grey))
    rng = np.random.default_rng(0)
    hits = 0
    for _, x, y in doc.glyphs:
        if scatter:
            x, y = rng.uniform(0, grey.shape[1]), rng.uniform(0, grey.shape[0])
        xi, yi = round(x), round(y)
        window = grey[max(0, yi - 3) : max(0, yi + 4), max(0, xi - 3) : max(0, xi + 4)]
        hits += bool(window.size) and float(np.abs(window - paper).max()) > 40
    return hits / len(doc.glyphs)


@pytest.mark.parametrize("kind", sorted(DOCUMENT_KINDS))
def test_glyph_centres_lie_on_printed_ink(kind: str) -> None:
    for seed in range(3):  # the training augmentations: rotation, rescaling, blur, noise
        doc = generate(kind, seed)
        assert len(doc.glyphs) >= 20
        assert all(not ch.isspace() for ch, _, _ in doc.glyphs)
        assert _on_ink(doc) >= 0.95
        # the check can fail: as many points anywhere on the page mostly miss the ink
        assert _on_ink(doc, scatter=True) < 0.6


def test_text_strips_record_their_glyphs() -> None:
    from glmv.synth.fonts import find_fonts
    from glmv.synth.lines import make_text_lines

    for seed in range(3):
        doc = make_text_lines(random.Random(seed), find_fonts(), Augment())
        printed = "".join(ch for ch in doc.text if not ch.isspace())
        assert "".join(ch for ch, _, _ in doc.glyphs) == printed
        assert _on_ink(doc) >= 0.95


def test_glyph_targets_follow_the_merger_order() -> None:
    pytest.importorskip("transformers")
    from training.data import GLYPHS_PER_TOKEN, Encoder, glyph_targets

    enc = Encoder(CHECKPOINT)
    doc = generate("receipt", 5, augment=Augment.none())
    pixels = enc.images.resize(doc.image)
    targets = glyph_targets(enc, doc, pixels)
    cell = enc.images.config.factor
    rows, cols = pixels.shape[0] // cell, pixels.shape[1] // cell
    assert targets.shape == (enc.images.num_tokens(doc.image.height, doc.image.width), GLYPHS_PER_TOKEN)
    assert targets.shape[0] == rows * cols
    # every character with one token is in the row-major cell that holds its centre
    sx, sy = pixels.shape[1] / doc.image.width, pixels.shape[0] / doc.image.height
    placed = 0
    for ch, x, y in doc.glyphs:
        tok = enc.char_id(ch)
        if tok < 0:
            continue
        i = int(y * sy // cell) * cols + int(x * sx // cell)
        placed += tok in targets[i]
    assert placed >= 0.95 * sum(enc.char_id(ch) >= 0 for ch, _, _ in doc.glyphs)
    filled = targets[:, 0] >= 0
    assert 0 < filled.sum() < len(targets)  # text in some cells, paper in others
    assert ((targets >= 0).sum(1) == np.argmin(np.c_[targets, np.full(len(targets), -1)] >= 0, 1)).all()


def test_glyph_loss_rewards_the_characters_under_each_token() -> None:
    torch = pytest.importorskip("torch")
    from training.model import glyph_loss

    # Orthogonal character embeddings: the embedding of "7 and 9" is nearest to 7 and 9 and to
    # nothing else, whatever the draw (random ones in 16 dimensions sometimes put a third closer).
    table = torch.eye(50)
    noise = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    glyphs = torch.tensor([[3, -1], [7, 9], [-1, -1]])
    right = torch.stack([table[3], table[7] + table[9], noise[0]]).requires_grad_()
    wrong = torch.stack([table[4], table[11], noise[1]])
    loss_right, acc_right = glyph_loss(right, glyphs, table)
    loss_wrong, acc_wrong = glyph_loss(wrong, glyphs, table)
    assert float(acc_right) == 1.0 and float(acc_wrong) == 0.0
    assert float(loss_right.detach()) < float(loss_wrong)
    loss_right.backward()
    assert right.grad is not None and float(right.grad[2].abs().sum()) == 0.0  # no text: no signal
    none, _ = glyph_loss(right, torch.full((3, 2), -1), table)
    assert float(none.detach()) == 0.0
