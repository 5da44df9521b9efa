"""The `glmv` command line: serve · chat · bench serve · quantize · create-tiny-model (and more as they land)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_create_tiny_model(args: argparse.Namespace) -> int:
    if args.arch == "glm4v-9b":
        from glmv.models.tiny_glm4v_9b import FULL_9B, TINY_9B, create_tiny_glm4v_9b

        if args.variant not in ("glm41v", "full"):
            print("error: --arch glm4v-9b takes no --variant other than 'full'", file=sys.stderr)
            return 2
        spec = FULL_9B if args.variant == "full" else TINY_9B
        path = create_tiny_glm4v_9b(args.directory, seed=args.seed, spec=spec)
        kind = "full-size weightless" if args.variant == "full" else "tiny random-weight"
        print(f"wrote a {kind} GLM-4v-9b checkpoint to {path}")
        return 0
    from glmv.models.tiny import create_tiny_model

    path = create_tiny_model(args.directory, variant=args.variant, seed=args.seed)
    print(f"wrote a tiny random-weight {args.variant} checkpoint to {path}")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from glmv.engine.llm import LLM
    from glmv.engine.sampling import SamplingParams
    from glmv.models.tiny import is_random_checkpoint
    from glmv.server.defaults import default_model_dir

    model = args.model or str(default_model_dir())
    if is_random_checkpoint(model):
        print("note: this checkpoint has random weights; its answers are random text", file=sys.stderr)
    content: list[dict[str, object]] = [{"type": "image", "image": img} for img in args.image]
    content.append({"type": "text", "text": args.question})
    llm = LLM(model, dtype=args.dtype)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    kwargs = {"enable_thinking": False} if args.no_thinking else None
    result = llm.chat([{"role": "user", "content": content}], params, use_tqdm=False, chat_template_kwargs=kwargs)[0]
    if result.error is not None:
        print(f"error: {result.error.message}", file=sys.stderr)
        return 1
    print(result.outputs[0].text)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmv", description="Serve and run the GLM vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    try:
        from glmv.server.settings import add_serve_arguments, run_serve
    except ImportError:  # pragma: no cover - the server package is optional during development
        add_serve_arguments = run_serve = None  # type: ignore[assignment]
    if add_serve_arguments is not None:
        p = sub.add_parser("serve", help="start the OpenAI-compatible server and web page")
        add_serve_arguments(p)
        p.set_defaults(func=run_serve)

    p = sub.add_parser("chat", help="ask one question offline (no server)")
    p.add_argument("question")
    p.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--image", action="append", default=[], type=Path, help="image file (repeatable)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-thinking", action="store_true", help="turn thinking off where the template allows")
    p.set_defaults(func=_cmd_chat)

    from glmv.bench_serve import add_bench_serve_arguments, run_bench_serve

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("serve", help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, throughput)")
    add_bench_serve_arguments(p)
    p.set_defaults(func=run_bench_serve)

    p = sub.add_parser("quantize", help="write a 4-bit (AWQ layout) copy of a checkpoint")
    p.add_argument("src", type=Path, help="float checkpoint directory")
    p.add_argument("dst", type=Path, help="output directory")
    p.add_argument("--method", default="awq", choices=["awq", "rtn"], help="activation-aware scaling or round-to-nearest")
    p.add_argument("--group-size", type=int, default=128, help="input channels per scale (-1: one per output channel)")
    vision = p.add_mutually_exclusive_group()
    vision.add_argument("--keep-vision-bf16", dest="quantize_vision", action="store_false", help="(default)")
    vision.add_argument("--quantize-vision", dest="quantize_vision", action="store_true")
    p.set_defaults(quantize_vision=False)
    p.add_argument("--keep-lm-head", action=argparse.BooleanOptionalAction, default=True, help="lm_head stays float")
    p.add_argument("--device", default=None, help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration conversations (awq)")
    p.add_argument("--calib-max-tokens", type=int, default=512, help="longest calibration conversation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_quantize)

    from glmv.extract_cli import add_extract_arguments, run_extract

    p = sub.add_parser("extract", help="extract JSON from document images and PDFs into a JSONL file")
    add_extract_arguments(p)
    p.set_defaults(func=run_extract)

    p = sub.add_parser("create-tiny-model", help="write a tiny random-weight checkpoint (for tests)")
    p.add_argument("directory", type=Path)
    p.add_argument(
        "--arch",
        default="glm4v",
        choices=["glm4v", "glm4v-9b"],
        help="glm4v: GLM-4.1V/4.6V-Flash layout; glm4v-9b: GLM-4v-9b (ChatGLM) layout",
    )
    p.add_argument("--variant", default="glm41v", choices=["glm41v", "glm46v", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_create_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
