"""The `glmv` command line: serve · chat · extract · bench serve · quantize · create-tiny-model.

Each command is a module of this package with `add_parser(subparsers)`; building the parser
imports no model code (a command imports what it needs when it runs). `glmv` (the console
script) and `python -m glmv` both call `main`. Each command checks its inputs before a model
loads and reports any error as one line on stderr (`glmv.cli.errors`): exit status 2 for a usage
error, 1 for a failure at run time. A mistake in the arguments themselves is one line as well
(argparse's error, without the usage text), with status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from glmv import __version__
from glmv.cli import bench, chat, extract, quantize, serve, tiny
from glmv.cli.errors import USAGE

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with its error as one line: what was wrong and where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="glmv", description="Serve and run the GLM vision-language models.")
    parser.add_argument("--version", action="version", version=f"glmv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (serve, chat, bench, quantize, extract, tiny):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
