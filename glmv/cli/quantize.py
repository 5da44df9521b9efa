"""`glmv quantize SRC DST`: write a 4-bit (AWQ layout) copy of a checkpoint, or with
`--method fp8-block` an FP8 one in the block-scaled layout of the published GLM FP8 checkpoints.

Before the model loads: SRC must be a checkpoint folder, DST a new or empty folder (`--force`
writes over one that holds files, removing its old weight files first), and the group size must
fit at least one linear layer (otherwise nothing would be quantized: one line, status 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from glmv.cli.errors import UsageError, reporting_errors

__all__ = ["add_parser"]


@reporting_errors("glmv quantize")
def run_quantize(args: argparse.Namespace) -> int:
    from glmv.cli.checks import check_model_dir, check_output_dir, clear_weights

    src = check_model_dir(args.src, flag="SRC")
    if src.resolve() == args.dst.resolve():
        raise UsageError(f"DST {args.dst} is the source checkpoint; choose another output folder")
    check_output_dir(args.dst, force=args.force, what="DST")

    from tqdm import tqdm

    from glmv.models.quant.quantize import FP8_BLOCK, check_quantizable, quantize_checkpoint, skip_list

    # Before the model loads and before --force removes anything: an already quantized SRC, or a
    # group size that fits no layer (nothing would be quantized), is one line and status 2.
    fp8 = args.method == FP8_BLOCK
    check_quantizable(src, None if fp8 else args.group_size, skip_list(args.quantize_vision, not args.keep_lm_head))
    if args.force:
        clear_weights(args.dst)

    bars: dict[str, tqdm] = {}

    def progress(stage: str, n: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(desc=stage, unit="", leave=True, disable=args.quiet)
        bars[stage].update(n)

    try:
        report = quantize_checkpoint(
            src,
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
    finally:
        for bar in bars.values():
            bar.close()
    if fp8:
        print(
            f"wrote {args.dst}: {report.quantized_layers} linear layers in FP8 (e4m3, 128x128 blocks), "
            f"{len(report.float_linears)} kept in full precision, {report.seconds:.1f} s"
        )
        return 0
    print(
        f"wrote {args.dst}: {report.quantized_layers} linear layers in 4 bits ({report.method}, group "
        f"{report.group_size}), {len(report.float_linears)} kept in full precision, "
        f"{report.calibration_samples} calibration samples / {report.calibration_tokens} tokens, "
        f"{report.seconds:.1f} s"
    )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("quantize", help="write a 4-bit (AWQ layout) or FP8 copy of a checkpoint")
    p.add_argument("src", type=Path, help="float checkpoint directory")
    p.add_argument("dst", type=Path, help="output directory (new or empty, unless --force)")
    p.add_argument(
        "--method",
        default="awq",
        choices=["awq", "rtn", "fp8-block"],
        help="4-bit: activation-aware scaling or round-to-nearest; fp8-block: FP8 weights with one scale "
        "per 128x128 block (the published GLM FP8 layout)",
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
    p.add_argument(
        "--force",
        action="store_true",
        help="write into DST even when it holds files (its old weights are removed)",
    )
    p.set_defaults(func=run_quantize)
