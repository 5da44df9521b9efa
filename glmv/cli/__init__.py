"""The `glmv` command line: serve · chat · extract · bench serve · quantize · create-tiny-model.

Each command is a module of this package with `add_parser(subparsers)`; building the parser
imports no model code (a command imports what it needs when it runs). `glmv` (the console
script) and `python -m glmv` both call `main`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from glmv.cli import bench, chat, extract, quantize, serve, tiny

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmv", description="Serve and run the GLM vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (serve, chat, bench, quantize, extract, tiny):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
