"""`StartupReport`: how long an engine core took to start, phase by phase, and how many GPU
kernels it built meanwhile (`glmv.kernels.compile_watch`). Printed at start-up; the phases are the
ones the core went through (on the CPU: the weights alone)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(slots=True)
class StartupReport:
    phases: dict[str, float] = field(default_factory=dict)  # name -> seconds, in order
    seconds: float = 0.0  # the whole start-up of the core
    kernel_builds: int | None = None  # None: not counted (no Triton in this process)
    kernel_build_seconds: float = 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - began

    def describe(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        text = f"engine core started in {self.seconds:.1f} s" + (f" ({parts})" if parts else "")
        if self.kernel_builds is not None:
            text += f"; {self.kernel_builds} GPU kernels built ({self.kernel_build_seconds:.1f} s)"
        return text
