"""Engine cores that share the CPU split its threads between them."""

from __future__ import annotations

import os

import torch

from glmv.engine.config import EngineConfig
from glmv.engine.core_proc import share_cpu_threads


def test_cores_on_the_cpu_split_its_threads() -> None:
    before = torch.get_num_threads()
    try:
        share_cpu_threads(EngineConfig(model="m", engine_mode="process", data_parallel_size=2), "cpu")
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
        torch.set_num_threads(before)
        share_cpu_threads(EngineConfig(model="m", engine_mode="process", data_parallel_size=1), "cpu")
        assert torch.get_num_threads() == before  # one core keeps torch's default
    finally:
        torch.set_num_threads(before)
