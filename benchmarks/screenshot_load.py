"""Screenshot load: Poisson arrivals of 1280x720 JPEG screenshots + a ~64-token question, 128-token
answers, swept over request rates against one `glmv serve`; a latency table per rate.

The server starts once (its start-up line is printed: weights, memory profile, CUDA graphs, GPU
kernels built); each rate then gets `rate x --seconds` requests (`glmv bench serve`'s runner, the
same TTFT/TPOT definitions), one rate after another. Last: the highest rate whose p99 TTFT and p99
TPOT stay within `--ttft-ms` / `--tpot-ms`, and the GPU kernels built while serving (from /metrics;
0 means start-up warmed every kernel the load needed).

    # GPU: the full-size GLM-4.6V-Flash shape, random bf16 weights
    PYTHONPATH=. python3 benchmarks/screenshot_load.py --full --rates 4,8,12,16,20
    # CPU smoke run: the tiny checkpoint at low rates
    PYTHONPATH=. python3 benchmarks/screenshot_load.py --rates 1,2 --seconds 4 --output-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.http_common import serve
from glmv.bench_serve import BenchConfig, BenchResult, format_sweep, run_sweep


def kernel_builds(base_url: str) -> float | None:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    match = re.search(r"^glmv_kernel_builds_after_startup_total\{[^}]*\} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def best_rate(results: list[BenchResult], ttft_ms: float, tpot_ms: float) -> BenchResult | None:
    """The run with the most requests served per second among those within both p99 targets."""
    ok = [
        r
        for r in results
        if r.failed == 0 and (r.ttft.p99 or math.inf) <= ttft_ms and (r.tpot.p99 or math.inf) <= tpot_ms
    ]
    return max(ok, key=lambda r: r.request_throughput, default=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="full-size GLM-4.6V-Flash shape, random weights (GPU)")
    p.add_argument("--model", type=Path, help="serve this checkpoint (default: tiny, or --full)")
    p.add_argument("--rates", default="4,8,12,16,20", help="requests per second, comma-separated")
    p.add_argument("--seconds", type=float, default=30.0, help="arrivals per rate: rate x seconds requests")
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--image", default="1280x720", help="screenshot size, WxH (JPEG)")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests before the first rate")
    p.add_argument("--ttft-ms", type=float, default=1000.0, help="p99 TTFT target")
    p.add_argument("--tpot-ms", type=float, default=50.0, help="p99 TPOT target")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `glmv serve` flag (repeatable)")
    p.add_argument("--out", type=Path, help="write the sweep's JSON here")
    args = p.parse_args()
    width, height = (int(v) for v in args.image.lower().split("x"))
    rates = [float(r) for r in args.rates.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        flags = list(args.serve_arg)
        if args.full:
            from glmv.models.tiny import create_tiny_model

            model = create_tiny_model(Path(tmp) / "full", variant="full")
            flags = ["--dtype", "bfloat16", "--max-num-seqs", "128", *flags]
        with serve(*flags, model=model, start_timeout=900.0) as server:
            banner = server.log_path.read_text(errors="replace")
            startup = [line.strip() for line in banner.splitlines() if "model ready in" in line]
            print(startup[0] if startup else "(no start-up line in the server's log)", flush=True)
            builds_ready = kernel_builds(server.base_url)
            configs = [
                BenchConfig(
                    base_url=server.base_url,
                    num_prompts=max(1, round(rate * args.seconds)),
                    request_rate=rate,
                    input_tokens=args.input_tokens,
                    output_tokens=args.output_tokens,
                    image_size=(width, height),
                    image_format="jpeg",
                    seed=i,
                    warmup=args.warmup if i == 0 else 0,
                    disable_tqdm=True,
                )
                for i, rate in enumerate(rates)
            ]
            results = asyncio.run(run_sweep(configs))
            builds_after = kernel_builds(server.base_url)
    print(format_sweep(results))
    best = best_rate(results, args.ttft_ms, args.tpot_ms)
    if best is None:
        print(f"no rate kept p99 TTFT <= {args.ttft_ms:.0f} ms and p99 TPOT <= {args.tpot_ms:.0f} ms")
    else:
        print(
            f"best within p99 TTFT <= {args.ttft_ms:.0f} ms and p99 TPOT <= {args.tpot_ms:.0f} ms: "
            f"{best.request_throughput:.2f} req/s served (offered {best.config.request_rate:g})"
        )
    print(f"GPU kernels built after start-up: at ready {builds_ready}, after the sweep {builds_after}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "startup": startup[0] if startup else None,
                    "kernel_builds_after_startup": builds_after,
                    "sweep": [{k: v for k, v in r.to_dict().items() if k != "requests"} for r in results],
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
