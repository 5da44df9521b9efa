"""Shared measurements of the device scripts."""

from __future__ import annotations

import time

import torch


def copy_bandwidth(nbytes: int = 2 * 1024**3, repeats: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * repeats / (time.perf_counter() - t)
    del x, y
    torch.cuda.empty_cache()
    return bw


def decode_replay_ms(engine: object, batch: int, seq_len: int = 1700, iters: int = 20) -> float | None:
    """GPU time of one replay of the engine's captured decode graph for `batch` sequences of
    `seq_len` tokens (no Python around it), or None when no such graph was captured."""
    graphs = engine.runner.graphs  # type: ignore[attr-defined]
    if graphs is None or batch not in graphs.graphs:
        return None
    graphs.seq_lens[:batch].fill_(seq_len)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        graphs.graphs[batch].replay()
    start.record()
    for _ in range(iters):
        graphs.graphs[batch].replay()
    end.record()
    torch.cuda.synchronize()
    graphs.seq_lens.zero_()
    return start.elapsed_time(end) / iters
