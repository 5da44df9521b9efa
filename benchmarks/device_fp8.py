"""FP8 and INT4 weights against bf16 on the GPU: per-shape products, the whole LM step, logits.

    PYTHONPATH=. python3 benchmarks/device_fp8.py [--skip-lm]

1. Per shape of one GLM-4.6V-Flash decoder layer (and lm_head): `F.linear` in bf16, `fp8_linear`
   (e4m3 weights with per-channel scales, per-token activation scales, `torch._scaled_mm`) and the
   int4 Triton kernels at 1, 16, 64 and 2048 rows (median of CUDA-graph replays), with the
   weight bandwidth reached.
2. A full-size GLM-4.6V-Flash-shaped model with random weights (residual branches scaled by 0.2):
   bf16, the same with its LM + vision linears converted to FP8 (`convert_to_fp8`, lm_head bf16)
   and with its LM linears RTN-quantized to int4 (group 128): weight bytes, logits against bf16
   (relative L2 error, mean cosine, top-1 agreement on 64 random tokens), and the whole 40-layer LM
   step at batch 1, 16 and 64 over 512-token contexts (CUDA graphs) and a 2048-token prefill.
Prints a table last.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_int4 import (
    LAYER_SHAPES,
    LM_HEAD_SHAPE,
    ROWS,
    decode_inputs,
    full_config,
    graph_time_ms,
    lm_step_ms,
    prefill_inputs,
    quantize_into,
    random_packed,
    row,
)

from glmv.kernels import fp8 as F8
from glmv.kernels import int4_triton as K
from glmv.models.loader import build_model, build_quantized_model, random_init
from glmv.models.quant.fp8 import convert_to_fp8
from glmv.models.quant.linear import quantizable_linears
from glmv.models.quant.report import weight_memory


def time_shapes(dev: torch.device) -> None:
    torch.manual_seed(1)
    for name, (n, k) in {**LAYER_SHAPES, "lm_head": LM_HEAD_SHAPE}.items():
        w16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
        codes, scale = F8.quantize_rows(w16)
        qw, z, s, gs = random_packed(n, k, 128, dev)
        qw = K.k_major(qw)
        for m in (1, 16, 64, 2048) if name != "lm_head" else (1, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t16 = graph_time_ms(lambda x=x, w=w16: F.linear(x, w))
            t8 = graph_time_ms(lambda x=x, c=codes, sc=scale: F8.fp8_linear(x, c, sc, None))
            t4 = graph_time_ms(lambda x=x, qw=qw, z=z, s=s, gs=gs: K.int4_matmul_triton(x, qw, z, s, gs))
            row(
                f"{name} {n}x{k}, {m} rows: fp8 / int4 / bf16 us",
                f"{t8 * 1e3:.1f} / {t4 * 1e3:.1f} / {t16 * 1e3:.1f} = {t8 / t16:.2f}x / {t4 / t16:.2f}x",
                f"(fp8 {n * k / t8 / 1e6:.0f} GB/s, bf16 {n * k * 2 / t16 / 1e6:.0f} GB/s)",
            )
        # Agreement of the FP8 product with bf16 (weights and activations rounded).
        x = torch.randn(64, k, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x.float(), w16.float())
        got = F8.fp8_linear(x, codes, scale, None).float()
        row(
            f"{name}: fp8 product vs fp32, relative L2 error",
            f"{((got - ref).norm() / ref.norm()).item():.4f}",
        )


def _logit_stats(a: torch.Tensor, b: torch.Tensor) -> str:
    rel = ((b.float() - a.float()).norm() / a.float().norm()).item()
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return f"rel. L2 {rel:.4f}, cosine {cos:.4f}, top-1 {top1:.2f}"


def full_lm(dev: torch.device) -> None:
    cfg = full_config()
    ref = build_model(cfg, torch.bfloat16, dev)
    random_init(ref, seed=0, branch_scale=0.2)
    row("bf16 weights", f"{weight_memory(ref).total_bytes / 1e9:.2f} GB")
    t0 = time.perf_counter()
    f8 = copy.deepcopy(ref)
    names = convert_to_fp8(f8)
    torch.cuda.synchronize()
    row(
        "fp8 conversion at load (LM + vision linears, lm_head bf16)",
        f"{len(names)} layers in {time.perf_counter() - t0:.1f} s; weights {weight_memory(f8).total_bytes / 1e9:.2f} GB",
    )
    with torch.device("meta"):
        shapes = type(ref)(cfg)
    q_names = quantizable_linears(shapes, 128, skip=("visual", "lm_head"))
    q4 = build_quantized_model(cfg, torch.bfloat16, dev, q_names, 128)
    quantize_into(ref, q4)
    row("int4 weights (LM linears, g128)", f"{weight_memory(q4).total_bytes / 1e9:.2f} GB")
    models = {"bf16": ref, "fp8": f8, "int4": q4}
    with torch.inference_mode():
        logits = {}
        for label, model in models.items():
            ids, pos, caches, meta = prefill_inputs(model, 64, dev)
            torch.manual_seed(5)
            ids = torch.randint(0, 150000, (64,), device=dev)
            logits[label] = model.compute_logits(model(ids, pos, caches, meta))
            del caches
        for label in ("fp8", "int4"):
            row(f"{label} vs bf16 logits, 64 random tokens", _logit_stats(logits["bf16"], logits[label]))
        times: dict[tuple[str, int | str], float] = {}
        for batch in (1, 16, 64):
            for label, model in models.items():
                inputs = decode_inputs(model, batch, 512, dev)
                times[(label, batch)] = lm_step_ms(model, inputs, graph=True)
                del inputs
            b = times[("bf16", batch)]
            row(
                f"LM decode step, batch {batch}, 512-token contexts (CUDA graph): fp8 / int4 / bf16 ms",
                f"{times[('fp8', batch)]:.2f} / {times[('int4', batch)]:.2f} / {b:.2f} = "
                f"{times[('fp8', batch)] / b:.2f}x / {times[('int4', batch)] / b:.2f}x",
            )
        for label, model in models.items():
            inputs = prefill_inputs(model, 2048, dev)
            times[(label, "prefill")] = lm_step_ms(model, inputs, graph=False)
            del inputs
        b = times[("bf16", "prefill")]
        row(
            "LM prefill 2048 tokens (eager): fp8 / int4 / bf16 ms",
            f"{times[('fp8', 'prefill')]:.1f} / {times[('int4', 'prefill')]:.1f} / {b:.1f} = "
            f"{times[('fp8', 'prefill')] / b:.2f}x / {times[('int4', 'prefill')] / b:.2f}x",
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-lm", action="store_true", help="per-shape products only")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    sections = [time_shapes] + ([] if args.skip_lm else [full_lm])
    for section in sections:
        try:
            section(dev)
        except Exception:  # report and go on with the next section
            traceback.print_exc()
            row("section failed", section.__name__)
        torch.cuda.empty_cache()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s\n")
    print("| measurement | value |  |\n|---|---|---|")
    for name, value, target in ROWS:
        print(f"| {name} | {value} | {target} |")


if __name__ == "__main__":
    main()
