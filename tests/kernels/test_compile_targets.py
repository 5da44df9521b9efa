"""Every Triton launch of the CUDA path compiles for the GPUs glmv's users run and fits their shared
memory: sm_89 (RTX 4090, L40S) and sm_90 (H100, H200). sm_80 (A100) and sm_86 (RTX 3090, A10)
take the same code path as sm_89 in Triton, with at least its shared memory per block.

The interpreter tests check what the kernels compute; this checks that the compiler takes them
(its typing rules, which the interpreter does not apply) and that no launch asks for more shared
memory than a block may have on the target (a launch-time failure on a 24 GB card otherwise). The
production wrappers run on CPU tensors with the launch replaced by a compile for each target, so
the launches checked are exactly the ones they make: the FP8 weight product and activation
rounding, the int4 defaults of `choose_config` for the
decoder and lm_head shapes at every row-count regime (and the `prefetch` / `gemv_pairs` options),
paged decode attention at the split counts the engine uses, the fused RMSNorm, SwiGLU and M-RoPE
at the model sizes. No GPU is needed: ptxas ships with Triton.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import pytest
import torch

from tests.kernels.launches import Launch, recording

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed (the test extra has it)"
)

# Largest shared memory one block may use (opt-in), bytes, and the SM counts of an RTX 4090 and an
# H200 (the launch defaults depend on it).
SHARED_LIMIT = {89: 101376, 90: 232448}
SM_COUNT = {89: 128, 90: 132}
# (N, K) of GLM-4.6V-Flash's decoder linears and lm_head, and GLM-4v-9b's (same LM sizes).
SHAPES = {"qkv": (4608, 4096), "o": (4096, 4096), "gate_up": (27392, 4096), "down": (4096, 13696)}
LM_HEAD = (151552, 4096)


@dataclasses.dataclass
class Compiled:
    kernel: str
    arch: int
    shared: int
    constexprs: dict[Any, Any]


class TargetCompiler:
    """Compiles each distinct launch variant once per target."""

    def __init__(self) -> None:
        self.seen: set[tuple[Any, ...]] = set()
        self.results: list[Compiled] = []

    def __call__(self, launch: Launch) -> None:
        if launch.key in self.seen:
            return
        self.seen.add(launch.key)
        kernel = launch.compile()
        self.results.append(Compiled(launch.kernel, launch.arch, kernel.metadata.shared, launch.named_constexprs()))


@pytest.fixture(scope="module")
def compiled() -> list[Compiled]:
    compiler = TargetCompiler()
    with recording(tuple(SHARED_LIMIT), compiler):
        _int4_launches()
        _attention_launches()
        _fused_launches()
        _fp8_launches()
    return compiler.results


def _packed(n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised int4 tensors of the right shapes and strides (nothing reads them)."""
    qweight = torch.empty(n, k // 8, dtype=torch.int32).t()  # K-major, as Int4Linear holds it
    groups = k // group
    return qweight, torch.empty(groups, n, dtype=torch.uint8), torch.empty(groups, n, dtype=torch.float16)


def _int4_launches() -> None:
    from glmv.kernels import int4_triton as T

    for sms in SM_COUNT.values():
        for n, k in [*SHAPES.values(), LM_HEAD]:
            qw, z, s = _packed(n, k, 128)
            for m in (1, 16, 17, 64, 127):
                cfg = T.choose_config(m, n, k, sms)
                x = torch.empty(m, k, dtype=torch.bfloat16)
                T.int4_matmul_triton(x, qw, z, s, 128, None, cfg)
                if m in (1, 64):
                    T.int4_matmul_triton(x, qw, z, s, 128, None, dataclasses.replace(cfg, prefetch=True))
                if m == 1:
                    pairs = dataclasses.replace(cfg, kind="gemv_pairs")
                    T.int4_matmul_triton(x, qw, z, s, 128, None, pairs)
                    T.int4_matmul_triton(x, qw, z, s, 128, None, dataclasses.replace(pairs, prefetch=True))
            assert T.choose_config(128, n, k, sms).kind == "dequant"
            T.dequantize_triton(qw, z, s, 128, torch.bfloat16)
    # fp16 activations with a bias, small groups (AWQ/GPTQ group 64) and whole-row groups (GPTQ -1).
    for group in (64, 4096):
        qw, z, s = _packed(4608, 4096, group)
        for m in (1, 17):
            x = torch.empty(m, 4096, dtype=torch.float16)
            bias = torch.empty(4608, dtype=torch.float16)
            T.int4_matmul_triton(x, qw, z, s, group, bias, T.choose_config(m, 4608, 4096, 128))
        T.dequantize_triton(qw, z, s, group, torch.float16)


def _attention_launches() -> None:
    from glmv.kernels.triton_decode import num_splits_for, paged_decode_attention

    heads, kv_heads, dim, block_size = 32, 2, 128, 16
    for dtype in (torch.bfloat16, torch.float32):
        k_cache = torch.empty(64, block_size, kv_heads, dim, dtype=dtype)
        for batch in (1, 64):
            q = torch.empty(batch, heads, dim, dtype=dtype)
            tables = torch.empty(batch, 8, dtype=torch.int32)
            lens = torch.empty(batch, dtype=torch.int32)
            for splits in {num_splits_for(batch, kv_heads, sms) for sms in SM_COUNT.values()}:
                paged_decode_attention(q, k_cache, k_cache, tables, lens, dim**-0.5, num_splits=splits)


def _fused_launches() -> None:
    from glmv.kernels import triton_fused as F

    for dtype in (torch.bfloat16, torch.float16):
        for hidden in (4096, 1536, 1792):  # LM, GLM-4.1V vision, GLM-4v-9b vision
            x = torch.empty(3, hidden, dtype=dtype)
            w = torch.empty(hidden, dtype=dtype)
            F.rms_norm(x, w, 1e-5, None)
            F.rms_norm(x, w, 1e-5, torch.empty(3, hidden, dtype=dtype))
        F.silu_mul(torch.empty(3, 2 * 13696, dtype=dtype))
        angles = torch.empty(5, 64, dtype=dtype)
        F.mrope_(torch.empty(5, 34, 128, dtype=dtype), angles, angles)


def _fp8_launches() -> None:
    from glmv.kernels import fp8_triton as F8

    for n, k in [*SHAPES.values(), LM_HEAD]:
        w = torch.empty(n, k, dtype=torch.float8_e4m3fn)
        scale = torch.empty(n, dtype=torch.float32)
        for m in (1, 17, 64):
            for dtype in (torch.bfloat16, torch.float16):
                F8.fp8_weight_matmul(torch.empty(m, k, dtype=dtype), w, scale, None)
        F8.fp8_weight_matmul(torch.empty(1, k, dtype=torch.bfloat16), w, scale, torch.empty(n, dtype=torch.bfloat16))
    for k in (4096, 13696):
        F8.quantize_rows_fp8(torch.empty(2048, k, dtype=torch.bfloat16))


def test_every_launch_compiles_for_each_target(compiled: list[Compiled]) -> None:
    kernels = {c.kernel for c in compiled}
    assert kernels == {
        "_int4_gemv_kernel",
        "_int4_gemm_kernel",
        "_dequant_kernel",
        "_decode_partial_kernel",
        "_decode_merge_kernel",
        "_rms_norm_kernel",
        "_silu_mul_kernel",
        "_mrope_kernel",
        "_weight_matmul_kernel",
        "_quantize_rows_kernel",
    }
    for kernel in kernels:
        assert {c.arch for c in compiled if c.kernel == kernel} == set(SHARED_LIMIT), kernel
    # The launch variants really were compiled: GEMV with and without prefetch, on glmv's and on
    # pair-permuted words; the GEMM with 16-, 32- and 64-row tiles.
    gemv = {
        (c.constexprs["PAIRS"], c.constexprs["PREFETCH"]) for c in compiled if c.kernel == "_int4_gemv_kernel"
    }
    assert gemv == {(False, False), (False, True), (True, False), (True, True)}
    gemm_rows = {c.constexprs["BLOCK_M"] for c in compiled if c.kernel == "_int4_gemm_kernel"}
    assert gemm_rows == {16, 32, 64}


def test_every_launch_fits_the_shared_memory_of_its_target(compiled: list[Compiled]) -> None:
    over = [c for c in compiled if c.shared > SHARED_LIMIT[c.arch]]
    assert not over, [(c.kernel, c.arch, c.shared, c.constexprs) for c in over]
    # The GEMM stages its tiles in shared memory: it is the kernel closest to a 24 GB card's limit.
    gemm = max(c.shared for c in compiled if c.kernel == "_int4_gemm_kernel" and c.arch == 89)
    assert 0 < gemm <= SHARED_LIMIT[89]
