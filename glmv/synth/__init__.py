"""Synthetic documents for training and grading glmv's demo model (Pillow and numpy only).

`generate(kind, seed)` renders one document of `kind` (see `DOCUMENT_KINDS`) and returns a
`SyntheticDocument`: the image, its printed text, question/answer pairs and the JSON of its
built-in extraction schema. The same (kind, seed, augment) always gives the same document, so a
held-out set is just other seeds. `training_example` and `conversation` (in `glmv.synth.tasks`)
turn a document into chat turns in exactly the served prompt format.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from glmv.synth.canvas import Augment
from glmv.synth.cards import make_business_card, make_business_license, make_id_card
from glmv.synth.document import QA, SyntheticDocument, empty_document
from glmv.synth.fonts import FontSet, FontsMissingError, find_fonts
from glmv.synth.invoice import make_invoice
from glmv.synth.receipt import make_receipt
from glmv.synth.table_chat import make_chat, make_table

__all__ = [
    "DOCUMENT_KINDS",
    "QA",
    "Augment",
    "FontsMissingError",
    "SyntheticDocument",
    "empty_document",
    "generate",
    "random_kind",
]

Maker = Callable[[random.Random, FontSet, Augment, "str | None"], SyntheticDocument]

DOCUMENT_KINDS: dict[str, Maker] = {
    "receipt": make_receipt,
    "invoice": make_invoice,
    "id_card": make_id_card,
    "business_license": make_business_license,
    "business_card": make_business_card,
    "table": make_table,
    "chat_screenshot": make_chat,
}

# How often each kind is drawn in training: receipts and invoices carry the main targets.
KIND_WEIGHTS: dict[str, float] = {
    "receipt": 0.36,
    "invoice": 0.34,
    "id_card": 0.06,
    "business_license": 0.06,
    "business_card": 0.06,
    "table": 0.06,
    "chat_screenshot": 0.06,
}


def random_kind(rng: random.Random) -> str:
    return rng.choices(tuple(KIND_WEIGHTS), weights=tuple(KIND_WEIGHTS.values()))[0]


def generate(
    kind: str,
    seed: int,
    *,
    augment: Augment | None = None,
    lang: str | None = None,
    fonts: FontSet | None = None,
) -> SyntheticDocument:
    """Render document `kind` from `seed`. `lang` ("en"/"zh") forces the language where a kind has
    both; `augment` defaults to the training augmentations (`Augment.none()` for clean pages)."""
    if kind not in DOCUMENT_KINDS:
        raise ValueError(f"unknown document kind {kind!r}; choose one of {', '.join(DOCUMENT_KINDS)}")
    rng = random.Random(f"{kind}:{seed}")
    return DOCUMENT_KINDS[kind](rng, fonts or find_fonts(), augment or Augment(), lang)
