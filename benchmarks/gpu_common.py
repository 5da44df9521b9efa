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
