"""CUDA graphs for decode steps: Python off the per-token path.

A decode step of `B` sequences has fixed shapes, so the whole LM forward (embedding, 40 layers,
final norm) is captured once per batch-size bucket (1, 2, 4, 8, 16, 24, 32, … up to
`max_num_seqs`) over static input buffers, and each step copies its ids, positions, slots,
lengths and block tables into those buffers and replays the bucket's graph. Rows beyond the real
batch are padding: length 0 (the attention kernel skips them) and a scratch KV slot to write to.
Prefill runs eagerly.

Every copy into the buffers is queued without waiting (pinned host memory or device to device),
so that the engine can launch a step while the previous one still runs; the one reused pinned
buffer (the block tables) is rewritten only after its previous copy has happened.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from glmv.kernels.metadata import AttentionMetadata
from glmv.kernels.triton_decode import num_splits_for
from glmv.models.base import KVCache, ServedModel


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8]
    n = 16
    while n <= max_batch:
        sizes.append(n)
        n += 8 if n < 64 else 32
    return [s for s in sizes if s <= max_batch] or [1]


@dataclass(slots=True)
class CaptureReport:
    sizes: list[int]
    seconds: float
    memory_bytes: int


class DecodeGraphs:
    def __init__(
        self,
        model: ServedModel,
        kv_caches: Sequence[KVCache],
        *,
        block_size: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        max_batch: int,
        position_rows: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.sizes = bucket_sizes(max_batch)
        dev = model.device
        n = self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(position_rows, n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=dev)
        # Host copy of the block tables (pinned), rewritten only where a row's table changed.
        self._host_tables = torch.full(
            (n, max_blocks_per_seq), scratch_block, dtype=torch.int32, pin_memory=True
        )
        # What each host row holds: (sequence id, its preemption count, table length).
        self._row_state: list[tuple[int, int, int]] = [(-1, 0, 0)] * n
        # Recorded after the last copy out of `_host_tables`: the host waits on it (not on the
        # whole device queue) before it rewrites a row that copy may still read.
        self._tables_copied: torch.cuda.Event | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.sm_count = torch.cuda.get_device_properties(dev).multi_processor_count

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b],
            query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=self.ids.device),
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            query_lens_cpu=[1] * b,
            seq_lens_cpu=[1] * b,
            block_size=self.block_size,
            num_splits=num_splits_for(b, self.model.num_kv_heads, self.sm_count),
        )

    @torch.inference_mode()
    def capture(self) -> CaptureReport:
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        self.seq_lens.fill_(1)
        for b in reversed(self.sizes):
            meta = self._meta(b)
            for _ in range(2):  # warm up: Triton compilation, cuBLAS handles, rotary tables
                self.model(self.ids[:b], self.positions[:, :b], self.kv_caches, meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.model(self.ids[:b], self.positions[:, :b], self.kv_caches, meta)
            self.graphs[b] = graph
        self.seq_lens.zero_()
        torch.cuda.synchronize()
        return CaptureReport(
            list(self.sizes), time.perf_counter() - t0, torch.cuda.memory_reserved() - before
        )

    def fits(self, batch: int) -> bool:
        return bool(self.graphs) and batch <= self.sizes[-1]

    def run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        row_keys: list[tuple[int, int]],
    ) -> torch.Tensor:
        """Replay the smallest bucket that holds `len(ids)` sequences; hidden states `[B, hidden]`.

        `ids` and `positions` are on the device already. `row_keys` identify each row's table
        contents ((sequence id, preemption count)): a row is rewritten only when its key or length
        changed since the previous step."""
        b = ids.shape[0]
        size = next(s for s in self.sizes if s >= b)
        host = self._host_tables
        changed = [
            (i, table, (key[0], key[1], len(table)))
            for i, (table, key) in enumerate(zip(block_tables, row_keys, strict=True))
            if self._row_state[i] != (key[0], key[1], len(table))  # a new sequence, or a new block
        ]
        padding = [i for i in range(b, size) if self._row_state[i] != (-1, 0, 0)]
        if (changed or padding) and self._tables_copied is not None:
            self._tables_copied.synchronize()
        for i, table, state in changed:
            host[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
            host[i, len(table) :] = self.scratch_block
            self._row_state[i] = state
        for i in padding:
            host[i] = self.scratch_block
            self._row_state[i] = (-1, 0, 0)
        self.block_tables[:size].copy_(host[:size], non_blocking=True)
        self._tables_copied = torch.cuda.Event()
        self._tables_copied.record()
        self.ids[:b].copy_(ids, non_blocking=True)
        self.positions[:, :b].copy_(positions, non_blocking=True)
        pad = size - b
        self.slots[:size].copy_(
            torch.tensor(slots + [self.scratch_slot] * pad, dtype=torch.int64).pin_memory(), non_blocking=True
        )
        self.seq_lens[:size].copy_(
            torch.tensor(seq_lens + [0] * pad, dtype=torch.int32).pin_memory(), non_blocking=True
        )
        self.graphs[size].replay()
        return self.outputs[size][:b]
