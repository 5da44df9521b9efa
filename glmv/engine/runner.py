"""The model runner: turns a scheduled step into tensors, runs the model, samples.

For each step it lays the scheduled chunks end to end (token ids, 3-axis M-RoPE positions,
block tables, slot mapping), encodes the images a prefill chunk needs (or takes their
embeddings from the encoder cache), runs one forward pass over the paged KV cache and samples
one token for every chunk that ends at its sequence's last token.

`launch` queues all of that and returns a `PendingStep` at once: the sampled ids stay on the
device and are copied back in the background, so the engine can schedule and launch the next
step before this one ends (asynchronous scheduling). A decode whose input token is a placeholder
(sampled by the step launched just before, not yet on the host) reads it from that step's ids on
the device. Inputs go to the device through pinned memory without blocking; the waits that
remain are where a value is needed on the host (an image's finiteness check, penalties).
`execute` is `launch` followed by `PendingStep.wait`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from glmv.engine.encoder_cache import EncoderCache
from glmv.engine.request import ImageInput
from glmv.engine.sampler import SampledBatch, SampledToken, SampleRequest, sample_batch
from glmv.engine.scheduler import ScheduledChunk
from glmv.engine.structured import GrammarState, apply_masks, fill_masks
from glmv.kernels.metadata import AttentionMetadata
from glmv.models.base import ServedModel


@dataclass(slots=True)
class SeqInputs:
    """Per-sequence data the runner needs beyond the scheduler's view."""

    images: list[ImageInput]
    generator: torch.Generator | None = None
    positions: torch.Tensor | None = None  # [3, num_prompt_tokens], computed on first use
    delta: int = 0
    failed: str | None = None  # set when this sequence's inputs could not be processed
    grammar: GrammarState | None = None  # structured output: the constraint on the next token


@dataclass(slots=True)
class StepResult:
    sampled: dict[int, SampledToken] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # seq_id -> error message
    encoded_images: int = 0


@dataclass(slots=True)
class PendingStep:
    """A launched step: the failures known at launch, and its sampled ids on their way back."""

    result: StepResult
    seq_ids: list[int] = field(default_factory=list)  # the sequence of each sampled row
    batch: SampledBatch | None = None

    def wait(self) -> StepResult:
        """The step's results on the host; waits for its own sampled ids only."""
        if self.batch is not None:
            tokens = self.batch.tokens()
            finite = self.batch.finite_rows()
            for j, (seq_id, token) in enumerate(zip(self.seq_ids, tokens, strict=True)):
                if finite is not None and not finite[j]:
                    self.result.failed[seq_id] = "the model produced non-finite logits"
                else:
                    self.result.sampled[seq_id] = token
            self.batch = None
        return self.result


def decode_graph_inputs(
    chunks: Sequence[ScheduledChunk], block_size: int
) -> tuple[list[int], list[int], list[list[int]], list[tuple[int, int]]]:
    """Cache slot, attended length, block table and row key of each one-token decode chunk."""
    slots, lens, tables, keys = [], [], [], []
    for c in chunks:
        p = c.start
        table = c.seq.block_table
        slots.append(table[p // block_size] * block_size + p % block_size)
        lens.append(p + 1)
        tables.append(table)
        keys.append((c.seq.seq_id, c.seq.num_preemptions))
    return slots, lens, tables, keys


def kv_bytes_per_block(model: ServedModel, block_size: int) -> int:
    return model.num_layers * 2 * block_size * model.num_kv_heads * model.head_dim * model.dtype.itemsize


class ModelRunner:
    def __init__(
        self,
        model: ServedModel,
        *,
        num_blocks: int,
        block_size: int,
        encoder_cache: EncoderCache,
        image_processor: Any = None,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.encoder_cache = encoder_cache
        # The checkpoint's image processor: makes patch rows from uint8 pixels on this device, and
        # its settings are part of every embedding's cache key.
        self.image_processor = image_processor
        self.preprocess_key = image_processor.config.cache_key() if image_processor is not None else ""
        # One extra block at the end: the scratch slot that padded rows of a CUDA-graph batch write to.
        shape = (num_blocks + 1, block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=model.dtype, device=model.device),
                torch.zeros(shape, dtype=model.dtype, device=model.device),
            )
            for _ in range(model.num_layers)
        ]
        self.device = model.device
        self.graphs: Any = None  # DecodeGraphs once captured (CUDA only)
        self.vocab_limit: int | None = None  # the tokenizer's vocabulary size, set by the engine
        self.default_generator = torch.Generator(device=self.device)
        self.default_generator.seed()
        # The ids sampled by the step launched last (on the device) and the row of each sequence:
        # where the next step's placeholder inputs come from.
        self._prev_tokens: torch.Tensor | None = None
        self._prev_rows: dict[int, int] = {}

    def _h2d(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the model's device. On CUDA the copy goes through pinned memory without
        blocking: a copy from pageable memory may wait for the whole device queue."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)  # pragma: no cover - CUDA

    def capture_cuda_graphs(self, *, max_batch: int, max_model_len: int) -> Any:  # pragma: no cover - CUDA
        """Capture decode graphs for batch buckets up to `max_batch`; returns a CaptureReport."""
        from glmv.engine.cuda_graphs import DecodeGraphs

        rows = self.model.positions_after_prompt(0, 1, 0).shape[0]
        self.graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            block_size=self.block_size,
            max_blocks_per_seq=(max_model_len + self.block_size - 1) // self.block_size,
            scratch_block=self.num_blocks,
            max_batch=max_batch,
            position_rows=rows,
        )
        return self.graphs.capture()

    # --- positions ------------------------------------------------------------------------------

    def _ensure_positions(self, seq_inputs: SeqInputs, num_prompt_tokens: int) -> None:
        if seq_inputs.positions is None:
            seq_inputs.positions, seq_inputs.delta = self.model.prompt_positions(
                num_prompt_tokens, seq_inputs.images
            )

    def _chunk_positions(self, chunk: ScheduledChunk, si: SeqInputs) -> torch.Tensor:
        seq = chunk.seq
        start, end = chunk.start, chunk.start + chunk.num_tokens
        n_prompt = seq.num_prompt_tokens
        if start >= n_prompt:  # decode: no prompt positions involved
            return self.model.positions_after_prompt(start, end, si.delta)
        assert si.positions is not None
        parts = []
        if start < n_prompt:
            parts.append(si.positions[:, start : min(end, n_prompt)])
        if end > n_prompt:
            lo = max(start, n_prompt)
            parts.append(self.model.positions_after_prompt(lo, end, si.delta))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # --- images ---------------------------------------------------------------------------------

    def _cache_key(self, image: ImageInput) -> str:
        return f"{image.content_hash}:{self.preprocess_key}"

    def _image_embeddings(
        self, chunks: Sequence[ScheduledChunk], inputs: Mapping[int, SeqInputs], result: StepResult
    ) -> dict[str, torch.Tensor]:
        """Embeddings of every image a chunk of this step touches, encoding the missing ones."""
        needed: dict[str, ImageInput] = {}
        owners: dict[str, list[int]] = {}
        for chunk in chunks:
            si = inputs[chunk.seq.seq_id]
            for image in si.images:
                if (
                    image.offset < chunk.start + chunk.num_tokens
                    and image.offset + image.length > chunk.start
                ):
                    key = self._cache_key(image)
                    needed.setdefault(key, image)
                    owners.setdefault(key, []).append(chunk.seq.seq_id)
        found: dict[str, torch.Tensor] = {}
        missing: list[tuple[str, ImageInput]] = []
        for key, image in needed.items():
            cached = self.encoder_cache.get(key)
            if cached is not None:
                found[key] = cached  # type: ignore[assignment]
            else:
                missing.append((key, image))
        if missing:
            try:
                found |= self._encode(missing)
            except Exception:
                # Isolate the failing image(s): encode one by one, fail only their sequences.
                for key, image in missing:
                    try:
                        found |= self._encode([(key, image)])
                    except Exception as exc:
                        for seq_id in owners[key]:
                            result.failed[seq_id] = f"image could not be encoded: {exc}"
            result.encoded_images += len(missing)
        return found

    def _encode(self, items: Sequence[tuple[str, ImageInput]]) -> dict[str, torch.Tensor]:
        parts = []
        for _, image in items:
            if image.pixel_values is not None:
                parts.append(image.pixel_values.to(self.device, non_blocking=True))
            elif image.pixels is not None and self.image_processor is not None:
                parts.append(
                    self.image_processor.to_patches(image.pixels, device=self.device, dtype=self.model.dtype)
                )
            else:
                raise ValueError("image pixels are no longer available and its embeddings were evicted")
        pixels = parts[0] if len(parts) == 1 else torch.cat(parts)
        embeds = self.model.encode_images(pixels, [im.grid_thw for _, im in items])
        out: dict[str, torch.Tensor] = {}
        for (key, image), emb in zip(items, embeds, strict=True):
            if emb.shape[0] != image.length:
                raise ValueError(
                    f"image yields {emb.shape[0]} embeddings for {image.length} placeholder tokens"
                )
            if not torch.isfinite(emb).all():
                raise ValueError("image embeddings are not finite")
            out[key] = emb
            self.encoder_cache.put(key, emb, emb.numel() * emb.element_size())
        return out

    # --- one step -------------------------------------------------------------------------------

    def execute(self, chunks: Sequence[ScheduledChunk], inputs: Mapping[int, SeqInputs]) -> StepResult:
        """Run one step and wait for its results."""
        return self.launch(chunks, inputs).wait()

    @torch.inference_mode()
    def launch(self, chunks: Sequence[ScheduledChunk], inputs: Mapping[int, SeqInputs]) -> PendingStep:
        """Queue one step on the device; its sampled ids come back through the `PendingStep`."""
        result = StepResult()
        prev_rows = self._prev_rows
        prev_tokens = self._prev_tokens
        self._prev_tokens, self._prev_rows = None, {}
        for chunk in chunks:
            self._ensure_positions(inputs[chunk.seq.seq_id], chunk.seq.num_prompt_tokens)
            missing = chunk.end - max(chunk.start, chunk.seq.num_tokens)
            # Only the token of the one step in flight can be pending, and only if that step
            # sampled this sequence.
            if missing > 1 or (missing == 1 and chunk.seq.seq_id not in prev_rows):
                result.failed[chunk.seq.seq_id] = "the input token of this step is not available"
        embeddings = self._image_embeddings(chunks, inputs, result)
        chunks = [c for c in chunks if c.seq.seq_id not in result.failed]
        if not chunks:
            return PendingStep(result)

        token_ids: list[int] = []
        fill_rows: list[int] = []  # rows whose input is a placeholder ...
        fill_from: list[int] = []  # ... and its row in the previous step's sampled ids
        positions: list[torch.Tensor] = []
        image_rows: list[torch.Tensor] = []
        mask_ranges: list[tuple[int, int]] = []
        offset = 0
        for chunk in chunks:
            seq = chunk.seq
            si = inputs[seq.seq_id]
            start, end = chunk.start, chunk.start + chunk.num_tokens
            token_ids.extend(seq.token_ids[start:end])
            if end > seq.num_tokens:  # the last input is the previous step's sampled token
                fill_rows.append(offset + chunk.num_tokens - 1)
                fill_from.append(prev_rows[seq.seq_id])
                token_ids.append(0)
            positions.append(self._chunk_positions(chunk, si))
            for image in si.images:
                lo, hi = max(start, image.offset), min(end, image.offset + image.length)
                if lo < hi:
                    emb = embeddings[self._cache_key(image)]
                    image_rows.append(emb[lo - image.offset : hi - image.offset])
                    mask_ranges.append((offset + lo - start, offset + hi - start))
            offset += chunk.num_tokens

        n = len(token_ids)
        ids = self._h2d(torch.tensor(token_ids, dtype=torch.int64))
        if fill_rows:  # a gather and a scatter on the device: nothing waits for the previous step
            assert prev_tokens is not None
            src = self._h2d(torch.tensor(fill_from, dtype=torch.int64))
            dst = self._h2d(torch.tensor(fill_rows, dtype=torch.int64))
            ids.index_copy_(0, dst, prev_tokens.index_select(0, src))
        pos = self._h2d(torch.cat(positions, dim=1))
        if self.graphs is not None and not image_rows and n == len(chunks) and self.graphs.fits(n):
            hidden = self._decode_with_graph(chunks, ids, pos)  # pragma: no cover - CUDA only
        else:
            hidden = self._forward_eager(chunks, ids, pos, n, image_rows, mask_ranges)
        return self._sample(chunks, hidden, inputs, result)

    def _decode_with_graph(
        self, chunks: Sequence[ScheduledChunk], ids: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover - CUDA only
        bs = self.block_size
        slots, lens, tables, keys = decode_graph_inputs(chunks, bs)
        return self.graphs.run(ids, pos, slots, lens, tables, keys)

    def _forward_eager(
        self,
        chunks: Sequence[ScheduledChunk],
        ids: torch.Tensor,
        pos: torch.Tensor,
        n: int,
        image_rows: list[torch.Tensor],
        mask_ranges: list[tuple[int, int]],
    ) -> torch.Tensor:
        meta = AttentionMetadata.build(
            query_lens=[c.num_tokens for c in chunks],
            seq_lens=[c.start + c.num_tokens for c in chunks],
            block_tables=[c.seq.block_table for c in chunks],
            block_size=self.block_size,
            device=self.device,
        )
        image_embeds = image_mask = None
        if image_rows:
            image_embeds = torch.cat(image_rows)
            mask = torch.zeros(n, dtype=torch.bool)
            for lo, hi in mask_ranges:
                mask[lo:hi] = True
            image_mask = self._h2d(mask)
        return self.model(ids, pos, self.kv_caches, meta, image_embeds, image_mask)

    def _sample(
        self,
        chunks: Sequence[ScheduledChunk],
        hidden: torch.Tensor,
        inputs: Mapping[int, SeqInputs],
        result: StepResult,
    ) -> PendingStep:
        sampling = [c for c in chunks if c.samples]
        if not sampling:
            return PendingStep(result)
        # Structured output: allowed-token masks of the constrained rows, filled on the host while
        # the forward pass may still run on the device.
        grammar_masks = fill_masks([inputs[c.seq.seq_id].grammar for c in sampling])
        last_rows = []
        cursor = 0
        for c in chunks:
            cursor += c.num_tokens
            if c.samples:
                last_rows.append(cursor - 1)
        if last_rows != list(range(hidden.shape[0])):  # unless every row is a sampling decode
            hidden = hidden.index_select(0, self._h2d(torch.tensor(last_rows, dtype=torch.int64)))
        logits = self.model.compute_logits(hidden)
        # A row with non-finite logits fails when the results arrive; it is sampled anyway, so
        # that the step needs no read-back here.
        finite = torch.isfinite(logits).all(dim=-1)
        rows = [
            SampleRequest(
                c.seq.params, c.seq.token_ids, c.seq.num_prompt_tokens, inputs[c.seq.seq_id].generator
            )
            for c in sampling
        ]
        apply_masks(logits, grammar_masks)  # unconstrained rows stay untouched
        batch = sample_batch(
            logits, rows, self.default_generator, vocab_limit=self.vocab_limit, finite=finite
        )
        seq_ids = [c.seq.seq_id for c in sampling]
        self._prev_tokens = batch.token_ids
        self._prev_rows = {seq_id: j for j, seq_id in enumerate(seq_ids)}
        return PendingStep(result, seq_ids, batch)
