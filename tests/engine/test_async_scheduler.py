"""Scheduler under asynchronous scheduling: step N+1 is scheduled before step N's results are applied.

The fake model of `test_scheduler` runs here the way the engine runs the real one: a step is
launched (KV written, tokens sampled) before the previous step is postprocessed, so a decode's
input can be a placeholder whose id only the model knows (it takes it from the tokens it sampled
in the step before, as the runner does on the device). The checks: the placeholder accounting
(in-flight tokens, placeholders, where chunks start), the KV content every chunk attends to, that
sequences finishing in step N never emit the extra token of step N+1 and free their blocks, that a
sequence preempted while its step runs keeps that step's token, and that every output equals the
reference computed without an engine (so equals the synchronous loop's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from glmv.engine.block_manager import BlockManager
from glmv.engine.scheduler import Scheduler, SchedulerOutput
from glmv.engine.sequence import ImageSpan, Sequence, SequenceStatus
from glmv.errors import ContextLengthExceededError, OverloadedError
from tests.engine.test_scheduler import (
    EOS,
    FakeModel,
    RandomRequest,
    assert_drained,
    assert_reference,
    limits,
    next_token,
    reference_output,
    request,
    scenarios,
    workload,
)


class DeviceFakeModel(FakeModel):
    """`FakeModel` whose steps are launched before the previous one is applied."""

    def __init__(self, bm: BlockManager) -> None:
        super().__init__(bm)
        self.last_sampled: dict[int, int] = {}  # seq_id -> token of the step launched last
        self.placeholder_inputs = 0

    def token(self, seq: Sequence, q: int) -> int:
        if q < seq.num_tokens:
            return seq.token_ids[q]
        assert q == seq.num_tokens, f"position {q} of {seq!r} is more than one token ahead"
        return self.last_sampled[seq.seq_id]

    def digest(self, seq: Sequence, p: int) -> int:
        digests = self._digests.setdefault(seq.seq_id, [])
        while len(digests) <= p:
            q = len(digests)
            image = next(((s.content_hash, q - s.offset) for s in seq.images if s.offset <= q < s.end), None)
            digests.append(hash((digests[-1] if digests else 0, self.token(seq, q), image)))
        return digests[p]

    def launch(self, out: SchedulerOutput) -> dict[int, int]:
        written: set[int] = set()
        for chunk in out.chunks:
            seq = chunk.seq
            assert chunk.end == seq.num_scheduled_tokens, "a chunk must continue after the in-flight tokens"
            assert chunk.end <= seq.num_tokens + seq.num_placeholders
            assert len(seq.block_table) * self.bs >= chunk.end
            for p in range(chunk.start, chunk.end):
                if p >= seq.num_tokens:
                    self.placeholder_inputs += 1
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
        self.last_sampled = dict(sampled)
        return sampled


def check_async_step(sched: Scheduler, out: SchedulerOutput, running_before: list[Sequence]) -> None:
    cfg = sched.config
    assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks) <= cfg.max_num_batched_tokens
    assert len({c.seq.seq_id for c in out.chunks}) == len(out.chunks)
    assert sched.num_running <= cfg.max_num_seqs
    scheduled = {c.seq.seq_id for c in out.chunks}
    for seq in sched.running:
        assert 0 <= seq.num_placeholders <= 2 and seq.num_inflight_tokens >= 0
        if seq.num_unscheduled_tokens == 1 and seq.seq_id not in scheduled:
            # Left out only when the step in flight certainly ends it (length limits).
            params = seq.params
            ends = seq.num_output_tokens + seq.num_placeholders
            assert (params.max_tokens is not None and ends >= params.max_tokens) or (
                seq.num_tokens + seq.num_placeholders >= sched.max_seq_len
            ), f"running decode {seq!r} left out of the step"
    if out.preempted:
        assert out.preempted == running_before[::-1][: len(out.preempted)]
        assert scheduled <= {s.seq_id for s in running_before}
    for seq in out.preempted:
        assert seq.status is SequenceStatus.WAITING and not seq.block_table and seq.num_computed_tokens == 0
        assert seq.seq_id not in scheduled


@dataclass
class AsyncDriver:
    """Schedules and launches step N+1, then postprocesses step N (the engine's order)."""

    sched: Scheduler
    model: DeviceFakeModel
    in_flight: tuple[SchedulerOutput, dict[int, int]] | None = None
    outputs: list[SchedulerOutput] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    preempted_in_flight: int = 0  # sequences preempted while a step of theirs was in flight
    discarded: int = 0  # chunks whose sequence finished before they were applied

    def step(self, override: dict[int, int] | None = None) -> SchedulerOutput:
        """One engine step; `override` replaces sampled tokens of the step launched now."""
        running_before = list(self.sched.running)
        out = self.sched.schedule()
        check_async_step(self.sched, out, running_before)
        self.preempted_in_flight += sum(1 for seq in out.preempted if seq.num_inflight_tokens)
        sampled = self.model.launch(out) if out.chunks else {}
        if override:
            sampled = {k: override.get(k, v) for k, v in sampled.items()}
            self.model.last_sampled = dict(sampled)
        if self.in_flight is not None:
            self.discarded += sum(1 for c in self.in_flight[0].chunks if c.seq.is_finished)
            self.finished += self.sched.postprocess(*self.in_flight)
        self.in_flight = (out, sampled) if out.chunks else None
        self.sched.block_manager.check_consistency()
        self.outputs.append(out)
        return out

    def run(self, arrivals: dict[int, list[list[Sequence]]] | None = None, max_steps: int = 20_000) -> None:
        arrivals = arrivals or {}
        last = max(arrivals, default=-1)
        step = 0
        while self.sched.has_unfinished or self.in_flight is not None or step <= last:
            for group in arrivals.get(step, []):
                self.sched.add(group)
            self.step()
            step += 1
            assert step < max_steps, "did not finish"


def make_async_driver(
    num_blocks: int = 256, block_size: int = 4, caching: bool = True, **config: Any
) -> AsyncDriver:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    return AsyncDriver(Scheduler(limits(**config), bm), DeviceFakeModel(bm))


# --- placeholder accounting ---------------------------------------------------------------------


def test_placeholder_accounting_of_a_decode() -> None:
    d = make_async_driver()
    (seq,) = request("r", [5, 6, 7], eos=False, max_tokens=4)
    d.sched.add([seq])
    out = d.step()  # the prompt; nothing in flight before it
    assert [(c.start, c.num_tokens, c.samples) for c in out.chunks] == [(0, 3, True)]
    assert (seq.num_computed_tokens, seq.num_inflight_tokens, seq.num_placeholders) == (0, 3, 1)
    assert seq.num_scheduled_tokens == 3 and seq.num_unscheduled_tokens == 1
    out = d.step()  # the decode of the prompt's sampled token, before that token is on the host
    assert [(c.start, c.num_tokens, c.samples) for c in out.chunks] == [(3, 1, True)]
    # The prompt's step was applied after this one was launched: its token is there now.
    assert seq.output_token_ids == [next_token(seq, 3)]
    assert (seq.num_computed_tokens, seq.num_inflight_tokens, seq.num_placeholders) == (3, 1, 1)
    assert len(seq.block_table) == 1 and d.model.placeholder_inputs == 1
    d.step()
    assert seq.num_output_tokens == 2 and seq.num_scheduled_tokens == 5
    d.run()
    assert_reference([seq], d.sched.max_seq_len)
    assert d.model.placeholder_inputs == 3  # every decode's input came from the device
    assert_drained(d.sched)


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_no_step_is_scheduled_past_max_tokens(max_tokens: int) -> None:
    d = make_async_driver(block_size=4)
    (seq,) = request("r", [5, 6, 7, 8], eos=False, max_tokens=max_tokens)
    d.sched.add([seq])
    d.run()
    assert seq.finish_reason == "length" and seq.num_output_tokens == max_tokens
    # One chunk per emitted token: the prompt, then a decode per further token, none wasted.
    assert sum(len(o.chunks) for o in d.outputs) == max_tokens
    assert_drained(d.sched)


def test_no_step_is_scheduled_past_the_context_limit() -> None:
    d = make_async_driver(num_blocks=3, block_size=4, max_model_len=100, max_num_batched_tokens=64)
    (seq,) = request("r", [5, 6, 7], eos=False)
    d.sched.add([seq])
    d.run()
    assert seq.num_tokens == 12 and seq.finish_reason == "length"
    assert sum(len(o.chunks) for o in d.outputs) == 12 - 3
    assert_drained(d.sched)


def test_stop_token_in_flight_discards_the_extra_decode() -> None:
    d = make_async_driver()
    (seq,) = request("r", [5, 6, 7], stop_token_ids=[77])
    (other,) = request("o", [5, 6, 8], eos=False, max_tokens=6)
    d.sched.add([seq])
    d.sched.add([other])
    d.step()
    d.step({seq.seq_id: 77})  # the decode that samples the stop token
    out = d.step()  # launched while 77 is still "on the device": seq decodes once more
    assert seq in [c.seq for c in out.chunks]
    assert seq.is_finished and seq.finish_reason == "stop" and seq.stop_reason == 77
    assert seq.block_table == [] and d.sched.get_seq(seq.seq_id) is None
    assert seq.output_token_ids == [next_token(seq, 3), 77]
    d.run()
    assert seq.output_token_ids == [next_token(seq, 3), 77]  # the extra token never appended
    assert_reference([other], d.sched.max_seq_len)
    assert_drained(d.sched)


def test_eos_in_flight_then_blocks_reused_by_a_new_request() -> None:
    d = make_async_driver(num_blocks=2, block_size=4, max_num_batched_tokens=64)
    (a,) = request("a", [5, 6, 7])
    d.sched.add([a])
    d.step({a.seq_id: EOS})  # the prompt samples EOS at once
    d.step()  # a's extra decode is in flight while a finishes
    assert a.is_finished and a.output_token_ids == [EOS]
    (b,) = request("b", [8] * 7, eos=False, max_tokens=2)  # needs both blocks
    d.sched.add([b])
    d.run()
    assert a.output_token_ids == [EOS]
    assert_reference([b], d.sched.max_seq_len)
    assert_drained(d.sched)


def test_abort_while_steps_are_in_flight() -> None:
    d = make_async_driver()
    (a,) = request("a", [5, 6, 7], eos=False)
    (b,) = request("b", [5, 6, 9], eos=False, max_tokens=5)
    d.sched.add([a])
    d.sched.add([b])
    d.step()
    d.step()
    emitted = a.num_output_tokens
    assert d.sched.abort("a") == [a]  # a has a decode in flight
    assert a.block_table == [] and a.finish_reason == "abort"
    d.run()
    assert a.num_output_tokens == emitted
    assert_reference([b], d.sched.max_seq_len)
    assert_drained(d.sched)


def test_preempted_while_in_flight_keeps_its_token_and_waits_for_it() -> None:
    d = make_async_driver(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    (a,) = request("a", [5] * 7, eos=False, max_tokens=10)
    (b,) = request("b", [6] * 7, eos=False, max_tokens=6)
    d.sched.add([a])
    d.sched.add([b])
    d.step()  # both prompts: 2 blocks each, the pool is full
    d.step()  # position 7 of both (placeholder inputs) still fits in their second blocks
    out = d.step()  # a's position 8 needs a third block: b, whose decode is in flight, is preempted
    assert out.preempted == [b] and [c.seq for c in out.chunks] == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    # The decode launched in the step before was applied after this launch: b kept its token.
    assert b.num_output_tokens == 2 and b.num_inflight_tokens == 0 and b.num_placeholders == 0
    assert b.output_token_ids == [next_token(b, 7), next_token(b, 8)]
    d.run()
    assert_reference([a, b], d.sched.max_seq_len)
    assert_drained(d.sched)


def test_preempted_sequence_is_not_readmitted_before_its_step_is_applied() -> None:
    d = make_async_driver(num_blocks=4, block_size=4, caching=False, max_num_batched_tokens=64)
    (a,) = request("a", [5] * 7, eos=False, max_tokens=10)
    (b,) = request("b", [6] * 7, eos=False, max_tokens=6)
    d.sched.add([a])
    d.sched.add([b])
    out1 = d.sched.schedule()
    d.model.launch(out1)
    d.sched.postprocess(out1, d.model.last_sampled)
    out2 = d.sched.schedule()  # both decode position 7
    d.model.launch(out2)
    out3 = d.sched.schedule()  # b preempted with its decode of out2 in flight
    assert out3.preempted == [b] and b.num_inflight_tokens == 1
    d.sched.abort("a")  # every block free now, but b's step has not been applied
    assert d.sched.schedule().chunks == []
    sampled = {b.seq_id: next_token(b, 8)}
    d.sched.postprocess(out2, sampled)
    d.sched.postprocess(out3, {})
    assert b.num_output_tokens == 2 and b.status is SequenceStatus.WAITING
    out = d.sched.schedule()  # readmitted: prompt + both outputs re-prefilled
    assert [(c.seq, c.start, c.end) for c in out.chunks] == [(b, 0, 9)]


# --- whole workloads: the same outputs as the reference (and so as the synchronous loop) ---------


@pytest.mark.parametrize(
    ("num_blocks", "caching", "budget", "chunked"),
    [(512, True, 64, True), (24, True, 64, True), (16, False, 16, True), (20, True, 64, False)],
)
def test_async_outputs_identical_under_memory_pressure_and_caching(
    num_blocks: int, caching: bool, budget: int, chunked: bool
) -> None:
    d = make_async_driver(
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
    assert d.model.placeholder_inputs > 0 and d.discarded > 0  # eos while the next step ran
    if num_blocks < 100:
        assert d.sched.num_preemptions > 0 and d.preempted_in_flight > 0
    if caching:
        assert d.sched.block_manager.prefix_cache_hits > 0


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_workloads_drain_with_steps_in_flight(scenario: tuple[dict, list[RandomRequest]]) -> None:
    config, reqs = scenario
    d = make_async_driver(**config)
    sched = d.sched
    accepted: dict[str, list[Sequence]] = {}
    arrivals: dict[int, list[tuple[str, RandomRequest]]] = {}
    aborts: dict[int, list[str]] = {}
    for i, r in enumerate(reqs):
        arrivals.setdefault(r.arrival, []).append((f"r{i}", r))
        if r.abort_at is not None:
            aborts.setdefault(r.abort_at, []).append(f"r{i}")
    last = max([*arrivals, *aborts], default=-1)
    step = 0
    while sched.has_unfinished or d.in_flight is not None or step <= last:
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
            try:
                sched.add(seqs)
            except (ContextLengthExceededError, OverloadedError):
                pass
            else:
                accepted[rid] = seqs
        for rid in aborts.get(step, []):
            sched.abort(rid)
        d.step()
        step += 1
        assert step < 5000, "scheduler did not make progress"
    assert_drained(sched)
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
