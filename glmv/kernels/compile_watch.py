"""Counts the GPU kernels this process builds (Triton), so that a server can prove that none is
built while it serves.

Triton builds a kernel the first time it meets a new specialisation of it (dtypes, constexpr
values, integer arguments equal to 1 or divisible by 16, pointer alignment): it compiles it, or
loads it from its disk cache, and keeps it in memory. Either way the first request that meets it
waits (compiling takes seconds), so every build after start-up is a kernel the start-up did not
warm. `install()` hooks Triton's `knobs.runtime.jit_cache_hook` (called before a build) and
`jit_post_compile_hook` (after it), keeping hooks set earlier; `snapshot()` reads the count.

Without Triton (the CPU build of torch) nothing is counted and `available()` is False.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("glmv.kernels")


@dataclass(frozen=True, slots=True)
class BuildCount:
    """Kernels built in this process since `install()`, and the seconds they took."""

    builds: int
    seconds: float


class _Watch:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.installed = False
        self.builds = 0
        self.seconds = 0.0
        self.started: dict[Any, float] = {}  # build key -> when its build began

    def before(self, key: Any) -> None:
        with self.lock:
            self.started[_hashable(key)] = time.perf_counter()

    def after(self, key: Any, name: str) -> None:
        now = time.perf_counter()
        with self.lock:
            began = self.started.pop(_hashable(key), now)
            self.builds += 1
            self.seconds += now - began
            count = self.builds
        log.info("GPU kernel built: %s (%.2f s; %d in this process)", name, now - began, count)


_WATCH = _Watch()


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError:
        return repr(key)
    return key


def _kernel_name(fn: Any) -> str:
    """`module.qualname` of the kernel Triton passes as `fn` (a `JitFunctionInfo`)."""
    module = getattr(fn, "module", "") or ""
    name = getattr(fn, "name", "") or repr(fn)
    return f"{module}.{name}" if module else str(name)


def _chain(previous: Callable[..., Any] | None, ours: Callable[..., None]) -> Callable[..., Any]:
    """A hook that runs ours, then the one set before (whose answer Triton reads: a true value
    from the cache hook skips the build)."""

    def hook(**kwargs: Any) -> Any:
        ours(**kwargs)
        return previous(**kwargs) if previous is not None else None

    hook.glmv_compile_watch = True  # type: ignore[attr-defined]
    return hook


def install(runtime: Any = None) -> bool:
    """Hook Triton's build events (once per process); False when Triton is not installed.

    `runtime` is `triton.knobs.runtime` (the tests pass a stand-in)."""
    if runtime is None:
        try:
            from triton import knobs  # type: ignore[import-not-found, unused-ignore]
        except Exception:  # no Triton (CPU torch) or one without knobs (< 3.3)
            return False
        runtime = knobs.runtime
    with _WATCH.lock:
        if _WATCH.installed:
            return True
        _WATCH.installed = True

    def before(**kwargs: Any) -> None:
        _WATCH.before(kwargs.get("key"))

    def after(**kwargs: Any) -> None:
        _WATCH.after(kwargs.get("key"), _kernel_name(kwargs.get("fn")))

    for attr, ours in (("jit_cache_hook", before), ("jit_post_compile_hook", after)):
        current = getattr(runtime, attr, None)
        if not getattr(current, "glmv_compile_watch", False):
            setattr(runtime, attr, _chain(current, ours))
    return True


def available() -> bool:
    """Whether builds are being counted in this process."""
    return _WATCH.installed


def snapshot() -> BuildCount:
    with _WATCH.lock:
        return BuildCount(_WATCH.builds, _WATCH.seconds)
