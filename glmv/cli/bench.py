"""`glmv bench serve`: load-test an OpenAI-compatible server (the load generator is `glmv.bench_serve`)."""

from __future__ import annotations

from typing import Any

__all__ = ["add_parser"]


def add_parser(sub: Any) -> None:
    from glmv.bench_serve import add_bench_serve_arguments, run_bench_serve
    from glmv.cli.errors import reporting_errors

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("serve", help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, throughput)")
    add_bench_serve_arguments(p)
    p.set_defaults(func=reporting_errors("glmv bench serve")(run_bench_serve))
