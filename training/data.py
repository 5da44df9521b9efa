"""Training sequences for the demo model, rendered on the fly in DataLoader workers.

`encode_example` turns an `Example` into token ids in the exact served format (glmv's chat
template and tokenizer, the image expanded to its token count), marks the answer tokens (each
answer is followed by `<|user|>`, which ends a turn), and computes the M-RoPE positions glmv uses.
`DocumentStream` is an endless `IterableDataset`: each item is one freshly generated document
(the uint8 patches of glmv's resized image) with `examples_per_doc` encoded sequences on it; a share of
them (`lines_share`) are text strips to transcribe (`glmv.synth.lines`). `BatchStream` groups a
worker's documents into whole padded batches (`PackedBatch`) in the worker itself, so the training
process receives one item of a few arrays per step instead of hundreds of small ones.
`glyph_targets` says which characters each image token shows (from the canvas' glyph centres):
the training's per-token reading loss (`--glyph-weight`).
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

__all__ = [
    "BatchStream",
    "DocumentStream",
    "Encoded",
    "Encoder",
    "PackedBatch",
    "Sequence",
    "encode_example",
    "glyph_targets",
    "group_sequences",
    "pack_sequences",
]

# (ids, targets, positions, task, image, grid[, glyphs]): one training sequence and its image
# (pixels or patch bytes, see `training.model.image_rows`), optionally with the image's
# `glyph_targets`
Sequence = tuple[Any, ...]
GLYPHS_PER_TOKEN = 6  # characters kept per image token (small Latin text puts ~4 in one)


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
        self._char_ids: dict[str, int] = {}

    def char_id(self, ch: str) -> int:
        """The token of one character, or -1 when it takes more than one token."""
        found = self._char_ids.get(ch)
        if found is None:
            ids = self.tokenizer.encode(ch)
            found = self._char_ids[ch] = ids[0] if len(ids) == 1 else -1
        return found

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


def glyph_targets(enc: Encoder, doc: SyntheticDocument, pixels: np.ndarray) -> np.ndarray:
    """(image tokens, GLYPHS_PER_TOKEN) int64: the tokens of the characters whose centre lies in each
    image token's square (patch x merge pixels of the resized image, in the merger's row-major
    order), -1 where there are fewer."""
    cell = enc.images.config.factor
    rows, cols = pixels.shape[0] // cell, pixels.shape[1] // cell
    sx, sy = pixels.shape[1] / doc.image.width, pixels.shape[0] / doc.image.height
    out = np.full((rows * cols, GLYPHS_PER_TOKEN), -1, np.int64)
    filled = np.zeros(rows * cols, np.int64)
    for ch, x, y in doc.glyphs:
        r, c = int(y * sy // cell), int(x * sx // cell)
        tok = enc.char_id(ch)
        if tok < 0 or not (0 <= r < rows and 0 <= c < cols):
            continue
        i = r * cols + c
        if filled[i] < GLYPHS_PER_TOKEN:
            out[i, filled[i]] = tok
            filled[i] += 1
    return out


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

    def documents(self) -> Any:
        """This worker's endless (patch bytes, grid, sequences, glyph targets) per document."""
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
                yield enc.images.patch_bytes(pixels), grid, seqs, glyph_targets(enc, doc, pixels)

    def __iter__(self) -> Any:
        for patches, grid, seqs, glyphs in self.documents():
            yield {
                "patches": patches,  # batched onto the device in one copy
                "grid": grid,
                "seqs": [(s.ids, s.targets, s.positions, s.task) for s in seqs],
                "glyphs": glyphs,
            }


def group_sequences(
    pool: list[Sequence], max_tokens: int, max_patches: int, rng: random.Random
) -> list[list[Sequence]]:
    """Length-sorted groups of at most `max_tokens` padded text tokens and, when `max_patches` is
    set, at most that many image patches (the vision tower's work grows with the images, not with
    the text); in random order."""
    pool = sorted(pool, key=lambda s: len(s[0]))
    groups: list[list[Sequence]] = [[]]
    patches = 0
    for s in pool:
        n_patches = s[5][0] * s[5][1] * s[5][2]
        longest = max(len(s[0]), *(len(t[0]) for t in groups[-1])) if groups[-1] else len(s[0])
        too_long = longest * (len(groups[-1]) + 1) > max_tokens
        too_wide = bool(max_patches) and patches + n_patches > max_patches
        if groups[-1] and (too_long or too_wide):
            groups.append([])
            patches = 0
        groups[-1].append(s)
        patches += n_patches
    rng.shuffle(groups)
    return groups


@dataclass(slots=True)
class PackedBatch:
    """Right-padded sequences and their images' patch bytes, as numpy arrays."""

    ids: np.ndarray  # (B, L) int64
    targets: np.ndarray  # (B, L) bool
    positions: np.ndarray  # (3, B, L) int64
    patches: np.ndarray  # (patches, 3, p, p) uint8: every sequence's image, in order
    grids: np.ndarray  # (B, 3) int64
    lengths: list[int]
    tasks: list[str]
    glyphs: np.ndarray | None = None  # (image tokens, GLYPHS_PER_TOKEN): every image's glyph_targets


def pack_sequences(seqs: list[Sequence], pad_id: int, patch_bytes: Any = None) -> PackedBatch:
    """Pad `seqs` into one batch; positions run on past each sequence's end. Images given as
    resized pixels are turned into patch bytes by `patch_bytes` (`ImageProcessor.patch_bytes`)."""
    b = len(seqs)
    length = max(len(s[0]) for s in seqs)
    ids = np.full((b, length), pad_id, np.int64)
    targets = np.zeros((b, length), bool)
    pos = np.zeros((3, b, length), np.int64)
    for i, (s_ids, s_tg, s_pos, *_rest) in enumerate(seqs):
        n = len(s_ids)
        ids[i, :n] = s_ids
        targets[i, :n] = s_tg
        pos[:, i, :n] = s_pos
        pos[:, i, n:] = s_pos[:, -1:] + np.arange(1, length - n + 1)
    images = [s[4] if s[4].ndim == 4 else patch_bytes(s[4]) for s in seqs]
    glyphs = np.concatenate([s[6] for s in seqs]) if all(len(s) > 6 for s in seqs) else None
    return PackedBatch(
        ids,
        targets,
        pos,
        np.concatenate(images),
        np.asarray([s[5] for s in seqs], np.int64),
        [len(s[0]) for s in seqs],
        [s[3] for s in seqs],
        glyphs,
    )


class BatchStream(IterableDataset):  # type: ignore[type-arg]
    """Endless `PackedBatch`es: each worker renders `pool_docs` documents (see `DocumentStream`),
    groups their sequences with `group_sequences` and packs every group."""

    def __init__(
        self,
        documents: DocumentStream,
        *,
        pad_id: int,
        max_tokens: int,
        max_patches: int = 0,
        pool_docs: int = 96,
    ) -> None:
        self.documents = documents
        self.pad_id = pad_id
        self.max_tokens = max_tokens
        self.max_patches = max_patches
        self.pool_docs = pool_docs

    def __iter__(self) -> Any:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(f"batches:{self.documents.seed}:{self.documents.start}:{worker}")
        docs = self.documents.documents()
        while True:
            pool: list[Sequence] = []
            for _ in range(self.pool_docs):
                patches, grid, seqs, glyphs = next(docs)
                pool += [(s.ids, s.targets, s.positions, s.task, patches, grid, glyphs) for s in seqs]
            for group in group_sequences(pool, self.max_tokens, self.max_patches, rng):
                yield pack_sequences(group, self.pad_id)
