"""INT4 weights on the GPU: kernel checks, per-shape timings, a full-size LM and the engine vs bf16.

    PYTHONPATH=. python3 benchmarks/device_int4.py [--sweep] [--skip-lm | --lm-only] [--engine]
    PYTHONPATH=. python3 benchmarks/device_int4.py --engine-only | --decode-variants

1. The Triton int4 kernels (GEMV for one row, tensor-core GEMM above, dequantize + cuBLAS from
   128 rows) against the reference dequantization `(q - z) * s` on random inputs: relative L2
   error for the decoder-layer shapes of GLM-4.6V-Flash, many row counts, group sizes
   128/64/8/whole row, bf16 and fp16, each launch run twice (bit-identical).
2. Per-shape timings (median of CUDA-graph replays) of int4 vs bf16 `F.linear` at 1, 4, 16, 64 and
   2048 rows (and the lm_head shape), with the bandwidth reached. `--sweep` also tries launch
   configurations around the defaults and prints the best per shape.
3. A full-size GLM-4.6V-Flash-shaped model with random weights in bf16, and the same model with
   its LM linear layers RTN-quantized in memory (group 128): weight bytes (LM int4; + vision;
   + lm_head), logits agreement, and one whole 40-layer LM forward (decode step over a 512-token
   context, CUDA graph) at batch 1 and 64, plus a 2048-token prefill, int4 vs bf16.
4. `--engine` / `--engine-only`: weightless full-size checkpoints (bf16; int4 LM + vision; int4
   with lm_head too) served by glmv's engine, one process each: batch-1 decode ms/token, decode
   graph replays, 64 concurrent image requests, and the start-up report under `--gpu-memory-gb 24`.
5. `--decode-variants`: the whole batch-1 LM step (weights cold in L2, as in serving) under
   several GEMV launch rules (with and without the prefetch mode, on glmv's and on pair-permuted
   words), and the batch-64 step with and without the GEMM's prefetch, against bf16 (the
   per-shape sweep keeps small weights in L2).
Prints a table last. Sections 1-3 take about a minute and a half on an H200, section 4 about four.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import copy_bandwidth, decode_replay_ms

from glmv.kernels import int4_triton as K
from glmv.kernels.metadata import AttentionMetadata
from glmv.models.config import ModelConfig, TextConfig, VisionConfig
from glmv.models.loader import build_model, build_quantized_model, random_init
from glmv.models.quant.int4 import dequantize_packed, quantize_rtn, to_packed
from glmv.models.quant.linear import Int4Linear, quantizable_linears
from glmv.models.quant.report import weight_memory

ROWS: list[tuple[str, str, str]] = []
# (N, K) of one decoder layer of GLM-4.6V-Flash: qkv, o, gate_up, down.
LAYER_SHAPES = {
    "qkv_proj": (4608, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (27392, 4096),
    "down_proj": (4096, 13696),
}
LM_HEAD_SHAPE = (151552, 4096)


def row(name: str, value: str, target: str = "") -> None:
    ROWS.append((name, value, target))
    print(f"  {name}: {value} {target}", flush=True)


def random_packed(
    n: int, k: int, group: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    w = torch.randn(n, k, device=dev) / k**0.5
    p = to_packed(quantize_rtn(w, group))
    return p.qweight, p.zeros, p.scales, p.group_size


def graph_time_ms(fn, iters: int = 50) -> float:
    """Median time of one `fn()` call, replayed from a CUDA graph of `iters` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    times = []
    for _ in range(7):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def check_kernels(dev: torch.device) -> None:
    torch.manual_seed(0)
    worst = 0.0
    cases = []
    for (n, k), m in itertools.product(LAYER_SHAPES.values(), (1, 2, 3, 16, 64, 600)):
        cases.append((m, n, k, 128, torch.bfloat16))
    for g in (64, -1):
        for m in (1, 17):
            cases.append((m, 4608, 4096, g, torch.bfloat16))
    for m in (1, 64):
        cases.append((m, 4096, 4096, 128, torch.float16))
        cases.append((m, 1000, 328, 8, torch.float16))  # ragged N, K not a multiple of 128

    def variants(m: int) -> list[K.LaunchConfig | None]:
        if m == 1:
            return [
                None,
                K.LaunchConfig("gemv", 1, 32, 8, 4, 2, 1, True),
                K.LaunchConfig("gemv", 1, 128, 4, 8, 3, 2),
                K.LaunchConfig("gemv", 1, 128, 4, 2, 2, 1, True, prefetch=True),
                K.LaunchConfig("gemv", 1, 64, 3, 2, 2, 2, True, prefetch=True),
            ]
        if m == 17:
            return [
                None,
                K.LaunchConfig("gemm", 16, 128, 8, 4, 3, 1, True),
                K.LaunchConfig("gemm", 32, 64, 1, 4, 4),
                K.LaunchConfig("gemm", 16, 128, 8, 4, 3, 1, True, prefetch=True),
            ]
        return [None]

    for m, n, k, g, dt in cases:
        qw, z, s, gs = random_packed(n, k, g, dev)
        qw = K.k_major(qw)
        x = torch.randn(m, k, device=dev, dtype=dt)
        bias = torch.randn(n, device=dev, dtype=dt) * 0.1
        ref = x.float() @ dequantize_packed(qw, z, s, gs, torch.float32) + bias.float()
        for cfg in variants(m):
            first = None
            for _ in range(2):
                out = torch.full((m, n), float("nan"), device=dev, dtype=dt)
                out.copy_(K.int4_matmul_triton(x, qw, z, s, gs, bias, cfg))
                if first is None:
                    first = out
                elif not torch.equal(first, out):
                    print(f"    NONDETERMINISTIC m={m} n={n} k={k} g={g} {dt} {cfg}")
                    worst = max(worst, 1.0)
            assert torch.isfinite(out).all(), (m, n, k, g, cfg)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            if err > 1e-2:
                print(f"    FAIL m={m} n={n} k={k} g={g} {dt} {cfg}: {err:.2e}")
            worst = max(worst, err)
    row(
        "int4 Triton kernels vs reference dequant (worst rel. L2; bf16/fp16 out; repeat-identical)",
        f"{worst:.2e}",
        "(< 1e-2)",
    )
    assert worst < 1e-2


def time_shapes(dev: torch.device, sweep: bool) -> None:
    torch.manual_seed(1)
    bw = copy_bandwidth()
    row("device-to-device copy bandwidth (read + write)", f"{bw:.0f} GB/s")
    shapes = {**LAYER_SHAPES, "lm_head": LM_HEAD_SHAPE}
    for name, (n, k) in shapes.items():
        qw, z, s, gs = random_packed(n, k, 128, dev)
        qw = K.k_major(qw)
        w16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
        for m in (1, 4, 16, 64, 2048) if name != "lm_head" else (1, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t4 = graph_time_ms(lambda x=x, qw=qw, z=z, s=s, gs=gs: K.int4_matmul_triton(x, qw, z, s, gs))
            t16 = graph_time_ms(lambda x=x, w16=w16: F.linear(x, w16))
            b4 = qw.numel() * 4 + z.numel() + s.numel() * 2
            row(
                f"{name} {n}x{k}, {m} rows: int4 / bf16",
                f"{t4 * 1e3:.1f} / {t16 * 1e3:.1f} us = {t4 / t16:.2f}x",
                f"(int4 {b4 / t4 / 1e6:.0f} GB/s, bf16 {n * k * 2 / t16 / 1e6:.0f} GB/s; "
                f"{K.choose_config(m, n, k, K._sm_count(dev))})",
            )
            if sweep and m in (1, 64):
                sweep_shape(x, qw, z, s, gs, name)
            if sweep and m == 1:
                sweep_pairs(x, qw, z, s, gs, name)


def _sweep_configs(m: int, n: int, k: int, sms: int) -> list[K.LaunchConfig]:
    """Launches around the defaults of `choose_config`."""
    chunks = triton_cdiv(k, 128)
    out: list[K.LaunchConfig] = []
    if m == 1:
        for bn, warps, ahead, waves, pf in itertools.product(
            (32, 64, 128), (1, 2), (1, 2), (4, 8), (False, True)
        ):
            sp = K._split_for(triton_cdiv(n, bn), chunks, sms, waves=waves)
            out.append(K.LaunchConfig("gemv", 1, bn, sp, warps, 2, ahead, sp > 1, prefetch=pf))
    else:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        for bn, stages, warps, pf in itertools.product((64, 128, 256), (3,), (4, 8), (False, True)):
            sp = K._split_for(triton_cdiv(m, bm) * triton_cdiv(n, bn), chunks, sms, waves=1 if bn > 64 else 2)
            for split in sorted({sp, max(1, sp // 2), min(chunks, sp * 2)}):
                out.append(K.LaunchConfig("gemm", bm, bn, split, warps, stages, 1, split > 1, prefetch=pf))
    return out


def _time_configs(
    x: torch.Tensor,
    qw: torch.Tensor,
    z: torch.Tensor,
    s: torch.Tensor,
    gs: int,
    configs: list[K.LaunchConfig],
) -> list[tuple[float, K.LaunchConfig]]:
    """Median CUDA-graph time (ms) of each launch that compiles, fastest first."""
    results = []
    for cfg in configs:
        try:
            t = graph_time_ms(lambda cfg=cfg: K.int4_matmul_triton(x, qw, z, s, gs, None, cfg), iters=10)
        except Exception as exc:  # a config that does not compile is skipped
            print(f"    config {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        results.append((t, cfg))
    return sorted(results, key=lambda r: r[0])


def sweep_shape(
    x: torch.Tensor, qw: torch.Tensor, z: torch.Tensor, s: torch.Tensor, gs: int, name: str
) -> None:
    m, k = x.shape
    n = qw.shape[1]
    results = _time_configs(x, qw, z, s, gs, _sweep_configs(m, n, k, K._sm_count(x.device)))
    b4 = qw.numel() * 4 + z.numel() + s.numel() * 2
    print(f"    sweep {name} m={m}: best of {len(results)}", flush=True)
    for t, cfg in results[:4]:
        print(f"      {t * 1e3:.1f} us ({b4 / t / 1e6:.0f} GB/s)  {cfg}")
    by_kind: dict[str, tuple[float, K.LaunchConfig]] = {}
    for t, cfg in results:
        key = f"{cfg.kind}-bn{cfg.block_n}-w{cfg.num_warps}{'-fused' if cfg.fused_reduce else ''}"
        key += "-prefetch" if cfg.prefetch else ""
        by_kind.setdefault(key, (t, cfg))
    print("      best per kind: " + ", ".join(f"{key} {t * 1e3:.1f}" for key, (t, _) in by_kind.items()))


def sweep_pairs(
    x: torch.Tensor, qw: torch.Tensor, z: torch.Tensor, s: torch.Tensor, gs: int, name: str
) -> None:
    """The "gemv_pairs" launch (activations loaded straight into the weight tile's layout) on
    pair-permuted words: checked against the reference, then timed, for one row."""
    n, k = qw.shape[1], x.shape[1]
    pw = K.permute_for_pairs(qw)
    ref = x.float() @ dequantize_packed(qw, z, s, gs, torch.float32)
    err = 0.0
    for pf in (False, True):
        cfg = K.LaunchConfig("gemv_pairs", 1, 128, 4, 2, 2, 1, True, prefetch=pf)
        got = K.int4_matmul_triton(x, pw, z, s, gs, None, cfg)
        err = max(err, ((got.float() - ref).norm() / ref.norm()).item())
    row(f"{name} 1 row, gemv_pairs vs reference (rel. L2)", f"{err:.2e}", "(< 1e-2)")
    chunks = triton_cdiv(k, 128)
    configs = []
    for bn, warps, ahead, waves, pf in itertools.product((64, 128), (2, 4), (1, 2), (4, 8), (False, True)):
        sp = K._split_for(triton_cdiv(n, bn), chunks, K._sm_count(x.device), waves=waves)
        configs.append(K.LaunchConfig("gemv_pairs", 1, bn, sp, warps, 2, ahead, sp > 1, prefetch=pf))
    results = _time_configs(x, pw, z, s, gs, configs)
    b4 = pw.numel() * 4 + z.numel() + s.numel() * 2
    for t, cfg in results[:3]:
        print(f"      pairs {name}: {t * 1e3:.1f} us ({b4 / t / 1e6:.0f} GB/s)  {cfg}")
    if results:
        t, cfg = results[0]
        row(f"{name} 1 row, gemv_pairs best", f"{t * 1e3:.1f} us ({b4 / t / 1e6:.0f} GB/s)", str(cfg))


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def full_config() -> ModelConfig:
    return ModelConfig(text=TextConfig(), vision=VisionConfig(), eos_token_ids=(151329,))


@torch.no_grad()
def quantize_into(float_model: torch.nn.Module, qmodel: torch.nn.Module) -> None:
    """Copy the float model's weights into the int4 model, RTN-quantizing its Int4Linear layers."""
    fparams = dict(float_model.named_parameters())
    qmods = {n: m for n, m in qmodel.named_modules() if isinstance(m, Int4Linear)}
    for name, p in qmodel.named_parameters():
        p.copy_(fparams[name])
    for name, mod in qmods.items():
        w = fparams[f"{name}.weight"]
        packed = to_packed(quantize_rtn(w, mod.group_size))
        mod.qweight.copy_(packed.qweight)
        mod.zeros.copy_(packed.zeros)
        mod.scales.copy_(packed.scales)


def decode_inputs(model: torch.nn.Module, batch: int, ctx: int, dev: torch.device):
    t = model.config.text
    bs = 16
    per_seq = (ctx + 1 + bs - 1) // bs
    num_blocks = batch * per_seq + 1
    shape = (num_blocks, bs, t.num_key_value_heads, t.head_dim)
    caches = [
        (
            torch.randn(shape, device=dev, dtype=torch.bfloat16),
            torch.randn(shape, device=dev, dtype=torch.bfloat16),
        )
        for _ in range(t.num_hidden_layers)
    ]
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
    from glmv.kernels.triton_decode import num_splits_for

    meta = AttentionMetadata.build(
        query_lens=[1] * batch, seq_lens=[ctx + 1] * batch, block_tables=tables, block_size=bs, device=dev
    )
    meta.num_splits = num_splits_for(batch, t.num_key_value_heads, K._sm_count(dev))
    ids = torch.randint(0, 150000, (batch,), device=dev)
    pos = torch.full((3, batch), ctx, device=dev, dtype=torch.int64)
    return ids, pos, caches, meta


def prefill_inputs(model: torch.nn.Module, n: int, dev: torch.device):
    t = model.config.text
    bs = 16
    nb = (n + bs - 1) // bs
    shape = (nb, bs, t.num_key_value_heads, t.head_dim)
    caches = [
        (
            torch.zeros(shape, device=dev, dtype=torch.bfloat16),
            torch.zeros(shape, device=dev, dtype=torch.bfloat16),
        )
        for _ in range(t.num_hidden_layers)
    ]
    meta = AttentionMetadata.build(
        query_lens=[n], seq_lens=[n], block_tables=[list(range(nb))], block_size=bs, device=dev
    )
    ids = torch.randint(0, 150000, (n,), device=dev)
    pos = torch.arange(n, device=dev).expand(3, n).contiguous()
    return ids, pos, caches, meta


def lm_step_ms(model: torch.nn.Module, inputs, *, graph: bool) -> float:
    ids, pos, caches, meta = inputs

    def step() -> torch.Tensor:
        return model.compute_logits(model(ids, pos, caches, meta))

    if graph:
        try:
            return graph_time_ms(step, iters=5)
        except RuntimeError as exc:
            print(f"    CUDA graph capture failed ({exc}); timing eagerly")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def full_lm(dev: torch.device) -> None:
    cfg = full_config()
    t0 = time.perf_counter()
    ref = build_model(cfg, torch.bfloat16, dev)
    random_init(ref, seed=0, branch_scale=0.2)
    torch.cuda.synchronize()
    row("full-size bf16 model built + random init", f"{time.perf_counter() - t0:.1f} s")
    mem_bf16 = weight_memory(ref)
    row("bf16 weights", f"{mem_bf16.total_bytes / 1e9:.2f} GB")

    with torch.device("meta"):
        shapes = type(ref)(cfg)
    for label, skip in (
        ("LM int4 (vision, lm_head bf16)", ("visual", "lm_head")),
        ("LM + vision int4 (lm_head bf16)", ("lm_head", "visual.patch_embed")),
        ("LM + vision + lm_head int4", ("visual.patch_embed",)),
    ):
        names = quantizable_linears(shapes, 128, skip=skip)
        with torch.device("meta"):
            qm = build_quantized_model(cfg, torch.bfloat16, torch.device("meta"), names, 128)
        row(f"weights, {label}", f"{weight_memory(qm).total_bytes / 1e9:.2f} GB", "(target <= 7.5 GB)")

    names = quantizable_linears(shapes, 128, skip=("visual", "lm_head"))
    t0 = time.perf_counter()
    q = build_quantized_model(cfg, torch.bfloat16, dev, names, 128)
    quantize_into(ref, q)
    torch.cuda.synchronize()
    row("int4 model (LM linears, RTN g128) quantized in memory", f"{time.perf_counter() - t0:.1f} s")
    mem = weight_memory(q)
    row(
        "int4 model weights on the GPU",
        f"{mem.total_bytes / 1e9:.2f} GB (int4 part {mem.int4_bytes / 1e9:.2f} GB)",
    )

    # Logits agreement on one short random prompt (the same ids and a fresh cache for both).
    with torch.inference_mode():
        ids, pos, caches, meta = prefill_inputs(ref, 64, dev)
        a = ref.compute_logits(ref(ids, pos, caches, meta))
        for k_cache, v_cache in caches:
            k_cache.zero_()
            v_cache.zero_()
        b = q.compute_logits(q(ids, pos, caches, meta))
        cos = F.cosine_similarity(a, b, dim=-1)
        top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    row(
        "int4 vs bf16 logits, 64 random tokens: mean cosine / top-1 agreement",
        f"{cos.mean().item():.4f} / {top1:.2f}",
    )

    with torch.inference_mode():
        results = {}
        for batch in (1, 64):
            for label, model in (("bf16", ref), ("int4", q)):
                inputs = decode_inputs(model, batch, 512, dev)
                results[(label, batch)] = lm_step_ms(model, inputs, graph=True)
                del inputs
            r = results[("int4", batch)] / results[("bf16", batch)]
            target = "(target <= 0.55)" if batch == 1 else "(int4 throughput >= bf16: ratio <= 1)"
            row(
                f"LM decode step, batch {batch}, 512-token context (CUDA graph): int4 / bf16 ms",
                f"{results[('int4', batch)]:.2f} / {results[('bf16', batch)]:.2f} = {r:.2f}x",
                target,
            )
        for label, model in (("bf16", ref), ("int4", q)):
            inputs = prefill_inputs(model, 2048, dev)
            results[(label, "prefill")] = lm_step_ms(model, inputs, graph=False)
            del inputs
        r = results[("int4", "prefill")] / results[("bf16", "prefill")]
        row(
            "LM prefill 2048 tokens (eager): int4 / bf16 ms",
            f"{results[('int4', 'prefill')]:.1f} / {results[('bf16', 'prefill')]:.1f} = {r:.2f}x",
        )
        eager1 = {
            label: lm_step_ms(m, decode_inputs(m, 1, 512, dev), graph=False)
            for label, m in (("bf16", ref), ("int4", q))
        }
        row(
            "LM decode step, batch 1 (eager, no graph): int4 / bf16 ms",
            f"{eager1['int4']:.2f} / {eager1['bf16']:.2f} = {eager1['int4'] / eager1['bf16']:.2f}x",
        )
    del q
    torch.cuda.empty_cache()
    # The same with lm_head in int4 as well (what `--keep-lm-head` off gives).
    names = quantizable_linears(shapes, 128, skip=("visual",))
    q2 = build_quantized_model(cfg, torch.bfloat16, dev, names, 128)
    quantize_into(ref, q2)
    with torch.inference_mode():
        t_q2 = lm_step_ms(q2, decode_inputs(q2, 1, 512, dev), graph=True)
    row(
        "LM decode step, batch 1, lm_head int4 too (CUDA graph): int4 / bf16 ms",
        f"{t_q2:.2f} / {results[('bf16', 1)]:.2f} = {t_q2 / results[('bf16', 1)]:.2f}x",
    )


def decode_variants(dev: torch.device, quick: bool = False) -> None:
    """The whole 40-layer decode step (weights cold in L2, as in serving) under several launch
    rules, against bf16: what the per-shape sweep, whose small weights stay in L2, cannot show.
    Most telling first (the defaults with and without `prefetch`, batch 1 and 64); `quick` stops
    after those and two `gemv_pairs` launches."""
    cfg = full_config()
    ref = build_model(cfg, torch.bfloat16, dev)
    random_init(ref, seed=0, branch_scale=0.2)
    with torch.device("meta"):
        shapes = type(ref)(cfg)
    names = quantizable_linears(shapes, 128, skip=("visual",))
    q = build_quantized_model(cfg, torch.bfloat16, dev, names, 128)
    quantize_into(ref, q)
    default = K.choose_config
    t16: dict[int, float] = {}

    def rule(kind: str, bn: int, warps: int, ahead: int, waves: int, prefetch: bool):
        """One-row products take `kind` with these tiles; more rows keep the defaults."""

        def choose(m: int, n: int, k: int, sm_count: int) -> K.LaunchConfig:
            if m > K.GEMV_MAX_M:
                return default(m, n, k, sm_count)
            split = K._split_for(triton_cdiv(n, bn), triton_cdiv(k, 128), sm_count, waves=waves)
            return K.LaunchConfig(kind, 1, bn, split, warps, 2, ahead, split > 1, prefetch=prefetch)

        return choose

    def changed(kind: str, **fields):
        """The defaults, with `fields` replaced in the launches of `kind`."""

        def choose(m: int, n: int, k: int, sm_count: int) -> K.LaunchConfig:
            cfg = default(m, n, k, sm_count)
            return dataclasses.replace(cfg, **fields) if cfg.kind == kind else cfg

        return choose

    def step(label: str, choose, batch: int = 1) -> None:
        if batch not in t16:
            t16[batch] = lm_step_ms(ref, decode_inputs(ref, batch, 512, dev), graph=True)
        K.choose_config = choose
        try:
            t4 = lm_step_ms(q, decode_inputs(q, batch, 512, dev), graph=True)
        finally:
            K.choose_config = default
        row(
            f"LM decode step, batch {batch}, lm_head int4 ({label}): int4 / bf16 ms",
            f"{t4:.2f} / {t16[batch]:.2f} = {t4 / t16[batch]:.2f}x",
        )

    # (BLOCK_N, warps, chunks ahead, waves, prefetch of scales/zeros/x with the words)
    gemv = (
        (128, 2, 2, 4, False),
        (64, 2, 2, 4, False),
        (32, 1, 2, 4, False),
        (128, 2, 2, 4, True),
        (64, 2, 2, 4, True),
        (64, 1, 2, 4, True),
        (32, 1, 2, 4, True),
        (128, 4, 2, 4, True),
        (128, 2, 2, 8, True),
        (64, 2, 2, 8, True),
    )
    pairs = (
        (128, 2, 1, 4, True),
        (128, 2, 2, 4, True),
        (128, 2, 1, 4, False),
        (64, 2, 2, 4, False),
        (64, 2, 2, 4, True),
        (128, 4, 2, 4, True),
        (64, 1, 2, 4, True),
        (128, 2, 2, 8, True),
    )
    with torch.inference_mode():
        step("defaults", default)
        step("defaults, prefetch", changed("gemv", prefetch=True))
        step("defaults, prefetch, 2 ahead", changed("gemv", prefetch=True, ahead=2))
        step("GEMM defaults", default, batch=64)
        step("GEMM defaults, prefetch", changed("gemm", prefetch=True), batch=64)
        for bn, warps, ahead, waves, pf in () if quick else gemv:
            step(
                f"BLOCK_N {bn}, {warps} warps, {ahead} ahead, {waves} waves{', prefetch' if pf else ''}",
                rule("gemv", bn, warps, ahead, waves, pf),
            )
        # The same step on pair-permuted words (a batch-1 step only runs the GEMV, so nothing else
        # meets the permuted order).
        for module in q.modules():
            if isinstance(module, Int4Linear):
                module.qweight.copy_(K.permute_for_pairs(module.qweight))
        for bn, warps, ahead, waves, pf in pairs[:2] if quick else pairs:
            label = f"gemv_pairs, BLOCK_N {bn}, {warps} warps, {ahead} ahead, {waves} waves"
            step(label + (", prefetch" if pf else ""), rule("gemv_pairs", bn, warps, ahead, waves, pf))


def engine_one(label: str, ckpt: str, gpu_memory_gb: float, out_json: str) -> None:
    """One engine in this process (a fresh process per engine: nothing of the last one remains)."""
    import json

    from device_engine import image_request, run_requests

    from glmv.engine.engine import EngineConfig, LLMEngine
    from glmv.errors import ConfigError

    r: dict[str, float | str] = {}
    try:
        t0 = time.perf_counter()
        engine = LLMEngine(
            EngineConfig(model=ckpt, dtype="bfloat16", max_num_seqs=64, gpu_memory_gb=gpu_memory_gb or None)
        )
    except ConfigError as exc:
        r["refused"] = str(exc)
        Path(out_json).write_text(json.dumps(r))
        return
    r["startup"] = time.perf_counter() - t0
    r["weights_gb"] = weight_memory(engine.model).total_bytes / 1e9
    if engine.memory is not None:
        r["memory"] = engine.memory.describe()
        r["kv_gb"] = engine.memory.kv_cache / 1e9
    if gpu_memory_gb:
        Path(out_json).write_text(json.dumps(r))
        return
    image_id = engine.model.image_token_id
    run_requests(engine, [image_request("warm", 999, 32, 8, image_id)])
    times = run_requests(engine, [image_request("b1", 1, 32, 257, image_id)])["b1"]
    r["tpot"] = statistics.median(b - a for a, b in itertools.pairwise(times[1:])) * 1e3
    for b in (1, 64):
        replay = decode_replay_ms(engine, b)
        if replay is not None:
            r[f"replay{b}"] = replay
    # The 64-concurrent workload twice, the second timed: the first compiles the kernels of every
    # batch shape it meets (a fresh machine has an empty Triton cache; whichever model runs first
    # would pay for the kernels both use). Fresh image hashes each time: no prefix-cache hits.
    for attempt in range(2):
        reqs = [
            image_request(f"c{attempt}-{i}", 100 + 100 * attempt + i, 64, 256, image_id) for i in range(64)
        ]
        t = time.perf_counter()
        out = run_requests(engine, reqs)
        r["tps"] = sum(len(v) for v in out.values()) / (time.perf_counter() - t)
        r[f"tps_pass{attempt + 1}"] = r["tps"]
    # Decode alone at 64: the same requests with one output token, subtracted.
    reqs = [image_request(f"p{i}", 400 + i, 64, 1, image_id) for i in range(64)]
    t = time.perf_counter()
    run_requests(engine, reqs)
    r["prefill64_s"] = time.perf_counter() - t
    Path(out_json).write_text(json.dumps(r))


def engine_int4(dev: torch.device) -> None:
    """bf16 and int4 (LM + vision linears, lm_head bf16) served by glmv's engine, each in its own
    process: batch-1 decode, the GPU time of one decode graph replay, 64 concurrent image requests,
    and the start-up memory report under `--gpu-memory-gb 24`."""
    import json
    import subprocess
    import tempfile

    from glmv.models.quant.quantize import quantize_checkpoint
    from glmv.models.tiny import create_tiny_model

    tmp = Path(tempfile.mkdtemp())
    full = create_tiny_model(tmp / "full", variant="full")
    int4 = tmp / "int4"
    quantize_checkpoint(full, int4, method="rtn", group_size=128, quantize_vision=True)
    int4_head = tmp / "int4-head"
    quantize_checkpoint(
        full, int4_head, method="rtn", group_size=128, quantize_vision=True, quantize_lm_head=True
    )
    res: dict[str, dict] = {}
    runs = (
        ("bf16", full, 0),
        ("int4", int4, 0),
        ("int4-24", int4, 24),
        ("bf16-24", full, 24),
        ("int4+lm_head", int4_head, 0),
    )
    for label, ckpt, gb in runs:
        out = tmp / f"{label}.json"
        cmd = [sys.executable, __file__, "--engine-one", label, str(ckpt), str(gb), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
        if proc.returncode != 0 or not out.exists():
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            row(f"engine {label}", f"failed (rc {proc.returncode})")
            continue
        res[label] = json.loads(out.read_text())
    b, q = res.get("bf16", {}), res.get("int4", {})
    for label, r in res.items():
        if "refused" in r:
            row(f"--gpu-memory-gb 24, {label}", f"refused: {r['refused']}")
        elif label.endswith("-24"):
            row(f"--gpu-memory-gb 24, {label}", str(r.get("memory")), "(KV target >= 4 GB)")
            row(
                f"--gpu-memory-gb 24, {label}: KV cache / weights",
                f"{r['kv_gb']:.2f} GB / {r['weights_gb']:.2f} GB",
            )
        else:
            row(f"{label} engine: start-up / weights", f"{r['startup']:.1f} s / {r['weights_gb']:.2f} GB")
    if "tpot" in b and "tpot" in q:
        row(
            "engine batch-1 decode ms/token (median step, 1120x1120 image prompt): int4 / bf16",
            f"{q['tpot']:.2f} / {b['tpot']:.2f} = {q['tpot'] / b['tpot']:.2f}x",
            "(target <= 0.55)",
        )
        for bs in (1, 64):
            key = f"replay{bs}"
            if key in q and key in b:
                row(
                    f"decode graph replay alone, batch {bs}, 1700-token contexts (GPU time): int4 / bf16",
                    f"{q[key]:.2f} / {b[key]:.2f} ms = {q[key] / b[key]:.2f}x",
                )
        row(
            "64 concurrent image requests x 256 tokens, output tok/s (engine, second pass): int4 / bf16",
            f"{q['tps']:.0f} / {b['tps']:.0f} = {q['tps'] / b['tps']:.2f}x "
            f"(first pass {q['tps_pass1']:.0f} / {b['tps_pass1']:.0f})",
            "(target >= 1)",
        )
        row(
            "the same 64 requests with 1 output token (prefill + vision), s: int4 / bf16",
            f"{q['prefill64_s']:.2f} / {b['prefill64_s']:.2f}",
        )
    h = res.get("int4+lm_head", {})
    if "tpot" in h and "tpot" in b:
        row(
            "engine batch-1 decode ms/token, lm_head int4 as well: int4 / bf16",
            f"{h['tpot']:.2f} / {b['tpot']:.2f} = {h['tpot'] / b['tpot']:.2f}x "
            f"(graph replay {h.get('replay1', 0):.2f} ms; 64 concurrent {h['tps']:.0f} tok/s)",
            "(target <= 0.55)",
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="also try tile configurations per shape")
    ap.add_argument("--skip-lm", action="store_true", help="kernels only")
    ap.add_argument("--engine", action="store_true", help="also serve bf16 and int4 through the engine")
    ap.add_argument("--engine-only", action="store_true", help="only the engine comparison")
    ap.add_argument(
        "--decode-variants", action="store_true", help="only the LM decode step under several launch rules"
    )
    ap.add_argument("--quick", action="store_true", help="--decode-variants, the most telling few only")
    ap.add_argument(
        "--lm-only", action="store_true", help="kernel checks and the full-size LM, no per-shape table"
    )
    ap.add_argument(
        "--engine-one", nargs=4, metavar=("LABEL", "CKPT", "GPU_GB", "OUT_JSON"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.engine_one:
        label, ckpt, gb, out_json = args.engine_one
        engine_one(label, ckpt, float(gb), out_json)
        return
    dev = torch.device("cuda")
    import triton

    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    t0 = time.perf_counter()
    sections = [check_kernels] + ([] if args.lm_only else [lambda d: time_shapes(d, args.sweep)])
    if not args.skip_lm:
        sections.append(full_lm)
    if args.engine:
        sections.append(engine_int4)
    if args.engine_only:
        sections = [engine_int4]
    if args.decode_variants or args.quick:
        sections = [lambda d: decode_variants(d, quick=args.quick)]
    for section in sections:
        try:
            section(dev)
        except Exception:  # report and go on with the next section
            traceback.print_exc()
            row("section failed", getattr(section, "__name__", "time_shapes"))
        torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n")
    print("| measurement | value | target |\n|---|---|---|")
    for name, value, target in ROWS:
        print(f"| {name} | {value} | {target} |")


if __name__ == "__main__":
    main()
