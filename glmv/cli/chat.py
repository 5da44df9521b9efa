"""`glmv chat QUESTION [--image FILE]`: ask one question offline, through the offline `LLM`.

The checkpoint and the images are checked before the model loads (`glmv.cli.checks`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from glmv.cli.errors import one_line, reporting_errors

__all__ = ["add_parser", "run_chat"]


@reporting_errors("glmv chat")
def run_chat(args: argparse.Namespace) -> int:
    from glmv.cli.checks import check_image_file, check_model_dir
    from glmv.models.defaults import default_model_dir

    model = str(check_model_dir(args.model)) if args.model else None
    images = [check_image_file(path) for path in args.image]

    from glmv.tasks.llm import LLM
    from glmv.tasks.service import is_random_checkpoint
    from glmv.tasks.types import SamplingParams

    model = model or str(default_model_dir())
    if is_random_checkpoint(model):
        print("note: this checkpoint has random weights; its answers are random text", file=sys.stderr)
    content: list[dict[str, object]] = [{"type": "image", "image": img} for img in images]
    content.append({"type": "text", "text": args.question})
    # One question: the image is decoded here, not in a pool of processes started for it.
    with LLM(model, dtype=args.dtype, engine_mode=args.engine_mode, image_workers=0) as llm:
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
        kwargs = {"enable_thinking": False} if args.no_thinking else None
        messages = [{"role": "user", "content": content}]
        result = llm.chat(messages, params, use_tqdm=False, chat_template_kwargs=kwargs)[0]
    if result.error is not None:
        print(f"glmv chat: error: {one_line(result.error.message)}", file=sys.stderr)
        return 1
    print(result.outputs[0].text)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="ask one question offline (no server)")
    p.add_argument("question")
    p.add_argument("--model", help="checkpoint directory (default: the embedded demo or tiny model)")
    p.add_argument("--image", action="append", default=[], type=Path, help="image file (repeatable)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-thinking", action="store_true", help="turn thinking off where the template allows")
    p.add_argument(
        "--engine-mode",
        default="inprocess",
        choices=["process", "inprocess"],
        help="run the engine core in its own process, or in a thread of this one (default: for one question)",
    )
    p.set_defaults(func=run_chat)
