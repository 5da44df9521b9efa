"""Triton launches without a GPU: `JITFunction.run` replaced by a recorder that binds the arguments
the way Triton's launcher does and keeps the key that selects a compiled variant.

Two tests use it: `test_compile_targets` compiles each distinct variant for the GPUs glmv's users
run; `test_kernel_variants` counts the variants a model's launches select.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch, bound for one target: what Triton keys its compiled kernels on."""

    fn: Any
    arch: int
    signature: Any
    constexprs: Any
    attrs: Any
    options: Any

    @property
    def kernel(self) -> str:
        return str(self.fn.__name__)

    @property
    def key(self) -> tuple[str, int, str, str, str, str]:
        return (self.kernel, self.arch, str(self.signature), str(self.constexprs), str(self.attrs), str(self.options))

    def named_constexprs(self) -> dict[str, Any]:
        return {self.fn.arg_names[path[0]]: value for path, value in self.constexprs.items() if len(path) == 1}

    def compile(self) -> Any:
        """The compiled kernel of this variant for its target (`.metadata`, `.asm["ptx"]`)."""
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.compiler import compile as triton_compile

        source = ASTSource(self.fn, self.signature, self.constexprs, self.attrs)
        return triton_compile(source, target=GPUTarget("cuda", self.arch, 32), options=self.options.__dict__)


def bind(fn: Any, arch: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Launch:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return Launch(fn, arch, signature, constexprs, attrs, options)


@contextlib.contextmanager
def recording(archs: tuple[int, ...], on_launch: Callable[[Launch], None]) -> Iterator[None]:
    """Within the block, every Triton launch is bound for each of `archs` and handed to `on_launch`
    instead of running."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        for arch in archs:
            on_launch(bind(self, arch, args, kwargs))

    JITFunction.run = run  # type: ignore[method-assign]
    try:
        yield
    finally:
        JITFunction.run = original  # type: ignore[method-assign]
