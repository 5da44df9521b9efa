"""Continuous batching: which tokens of which sequences go through the model in each step.

One unified step, in the manner of vLLM v1. Every sequence has `num_computed_tokens` of its
`token_ids` in the KV cache; a step computes the next tokens of some sequences:

1. Running sequences first, in admission order. A decode (one uncomputed token) always gets its
   token; a prefill (a prompt, or a re-prefill after preemption) gets what is left of the token
   budget after the decodes behind it are reserved, so a long prompt is computed in chunks while
   the decodes keep going. A prefill chunk also shrinks to the free blocks that the decodes behind
   it do not need (and waits a step if none are left). When the KV blocks still run out, the most
   recently admitted running sequence is preempted by recompute: its blocks are freed and it goes
   back to the front of the waiting queue, to re-prefill its prompt and outputs later (prefix-cache
   hits often make that cheap).
2. Then, unless something was preempted, waiting sequences are admitted first come first served
   while `max_num_seqs`, the token budget and the free blocks (counting prefix-cache hits) allow.
   If the head of the queue does not fit, admission stops: nothing skips ahead of it.

After the model ran, `postprocess` advances the computed counts, registers newly full blocks in
the prefix cache, appends the sampled tokens and finishes sequences on eos / stop tokens / length.
The oldest running sequence is never preempted by others; it waits at most for the decodes behind
it, whose number cannot grow while it waits (nothing is admitted then). So every sequence finishes.

Asynchronous scheduling: the engine may schedule step N+1 before it calls `postprocess` for step N
(whose tokens are still on the device). A chunk counts its tokens as in flight on its sequence, and
a chunk that samples adds a placeholder for the token it will produce; step N+1 then continues each
sequence after its in-flight tokens, and a decode's input is the placeholder (the runner takes its
id from the device). A sequence that step N will certainly end (its placeholder reaches
`max_tokens` or the length limit) is not scheduled again. One that step N ends for a reason known
only from the token (eos, a stop token) has a decode in step N+1 as well; `postprocess` ignores
chunks of finished sequences, so that token is never appended and the blocks are already free. A
sequence preempted while its step was in flight keeps that step's token (its KV is recomputed
later, the token is not drawn again), and is not readmitted before that step was applied. With
nothing in flight, all of this reduces to the synchronous loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from glmv.engine.block_manager import BlockManager
from glmv.engine.config import EngineConfig
from glmv.engine.sequence import Sequence, SequenceStatus
from glmv.errors import ConfigError, ContextLengthExceededError, InvalidRequestError, OverloadedError

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"


@dataclass(slots=True)
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of `seq` in this step.

    `samples` is True when the chunk reaches the end of the sequence, so the model must sample the
    next token from its last position. It is fixed when the chunk is made (before `postprocess`
    appends the sampled token).
    """

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        # The sequence's end counts the placeholders of steps still in flight.
        self.samples = self.start + self.num_tokens == self.seq.num_tokens + self.seq.num_placeholders

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_tokens > 1 or not self.samples


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    def shape(self) -> dict[str, int]:
        """How many sequences and tokens of the step are prompt (prefill) and how many are
        generated (decode): a step's line in a timeline."""
        prefill_seqs = prefill_tokens = decode_seqs = decode_tokens = 0
        for chunk in self.chunks:
            if chunk.start >= chunk.seq.num_prompt_tokens:
                decode_seqs += 1
                decode_tokens += chunk.num_tokens
            else:
                prefill_seqs += 1
                prefill_tokens += chunk.num_tokens
        return {
            "prefill_seqs": prefill_seqs,
            "prefill_tokens": prefill_tokens,
            "decode_seqs": decode_seqs,
            "decode_tokens": decode_tokens,
        }


class Scheduler:
    """Waiting queue + running batch over a `BlockManager`; see the module docstring for the policy."""

    def __init__(
        self, config: EngineConfig, block_manager: BlockManager, *, max_model_len: int | None = None
    ) -> None:
        """`max_model_len`: the context limit the engine settled on (the model's, capped by the
        config and the KV cache); by default the config's, else all of the KV cache."""
        self.config = config
        self.block_manager = block_manager
        capacity = block_manager.num_blocks * block_manager.block_size
        self.max_model_len = max_model_len or config.max_model_len or capacity
        # Every running sequence must be able to decode in every step, so no more may run than
        # the token budget has tokens.
        self.max_running = min(config.max_num_seqs, config.max_num_batched_tokens)
        # The longest a sequence may get: the context limit, or all of the KV cache if smaller.
        self.max_seq_len = min(self.max_model_len, capacity)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_seq_len:
            raise ConfigError(
                f"Without chunked prefill, max_num_batched_tokens ({config.max_num_batched_tokens}) must "
                f"be >= the longest sequence ({self.max_seq_len} tokens).",
                param="max_num_batched_tokens",
            )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._seqs: dict[int, Sequence] = {}
        self._requests: dict[str, list[Sequence]] = {}
        self.num_preemptions = 0  # total over the scheduler's life

    # --- queries ------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def get_seq(self, seq_id: int) -> Sequence | None:
        """An unfinished sequence by id, or None."""
        return self._seqs.get(seq_id)

    def get_request(self, request_id: str) -> list[Sequence]:
        """The unfinished sequences of a request."""
        return list(self._requests.get(request_id, ()))

    # --- admission ----------------------------------------------------------------------------

    def add(self, seqs: Iterable[Sequence]) -> None:
        """Queue all sequences of one request at once, or none of them (raising)."""
        seqs = list(seqs)
        if not seqs:
            return
        request_id = seqs[0].request_id
        if any(seq.request_id != request_id for seq in seqs):
            raise ValueError("Scheduler.add takes the sequences of exactly one request")
        if request_id in self._requests:
            raise InvalidRequestError(
                f"Request id {request_id!r} is already in progress.", code="duplicate_request_id"
            )
        block_capacity = self.block_manager.num_blocks * self.block_manager.block_size
        for seq in seqs:
            if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
                raise ValueError(f"{seq!r} was already scheduled")
            if seq.num_tokens > self.max_model_len:
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {self.max_model_len} tokens, "
                    f"but the prompt has {seq.num_tokens} tokens."
                )
            if seq.num_tokens > block_capacity:
                raise ContextLengthExceededError(
                    f"The prompt has {seq.num_tokens} tokens but the KV cache holds at most "
                    f"{block_capacity} tokens in all."
                )
        if len(self.waiting) + len(seqs) > self.config.max_waiting:
            raise OverloadedError(
                f"The server is overloaded: {len(self.waiting)} sequences are waiting "
                f"(limit {self.config.max_waiting}). Retry later."
            )
        self._requests[request_id] = list(seqs)
        for seq in seqs:
            self._seqs[seq.seq_id] = seq
            self.waiting.append(seq)

    # --- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        bm = self.block_manager
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []

        # Tokens and fresh blocks kept back for the decodes not yet visited, so that a prefill
        # ahead of them in the running list never takes their token or their next block.
        reserved_tokens = 0
        reserved_blocks = 0
        for seq in self.running:
            if self._unscheduled(seq) == 1:
                reserved_tokens += 1
                reserved_blocks += self._needs_new_block(seq)

        def preempt_tail() -> Sequence:
            nonlocal reserved_tokens, reserved_blocks
            victim = self.running[-1]
            if victim is not seq and self._unscheduled(victim) == 1:
                reserved_tokens -= 1
                reserved_blocks -= self._needs_new_block(victim)
            self._preempt(victim)
            preempted.append(victim)
            return victim

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            remaining = self._unscheduled(seq)
            if remaining <= 0:  # nothing to compute (or the step in flight ends it)
                i += 1
                continue
            if remaining == 1:
                reserved_tokens -= 1
                reserved_blocks -= self._needs_new_block(seq)
                num_new = 1
            else:
                available = budget - reserved_tokens
                num_new = min(remaining, available) if cfg.enable_chunked_prefill else remaining
                if num_new <= 0 or num_new > available:
                    i += 1
                    continue
                if cfg.enable_chunked_prefill:
                    # Shrink the chunk to the blocks the decodes behind do not need; if there are
                    # none, yield to those decodes this step; preempt only when nobody could run.
                    yielded = False
                    while True:
                        spare_blocks = len(seq.block_table) + bm.num_free_blocks - reserved_blocks
                        fits = spare_blocks * bm.block_size - seq.num_scheduled_tokens
                        if fits >= 1:
                            num_new = min(num_new, fits)
                            break
                        if reserved_blocks > 0:
                            yielded = True
                            break
                        if preempt_tail() is seq:
                            break
                    if yielded:
                        i += 1
                        continue
                    if seq.status is not SequenceStatus.RUNNING:
                        break  # `seq` preempted itself; it was the last running one
            # Preempt from the tail (most recently admitted) until this sequence fits. Everything
            # behind index i is unscheduled in this step, so no scheduled chunk is invalidated.
            while not bm.can_append(seq, num_new):
                if preempt_tail() is seq:
                    break
            else:
                bm.append_slots(seq, num_new)
                chunks.append(self._chunk(seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # `seq` preempted itself; it was the last running one

        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_running:
                seq = self.waiting[0]
                if seq.num_inflight_tokens:
                    break  # preempted while its step ran: readmitted once that step is applied
                cached = bm.num_cached_prefix_tokens(seq)
                remaining = seq.num_tokens - cached
                if cfg.enable_chunked_prefill:
                    num_new = min(remaining, budget)
                elif remaining <= budget:
                    num_new = remaining
                else:
                    break
                if not bm.can_allocate(seq, num_new):
                    break
                self.waiting.popleft()
                bm.allocate(seq, num_new)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                chunks.append(self._chunk(seq, num_new))
                budget -= num_new

        return SchedulerOutput(chunks, preempted, cfg.max_num_batched_tokens - budget)

    def _chunk(self, seq: Sequence, num_new: int) -> ScheduledChunk:
        """The next `num_new` tokens of `seq`, now in flight (with a placeholder if it samples)."""
        chunk = ScheduledChunk(seq, seq.num_scheduled_tokens, num_new)
        seq.num_inflight_tokens += num_new
        if chunk.samples:
            seq.num_placeholders += 1
        return chunk

    def _unscheduled(self, seq: Sequence) -> int:
        """Tokens of `seq` to schedule now; 0 when a step in flight will certainly end it."""
        if seq.num_placeholders:
            params = seq.params
            num_output = seq.num_output_tokens + seq.num_placeholders
            if params.max_tokens is not None and num_output >= params.max_tokens:
                return 0
            if seq.num_tokens + seq.num_placeholders >= self.max_seq_len:
                return 0
        return seq.num_unscheduled_tokens

    def _needs_new_block(self, seq: Sequence) -> bool:
        """Whether computing one more token of `seq` needs a fresh block."""
        return len(seq.block_table) * self.block_manager.block_size < seq.num_scheduled_tokens + 1

    def _preempt(self, seq: Sequence) -> None:
        if self.running and self.running[-1] is seq:
            self.running.pop()
        else:
            self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # --- after the model ran ------------------------------------------------------------------

    def postprocess(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Apply a step's results. `sampled` maps seq_id to the new token of every chunk that
        samples. Returns the sequences that finished in this step."""
        finished: list[Sequence] = []
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.is_finished:
                continue  # aborted or finished since it was scheduled: its token is never emitted
            seq.num_inflight_tokens -= chunk.num_tokens
            if chunk.samples:
                seq.num_placeholders -= 1
            if seq.status is SequenceStatus.RUNNING:
                seq.num_computed_tokens = chunk.end
                self.block_manager.commit(seq)
            # else: preempted while this step ran (asynchronous scheduling); its KV is recomputed
            # on readmission, but the token it sampled is kept.
            if not chunk.samples:
                continue
            token_id = sampled.get(seq.seq_id)
            if token_id is None:
                self._finish(seq, FINISH_ERROR)
                finished.append(seq)
                continue
            seq.append_token(token_id)
            reason, stop_reason = self._check_stop(seq, token_id)
            if reason is not None:
                self._finish(seq, reason, stop_reason)
                finished.append(seq)
        return finished

    def _check_stop(self, seq: Sequence, token_id: int) -> tuple[str | None, int | None]:
        params = seq.params
        num_output = seq.num_output_tokens
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id in seq.eos_token_ids:
                return FINISH_STOP, None
            if token_id in params.stop_token_ids:
                return FINISH_STOP, token_id
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return FINISH_LENGTH, None
        if seq.num_tokens >= self.max_seq_len:
            return FINISH_LENGTH, None
        return None, None

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Finish `seq` for a reason found outside the scheduler (stop string, error); frees its
        blocks. No-op if it already finished."""
        if seq.is_finished:
            return
        self._finish(seq, reason, stop_reason)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of a request with reason "abort"; returns them."""
        seqs = [seq for seq in self._requests.get(request_id, ()) if not seq.is_finished]
        for seq in seqs:
            self._finish(seq, FINISH_ABORT)
        return seqs

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.num_inflight_tokens = seq.num_placeholders = 0
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self._seqs.pop(seq.seq_id, None)
        siblings = self._requests.get(seq.request_id)
        if siblings is not None:
            if seq in siblings:
                siblings.remove(seq)
            if not siblings:
                del self._requests[seq.request_id]
