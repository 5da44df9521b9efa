"""Text strips for reading practice: deterministic, sized in whole image tokens, transcribed exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest

from glmv.synth import Augment, FontsMissingError
from glmv.synth.fonts import find_fonts
from glmv.synth.lines import PATCH, TEXT_LINES_KIND, make_text_lines
from glmv.synth.tasks import training_examples


@pytest.fixture(scope="module")
def fonts():  # type: ignore[no-untyped-def]
    try:
        return find_fonts()
    except FontsMissingError as e:
        pytest.skip(str(e))


def test_a_seed_fixes_the_strip(fonts) -> None:  # type: ignore[no-untyped-def]
    a = make_text_lines(random.Random(7), fonts, Augment())
    b = make_text_lines(random.Random(7), fonts, Augment())
    assert a.lines == b.lines
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_strips_are_whole_tokens_with_their_transcription(fonts) -> None:  # type: ignore[no-untyped-def]
    langs = set()
    for seed in range(40):
        doc = make_text_lines(random.Random(seed), fonts, Augment())
        langs.add(doc.lang)
        w, h = doc.image.size
        assert w % PATCH == 0 and h % PATCH == 0 and 6 * PATCH <= w <= 16 * PATCH
        assert 1 <= len(doc.lines) <= 4 and all(line.strip() for line in doc.lines)
        assert doc.kind == TEXT_LINES_KIND and doc.schema is None and doc.qa == []
        # ink on the page: the strip is not blank
        assert np.asarray(doc.image.convert("L")).min() < 128
        examples = training_examples(doc, random.Random(seed), 2)
        assert [e.task for e in examples] == ["read", "read"]
        assert all(e.turns[0][1] == doc.text for e in examples)
    assert langs == {"en", "zh"}


def test_clean_strip_draws_every_line(fonts) -> None:  # type: ignore[no-untyped-def]
    # Without damage, each text line leaves its own band of ink: as many inked bands as lines.
    for seed in range(10):
        doc = make_text_lines(random.Random(seed), fonts, Augment.none())
        ink_rows = (np.asarray(doc.image.convert("L")) < 140).any(axis=1)
        bands = int(ink_rows[0]) + int(np.count_nonzero(ink_rows[1:] & ~ink_rows[:-1]))
        assert bands == len(doc.lines), (seed, doc.lines)
