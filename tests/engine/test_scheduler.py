"""Scheduler: continuous batching, chunked prefill, preemption by recompute, finish reasons.

A deterministic fake model drives schedule/postprocess. It keeps a simulated KV cache: every token
it computes is written, as a digest of the sequence's whole prefix up to that position, into the
slot the block table gives; every chunk then checks that all positions it attends to hold exactly
its own prefix (so a wrong prefix-cache hit, a block shared while written, or a lost block fails).
The next token is a fixed function of (request id, choice index, position), so whole outputs can be
compared with a reference computed without any engine, under any memory pressure.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmv.engine.block_manager import BlockManager
from glmv.engine.config import EngineConfig
from glmv.engine.sampling import SamplingParams
from glmv.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from glmv.engine.sequence import ImageSpan, Sequence, SequenceStatus
from glmv.errors import ConfigError, ContextLengthExceededError, InvalidRequestError, OverloadedError

EOS = 2
IMG = 99


def next_token(seq: Sequence, position: int) -> int:
    """The fake model's token at `position` (the number of tokens before it)."""
    h = zlib.crc32(f"{seq.request_id}/{seq.index}/{position}".encode())
    return EOS if h % 7 == 0 else 1000 + h % 500


def reference_output(seq: Sequence, max_seq_len: int) -> tuple[list[int], str, int | None]:
    """What the sequence must generate, computed without an engine."""
    params = seq.params
    tokens = seq.prompt_token_ids
    out: list[int] = []
    while True:
        tok = next_token(seq, len(tokens))
        tokens.append(tok)
        out.append(tok)
        if len(out) >= params.min_tokens:
            if not params.ignore_eos and tok in seq.eos_token_ids:
                return out, "stop", None
            if tok in params.stop_token_ids:
                return out, "stop", tok
        if params.max_tokens is not None and len(out) >= params.max_tokens:
            return out, "length", None
        if len(tokens) >= max_seq_len:
            return out, "length", None


class FakeModel:
    def __init__(self, bm: BlockManager) -> None:
        self.bs = bm.block_size
        self.kv: list[int | None] = [None] * (bm.num_blocks * bm.block_size)
        self._digests: dict[int, list[int]] = {}

    def slot(self, seq: Sequence, p: int) -> int:
        return seq.block_table[p // self.bs] * self.bs + p % self.bs

    def digest(self, seq: Sequence, p: int) -> int:
        """Hash of everything up to and including position p (tokens and image identity)."""
        digests = self._digests.setdefault(seq.seq_id, [])
        while len(digests) <= p:
            q = len(digests)
            image = next(((s.content_hash, q - s.offset) for s in seq.images if s.offset <= q < s.end), None)
            digests.append(hash((digests[-1] if digests else 0, seq.token_ids[q], image)))
        return digests[p]

    def step(self, out: SchedulerOutput) -> dict[int, int]:
        written: set[int] = set()
        for chunk in out.chunks:
            seq = chunk.seq
            assert chunk.start == seq.num_computed_tokens
            assert chunk.num_tokens >= 1 and chunk.end <= seq.num_tokens
            assert len(seq.block_table) * self.bs >= chunk.end
            for p in range(chunk.start, chunk.end):
                s = self.slot(seq, p)
                assert s not in written, "two tokens written to one slot in a step"
                written.add(s)
                self.kv[s] = self.digest(seq, p)
        sampled: dict[int, int] = {}
        for chunk in out.chunks:
            seq = chunk.seq
            for p in range(chunk.end):
                assert self.kv[self.slot(seq, p)] == self.digest(seq, p), f"bad KV at {p} of {seq!r}"
            if chunk.samples:
                sampled[seq.seq_id] = next_token(seq, chunk.end)
        return sampled


def check_step(sched: Scheduler, out: SchedulerOutput, running_before: list[Sequence]) -> None:
    cfg = sched.config
    assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks)
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.chunks) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    assert len({c.seq.seq_id for c in out.chunks}) == len(out.chunks)
    scheduled = {c.seq.seq_id for c in out.chunks}
    for seq in sched.running:
        if seq.num_uncomputed_tokens == 1:
            assert seq.seq_id in scheduled, f"running decode {seq!r} left out of the step"
    if out.preempted:
        # Victims come from the tail of the running list (most recently admitted first), and
        # nothing new is admitted in a step that had to preempt.
        assert out.preempted == running_before[::-1][: len(out.preempted)]
        before = {s.seq_id for s in running_before}
        assert scheduled <= before
    for seq in out.preempted:
        assert seq.status is SequenceStatus.WAITING and not seq.block_table and seq.num_computed_tokens == 0
        assert seq.seq_id not in scheduled


@dataclass
class Driver:
    sched: Scheduler
    model: FakeModel
    steps: int = 0
    outputs: list[SchedulerOutput] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)

    def step(self, sampled_override: dict[int, int] | None = None) -> SchedulerOutput:
        running_before = list(self.sched.running)
        out = self.sched.schedule()
        check_step(self.sched, out, running_before)
        sampled = self.model.step(out)
        if sampled_override is not None:
            sampled = {k: sampled_override.get(k, v) for k, v in sampled.items()}
        self.finished += self.sched.postprocess(out, sampled)
        self.sched.block_manager.check_consistency()
        self.outputs.append(out)
        self.steps += 1
        return out

    def run(
        self,
        arrivals: dict[int, list[list[Sequence]]] | None = None,
        aborts: dict[int, list[str]] | None = None,
        max_steps: int = 20_000,
        on_step: Callable[[int, SchedulerOutput], None] | None = None,
    ) -> None:
        arrivals = arrivals or {}
        aborts = aborts or {}
        last = max([*arrivals, *aborts], default=-1)
        step = 0
        while self.sched.has_unfinished or step <= last:
            for group in arrivals.get(step, []):
                self.sched.add(group)
            for rid in aborts.get(step, []):
                self.sched.abort(rid)
            out = self.step()
            if on_step is not None:
                on_step(step, out)
            step += 1
            assert step < max_steps, "did not finish"


def limits(**config: Any) -> EngineConfig:
    """The scheduler's limits come from the engine's one config object."""
    return EngineConfig(model="unused", **config)


def make_driver(
    num_blocks: int = 256,
    block_size: int = 4,
    caching: bool = True,
    **config: int | bool,
) -> Driver:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    sched = Scheduler(limits(**config), bm)  # type: ignore[arg-type]
    return Driver(sched, FakeModel(bm))


def request(
    rid: str,
    prompt: list[int],
    n: int = 1,
    eos: bool = True,
    images: tuple[ImageSpan, ...] = (),
    **params: object,
) -> list[Sequence]:
    sp = SamplingParams(n=n, **params)  # type: ignore[arg-type]
    return [
        Sequence(rid, prompt, sp, index=i, images=images, eos_token_ids=[EOS] if eos else [])
        for i in range(n)
    ]


def assert_reference(seqs: list[Sequence], max_seq_len: int) -> None:
    for seq in seqs:
        out, reason, stop_reason = reference_output(seq, max_seq_len)
        assert seq.is_finished
        assert seq.output_token_ids == out, seq
        assert (seq.finish_reason, seq.stop_reason) == (reason, stop_reason)


def assert_drained(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert not sched.has_unfinished and sched.num_running == 0 and sched.num_waiting == 0
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    bm.check_consistency()


# --- configuration and admission ------------------------------------------------------------------


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        limits(max_num_seqs=0)
    with pytest.raises(ConfigError):
        limits(max_waiting=-1)
    # No more sequences run than the budget has tokens, so every one decodes in every step.
    assert (
        Scheduler(limits(max_num_seqs=16, max_num_batched_tokens=8), BlockManager(8)).max_running
        == 8
    )
    with pytest.raises(ConfigError):
        Scheduler(
            limits(max_num_batched_tokens=512, max_model_len=1024, enable_chunked_prefill=False),
            BlockManager(1024, 16),
        )
    # Without chunking the budget only has to cover what the KV cache can hold.
    sched = Scheduler(
        limits(max_num_batched_tokens=64, max_model_len=1024, enable_chunked_prefill=False),
        BlockManager(4, 16),
    )
    assert sched.max_seq_len == 64


def test_prompt_that_can_never_fit_is_rejected() -> None:
    d = make_driver(num_blocks=8, block_size=4, max_model_len=20, max_num_batched_tokens=64)
    with pytest.raises(ContextLengthExceededError) as info:
        d.sched.add(request("long", [5] * 21))
    assert info.value.status_code == 400 and "20" in info.value.message
    d2 = make_driver(num_blocks=4, block_size=4, max_model_len=100, max_num_batched_tokens=64)
    with pytest.raises(ContextLengthExceededError):
        d2.sched.add(request("big", [5] * 17))  # 16 slots in the whole cache
    assert not d.sched.has_unfinished and not d2.sched.has_unfinished
    # A prompt of exactly the context length still gets one token, then stops for length.
    d.sched.add(request("edge", [5] * 20, eos=False))
    d.run()
    (seq,) = d.finished
    assert seq.num_output_tokens == 1 and seq.finish_reason == "length"


def test_waiting_queue_bound_raises_overloaded_and_adds_nothing() -> None:
    d = make_driver(max_waiting=3, max_num_seqs=1, max_num_batched_tokens=8)
    d.sched.add(request("a", [5, 6], n=2))
    with pytest.raises(OverloadedError) as info:
        d.sched.add(request("b", [5, 6], n=2))
    assert info.value.status_code == 503 and info.value.retry_after > 0
    assert d.sched.num_waiting == 2 and d.sched.get_request("b") == []
    d.sched.add(request("c", [7]))
    assert d.sched.num_waiting == 3
    with pytest.raises(OverloadedError):
        d.sched.add(request("d", [8]))
    d.step()  # one admitted (max_num_seqs=1): room for one more
    d.sched.add(request("d", [8]))
    d.run()
    assert_drained(d.sched)


def test_n_greater_than_one_is_added_atomically_and_ids_checked() -> None:
    d = make_driver()
    seqs = request("multi", [5, 6, 7], n=3, eos=False, max_tokens=5)
    d.sched.add(seqs)
    assert d.sched.num_waiting == 3
    assert [s.index for s in d.sched.get_request("multi")] == [0, 1, 2]
    with pytest.raises(InvalidRequestError):
        d.sched.add(request("multi", [1]))
    with pytest.raises(ValueError):
        d.sched.add(request("x", [1]) + request("y", [1]))
    d.run()
    assert_reference(seqs, d.sched.max_seq_len)
    assert len({tuple(s.output_token_ids) for s in seqs}) == 3  # choices differ
    assert d.sched.get_request("multi") == []
    # Once finished, the id may be used again.
    d.sched.add(request("multi", [1]))
    d.run()
    assert_drained(d.sched)


# --- finish reasons ---------------------------------------------------------------------------------


def scripted(d: Driver, seq: Sequence, tokens: list[int]) -> None:
    """Feed `tokens` as the sampled outputs of `seq`, one step each, while it runs."""
    for tok in tokens:
        if seq.is_finished:
            return
        d.step({seq.seq_id: tok})


@pytest.mark.parametrize(
    ("params", "eos", "tokens", "outputs", "reason", "stop_reason"),
    [
        ({}, True, [10, EOS, 11], [10, EOS], "stop", None),
        ({"ignore_eos": True, "max_tokens": 3}, True, [EOS, EOS, EOS, EOS], [EOS, EOS, EOS], "length", None),
        ({}, False, [EOS, 10, 11, 12], [EOS, 10, 11, 12], None, None),
        ({"stop_token_ids": [77]}, True, [10, 77, 11], [10, 77], "stop", 77),
        ({"stop_token_ids": [77], "ignore_eos": True}, True, [EOS, 77], [EOS, 77], "stop", 77),
        ({"min_tokens": 2}, True, [EOS, EOS], [EOS, EOS], "stop", None),
        ({"min_tokens": 3, "stop_token_ids": [77]}, True, [77, EOS, 77], [77, EOS, 77], "stop", 77),
        ({"max_tokens": 2}, True, [10, 11, 12], [10, 11], "length", None),
        ({"max_tokens": 2}, True, [10, EOS], [10, EOS], "stop", None),  # the model did stop
        ({"max_tokens": 1}, True, [10], [10], "length", None),
    ],
)
def test_finish_reasons(
    params: dict,
    eos: bool,
    tokens: list[int],
    outputs: list[int],
    reason: str | None,
    stop_reason: int | None,
) -> None:
    d = make_driver()
    (seq,) = request("r", [5, 6, 7], eos=eos, **params)
    d.sched.add([seq])
    scripted(d, seq, tokens)
    assert seq.output_token_ids == outputs
    assert seq.finish_reason == reason and seq.stop_reason == stop_reason
    if reason is None:
        assert seq.status is SequenceStatus.RUNNING
    else:
        assert seq.is_finished and d.finished == [seq] and seq.block_table == []
        assert_drained(d.sched)


def test_max_model_len_finishes_with_length() -> None:
    d = make_driver(max_model_len=8, max_num_batched_tokens=64)
    (seq,) = request("r", [5, 6, 7, 8, 9], eos=False)
    d.sched.add([seq])
    d.run()
    assert seq.num_tokens == 8 and seq.num_output_tokens == 3 and seq.finish_reason == "length"


def test_kv_capacity_caps_length_when_smaller_than_context() -> None:
    d = make_driver(num_blocks=3, block_size=4, max_model_len=100, max_num_batched_tokens=64)
    assert d.sched.max_seq_len == 12
    (seq,) = request("r", [5, 6, 7], eos=False)
    d.sched.add([seq])
    d.run()
    assert seq.num_tokens == 12 and seq.finish_reason == "length"
    assert_drained(d.sched)


def test_engine_finish_for_stop_string() -> None:
    d = make_driver()
    (seq,) = request("r", [5, 6, 7], eos=False)
    d.sched.add([seq])
    d.step()
    d.step()
    assert d.sched.block_manager.num_used_blocks > 0
    d.sched.finish(seq, "stop", "###")
    assert seq.is_finished and (seq.finish_reason, seq.stop_reason) == ("stop", "###")
    d.sched.finish(seq, "error")  # no-op once finished
    assert seq.finish_reason == "stop"
    assert_drained(d.sched)


def test_missing_sampled_token_finishes_with_error() -> None:
    d = make_driver()
    (a,) = request("a", [5, 6, 7])
    (b,) = request("b", [5, 6, 8], eos=False, max_tokens=3)
    d.sched.add([a])
    d.sched.add([b])
    out = d.sched.schedule()
    sampled = d.model.step(out)
    del sampled[a.seq_id]
    finished = d.sched.postprocess(out, sampled)
    assert finished == [a] and a.finish_reason == "error"
    d.run()
    assert b.finish_reason == "length" and b.num_output_tokens == 3
    assert_drained(d.sched)


# --- abort --------------------------------------------------------------------------------------------


def test_abort_from_waiting() -> None:
    d = make_driver(max_num_seqs=1, max_num_batched_tokens=8)
    a = request("a", [5, 6, 7], eos=False, max_tokens=4)
    b = request("b", [5, 6, 8], n=2)
    d.sched.add(a)
    d.sched.add(b)
    d.step()
    assert d.sched.num_waiting == 2
    aborted = d.sched.abort("b")
    assert aborted == b
    assert all(s.is_finished and s.finish_reason == "abort" and s.block_table == [] for s in b)
    assert d.sched.num_waiting == 0 and d.sched.get_seq(b[0].seq_id) is None
    assert d.sched.abort("b") == [] and d.sched.abort("unknown") == []
    d.run()
    assert_reference(a, d.sched.max_seq_len)
    assert_drained(d.sched)


def test_abort_during_chunked_prefill_and_decode() -> None:
    d = make_driver(max_num_batched_tokens=8, max_num_seqs=4)
    long = request("long", list(range(10, 40)))
    dec = request("dec", [5, 6], n=2, eos=False)
    d.sched.add(dec)
    d.step()
    d.sched.add(long)
    d.step()
    assert long[0].status is SequenceStatus.RUNNING and 0 < long[0].num_computed_tokens < 30
    used = d.sched.block_manager.num_used_blocks
    assert d.sched.abort("long") == long
    assert d.sched.block_manager.num_used_blocks < used
    d.step()
    d.step()
    assert all(s.status is SequenceStatus.RUNNING and s.num_output_tokens == 4 for s in dec)
    assert d.sched.abort("dec") == dec
    assert [s.finish_reason for s in dec] == ["abort", "abort"]
    assert_drained(d.sched)


def test_abort_between_schedule_and_postprocess() -> None:
    d = make_driver()
    a = request("a", [5, 6, 7], eos=False, max_tokens=3)
    b = request("b", [5, 6, 8], eos=False, max_tokens=3)
    d.sched.add(a)
    d.sched.add(b)
    out = d.sched.schedule()
    sampled = d.model.step(out)
    d.sched.abort("a")
    finished = d.sched.postprocess(out, sampled)
    assert finished == []
    assert a[0].output_token_ids == [] and a[0].finish_reason == "abort"
    assert b[0].num_output_tokens == 1
    d.run()
    assert_reference(b, d.sched.max_seq_len)
    assert_drained(d.sched)


# --- batching policy ------------------------------------------------------------------------------------


def test_token_budget_and_max_num_seqs_respected() -> None:
    d = make_driver(max_num_batched_tokens=20, max_num_seqs=3)
    reqs = [request(f"r{i}", list(range(3, 3 + 5 + 3 * i)), max_tokens=6) for i in range(10)]
    for r in reqs:
        d.sched.add(r)
    d.run()
    assert max(o.num_batched_tokens for o in d.outputs) == 20
    assert max(len(o.chunks) for o in d.outputs) == 3
    assert_reference([s for r in reqs for s in r], d.sched.max_seq_len)
    assert_drained(d.sched)


def test_fcfs_admission_order() -> None:
    d = make_driver(max_num_batched_tokens=16, max_num_seqs=2)
    reqs = [request(f"r{i}", [3 + i] * (3 + (7 * i) % 5), eos=False, max_tokens=1 + i % 3) for i in range(8)]
    for r in reqs:
        d.sched.add(r)
    admitted: list[str] = []
    for out in iter(lambda: d.step(), None):
        admitted += [
            c.seq.request_id for c in out.chunks if c.start == 0 and c.seq.request_id not in admitted
        ]
        if not d.sched.has_unfinished:
            break
    assert admitted == [f"r{i}" for i in range(8)]


def test_long_prompt_is_chunked_while_decodes_keep_going() -> None:
    d = make_driver(
        num_blocks=1024, block_size=16, max_num_batched_tokens=512, max_num_seqs=8, max_model_len=8192
    )
    decodes = [request(f"d{i}", [5 + i] * 10, eos=False, max_tokens=60) for i in range(3)]
    for r in decodes:
        d.sched.add(r)
    d.step()
    d.step()
    assert all(r[0].num_output_tokens == 2 for r in decodes)
    (long,) = request("long", [(7 * i) % 300 + 3 for i in range(6000)], eos=False, max_tokens=5)
    d.sched.add([long])
    long_chunks: list[int] = []
    while long.num_output_tokens == 0:
        before = [r[0].num_output_tokens for r in decodes]
        out = d.step()
        by_seq = {c.seq.seq_id: c for c in out.chunks}
        # Every step: the three decodes get one token each, the prompt gets the rest of the budget.
        assert all(by_seq[r[0].seq_id].num_tokens == 1 for r in decodes)
        assert [r[0].num_output_tokens for r in decodes] == [b + 1 for b in before]
        long_chunks.append(by_seq[long.seq_id].num_tokens)
        assert out.num_batched_tokens == 3 + long_chunks[-1]
    assert long_chunks == [509] * 11 + [6000 - 11 * 509]
    assert out.chunks[-1].samples and not any(o.preempted for o in d.outputs)
    d.run()
    assert_reference([long] + [r[0] for r in decodes], d.sched.max_seq_len)
    assert_drained(d.sched)


def test_head_of_queue_blocks_smaller_requests_no_skipping() -> None:
    d = make_driver(num_blocks=8, block_size=4, max_num_batched_tokens=64, caching=False)
    (hog,) = request("hog", list(range(3, 23)), eos=False, max_tokens=3)  # 20 tokens: 5-6 blocks
    d.sched.add([hog])
    d.step()
    (big,) = request("big", list(range(40, 56)), eos=False, max_tokens=2)  # 16 tokens: 4 blocks
    (small,) = request("small", [60, 61], eos=False, max_tokens=2)  # would fit now
    d.sched.add([big])
    d.sched.add([small])
    d.step()
    assert big.status is SequenceStatus.WAITING and small.status is SequenceStatus.WAITING
    assert list(d.sched.waiting) == [big, small]
    d.run()
    first_step = {
        rid: next(i for i, o in enumerate(d.outputs) if any(c.seq.request_id == rid for c in o.chunks))
        for rid in ("hog", "big", "small")
    }
    assert first_step["hog"] < first_step["big"] <= first_step["small"]
    assert_reference([hog, big, small], d.sched.max_seq_len)


def test_chunked_prefill_disabled_schedules_whole_prompts() -> None:
    d = make_driver(max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=False)
    (a,) = request("a", [5] * 20, eos=False, max_tokens=3)
    (b,) = request("b", [6] * 20, eos=False, max_tokens=3)
    d.sched.add([a])
    d.sched.add([b])
    out = d.step()
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 0, 20)]
    out = d.step()
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 20)]
    d.run()
    assert_reference([a, b], d.sched.max_seq_len)


# --- preemption ----------------------------------------------------------------------------------------


def test_preemption_picks_the_most_recent_and_it_reprefills() -> None:
    d = make_driver(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    (a,) = request("a", [5] * 7, eos=False, max_tokens=10)
    (b,) = request("b", [6] * 7, eos=False, max_tokens=6)
    d.sched.add([a])
    d.sched.add([b])
    d.step()  # both prompts: 2 blocks each, pool full
    d.step()  # position 7 fits in block 1 for both
    out = d.step()  # a needs a third block: b (admitted last) is preempted
    assert out.preempted == [b] and [c.seq for c in out.chunks] == [a]
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1 and d.sched.num_preemptions == 1
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert list(d.sched.waiting) == [b]
    assert b.num_output_tokens == 2
    d.run()
    # b came back and re-prefilled prompt + its outputs, then continued.
    reprefill = next(c for o in d.outputs[3:] for c in o.chunks if c.seq is b)
    assert reprefill.samples and reprefill.end == 9 and reprefill.start % 4 == 0
    assert_reference([a, b], d.sched.max_seq_len)
    assert_drained(d.sched)


def test_last_running_sequence_preempts_itself() -> None:
    d = make_driver(num_blocks=4, block_size=4, max_num_batched_tokens=64, caching=False)
    (a,) = request("a", [5] * 6, eos=False, max_tokens=3)
    (b,) = request("b", [6] * 7, eos=False, max_tokens=3)
    d.sched.add([a])
    d.sched.add([b])
    d.step()
    d.step()  # a: 8 tokens, 7 computed; b: 9 tokens, 8 computed
    out = d.step()  # b needs a third block, nobody behind it: it preempts itself
    assert out.preempted == [b] and [c.seq for c in out.chunks] == [a]
    d.run()
    assert_reference([a, b], d.sched.max_seq_len)
    assert_drained(d.sched)


def test_prefill_chunk_shrinks_before_preempting() -> None:
    d = make_driver(num_blocks=6, block_size=4, max_num_batched_tokens=64, caching=False)
    (dec,) = request("dec", [5] * 3, eos=False, max_tokens=4)
    d.sched.add([dec])
    (p,) = request("p", list(range(10, 30)), eos=False, max_tokens=1)  # 20 tokens
    d.sched.add([p])
    out = d.step()  # dec: 1 block; p: 5 blocks, pool full
    assert [c.num_tokens for c in out.chunks] == [3, 20]
    d.run()
    assert_reference([dec, p], d.sched.max_seq_len)


def test_prefill_yields_blocks_to_decodes_behind_it() -> None:
    bm = BlockManager(4, 4, enable_prefix_caching=False)
    sched = Scheduler(limits(max_num_batched_tokens=64), bm)
    (p,) = request("p", list(range(10, 26)), eos=False)
    (d,) = request("d", [5, 6, 7, 8], eos=False)
    sched.add([p])
    sched.add([d])
    # White-box state: p (admitted first) is half-way through its prompt with 2 blocks; d decodes
    # behind it and its next token starts a new block. One block is free.
    sched.waiting.clear()
    bm.allocate(p, 8)
    p.num_computed_tokens = 8
    bm.allocate(d, 4)
    d.num_computed_tokens = 4
    d.append_token(9)
    for seq in (p, d):
        seq.status = SequenceStatus.RUNNING
        sched.running.append(seq)
    assert bm.num_free_blocks == 1
    out = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("d", 1)]
    assert out.preempted == []
    assert sched.abort("p") == [p] and sched.abort("d") == [d]
    assert_drained(sched)


def workload(num_requests: int = 16) -> dict[int, list[list[Sequence]]]:
    system = [(3 * i) % 40 + 3 for i in range(13)]
    arrivals: dict[int, list[list[Sequence]]] = {}
    for i in range(num_requests):
        tail = [(5 * i + j) % 50 + 3 for j in range(1 + (3 * i) % 9)]
        images: tuple[ImageSpan, ...] = ()
        prompt = system + tail
        if i % 3 == 0:
            images = (ImageSpan(len(prompt), 6, "img-a" if i % 2 else "img-b"),)
            prompt = prompt + [IMG] * 6 + tail[:2]
        arrivals.setdefault(i // 3, []).append(
            request(
                f"w{i}",
                prompt,
                n=1 + (i % 4 == 1),
                images=images,
                ignore_eos=i % 5 == 0,
                max_tokens=4 + i % 9,
            )
        )
    return arrivals


@pytest.mark.parametrize(
    ("num_blocks", "caching", "budget", "chunked"),
    [
        (512, True, 64, True),
        (24, True, 64, True),
        (16, False, 16, True),
        (20, True, 64, False),
        (512, False, 8, True),
    ],
)
def test_outputs_identical_under_memory_pressure_and_caching(
    num_blocks: int, caching: bool, budget: int, chunked: bool
) -> None:
    d = make_driver(
        num_blocks=num_blocks,
        block_size=4,
        caching=caching,
        max_model_len=64,
        max_num_batched_tokens=max(budget, 64) if not chunked else budget,
        max_num_seqs=8,
        enable_chunked_prefill=chunked,
    )
    arrivals = workload()
    d.run(arrivals)
    seqs = [s for group in arrivals.values() for r in group for s in r]
    assert_reference(seqs, 64)
    assert_drained(d.sched)
    bm = d.sched.block_manager
    if num_blocks < 100:
        assert d.sched.num_preemptions > 0
    else:
        assert d.sched.num_preemptions == 0
    if caching:
        assert bm.prefix_cache_hits > 0
        assert any(s.num_cached_tokens > 0 for s in seqs)
    else:
        assert bm.prefix_cache_hits == 0 and all(s.num_cached_tokens == 0 for s in seqs)


def test_cached_prefix_is_not_recomputed() -> None:
    d = make_driver(block_size=4)
    prompt = list(range(3, 23))  # 20 tokens
    (a,) = request("a", prompt, eos=False, max_tokens=2)
    d.sched.add([a])
    d.run()
    (b,) = request("b", [*prompt[:18], 70, 71], eos=False, max_tokens=2)
    d.sched.add([b])
    out = d.step()
    (chunk,) = out.chunks
    assert (chunk.start, chunk.num_tokens) == (16, 4)
    assert b.num_cached_tokens == 16
    (c,) = request("c", prompt, eos=False, max_tokens=2)  # identical prompt: last block recomputed
    d.sched.add([c])
    out = d.step()
    assert [(ch.seq.request_id, ch.start, ch.num_tokens) for ch in out.chunks] == [("b", 20, 1), ("c", 16, 4)]
    d.run()
    assert_reference([a, b, c], d.sched.max_seq_len)


def test_scheduled_chunk_samples_is_fixed_at_creation() -> None:
    (seq,) = request("r", [5, 6, 7])
    chunk = ScheduledChunk(seq, 0, 3)
    partial = ScheduledChunk(seq, 0, 2)
    seq.append_token(9)
    assert chunk.samples and not partial.samples
    assert chunk.end == 3 and partial.is_prefill
    assert SchedulerOutput([], [], 0).is_empty


# --- property test over random workloads ---------------------------------------------------------------


@dataclass
class RandomRequest:
    arrival: int
    prompt: list[int]
    n: int
    max_tokens: int | None
    min_tokens: int
    eos: bool
    ignore_eos: bool
    abort_at: int | None
    image: tuple[int, int, str] | None


@st.composite
def random_requests(draw: st.DrawFn, prefixes: list[list[int]]) -> RandomRequest:
    prefix = draw(st.sampled_from(prefixes))
    suffix = draw(st.lists(st.integers(3, 12), min_size=1, max_size=10))
    prompt = prefix + suffix
    image = None
    if draw(st.booleans()):
        offset = draw(st.integers(0, len(prompt) - 1))
        length = draw(st.integers(1, len(prompt) - offset))
        prompt[offset : offset + length] = [IMG] * length
        image = (offset, length, draw(st.sampled_from(["cat", "dog"])))
    max_tokens = draw(st.none() | st.integers(1, 12))
    return RandomRequest(
        arrival=draw(st.integers(0, 25)),
        prompt=prompt,
        n=draw(st.integers(1, 3)),
        max_tokens=max_tokens,
        min_tokens=draw(st.integers(0, min(3, max_tokens or 3))),
        eos=draw(st.booleans()),
        ignore_eos=draw(st.booleans()),
        abort_at=draw(st.none() | st.integers(0, 40)),
        image=image,
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict, list[RandomRequest]]:
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    num_blocks = draw(st.integers(3, 40))
    max_model_len = draw(st.integers(4, 80))
    max_num_seqs = draw(st.integers(1, 6))
    chunked = draw(st.booleans())
    budget = draw(st.integers(max_num_seqs, 48))
    if not chunked:
        budget = max(budget, min(max_model_len, num_blocks * block_size))
    config = {
        "num_blocks": num_blocks,
        "block_size": block_size,
        "caching": draw(st.booleans()),
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": budget,
        "max_waiting": draw(st.integers(1, 16)),
        "enable_chunked_prefill": chunked,
    }
    prefixes = [draw(st.lists(st.integers(3, 12), max_size=24)) for _ in range(3)]
    reqs = draw(st.lists(random_requests(prefixes), max_size=10))
    return config, reqs


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_workloads_always_drain(scenario: tuple[dict, list[RandomRequest]]) -> None:
    config, reqs = scenario
    d = make_driver(**config)
    sched = d.sched
    accepted: dict[str, list[Sequence]] = {}
    arrivals: dict[int, list[tuple[str, RandomRequest]]] = {}
    aborts: dict[int, list[str]] = {}
    for i, r in enumerate(reqs):
        arrivals.setdefault(r.arrival, []).append((f"r{i}", r))
        if r.abort_at is not None:
            aborts.setdefault(r.abort_at, []).append(f"r{i}")
    last = max([*arrivals, *aborts], default=-1)
    capacity = config["num_blocks"] * config["block_size"]
    step = 0
    while sched.has_unfinished or step <= last:
        for rid, r in arrivals.get(step, []):
            images = (ImageSpan(r.image[0], r.image[1], r.image[2]),) if r.image else ()
            seqs = request(
                rid,
                r.prompt,
                n=r.n,
                eos=r.eos,
                images=images,
                max_tokens=r.max_tokens,
                min_tokens=r.min_tokens,
                ignore_eos=r.ignore_eos,
            )
            too_long = len(r.prompt) > min(config["max_model_len"], capacity)
            waiting_before = sched.num_waiting
            try:
                sched.add(seqs)
            except ContextLengthExceededError:
                assert too_long
            except OverloadedError:
                assert not too_long and waiting_before + r.n > config["max_waiting"]
                assert sched.num_waiting == waiting_before
            else:
                assert not too_long
                accepted[rid] = seqs
        for rid in aborts.get(step, []):
            aborted = sched.abort(rid)
            assert all(s.finish_reason == "abort" for s in aborted)
        d.step()
        step += 1
        assert step < 5000, "scheduler did not make progress"

    assert_drained(sched)
    assert sched.block_manager.num_free_blocks + sched.block_manager.num_used_blocks == config["num_blocks"]
    for seqs in accepted.values():
        for seq in seqs:
            assert seq.is_finished and seq.block_table == []
            out, reason, stop_reason = reference_output(seq, sched.max_seq_len)
            if seq.finish_reason == "abort":
                assert seq.output_token_ids == out[: seq.num_output_tokens]
            else:
                assert (seq.output_token_ids, seq.finish_reason, seq.stop_reason) == (
                    out,
                    reason,
                    stop_reason,
                )
