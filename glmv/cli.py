"""The `glmv` command line: serve · chat · bench serve · create-tiny-model (and more as they land)."""

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
