"""A model's launches select a bounded set of compiled Triton variants, all of them seen at start-up.

Triton compiles one variant per distinct key: the constexpr arguments, the dtypes, and for each
integer argument whether it equals 1 or is divisible by 16. A kernel whose key follows the batch
(the decode count of a mixed prefill+decode step, the block table's width) compiles again while
the server runs, for seconds on the request's path. These tests replay the launches over the range
of batches a server meets and count the keys, without a GPU (`tests/kernels/launches.py`).
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict

import pytest
import torch

from tests.kernels.launches import Launch, recording

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed (the test extra has it)"
)

SM_COUNTS = (128, 132)  # RTX 4090, H200
ARCH = 90


class VariantCounter:
    def __init__(self) -> None:
        self.keys: dict[str, set[tuple[str, ...]]] = defaultdict(set)

    def __call__(self, launch: Launch) -> None:
        self.keys[launch.kernel].add(launch.key)

    def counts(self) -> dict[str, int]:
        return {kernel: len(keys) for kernel, keys in self.keys.items()}


def test_decode_attention_builds_one_variant_for_every_batch_and_table_width() -> None:
    from glmv.kernels.triton_decode import MAX_SPLITS, num_splits_for, paged_decode_attention

    heads, kv_heads, dim, block_size = 32, 2, 128, 16
    k_cache = torch.empty(64, block_size, kv_heads, dim, dtype=torch.bfloat16)
    counter = VariantCounter()
    splits_seen: set[int] = set()
    with recording((ARCH,), counter):
        for batch in range(1, 161):
            q = torch.empty(batch, heads, dim, dtype=torch.bfloat16)
            lens = torch.empty(batch, dtype=torch.int32)
            for width in (1, 7, 16, 33, 64, 100, 512):
                tables = torch.empty(batch, width, dtype=torch.int32)
                for sms in SM_COUNTS:
                    splits = num_splits_for(batch, kv_heads, sms)
                    splits_seen.add(splits)
                    paged_decode_attention(q, k_cache, k_cache, tables, lens, dim**-0.5, num_splits=splits)
    # The replay crossed every regime: one split per sequence up to the most the kernel takes.
    assert min(splits_seen) == 1 and max(splits_seen) == MAX_SPLITS and len(splits_seen) > 10
    assert counter.counts() == {"_decode_partial_kernel": 1, "_decode_merge_kernel": 1}


def test_decode_attention_keeps_its_partial_outputs_vectorised() -> None:
    """The integers left unspecialised must not cost the 128-bit accesses to the partial outputs:
    the partial kernel stores them and the merge loads them with `v4` instructions (their row
    strides stay specialised: multiples of the head size at every batch)."""
    import re

    from glmv.kernels.triton_decode import paged_decode_attention

    ptx: dict[str, str] = {}

    def compile_ptx(launch: Launch) -> None:
        ptx[launch.kernel] = launch.compile().asm["ptx"]

    heads, kv_heads, dim, block_size, batch = 32, 2, 128, 16, 7
    cache = torch.empty(64, block_size, kv_heads, dim, dtype=torch.bfloat16)
    with recording((ARCH,), compile_ptx):
        paged_decode_attention(
            torch.empty(batch, heads, dim, dtype=torch.bfloat16), cache, cache,
            torch.empty(batch, 33, dtype=torch.int32), torch.empty(batch, dtype=torch.int32), 0.1, num_splits=5,
        )  # fmt: skip
    assert len(re.findall(r"st\.global\.v4", ptx["_decode_partial_kernel"])) >= 4
    assert len(re.findall(r"ld\.global\.v4", ptx["_decode_merge_kernel"])) >= 2


def test_decode_attention_refuses_a_split_count_beyond_its_merge() -> None:
    from glmv.kernels.triton_decode import MAX_SPLITS, paged_decode_attention

    q = torch.empty(1, 4, 16)
    cache = torch.empty(2, 16, 2, 16)
    tables = torch.empty(1, 2, dtype=torch.int32)
    lens = torch.empty(1, dtype=torch.int32)
    for bad in (0, MAX_SPLITS + 1):
        with pytest.raises(ValueError, match=f"num_splits must be in 1..{MAX_SPLITS}"):
            paged_decode_attention(q, cache, cache, tables, lens, 0.25, num_splits=bad)


def test_fused_kernels_build_one_variant_per_model_shape_for_every_token_count() -> None:
    from glmv.kernels import triton_fused as F

    hidden, inner, heads, head_dim, rot = 4096, 13696, 34, 128, 64
    weight = torch.empty(hidden, dtype=torch.bfloat16)
    counter = VariantCounter()
    with recording((ARCH,), counter):
        for tokens in (*range(1, 70), 96, 128, 255, 256, 1000, 1024, 4097, 8192):
            x = torch.empty(tokens, hidden, dtype=torch.bfloat16)
            F.rms_norm(x, weight, 1e-5, None)
            F.rms_norm(x, weight, 1e-5, torch.empty(tokens, hidden, dtype=torch.bfloat16))
            F.silu_mul(torch.empty(tokens, 2 * inner, dtype=torch.bfloat16))
            angles = torch.empty(tokens, rot, dtype=torch.bfloat16)
            F.mrope_(torch.empty(tokens, heads, head_dim, dtype=torch.bfloat16), angles, angles)
    # RMSNorm: with and without the residual add; the others: one each.
    assert counter.counts() == {"_rms_norm_kernel": 2, "_silu_mul_kernel": 1, "_mrope_kernel": 1}


def test_quantized_matmuls_need_no_variant_that_start_up_did_not_build() -> None:
    """Start-up runs the decoder at every CUDA-graph bucket and at the profile's largest step; any
    other row count (a mixed step of 65-95 rows, say) must select one of those variants."""
    from glmv.engine.cuda_graphs import bucket_sizes
    from glmv.kernels import fp8_triton as F8
    from glmv.kernels import int4_triton as T

    decoder = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)]
    sms = 132

    def int4(m: int, n: int, k: int) -> None:
        qw = torch.empty(n, k // 8, dtype=torch.int32).t()
        z = torch.empty(k // 128, n, dtype=torch.uint8)
        s = torch.empty(k // 128, n, dtype=torch.float16)
        cfg = T.choose_config(m, n, k, sms)
        if cfg.kind == "dequant":
            T.dequantize_triton(qw, z, s, 128, torch.bfloat16)
        else:
            T.int4_matmul_triton(torch.empty(m, k, dtype=torch.bfloat16), qw, z, s, 128, None, cfg)

    def fp8(m: int, n: int, k: int) -> None:
        w = torch.empty(n, k, dtype=torch.float8_e4m3fn)
        F8.fp8_weight_matmul(torch.empty(m, k, dtype=torch.bfloat16), w, torch.empty(n, dtype=torch.float32), None)

    at_start_up = set(bucket_sizes(128)) | {8192}  # max_num_seqs 128, max_num_batched_tokens 8192
    for launch in (int4, fp8):
        built, served = VariantCounter(), VariantCounter()
        with recording((ARCH,), built):
            for n, k in decoder:
                for m in sorted(at_start_up):
                    launch(m, n, k)
        with recording((ARCH,), served):
            for n, k in decoder:
                for m in (*range(1, 200), 255, 1000, 4097):
                    launch(m, n, k)
        for kernel, keys in served.keys.items():
            assert keys <= built.keys[kernel], (launch.__name__, kernel, len(keys - built.keys[kernel]))
