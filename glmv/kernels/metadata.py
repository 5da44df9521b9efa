"""The per-step description of a flattened, paged batch that attention needs.

A step runs `N` new tokens from `B` sequences laid end to end. Sequence `i` contributes
`query_lens[i]` new tokens whose keys/values go into the slots `slot_mapping[...]` of the paged
cache, and attends over `seq_lens[i]` tokens in total (its cached prefix plus the new tokens),
found through `block_tables[i]`.

On CUDA the tensors are made on the host and copied through pinned memory without blocking, so
building the metadata of a step never waits for the step before it to finish.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def to_device(
    values: list[int] | list[list[int]] | torch.Tensor, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """`values` as a tensor on `device`; a CUDA copy is queued from pinned memory, never waited for
    (a blocking or pageable copy would wait for everything queued on the device)."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # pragma: no cover - CUDA


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [N] int64: cache slot of every new token
    query_start_loc: torch.Tensor  # [B + 1] int32: offsets of each sequence's new tokens
    seq_lens: torch.Tensor  # [B] int32: tokens attended over (prefix + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int
    # Decode-only batches: cache slot of every (sequence, position) pair, shared by all layers.
    decode_slots: torch.Tensor | None = None
    # GPU decode kernel: how many slices each sequence is split into (None: chosen per launch;
    # fixed for a captured CUDA graph).
    num_splits: int | None = None
    # Mixed batches on CUDA: (decode seq indices, their token rows) on the device, built once per step.
    decode_subset: tuple[torch.Tensor, torch.Tensor] | None = None
    # Prefill chunks: cache slots of each sequence's whole history, shared by all layers.
    seq_slots: dict[int, torch.Tensor] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        *,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Derive slot mapping and padded tensors from per-sequence lengths and block tables."""
        if sum(query_lens) <= 512:  # decode-sized steps: plain Python is quickest
            slots: list[int] = []
            for q_len, s_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
                for pos in range(s_len - q_len, s_len):
                    slots.append(table[pos // block_size] * block_size + pos % block_size)
            slot_mapping = to_device(slots, torch.int64, device)
        else:  # prefill-sized steps: one vectorised gather per sequence
            parts = []
            for q_len, s_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
                pos = torch.arange(s_len - q_len, s_len)
                parts.append(
                    torch.tensor(table, dtype=torch.int64)[pos // block_size] * block_size + pos % block_size
                )
            slot_mapping = to_device(torch.cat(parts), torch.int64, device)
        width = max((len(t) for t in block_tables), default=1) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        starts = [0]
        for q_len in query_lens:
            starts.append(starts[-1] + q_len)
        return cls(
            slot_mapping=slot_mapping,
            query_start_loc=to_device(starts, torch.int32, device),
            seq_lens=to_device(seq_lens, torch.int32, device),
            block_tables=to_device(padded, torch.int32, device),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            block_size=block_size,
        )
