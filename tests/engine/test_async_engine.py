"""Asynchronous scheduling on the tiny checkpoint: exactly the outputs of the synchronous loop.

Each test runs the same requests through two engines, `async_scheduling` on and off, and compares
every choice's token ids, logprobs, text and finish reason: greedy and seeded sampling, n > 1,
logprobs, stop tokens, stop strings, max_tokens, images, staggered arrivals, prefix caching,
preemption under a tiny KV cache, structured output and penalties (their steps are applied before
the next one is scheduled), aborts while a step is in flight, and a request id reused while its
aborted namesake's step is still in flight. The engines also count how many steps overlapped, so
each test shows that the asynchronous path really ran.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from glmv.engine.engine import LLMEngine
from glmv.engine.request import EngineRequest
from glmv.engine.sampling import SamplingParams
from glmv.engine.structured import json_schema_output
from glmv.tasks.inputs import InputBuilder
from tests.engine.test_engine import GREEDY, make_engine, mixed_conversations, request
from tests.models.reference import noise_image

MODES = (False, True)  # async_scheduling off (the reference), on
# KV bytes of one block of the tiny checkpoint (2 layers, 2 KV heads, head_dim 32, float32).
PER_BLOCK = 2 * 2 * 16 * 2 * 32 * 4


def engines(path: Path, **config: Any) -> dict[bool, tuple[LLMEngine, InputBuilder]]:
    return {mode: make_engine(path, async_scheduling=mode, **config) for mode in MODES}


def drive(
    engine: LLMEngine,
    reqs: list[EngineRequest],
    arrivals: list[int] | None = None,
    aborts: dict[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Add request i at step `arrivals[i]`, abort request i at step `aborts[i]`, step until done.
    Per request, in order: token ids, text, logprobs and finish reason of each choice; error."""
    arrivals = arrivals or [0] * len(reqs)
    aborts = aborts or {}
    index = {r.request_id: i for i, r in enumerate(reqs)}
    results: list[dict[str, Any]] = [
        {"tokens": {}, "text": {}, "logprobs": {}, "finish": {}, "error": None} for _ in reqs
    ]
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i, r in enumerate(reqs):
            if arrivals[i] == step:
                engine.add_request(r)
        for i, at in aborts.items():
            if at == step:
                engine.abort(reqs[i].request_id)
        for out in engine.step():
            res = results[index[out.request_id]]
            res["error"] = out.error
            for d in out.deltas:
                res["tokens"].setdefault(d.index, []).extend(d.token_ids)
                res["text"][d.index] = res["text"].get(d.index, "") + d.text
                res["logprobs"].setdefault(d.index, []).extend(d.logprobs or [])
                if d.finish_reason:
                    res["finish"][d.index] = (d.finish_reason, d.stop_reason)
        step += 1
        assert step < 2000, "the engine did not finish"
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.core._requests and not engine.core._seqs
    return results


def compare(
    path: Path,
    build: Callable[[InputBuilder], list[EngineRequest]],
    arrivals: list[int] | None = None,
    **config: Any,
) -> tuple[list[dict[str, Any]], dict[bool, LLMEngine]]:
    pair = engines(path, **config)
    got = {mode: drive(engine, build(builder), arrivals) for mode, (engine, builder) in pair.items()}
    assert got[True] == got[False]
    cores = {mode: engine for mode, (engine, _) in pair.items()}
    assert cores[False].core.num_overlapped_steps == 0
    assert cores[True].core.num_overlapped_steps > 0
    return got[False], cores


def test_free_text_batch_is_identical(tiny41_dir: Path) -> None:
    probe, builder = make_engine(tiny41_dir, async_scheduling=False)
    msgs = [{"role": "user", "content": "Count for me."}]
    base = request(builder, msgs, [], SamplingParams(max_tokens=30, **GREEDY))
    (ref,) = drive(probe, [base])
    stop_token, stop_text = ref["tokens"][0][5], ref["text"][0][3:6]

    def build(builder: InputBuilder) -> list[EngineRequest]:
        reqs = [
            request(builder, m, i, SamplingParams(max_tokens=n, **GREEDY))
            for m, i, n in mixed_conversations()[:6]
        ]
        seeded = SamplingParams(
            n=2, max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True
        )
        reqs.append(request(builder, [{"role": "user", "content": "Tell me a story."}], [], seeded))
        reqs.append(request(builder, msgs, [], SamplingParams(max_tokens=12, logprobs=3, **GREEDY)))
        reqs.append(
            request(builder, msgs, [], SamplingParams(max_tokens=30, stop_token_ids=[stop_token], **GREEDY))
        )
        reqs.append(request(builder, msgs, [], SamplingParams(max_tokens=30, stop=[stop_text], **GREEDY)))
        reqs.append(request(builder, msgs, [], SamplingParams(max_tokens=25, temperature=0.0)))  # eos counts
        reqs.append(request(builder, msgs, [], SamplingParams(max_tokens=1, **GREEDY)))
        sampled = SamplingParams(
            max_tokens=16, temperature=0.7, seed=7, logprobs=0, stop_token_ids=[stop_token]
        )
        reqs.append(request(builder, [{"role": "user", "content": "Another one."}], [], sampled))
        return reqs

    arrivals = [0, 0, 1, 2, 2, 3, 5, 0, 1, 4, 6, 7, 3]
    got, _ = compare(tiny41_dir, build, arrivals)
    assert got[8]["finish"][0] == ("stop", stop_token) and got[8]["tokens"][0][-1] == stop_token
    assert got[9]["finish"][0] == ("stop", stop_text) and stop_text not in got[9]["text"][0]
    assert len(got[11]["tokens"][0]) == 1 and got[11]["finish"][0] == ("length", None)
    assert len(got[6]["tokens"]) == 2 and len(got[7]["logprobs"][0]) == 12
    assert all(len(lp.top) == 3 for lp in got[7]["logprobs"][0])


def test_structured_output_and_penalties_are_identical(tiny41_dir: Path) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}, "required": ["a"]}
    structured = json_schema_output(schema).with_thinking(False)

    def build(builder: InputBuilder) -> list[EngineRequest]:
        free = [{"role": "user", "content": f"Tell me about invoices, part {i}."} for i in range(2)]
        return [
            request(builder, [free[0]], [], SamplingParams(max_tokens=40, **GREEDY)),
            request(builder, [{"role": "user", "content": "Fill in the JSON."}], [],
                    SamplingParams(temperature=0.0, max_tokens=48, structured=structured)),
            request(builder, [free[1]], [], SamplingParams(
                max_tokens=16, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, **GREEDY)),
            request(builder, [free[1]], [], SamplingParams(max_tokens=40, temperature=0.9, seed=3, ignore_eos=True)),
        ]  # fmt: skip

    got, cores = compare(tiny41_dir, build, max_model_len=2048, kv_cache_gb=0.05)
    assert isinstance(json.loads(got[1]["text"][0]), dict)
    assert cores[True].core.num_synchronized_steps > 0  # the grammar and the penalties needed it


def test_prefix_caching_and_preemption_are_identical(tiny41_dir: Path) -> None:
    image = noise_image(224, 224, 11)
    ask = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is on this page?"}]}
    ]

    def build(builder: InputBuilder) -> list[EngineRequest]:
        convs = mixed_conversations()[:5]
        reqs = [request(builder, m, i, SamplingParams(max_tokens=28, **GREEDY)) for m, i, _ in convs]
        # The same image and question again later: its prompt blocks come from the prefix cache.
        reqs += [request(builder, ask, [image], SamplingParams(max_tokens=20, **GREEDY)) for _ in range(3)]
        return reqs

    arrivals = [0, 0, 1, 1, 2, 0, 30, 60]
    got, cores = compare(tiny41_dir, build, arrivals, kv_cache_gb=24 * PER_BLOCK / 1024**3)
    for mode, engine in cores.items():
        assert engine.scheduler.num_preemptions > 0, mode
        assert engine.block_manager.prefix_cache_hits > 0, mode
    assert all(len(r["tokens"][0]) == n for r, n in zip(got, [28] * 5 + [20] * 3, strict=True))


def test_abort_while_a_step_is_in_flight(tiny41_dir: Path) -> None:
    def build(builder: InputBuilder) -> list[EngineRequest]:
        return [
            request(builder, [{"role": "user", "content": f"Question {i}, answer at length."}], [],
                    SamplingParams(max_tokens=24, **GREEDY))
            for i in range(3)
        ]  # fmt: skip

    pair = engines(tiny41_dir)
    full = drive(pair[False][0], build(pair[False][1]))
    got = {
        mode: drive(engine, build(builder), aborts={0: 4, 2: 9}) for mode, (engine, builder) in pair.items()
    }
    for mode in MODES:
        assert got[mode][1] == full[1]  # the neighbour is untouched
        for i in (0, 2):
            tokens = got[mode][i]["tokens"].get(0, [])
            assert 0 < len(tokens) < 24 and tokens == full[i]["tokens"][0][: len(tokens)]
            assert got[mode][i]["finish"] == {}  # an aborted request reports nothing more
    assert pair[True][0].core.num_overlapped_steps > 0


def test_request_id_reused_while_its_aborted_step_is_in_flight(tiny41_dir: Path) -> None:
    engine, builder = make_engine(tiny41_dir, async_scheduling=True)
    core = engine.core
    msgs = [{"role": "user", "content": "Please describe the invoice."}]
    first = request(builder, msgs, [], SamplingParams(max_tokens=30, **GREEDY))
    alone, builder2 = make_engine(tiny41_dir, async_scheduling=False)
    other = request(builder2, [{"role": "user", "content": "Something else entirely."}], [],
                    SamplingParams(max_tokens=10, **GREEDY))  # fmt: skip
    expected = drive(alone, [other])[0]["tokens"][0]
    core.add_request(first)
    for _ in range(3):
        core.step()
    assert core.step_in_flight  # the next decode of `first` is on the device
    core.abort(first.request_id)
    # The same id again, for a different prompt, while the aborted request's step is in flight.
    reused = EngineRequest(first.request_id, other.prompt_token_ids, other.params, other.images)
    core.add_request(reused)
    tokens: list[int] = []
    finish = None
    while core.has_unfinished():
        for out in core.step():
            assert out.request_id == first.request_id
            for seq in out.seqs:
                tokens += seq.token_ids
                finish = seq.finish_reason or finish
    assert tokens == expected and finish == "length"
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("async_scheduling", MODES)
def test_failed_image_fails_alone(tiny41_dir: Path, async_scheduling: bool) -> None:
    """An image that cannot be encoded fails its request at launch; the step after it is not
    overlapped with it, and the neighbour finishes normally."""
    import torch

    engine, builder = make_engine(tiny41_dir, async_scheduling=async_scheduling)
    good = request(builder, [{"role": "user", "content": "fine"}], [], SamplingParams(max_tokens=6, **GREEDY))
    bad = request(
        builder,
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
        [noise_image(112, 112, 1)],
        SamplingParams(max_tokens=6, **GREEDY),
    )
    rows = bad.images[0].grid_thw[1] * bad.images[0].grid_thw[2]
    bad.images[0].pixels = None
    bad.images[0].pixel_values = torch.full((rows, 1176), float("nan"))
    bad.images[0].content_hash = "poisoned-async"
    res = drive(engine, [good, bad], arrivals=[0, 2])
    assert len(res[0]["tokens"][0]) == 6 and res[0]["finish"][0] == ("length", None)
    assert res[1]["error"] is not None and res[1]["finish"][0][0] == "error"


def test_device_benchmark_measures_batch1_decode_both_ways(tiny41_dir: Path) -> None:
    """The GPU benchmark's batch-1 decode measurement, run on the CPU: it switches the mode between
    runs, restores it, and both runs give the same tokens (its timings are not checked here)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "device_engine.py"
    spec = importlib.util.spec_from_file_location("device_engine_under_test", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    engine, builder = make_engine(tiny41_dir)
    msgs = [{"role": "user", "content": "Read the invoice aloud."}]

    def make(rid: str) -> EngineRequest:
        return builder.build(rid, msgs, [], SamplingParams(max_tokens=12, **GREEDY))

    ms_async, tokens_async = bench.decode_ms_per_token(engine, make, True)
    ms_sync, tokens_sync = bench.decode_ms_per_token(engine, make, False)
    assert len(tokens_async) == 12 and tokens_async == tokens_sync
    assert ms_async >= 0.0 and ms_sync >= 0.0
    assert engine.core.async_scheduling is False and not engine.core.step_in_flight  # the CPU's default
