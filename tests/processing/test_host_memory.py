"""On the CPU the engine and the image workers keep freed host memory for the next step (glibc's
malloc thresholds)."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from glmv.processing import host_memory


def _has_mallinfo2() -> bool:
    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 - glibc >= 2.33
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc (mallinfo2)")
def test_a_large_block_comes_from_the_heap_once_freed_memory_is_retained() -> None:
    """A 256 MiB block is mapped afresh by default (above glibc's largest dynamic threshold); once
    the thresholds are raised it comes from the heap, and its pages stay for the next one."""
    script = textwrap.dedent(
        """
        import ctypes
        from glmv.processing import host_memory

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        size = 256 << 20

        def mapped_while_held():
            block = libc.malloc(size)
            ctypes.memset(block, 1, size)
            mapped = libc.mallinfo2().hblkhd
            libc.free(block)
            return mapped >= size

        before = mapped_while_held()
        assert host_memory.retain_freed_memory() is True
        assert host_memory.retain_freed_memory() is True  # once per process; asking again is fine
        after = mapped_while_held()
        kept = libc.mallinfo2().arena >= size  # freed, and still in the heap
        print(before, after, kept)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "True"]


def test_the_engine_core_on_the_cpu_retains_freed_memory(
    tiny41_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from glmv.engine.config import EngineConfig
    from glmv.engine.core import EngineCore

    calls: list[bool] = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append(True) or True)
    EngineCore(EngineConfig(model=str(tiny41_dir), device="cpu", dtype="float32"))
    assert calls == [True]
