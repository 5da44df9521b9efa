"""Run the CUDA kernels' Triton code on the CPU: a subprocess under `TRITON_INTERPRET=1`.

The interpreter executes each program of a launch with numpy, so the kernels' indexing, masking,
split-K and reduction logic is checked on machines without a GPU (CI). Its speed and its
floating-point are numpy's, not the GPU's: only the results are compared."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

requires_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed (the test extra has it)"
)

# numpy >= 2.4 refuses int() of a 1-element 1-D array, which the interpreter does for loop bounds.
_PREAMBLE = """
import triton.runtime.interpreter as _interp
_patch = _interp._patch_lang_tensor
def _patch_lang_tensor(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
_interp._patch_lang_tensor = _patch_lang_tensor
"""


def run_in_interpreter(code: str, timeout: float = 600) -> None:
    """Run `code` (which asserts what it checks) in a fresh interpreter-mode Python process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", _PREAMBLE + code], check=True, cwd=ROOT, env=env, timeout=timeout)
