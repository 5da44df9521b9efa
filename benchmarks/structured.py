"""Decode cost of constrained (JSON Schema) vs unconstrained generation, at batch 1 and 32.

    python benchmarks/structured.py [--model DIR] [--batches 1 32] [--tokens 48] [--repeats 3]

Without --model the tiny GLM-4.1V checkpoint is created in a temp dir (CPU). On a GPU machine pass
a checkpoint (e.g. `glmv create-tiny-model DIR --variant full`, bf16) and the engine runs there
with CUDA graphs as `glmv serve` would; note that mask costs depend on the tokenizer's real
vocabulary (the tiny tokenizer has ~2k tokens; `benchmarks/grammar_mask.py` measures masks on a
151,552-token vocabulary).

Per batch size, all requests are submitted at once (short text prompts, greedy) and the first
step (prefill + first token) is not timed; the remaining decode steps are. Three workloads:

* `free`: unconstrained, `ignore_eos`, exactly `--tokens` tokens;
* `string`: a schema whose one string field needs more than `--tokens` tokens, so every step is
  constrained, in the state with the most allowed tokens (the costliest mask);
* `invoice`: the built-in invoice schema (keys, nulls, numbers, arrays: mixed states), up to
  `--tokens` tokens; its steps end when the documents do, so it is reported per step.

The host time of filling the bitmasks and applying them to the logits is measured inside the
runner (its `fill_masks` / `apply_masks` are wrapped with timers). Prints one table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glmv.engine.runner as runner_module
import glmv.engine.structured as structured_module
from glmv.engine.engine import EngineConfig, LLMEngine
from glmv.engine.sampling import SamplingParams
from glmv.engine.structured import StructuredOutput, json_schema_output
from glmv.models.tiny import create_tiny_model
from glmv.tasks.inputs import load_processors
from glmv.tasks.schemas import BUILTIN_SCHEMAS


class _Timed:
    """Wraps a runner function and adds up its wall time."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def _requests(builder: Any, batch: int, params: SamplingParams, tag: str) -> list[Any]:
    out = []
    for i in range(batch):
        messages = [{"role": "user", "content": f"Document {tag}-{i}: read it and fill in the fields."}]
        out.append(builder.build(f"{tag}-{i}", messages, [], params))
    return out


def _run(engine: LLMEngine, reqs: list[Any], timers: list[_Timed]) -> tuple[float, int, int, list[float]]:
    """(decode seconds, decode steps, decode tokens, seconds in each timer) after the first step."""
    for r in reqs:
        engine.add_request(r)
    engine.step()  # prefill + first token of every request
    for t in timers:
        t.seconds = 0.0
    steps = tokens = 0
    sync = engine.model.device.type == "cuda"
    start = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        tokens += sum(len(d.token_ids) for o in outs for d in o.deltas)
    if sync:  # pragma: no cover - CUDA
        torch.cuda.synchronize()
    return time.perf_counter() - start, steps, tokens, [t.seconds for t in timers]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: a tiny one in a temp dir)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is reported")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    tmp = None
    model = args.model
    if model is None:
        tmp = tempfile.TemporaryDirectory()
        model = create_tiny_model(Path(tmp.name) / "tiny", variant="glm41v", seed=0)
    tokenizer, builder = load_processors(model)
    engine = LLMEngine(
        EngineConfig(model=str(model), dtype=args.dtype, max_num_seqs=max(args.batches), max_model_len=4096),
        tokenizer=tokenizer,
    )
    fill = _Timed(runner_module.fill_masks)
    apply = _Timed(runner_module.apply_masks)
    advance = _Timed(structured_module.GrammarState.advance)
    runner_module.fill_masks = fill  # type: ignore[assignment]
    runner_module.apply_masks = apply  # type: ignore[assignment]
    structured_module.GrammarState.advance = lambda self, token: advance(self, token)  # type: ignore[method-assign]
    timers = [fill, apply, advance]

    text = {"type": "string", "minLength": 50 * args.tokens, "maxLength": 100 * args.tokens}
    long_string = json_schema_output(
        {"type": "object", "properties": {"text": text}, "required": ["text"]}
    ).with_thinking(False)
    invoice = json_schema_output(BUILTIN_SCHEMAS["invoice"].schema).with_thinking(False)
    workloads: list[tuple[str, StructuredOutput | None]] = [
        ("free", None),
        ("string", long_string),
        ("invoice", invoice),
    ]
    print(
        f"model {model} on {engine.model.device} ({engine.model.dtype}), vocab {engine.model.vocab_size}, "
        f"tokenizer {tokenizer.vocab_size} tokens, {torch.get_num_threads()} torch threads, "
        f"{args.tokens} tokens per request"
    )
    warm = _requests(builder, 2, SamplingParams(temperature=0.0, max_tokens=4, structured=invoice), "warm")
    _run(engine, warm, timers)  # builds the grammar machinery and compiles the invoice grammar
    rows: list[tuple[int, str, list[float]]] = []
    for batch in args.batches:
        for name, structured in workloads:
            samples = []
            for rep in range(args.repeats):
                params = SamplingParams(
                    temperature=0.0,
                    max_tokens=args.tokens,
                    ignore_eos=structured is None,
                    structured=structured,
                )
                secs, steps, tokens, host = _run(
                    engine, _requests(builder, batch, params, f"{name}{batch}r{rep}"), timers
                )
                n = max(steps, 1)
                samples.append([secs / n, secs / max(tokens, 1), *(h / n for h in host)])
            rows.append((batch, name, [statistics.median(s[k] for s in samples) for k in range(5)]))
    print()
    print(
        "| batch | workload | ms/step | × free | µs/token | fill ms/step | apply ms/step | advance ms/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    free_step = {b: v[0] for b, name, v in rows if name == "free"}
    for batch, name, (step, token, f, a, adv) in rows:
        print(
            f"| {batch} | {name} | {step * 1e3:.2f} | {step / free_step[batch]:.2f} | {token * 1e6:.0f} | "
            f"{f * 1e3:.2f} | {a * 1e3:.2f} | {adv * 1e3:.2f} |"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
