"""The start-up report and the count of GPU kernels built: Triton's hooks are chained, counted and
timed (with a stand-in for `triton.knobs.runtime`: no GPU here), and both engine modes report their
start-up phases and 0 kernels built after it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from glmv.engine.client import start_engine
from glmv.engine.config import EngineConfig
from glmv.engine.startup import StartupReport
from glmv.kernels import compile_watch


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh counter for the test (the process-wide one stays as it was)."""
    monkeypatch.setattr(compile_watch, "_WATCH", compile_watch._Watch())
    yield


def build(runtime: Any, key: str, name: str) -> Any:
    """What Triton does for a kernel it has not built yet: the cache hook, the build, the post hook."""
    fn = SimpleNamespace(module="glmv.kernels.triton_fused", name=name)
    skipped = runtime.jit_cache_hook(
        key=key, repr=name, fn=fn, compile={}, is_manual_warmup=False, already_compiled=False
    )
    runtime.jit_post_compile_hook(
        key=key, repr=name, fn=fn, compile={}, is_manual_warmup=False, already_compiled=False
    )
    return skipped


def test_builds_are_counted_and_earlier_hooks_still_run(watch: None) -> None:
    seen: list[str] = []
    runtime = SimpleNamespace(
        jit_cache_hook=lambda **kw: seen.append("cache:" + kw["key"]) or False,
        jit_post_compile_hook=lambda **kw: seen.append("post:" + kw["key"]),
    )
    assert not compile_watch.available()
    assert compile_watch.install(runtime) is True
    assert compile_watch.install(runtime) is True  # once: the hooks are not wrapped twice
    assert compile_watch.available()
    assert compile_watch.snapshot().builds == 0

    assert build(runtime, "k1", "_rms_norm_kernel") is False  # the earlier hook's answer is kept
    build(runtime, "k2", "_silu_mul_kernel")
    count = compile_watch.snapshot()
    assert count.builds == 2
    assert count.seconds >= 0.0
    assert seen == ["cache:k1", "post:k1", "cache:k2", "post:k2"]


def test_hooks_installed_on_an_empty_runtime(watch: None) -> None:
    runtime = SimpleNamespace(jit_cache_hook=None, jit_post_compile_hook=None)
    compile_watch.install(runtime)
    assert build(runtime, "k", "_mrope_kernel") is None  # nothing asks Triton to skip the build
    assert compile_watch.snapshot().builds == 1


def test_the_report_names_its_phases() -> None:
    report = StartupReport()
    with report.phase("weights"):
        pass
    report.seconds = 3.25
    assert report.describe() == "engine core started in 3.2 s (weights 0.0 s)"
    report.kernel_builds, report.kernel_build_seconds = 4, 1.5
    assert report.describe().endswith("; 4 GPU kernels built (1.5 s)")


@pytest.mark.parametrize("mode", ["inprocess", "process"])
def test_both_modes_report_their_start_up(tiny41_dir: Path, mode: str) -> None:
    client = start_engine(EngineConfig(model=str(tiny41_dir), engine_mode=mode, kv_cache_gb=0.05))
    try:
        info = client.info
        assert info.startup is not None
        assert info.startup.startswith("engine core started in ")
        assert "weights " in info.startup
        assert "GPU kernels" not in info.startup  # the CPU builds none, and says nothing of them
        assert info.startup_seconds > 0.0
        assert client.stats().kernel_builds == 0
    finally:
        client.shutdown()
