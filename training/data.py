"""Training sequences for the demo model, rendered on the fly in DataLoader workers.

`encode_example` turns an `Example` into token ids in the exact served format (glmv's chat
template and tokenizer, the image expanded to its token count), marks the answer tokens (each
answer is followed by `<|user|>`, which ends a turn), and computes the M-RoPE positions glmv uses.
`DocumentStream` is an endless `IterableDataset`: each item is one freshly generated document
(the uint8 patches of glmv's resized image) with `examples_per_doc` encoded sequences on it; a share of
them (`lines_share`) are text strips to transcribe (`glmv.synth.lines`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from glmv.models.positions import ImageGrid, mrope_positions
from glmv.processing.chat import ChatProcessor
from glmv.processing.image import ImageProcessor
from glmv.processing.tokenizer import Tokenizer
from glmv.synth import Augment, SyntheticDocument, generate, random_kind
from glmv.synth.fonts import find_fonts
from glmv.synth.lines import TEXT_LINES_KIND, make_text_lines
from glmv.synth.tasks import Example, training_examples

__all__ = ["DocumentStream", "Encoded", "Encoder", "encode_example"]


@dataclass(slots=True)
class Encoded:
    ids: np.ndarray  # int64 (L,)
    targets: np.ndarray  # bool (L,): token t is an answer token (predicted from t - 1)
    positions: np.ndarray  # int64 (3, L)
    task: str


class Encoder:
    """Tokenizer, chat template and image processor of one checkpoint folder."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.tokenizer = Tokenizer.from_pretrained(checkpoint)
        self.chat = ChatProcessor(self.tokenizer)
        self.images = ImageProcessor.from_pretrained(checkpoint)
        end = self.tokenizer.token_to_id("<|user|>")
        assert end is not None
        self.end_of_turn = end

    def prompt(self, example: Example, turn: int, image_tokens: int) -> list[int]:
        """Ids of the conversation up to the user turn `turn` (0-based), generation prompt included."""
        messages = example.messages(upto=turn + 1)
        return self.chat.encode(messages, [image_tokens], ["x"], add_generation_prompt=True).token_ids


def encode_example(enc: Encoder, example: Example, grid: tuple[int, int, int]) -> Encoded:
    merged_h, merged_w = grid[1] // 2, grid[2] // 2
    n_image = merged_h * merged_w
    ids: list[int] = []
    targets: list[bool] = []
    for turn, (_, answer) in enumerate(example.turns):
        prefix = enc.prompt(example, turn, n_image)
        # Each prompt renders the whole history, so it must extend what was built so far.
        if prefix[: len(ids)] != ids:
            raise AssertionError("chat template rendering is not incremental")
        targets += [False] * (len(prefix) - len(ids))
        ids = prefix
        answer_ids = [*enc.tokenizer.encode(answer), enc.end_of_turn]
        ids = ids + answer_ids
        targets += [True] * len(answer_ids)
    offset = ids.index(enc.chat.image_token_id)
    pos, _ = mrope_positions(len(ids), [ImageGrid(offset, 1, merged_h, merged_w)])
    return Encoded(np.asarray(ids, np.int64), np.asarray(targets, bool), pos.numpy(), example.task)


class DocumentStream(IterableDataset):  # type: ignore[type-arg]
    """Endless documents with `examples_per_doc` training sequences each; worker `w` of run `seed`
    draws from its own random stream (`start` skips ahead on resume)."""

    def __init__(
        self,
        checkpoint: str | Path,
        seed: int,
        examples_per_doc: int = 3,
        max_len: int = 1536,
        start: int = 0,
        task_weights: dict[str, float] | None = None,
        lines_share: float = 0.0,
    ) -> None:
        self.checkpoint = str(checkpoint)
        self.seed = seed
        self.examples_per_doc = examples_per_doc
        self.max_len = max_len
        self.start = start
        self.task_weights = task_weights
        self.lines_share = lines_share

    def __iter__(self) -> Any:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(f"train:{self.seed}:{self.start}:{worker}")
        enc = Encoder(self.checkpoint)
        fonts = find_fonts()
        torch.set_num_threads(1)
        while True:
            doc: SyntheticDocument
            if self.lines_share and rng.random() < self.lines_share:
                doc = make_text_lines(random.Random(rng.randrange(2**40)), fonts, Augment())
            else:
                doc = generate(random_kind(rng), rng.randrange(2**40), fonts=fonts)
            pixels = enc.images.resize(doc.image)
            grid = (1, pixels.shape[0] // 14, pixels.shape[1] // 14)
            # a strip has one task, so one sequence (three would repeat the same answer)
            count = 1 if doc.kind == TEXT_LINES_KIND else self.examples_per_doc
            examples = training_examples(doc, rng, count, self.task_weights)
            seqs = [encode_example(enc, ex, grid) for ex in examples]
            seqs = [s for s in seqs if len(s.ids) <= self.max_len]
            if seqs:
                yield {
                    "patches": enc.images.patch_bytes(pixels),  # batched onto the device in one copy
                    "grid": grid,
                    "seqs": [(s.ids, s.targets, s.positions, s.task) for s in seqs],
                }
