"""The engine end to end on the tiny checkpoint: batching, caches, preemption, aborts, sampling."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmv.engine.engine import EngineConfig, LLMEngine
from glmv.engine.request import EngineRequest
from glmv.engine.sampling import SamplingParams
from glmv.processing.chat import ChatProcessor
from glmv.processing.image import ImageProcessor
from glmv.tasks.inputs import InputBuilder
from tests.models.reference import hf_inputs, hf_model, noise_image

_ids = itertools.count()


def make_engine(path: Path, **kw: Any) -> tuple[LLMEngine, InputBuilder]:
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", **kw))
    builder = InputBuilder(ChatProcessor(engine.tokenizer), ImageProcessor.from_pretrained(path))
    return engine, builder


def request(
    builder: InputBuilder, messages: list[dict[str, Any]], images: list[Any], params: SamplingParams
) -> EngineRequest:
    return builder.build(f"r{next(_ids)}", messages, builder.preprocess(images), params)


def run(engine: LLMEngine, reqs: list[EngineRequest]) -> dict[str, dict[str, Any]]:
    """Submit all, step to completion; per request: token ids and text of each choice, usage."""
    results: dict[str, dict[str, Any]] = {}
    for r in reqs:
        engine.add_request(r)
        results[r.request_id] = {"tokens": {}, "text": {}, "finish": {}, "cached": 0, "logprobs": {}}
    while engine.has_unfinished():
        for out in engine.step():
            res = results[out.request_id]
            res["cached"] = out.cached_tokens
            res["error"] = out.error
            for d in out.deltas:
                res["tokens"].setdefault(d.index, []).extend(d.token_ids)
                res["text"][d.index] = res["text"].get(d.index, "") + d.text
                if d.logprobs:
                    res["logprobs"].setdefault(d.index, []).extend(d.logprobs)
                if d.finish_reason:
                    res["finish"][d.index] = d.finish_reason
    return results


def mixed_conversations() -> list[tuple[list[dict[str, Any]], list[Any], int]]:
    """12 requests: text only, one image, two images; different lengths and max_tokens."""
    img = [noise_image(w, h, s) for s, (w, h) in enumerate([(300, 200), (90, 160), (224, 224), (448, 112)])]
    out = []
    for i in range(12):
        kind = i % 3
        text = "Please read this carefully. " * (1 + i % 4) + f"Question {i}: 发票总额？"
        if kind == 0:
            msgs = [{"role": "user", "content": text}]
            ims: list[Any] = []
        elif kind == 1:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            ims = [img[i % 4]]
        else:
            msgs = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}],
                }
            ]
            ims = [img[i % 4], img[(i + 1) % 4]]
        out.append((msgs, ims, 8 + 3 * i))
    return out


GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_batch_invariance_and_transformers(tiny41_dir: Path) -> None:
    engine, builder = make_engine(tiny41_dir, max_num_batched_tokens=512)
    convs = mixed_conversations()
    batch = [request(builder, m, i, SamplingParams(max_tokens=n, **GREEDY)) for m, i, n in convs]
    together = run(engine, batch)
    ref = hf_model(str(tiny41_dir))
    for (msgs, ims, n), req in zip(convs, batch, strict=True):
        alone_req = request(builder, msgs, ims, SamplingParams(max_tokens=n, **GREEDY))
        alone = run(engine, [alone_req])[alone_req.request_id]
        got = together[req.request_id]["tokens"][0]
        assert got == alone["tokens"][0]
        assert len(got) == n
        inputs = hf_inputs(tiny41_dir, msgs, ims)
        assert inputs["input_ids"][0].tolist() == req.prompt_token_ids
        with torch.no_grad():
            expected = ref.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0]
        assert got == expected[inputs["input_ids"].shape[1] :].tolist()
    assert engine.block_manager.num_used_blocks == 0


def test_prefix_cache_reuses_image_and_matches_uncached(tiny41_dir: Path) -> None:
    image = noise_image(448, 448, 7)
    turn1 = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What does this chart show?"}],
        }
    ]
    outs = {}
    for caching in (True, False):
        engine, builder = make_engine(tiny41_dir, enable_prefix_caching=caching)
        r1 = request(builder, turn1, [image], SamplingParams(max_tokens=12, **GREEDY))
        first = run(engine, [r1])[r1.request_id]
        answer = first["text"][0]
        turn2 = [
            *turn1,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And the trend?"},
        ]
        encoded_before = engine.images_encoded
        cache_hits_before = engine.encoder_cache.hits
        r2 = request(builder, turn2, [image], SamplingParams(max_tokens=12, **GREEDY))
        second = run(engine, [r2])[r2.request_id]
        outs[caching] = (first["tokens"][0], second["tokens"][0])
        image_tokens = r2.images[0].length
        if caching:
            assert image_tokens == 256
            assert second["cached"] >= image_tokens
            assert engine.images_encoded == encoded_before  # the vision tower did not run again
        else:
            # No KV reuse; the image embedding still comes from the encoder cache, not the tower.
            assert second["cached"] == 0
            assert engine.images_encoded == encoded_before
            assert engine.encoder_cache.hits == cache_hits_before + 1
        assert engine.block_manager.num_used_blocks == 0
    assert outs[True] == outs[False]


def test_preemption_keeps_outputs(tiny41_dir: Path) -> None:
    convs = mixed_conversations()[:6]
    params = [SamplingParams(max_tokens=40, **GREEDY) for _ in convs]
    roomy, builder = make_engine(tiny41_dir)
    expected = run(roomy, [request(builder, m, i, p) for (m, i, _), p in zip(convs, params, strict=True)])
    # Room for only ~2 sequences at a time: the scheduler must preempt and recompute.
    per_block = 2 * 2 * 16 * 2 * 32 * 4
    tight, builder = make_engine(tiny41_dir, kv_cache_gb=24 * per_block / 1024**3)
    reqs = [request(builder, m, i, p) for (m, i, _), p in zip(convs, params, strict=True)]
    got = run(tight, reqs)
    assert [got[r.request_id]["tokens"][0] for r in reqs] == [v["tokens"][0] for v in expected.values()]
    assert tight.block_manager.num_used_blocks == 0
    assert tight.scheduler.num_preemptions > 0


def test_seeded_sampling_is_batch_independent(tiny41_dir: Path) -> None:
    engine, builder = make_engine(tiny41_dir)
    msgs = [{"role": "user", "content": "Tell me a story about invoices."}]
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone_req = request(builder, msgs, [], seeded)
    alone = run(engine, [alone_req])[alone_req.request_id]["tokens"][0]
    others = [
        request(
            builder,
            [{"role": "user", "content": f"Other {i}"}],
            [],
            SamplingParams(max_tokens=15, temperature=1.0),
        )
        for i in range(5)
    ]
    again_req = request(builder, msgs, [], seeded)
    mixed = run(engine, [*others[:3], again_req, *others[3:]])
    assert mixed[again_req.request_id]["tokens"][0] == alone
    other_params = SamplingParams(
        max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=99, ignore_eos=True
    )
    other_seed = request(builder, msgs, [], other_params)
    assert run(engine, [other_seed])[other_seed.request_id]["tokens"][0] != alone


def test_n_choices_logprobs_and_stop_strings(tiny41_dir: Path) -> None:
    engine, builder = make_engine(tiny41_dir)
    msgs = [{"role": "user", "content": "Count for me."}]
    base = request(builder, msgs, [], SamplingParams(max_tokens=30, **GREEDY))
    text = run(engine, [base])[base.request_id]["text"][0]
    assert len(text) > 6
    stop = text[3:6]
    r = request(builder, msgs, [], SamplingParams(max_tokens=30, stop=[stop], **GREEDY))
    res = run(engine, [r])[r.request_id]
    assert res["text"][0] == text[: text.index(stop)]
    assert res["finish"][0] == "stop"

    r = request(
        builder,
        msgs,
        [],
        SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=5, logprobs=2, ignore_eos=True),
    )
    res = run(engine, [r])[r.request_id]
    assert sorted(res["tokens"]) == [0, 1, 2]
    assert len({tuple(t) for t in res["tokens"].values()}) > 1  # distinct samples per choice
    for i in range(3):
        assert len(res["tokens"][i]) == 10 and res["finish"][i] == "length"
        lps = res["logprobs"][i]
        assert len(lps) == 10
        for lp, tok in zip(lps, res["tokens"][i], strict=True):
            assert lp.token_id == tok and lp.logprob <= 0.0 and len(lp.top) == 2
            assert lp.top[0][2] >= lp.top[1][2]
            assert lp.top[0][2] >= lp.logprob - 1e-6
    assert engine.block_manager.num_used_blocks == 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    schedule=st.lists(
        st.tuples(st.integers(0, 3), st.integers(4, 40), st.booleans(), st.integers(0, 12)),
        min_size=1,
        max_size=8,
    )
)
def test_random_aborts_leave_nothing_behind(
    tiny41_dir: Path, schedule: list[tuple[int, int, bool, int]]
) -> None:
    engine, builder = _shared_engine(tiny41_dir)
    image = noise_image(112, 112, 3)
    pending: list[tuple[int, EngineRequest, int | None]] = []
    for arrival, max_tokens, with_image, abort_after in schedule:
        content: Any = (
            [{"type": "image"}, {"type": "text", "text": "hi"}] if with_image else "hello " * arrival
        )
        req = request(
            builder,
            [{"role": "user", "content": content}],
            [image] if with_image else [],
            SamplingParams(max_tokens=max_tokens, **GREEDY),
        )
        pending.append((arrival, req, abort_after if abort_after < max_tokens else None))
    step = 0
    added: list[tuple[EngineRequest, int | None, int]] = []
    while pending or engine.has_unfinished():
        for item in [p for p in pending if p[0] <= step]:
            engine.add_request(item[1])
            added.append((item[1], item[2], step))
            pending.remove(item)
        for req, abort_at, t0 in added:
            if abort_at is not None and step - t0 == abort_at:
                engine.abort(req.request_id)
        engine.step()
        step += 1
        assert step < 500
    bm = engine.block_manager
    assert bm.num_used_blocks == 0
    assert bm.num_free_blocks == bm.num_blocks
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0
    assert not engine.core._requests and not engine.core._seqs and len(engine.output_processor) == 0


_ENGINES: dict[str, tuple[LLMEngine, InputBuilder]] = {}


def _shared_engine(path: Path) -> tuple[LLMEngine, InputBuilder]:
    key = str(path)
    if key not in _ENGINES:
        per_block = 2 * 2 * 16 * 2 * 32 * 4
        _ENGINES[key] = make_engine(path, kv_cache_gb=120 * per_block / 1024**3, max_num_batched_tokens=128)
    return _ENGINES[key]


def test_bad_request_fails_alone(tiny41_dir: Path) -> None:
    engine, builder = make_engine(tiny41_dir)
    good = request(builder, [{"role": "user", "content": "fine"}], [], SamplingParams(max_tokens=5, **GREEDY))
    bad = request(
        builder,
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
        [noise_image(112, 112, 1)],
        SamplingParams(max_tokens=5, **GREEDY),
    )
    rows = bad.images[0].grid_thw[1] * bad.images[0].grid_thw[2]
    bad.images[0].pixels = None
    bad.images[0].pixel_values = torch.full((rows, 1176), float("nan"))
    bad.images[0].content_hash = "poisoned"
    res = run(engine, [good, bad])
    assert res[good.request_id]["finish"][0] == "length" and len(res[good.request_id]["tokens"][0]) == 5
    assert res[bad.request_id]["error"] is not None
    assert res[bad.request_id]["finish"][0] == "error"
    assert engine.block_manager.num_used_blocks == 0


def test_merge_outputs_joins_choices_in_order() -> None:
    from glmv.engine.async_engine import merge_outputs
    from glmv.engine.request import CompletionDelta, RequestOutput, TokenLogprob

    lp = TokenLogprob(1, "a", -0.5, [])
    a = RequestOutput(
        "r",
        [CompletionDelta(0, "he", [1], [lp]), CompletionDelta(1, "x", [7])],
        5,
        2,
        2,
        False,
        arrival_time=1.0,
        first_token_time=2.0,
    )
    b = RequestOutput(
        "r",
        [CompletionDelta(0, "llo", [2], [lp], "length"), CompletionDelta(1, "y", [8], None, "stop", 9)],
        5,
        2,
        4,
        True,
    )
    m = merge_outputs(a, b)
    assert [(d.index, d.text, d.token_ids, d.finish_reason, d.stop_reason) for d in m.deltas] == [
        (0, "hello", [1, 2], "length", None),
        (1, "xy", [7, 8], "stop", 9),
    ]
    assert m.deltas[0].logprobs == [lp, lp]
    assert (m.completion_tokens, m.finished, m.first_token_time, m.arrival_time) == (4, True, 2.0, 1.0)
    assert a.deltas[0].text == "he"  # inputs untouched


def test_padding_vocabulary_ids_are_never_sampled(tiny41_dir: Path) -> None:
    engine, builder = make_engine(tiny41_dir)
    vocab = engine.tokenizer.vocab_size
    assert engine.model.vocab_size > vocab  # the tiny model pads its embedding to a multiple of 64
    r = request(
        builder,
        [{"role": "user", "content": "hi"}],
        [],
        SamplingParams(n=4, max_tokens=64, temperature=2.0, seed=3, ignore_eos=True, logprobs=3),
    )
    res = run(engine, [r])[r.request_id]
    tokens = [t for i in range(4) for t in res["tokens"][i]]
    assert len(tokens) == 256 and max(tokens) < vocab
    assert all(alt[0] < vocab for i in range(4) for lp in res["logprobs"][i] for alt in lp.top)
