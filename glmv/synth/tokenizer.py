"""The demo model's tokenizer: GLM's format and special tokens, a vocabulary fitted to its documents.

`write_demo_tokenizer(dir)` trains a byte-level BPE (the format of GLM's own tokenizer.json, the
GLM-4.1V added tokens in their order, the GLM-4.1V chat template) on text the generator prints and
answers, plus every built-in extraction prompt, so the long prompts of /v1/extract take few tokens.
Digits are split one per token (GLM-4 groups up to three), which makes amounts and codes easier
to read for a small model.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from glmv.processing.tiny_tokenizer import (
    _CORPUS,
    GLM_PRETOKENIZE_REGEX,
    TinyTokenizerInfo,
    write_tiny_tokenizer,
)
from glmv.synth import DOCUMENT_KINDS, Augment, generate
from glmv.synth.questions import QUESTIONS, READ_PROMPTS
from glmv.synth.tasks import SYSTEM_PROMPTS, dump_json
from glmv.tasks.schemas import BUILTIN_SCHEMAS

__all__ = ["DEMO_SPLIT_REGEX", "demo_corpus", "write_demo_tokenizer"]

DEMO_SPLIT_REGEX = GLM_PRETOKENIZE_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
assert DEMO_SPLIT_REGEX != GLM_PRETOKENIZE_REGEX


def demo_corpus(documents: int = 1400, seed: int = 0) -> Iterator[str]:
    """Lines the tokenizer is trained on (deterministic for a seed)."""
    for _ in range(40):
        for preset in BUILTIN_SCHEMAS.values():
            yield preset.prompt() + "\n"
    for en, zh in (*QUESTIONS.values(), READ_PROMPTS):
        for _ in range(10):
            yield from (q + "\n" for q in (*en, *zh))
    yield from (s + "\n" for s in SYSTEM_PROMPTS)
    yield _CORPUS
    rng = random.Random(seed)
    kinds = tuple(DOCUMENT_KINDS)
    clean = Augment.none()
    for i in range(documents):
        doc = generate(kinds[i % len(kinds)], 10_000_000 + rng.randrange(10**9), augment=clean)
        yield doc.text + "\n"
        for qa in doc.qa:
            yield qa.answer + "\n"
        if doc.data is not None:
            yield dump_json(doc.data) + "\n"


def write_demo_tokenizer(
    out_dir: str | Path, *, vocab_size: int = 4096, documents: int = 1400
) -> TinyTokenizerInfo:
    return write_tiny_tokenizer(
        Path(out_dir),
        template="glm41v",
        vocab_size=vocab_size,
        corpus=list(demo_corpus(documents)),
        split_regex=DEMO_SPLIT_REGEX,
        max_token_length=16,
    )
