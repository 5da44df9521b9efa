"""`glmv create-tiny-model DIR`: write a tiny random-weight checkpoint (tests, the embedded default).

DIR must be new or empty; `--force` writes over a folder that holds files (its old weight files
are removed first, so that they cannot mix with the new ones).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from glmv.cli.errors import UsageError, reporting_errors

__all__ = ["add_parser", "run_create_tiny_model"]


@reporting_errors("glmv create-tiny-model")
def run_create_tiny_model(args: argparse.Namespace) -> int:
    from glmv.cli.checks import check_output_dir, clear_weights

    if args.arch == "glm4v-9b" and args.variant not in ("glm41v", "full"):
        raise UsageError("--arch glm4v-9b takes no --variant other than 'full'")
    check_output_dir(args.directory, force=args.force, what="DIR")
    if args.force:
        clear_weights(args.directory)
    if args.arch == "glm4v-9b":
        from glmv.models.tiny_glm4v_9b import FULL_9B, TINY_9B, create_tiny_glm4v_9b

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
    p.add_argument("directory", type=Path, help="output folder (new or empty, unless --force)")
    p.add_argument(
        "--arch",
        default="glm4v",
        choices=["glm4v", "glm4v-9b"],
        help="glm4v: GLM-4.1V/4.6V-Flash layout; glm4v-9b: GLM-4v-9b (ChatGLM) layout",
    )
    p.add_argument("--variant", default="glm41v", choices=["glm41v", "glm46v", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--force",
        action="store_true",
        help="write into DIR even when it holds files (its old weights are removed)",
    )
    p.set_defaults(func=run_create_tiny_model)
