"""`glmv quantize SRC DST`: write a 4-bit (AWQ layout) copy of a checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


def run_quantize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from glmv.errors import GlmvError
    from glmv.models.quant.quantize import quantize_checkpoint

    bars: dict[str, tqdm] = {}

    def progress(stage: str, n: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(desc=stage, unit="", leave=True, disable=args.quiet)
        bars[stage].update(n)

    try:
        report = quantize_checkpoint(
            args.src,
            args.dst,
            method=args.method,
            group_size=args.group_size,
            quantize_vision=args.quantize_vision,
            quantize_lm_head=not args.keep_lm_head,
            device=args.device,
            num_samples=args.calib_samples,
            max_tokens=args.calib_max_tokens,
            seed=args.seed,
            progress=progress,
        )
    except GlmvError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        for bar in bars.values():
            bar.close()
    print(
        f"wrote {args.dst}: {report.quantized_layers} linear layers in 4 bits ({report.method}, group "
        f"{report.group_size}), {len(report.float_linears)} kept in full precision, "
        f"{report.calibration_samples} calibration samples / {report.calibration_tokens} tokens, "
        f"{report.seconds:.1f} s"
    )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("quantize", help="write a 4-bit (AWQ layout) copy of a checkpoint")
    p.add_argument("src", type=Path, help="float checkpoint directory")
    p.add_argument("dst", type=Path, help="output directory")
    p.add_argument(
        "--method", default="awq", choices=["awq", "rtn"], help="activation-aware scaling or round-to-nearest"
    )
    p.add_argument(
        "--group-size", type=int, default=128, help="input channels per scale (-1: one per output channel)"
    )
    vision = p.add_mutually_exclusive_group()
    vision.add_argument("--keep-vision-bf16", dest="quantize_vision", action="store_false", help="(default)")
    vision.add_argument("--quantize-vision", dest="quantize_vision", action="store_true")
    p.set_defaults(quantize_vision=False)
    p.add_argument(
        "--keep-lm-head", action=argparse.BooleanOptionalAction, default=True, help="lm_head stays float"
    )
    p.add_argument("--device", default=None, help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration conversations (awq)")
    p.add_argument("--calib-max-tokens", type=int, default=512, help="longest calibration conversation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_quantize)
