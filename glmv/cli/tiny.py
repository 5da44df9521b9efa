"""`glmv create-tiny-model DIR`: write a tiny random-weight checkpoint (tests, the embedded default)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]


def run_create_tiny_model(args: argparse.Namespace) -> int:
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


def add_parser(sub: Any) -> None:
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
    p.set_defaults(func=run_create_tiny_model)
