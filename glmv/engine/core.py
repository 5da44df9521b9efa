"""`EngineCore`: the scheduler, the model runner and the sampler, one step at a time, token ids out.

The core loads the model, sizes the paged KV cache, and turns a stream of `EngineRequest`s into
`CoreOutput`s: per step and per request the new token ids of each choice, their logprobs (ids and
values), finish reasons and the prompt/cache counts. It never produces text: detokenisation, stop
strings and logprob token text belong to the front end (`OutputProcessor`), which tells the core
to end a choice whose text hit a stop string (`stop_seq`).

A step is three parts: `schedule` (which tokens of which sequences), `launch` (images, forward
pass, sampling, queued on the device) and `update` (apply the sampled tokens, finish sequences,
collect outputs). With asynchronous scheduling (the default on CUDA) `step` overlaps them: it
schedules and launches step N+1 while step N still runs on the device, then waits for step N's
sampled ids (only those) and applies them, so the host work between two device steps hides
behind the device work. The scheduler counts step N's tokens as placeholders, and the runner
feeds them to step N+1 on the device. A step whose sequences need step N's token on the host
(structured output: the grammar mask; penalties: the history), or whose launch already failed,
is applied before the next one is scheduled, as in the synchronous loop (every step with it off,
the CPU's default). Either way the outputs are the same; requests aborted or stopped while a step
is in flight simply have their part of it ignored.

The same core runs on a thread of the API process (in-process mode, via `LLMEngine`) or in its own
process (`glmv.engine.core_proc`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from glmv.engine.block_manager import BlockManager
from glmv.engine.config import EngineConfig
from glmv.engine.encoder_cache import EncoderCache
from glmv.engine.messages import CoreOutput, SeqOutput, error_info
from glmv.engine.request import EngineRequest, validate_request
from glmv.engine.runner import ModelRunner, PendingStep, SeqInputs, StepResult, kv_bytes_per_block
from glmv.engine.sampler import SampledToken
from glmv.engine.scheduler import FINISH_ABORT, Scheduler, SchedulerOutput
from glmv.engine.sequence import ImageSpan, Sequence
from glmv.engine.startup import StartupReport
from glmv.engine.stats import EngineStats
from glmv.engine.structured import GrammarBackend, GrammarState, StructuredOutput
from glmv.errors import ConfigError, EngineError, GlmvError, InvalidRequestError
from glmv.kernels import compile_watch
from glmv.models.base import ServedModel
from glmv.models.registry import load_model
from glmv.processing import host_memory

if TYPE_CHECKING:
    from glmv.engine.info import EngineInfo


@dataclass(slots=True)
class MemoryReport:
    """Where the device memory goes (bytes); printed at start-up."""

    budget: int
    weights: int
    activations: int
    kv_cache: int
    kv_blocks: int
    cuda_graphs: int = 0
    graph_capture_seconds: float = 0.0

    def describe(self) -> str:
        gib = 1024**3
        return (
            f"memory budget {self.budget / gib:.2f} GiB: weights {self.weights / gib:.2f}, "
            f"activations (profiled) {self.activations / gib:.2f}, KV cache {self.kv_cache / gib:.2f} "
            f"({self.kv_blocks} blocks), CUDA graphs {self.cuda_graphs / gib:.2f} "
            f"(captured in {self.graph_capture_seconds:.1f} s)"
        )


@dataclass(slots=True)
class _SeqState:
    seq: Sequence
    inputs: SeqInputs
    reported: bool = False  # its finish reason was sent (or the front end ended it)


@dataclass(slots=True)
class _Launched:
    """A step queued on the device whose results are not applied yet."""

    scheduled: SchedulerOutput
    pending: PendingStep | Exception


@dataclass(slots=True)
class _RequestState:
    request: EngineRequest
    seqs: list[_SeqState]
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    error: GlmvError | None = None
    pending: dict[int, SeqOutput] = field(default_factory=dict)


def _image_processor(model_dir: str) -> Any:
    """The checkpoint's image processor, or None for a model directory without one (text-only tests)."""
    from glmv.processing.loader import load_image_processor

    try:
        return load_image_processor(model_dir)
    except GlmvError:
        return None


def _structured(value: Any) -> StructuredOutput | None:
    """`SamplingParams.structured` as a `StructuredOutput` (it crosses the process boundary as a dict)."""
    if value is None or isinstance(value, StructuredOutput):
        return value
    if isinstance(value, dict):
        return StructuredOutput(**value)
    raise InvalidRequestError("structured must be a StructuredOutput.", param="response_format")


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        *,
        model: ServedModel | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.config = config
        began = time.perf_counter()
        counting = compile_watch.install()
        builds_before = compile_watch.snapshot()
        self.startup = StartupReport()
        if model is None:
            with self.startup.phase("weights"):
                model = load_model(
                    config.model, dtype=config.dtype, device=config.device, quantization=config.quantization
                )
        self.model = model
        if self.model.device.type == "cpu":  # each step's activations reuse the last step's pages
            host_memory.retain_freed_memory()
        if self.model.device.type == "cuda":  # pragma: no cover - CUDA
            # process-wide: in process mode the core has its process to itself
            torch.backends.cuda.enable_cudnn_sdp(config.cudnn_attention)
        if tokenizer is None:
            from glmv.processing.loader import load_tokenizer

            tokenizer = load_tokenizer(config.model)
        # The core needs the tokenizer for structured output (token bytes) and its vocabulary size.
        self.tokenizer = tokenizer
        m = self.model
        self.eos_token_ids = frozenset(m.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.max_model_len = min(config.max_model_len or m.max_model_len, m.max_model_len)
        self.memory: MemoryReport | None = None
        if self.model.device.type == "cuda":  # pragma: no cover - CUDA
            with self.startup.phase("memory profile"):  # the largest prefill and image, measured
                num_blocks = self._num_kv_blocks()
        else:
            num_blocks = self._num_kv_blocks()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, max_model_len=self.max_model_len)
        self.encoder_cache = EncoderCache(config.encoder_cache_mb * 1024 * 1024)
        self.runner = ModelRunner(
            self.model,
            num_blocks=num_blocks,
            block_size=config.block_size,
            encoder_cache=self.encoder_cache,
            image_processor=_image_processor(config.model),
        )
        vocab = getattr(self.tokenizer, "vocab_size", None)
        self.runner.vocab_limit = int(vocab) if isinstance(vocab, int) and vocab > 0 else None
        if config.seed is not None:
            self.runner.default_generator.manual_seed(config.seed)
        if self.model.device.type == "cuda" and config.enable_cuda_graphs:  # pragma: no cover - CUDA
            with self.startup.phase("CUDA graphs"):
                report = self.runner.capture_cuda_graphs(
                    max_batch=min(config.max_num_seqs, 512), max_model_len=self.max_model_len
                )
            if self.memory is not None:
                self.memory.cuda_graphs = report.memory_bytes
                self.memory.graph_capture_seconds = report.seconds
        self._requests: dict[str, _RequestState] = {}
        self._seqs: dict[int, _SeqState] = {}
        self.images_encoded = 0
        self.num_generated_tokens = 0
        self._grammar: GrammarBackend | None = None  # structured output, built on first use
        self._grammar_lock = threading.Lock()
        self.async_scheduling = config.uses_async_scheduling(self.model.device.type)
        self.last_scheduled: SchedulerOutput | None = None
        self._in_flight: _Launched | None = None  # asynchronous scheduling: the step on the device
        # Steps launched while the one before was still in flight, and steps in flight that had to
        # be applied before the next was scheduled (see `_can_overlap`).
        self.num_overlapped_steps = 0
        self.num_synchronized_steps = 0
        self.startup.seconds = time.perf_counter() - began
        # Kernels built from here on were met while serving: the start-up did not warm them.
        self._builds_at_start = compile_watch.snapshot()
        if counting and self.model.device.type == "cuda":
            self.startup.kernel_builds = self._builds_at_start.builds - builds_before.builds
            self.startup.kernel_build_seconds = self._builds_at_start.seconds - builds_before.seconds

    # --- set-up ---------------------------------------------------------------------------------

    def _num_kv_blocks(self) -> int:
        per_block = kv_bytes_per_block(self.model, self.config.block_size)
        if self.config.kv_cache_gb is not None:
            budget = int(self.config.kv_cache_gb * 1024**3)
        elif self.model.device.type == "cuda":  # pragma: no cover - CUDA
            budget = self._gpu_kv_budget(per_block)
        else:
            budget = 512 * 1024**2
        num_blocks = budget // per_block
        min_blocks = (self.max_model_len + self.config.block_size - 1) // self.config.block_size
        if num_blocks < 2:
            raise ConfigError(
                f"KV-cache budget of {budget / 1024**3:.2f} GB holds no blocks "
                f"({per_block} bytes each); raise --kv-cache-gb or --gpu-memory-utilization"
            )
        if num_blocks < min_blocks:
            # Fewer blocks than one full-length sequence needs: cap the context to what fits.
            self.max_model_len = num_blocks * self.config.block_size
        return num_blocks

    def _gpu_kv_budget(self, per_block: int) -> int:  # pragma: no cover - CUDA
        """What is left for KV blocks of the GPU budget after weights, profiled activations and a
        reserve for CUDA graphs; fails with advice when that is not enough."""
        dev = self.model.device
        torch.cuda.synchronize(dev)
        total = torch.cuda.get_device_properties(dev).total_memory
        cap = total * self.config.gpu_memory_utilization
        if self.config.gpu_memory_gb is not None:
            cap = min(cap, self.config.gpu_memory_gb * 1024**3)
        weights = torch.cuda.memory_allocated(dev)
        activations = self._profile_activations()
        reserve = (512 * 1024**2 if self.config.enable_cuda_graphs else 0) + 256 * 1024**2
        free, _ = torch.cuda.mem_get_info(dev)
        budget = int(min(cap - weights - activations - reserve, free - activations - reserve))
        need = per_block * ((self.max_model_len + self.config.block_size - 1) // self.config.block_size)
        if budget < need:
            gib = 1024**3
            raise ConfigError(
                f"not enough GPU memory for the KV cache: budget {cap / gib:.1f} GiB, weights "
                f"{weights / gib:.1f} GiB, activations {activations / gib:.1f} GiB leave "
                f"{max(budget, 0) / gib:.2f} GiB, but one {self.max_model_len}-token sequence needs "
                f"{need / gib:.2f} GiB. Lower --max-model-len or --max-num-batched-tokens, use INT4 "
                "weights, or raise --gpu-memory-gb / --gpu-memory-utilization."
            )
        self.memory = MemoryReport(
            budget=int(cap),
            weights=weights,
            activations=activations,
            kv_cache=budget,
            kv_blocks=budget // per_block,
        )
        return budget

    @torch.inference_mode()
    def _profile_activations(self) -> int:  # pragma: no cover - CUDA
        """Peak extra memory of the largest prefill step and the largest image, measured."""
        from glmv.kernels.metadata import AttentionMetadata

        dev = self.model.device
        m = self.model
        tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        bs = self.config.block_size
        blocks = (tokens + bs - 1) // bs
        shape = (blocks, bs, m.num_kv_heads, m.head_dim)
        caches = [
            (torch.empty(shape, dtype=m.dtype, device=dev), torch.empty(shape, dtype=m.dtype, device=dev))
            for _ in range(m.num_layers)
        ]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        ids = torch.zeros(tokens, dtype=torch.int64, device=dev)
        pos = m.positions_after_prompt(0, tokens, 0).to(dev)
        meta = AttentionMetadata.build(
            query_lens=[tokens],
            seq_lens=[tokens],
            block_tables=[list(range(blocks))],
            block_size=bs,
            device=dev,
        )
        hidden = m(ids, pos, caches, meta)
        m.compute_logits(hidden[-min(tokens, self.config.max_num_seqs) :])
        del hidden
        grid = self._largest_image_grid()
        if grid is not None:
            t, h, w = grid
            pixels = torch.zeros(t * h * w, m.config.vision.patch_dim, dtype=m.dtype, device=dev)
            m.encode_images(pixels, [grid])
            del pixels
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del caches
        torch.cuda.empty_cache()
        return int(peak)

    def _largest_image_grid(self) -> tuple[int, int, int] | None:  # pragma: no cover - CUDA
        if getattr(self.model.config, "model_type", None) != "glm4v":
            return None
        try:
            from glmv.processing.image import ImageProcessorConfig, smart_resize

            cfg = ImageProcessorConfig.from_pretrained(self.config.model)
        except Exception:
            return None
        side = int((cfg.max_pixels / cfg.temporal_patch_size) ** 0.5)
        h, w = smart_resize(side, side, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        return (1, h // cfg.patch_size, w // cfg.patch_size)

    def info(self) -> EngineInfo:
        from glmv.engine.info import EngineInfo

        m = self.model
        return EngineInfo(
            model_dir=str(self.config.model),
            model_type=str(getattr(m.config, "model_type", "")),
            device=m.device.type,
            max_model_len=self.max_model_len,
            vocab_size=m.vocab_size,
            image_token_id=m.image_token_id,
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
            num_blocks=self.block_manager.num_blocks,
            block_size=self.config.block_size,
            memory=self.memory.describe() if self.memory is not None else None,
            startup=self.startup.describe(),
            startup_seconds=round(self.startup.seconds, 3),
        )

    @property
    def preprocess_key(self) -> str:
        return self.runner.preprocess_key

    # --- requests -------------------------------------------------------------------------------

    def validate(self, request: EngineRequest) -> None:
        """Raise a client error for a request that can never run; cheap, no side effects."""
        validate_request(
            request,
            max_model_len=self.max_model_len,
            vocab_size=self.model.vocab_size,
            image_token_id=self.model.image_token_id,
            max_sequences=self.config.max_waiting,
        )

    def add_request(self, request: EngineRequest) -> None:
        if request.request_id in self._requests:
            raise InvalidRequestError(f"Duplicate request id {request.request_id!r}.")
        request.params.structured = _structured(request.params.structured)
        self.validate(request)
        params = request.params
        grammars = self._grammar_states(request)  # structured output; may raise, before anything is queued
        spans = [ImageSpan(im.offset, im.length, im.content_hash) for im in request.images]
        seqs = [
            Sequence(
                request.request_id,
                request.prompt_token_ids,
                params,
                index=i,
                images=spans,
                eos_token_ids=self.eos_token_ids,
            )
            for i in range(params.n)
        ]
        self.scheduler.add(seqs)  # may raise OverloadedError; nothing registered yet
        states = []
        for seq in seqs:
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.model.device)
                gen.manual_seed(params.seed + seq.index)
            state = _SeqState(
                seq=seq,
                inputs=SeqInputs(images=list(request.images), generator=gen, grammar=grammars[seq.index]),
            )
            self._seqs[seq.seq_id] = state
            states.append(state)
        self._requests[request.request_id] = _RequestState(request, states)

    def grammar_backend(self) -> GrammarBackend:
        """The structured-output machinery for this model's tokenizer (built once, on first use;
        a core process builds it in the background at start-up). Thread-safe."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarBackend(
                    self.tokenizer, self.model.vocab_size, sorted(self.eos_token_ids)
                )
            return self._grammar

    def _grammar_states(self, request: EngineRequest) -> list[GrammarState | None]:
        """One grammar state per choice of a structured-output request (None for free text)."""
        structured = request.params.structured
        if structured is None:
            return [None] * request.params.n
        backend = self.grammar_backend()
        budget = self.max_model_len - len(request.prompt_token_ids)
        if request.params.max_tokens is not None:
            budget = min(budget, request.params.max_tokens)
        return [
            backend.new_state(structured, request.prompt_token_ids, budget) for _ in range(request.params.n)
        ]

    def abort(self, request_id: str) -> bool:
        state = self._requests.pop(request_id, None)
        self.scheduler.abort(request_id)
        if state is None:
            return False
        for s in state.seqs:
            self._seqs.pop(s.seq.seq_id, None)
        return True

    def stop_seq(self, request_id: str, index: int) -> None:
        """End choice `index` of a request because the front end says so (its text hit a stop
        string): its blocks are freed at once, nothing more is reported for it."""
        req = self._requests.get(request_id)
        if req is None:
            return
        for s in req.seqs:
            if s.seq.index == index:
                self.scheduler.finish(s.seq, FINISH_ABORT)
                s.reported = True
        if all(s.reported for s in req.seqs):
            self._drop(req)

    def _drop(self, req: _RequestState) -> None:
        self._requests.pop(req.request.request_id, None)
        for s in req.seqs:
            self._seqs.pop(s.seq.seq_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=bm.usage,
            num_blocks=bm.num_blocks,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            encoder_cache_hits=self.encoder_cache.hits,
            encoder_cache_misses=self.encoder_cache.misses,
            images_encoded=self.images_encoded,
            num_generated_tokens=self.num_generated_tokens,
            kernel_builds=compile_watch.snapshot().builds - self._builds_at_start.builds,
        )

    # --- one step: schedule → execute → update ------------------------------------------------

    def step(self) -> list[CoreOutput]:
        """Schedule and launch the next step; apply the previous one (asynchronous scheduling) or
        this one (synchronous); return the outputs of the step applied."""
        outputs: list[CoreOutput] = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and not self._can_overlap(previous):
            self.num_synchronized_steps += 1
            outputs += self._apply(previous)
            previous = None
        scheduled = self.schedule()
        launched = _Launched(scheduled, self.launch(scheduled)) if scheduled.chunks else None
        if launched is not None and previous is not None:
            self.num_overlapped_steps += 1
        if previous is not None:
            outputs += self._apply(previous)
        if launched is not None:
            if self.async_scheduling:
                self._in_flight = launched
            else:
                outputs += self._apply(launched)
        return outputs

    @property
    def step_in_flight(self) -> bool:
        """Whether a launched step's results are still to be applied (asynchronous scheduling)."""
        return self._in_flight is not None

    def _can_overlap(self, launched: _Launched) -> bool:
        """Whether the next step may be scheduled before `launched` is applied: not when its
        launch failed, nor when a sequence it samples needs that token on the host to go on."""
        pending = launched.pending
        if not self.async_scheduling or isinstance(pending, Exception) or pending.result.failed:
            return False
        for chunk in launched.scheduled.chunks:
            if not chunk.samples:
                continue
            state = self._seqs.get(chunk.seq.seq_id)
            if state is not None and (state.inputs.grammar is not None or chunk.seq.params.uses_penalties):
                return False
        return True

    def _apply(self, launched: _Launched) -> list[CoreOutput]:
        result: StepResult | Exception
        if isinstance(launched.pending, Exception):
            result = launched.pending
        else:
            try:
                result = launched.pending.wait()
            except Exception as exc:
                result = exc
        return self.update(launched.scheduled, result)

    def schedule(self) -> SchedulerOutput:
        scheduled = self.scheduler.schedule()
        self.last_scheduled = scheduled  # what the latest step launched (timelines read it)
        now = time.monotonic()
        for chunk in scheduled.chunks:
            req = self._requests[chunk.seq.request_id]
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        return scheduled

    def launch(self, scheduled: SchedulerOutput) -> PendingStep | Exception:
        """Queue the model on a scheduled step; an exception is returned, not raised, so that
        `update` fails only that step's requests and the core lives on."""
        inputs = {c.seq.seq_id: self._seqs[c.seq.seq_id].inputs for c in scheduled.chunks}
        try:
            return self.runner.launch(scheduled.chunks, inputs)
        except Exception as exc:
            return exc

    def execute(self, scheduled: SchedulerOutput) -> StepResult | Exception:
        """Run the model on a scheduled step and wait for its results (see `launch`)."""
        pending = self.launch(scheduled)
        if isinstance(pending, Exception):
            return pending
        try:
            return pending.wait()
        except Exception as exc:
            return exc

    def update(self, scheduled: SchedulerOutput, result: StepResult | Exception) -> list[CoreOutput]:
        # A sequence's state is gone once its request was aborted or finished (possibly while this
        # step was in flight, and its request id may even be in use again): look it up by seq_id.
        if isinstance(result, Exception):  # the whole step failed: fail its requests
            failed: dict[str, _RequestState] = {}
            for chunk in scheduled.chunks:
                state = self._seqs.get(chunk.seq.seq_id)
                if state is not None:
                    req = self._requests[state.seq.request_id]
                    failed[req.request.request_id] = req
            for req in failed.values():
                req.error = EngineError(f"model execution failed: {result}")
                for s in req.seqs:
                    self.scheduler.finish(s.seq, "error")
            return [self._collect(req) for req in failed.values()]
        self.images_encoded += result.encoded_images
        for seq_id, message in result.failed.items():
            state = self._seqs.get(seq_id)
            if state is None or state.reported:
                continue
            req = self._requests[state.seq.request_id]
            req.error = EngineError(message, code="request_failed")
            self.scheduler.finish(state.seq, "error")
        self.scheduler.postprocess(scheduled, {sid: t.token_id for sid, t in result.sampled.items()})

        touched: dict[str, _RequestState] = {}
        now = time.monotonic()
        for chunk in scheduled.chunks:
            state = self._seqs.get(chunk.seq.seq_id)
            if state is None or state.reported:
                continue
            req = self._requests[chunk.seq.request_id]
            sampled = result.sampled.get(chunk.seq.seq_id)
            if sampled is not None:
                if req.first_token_time is None:
                    req.first_token_time = now
                self._apply_token(state, req, sampled)
                touched[req.request.request_id] = req
            if state.seq.is_finished and not state.reported:
                self._report_finish(state, req)
                touched[req.request.request_id] = req
        for seq_id in result.failed:
            state = self._seqs.get(seq_id)
            if state is not None:
                req = self._requests[state.seq.request_id]
                if not state.reported:
                    self._report_finish(state, req)
                touched[req.request.request_id] = req
        return [self._collect(req) for req in touched.values()]

    def _pending(self, state: _SeqState, req: _RequestState) -> SeqOutput:
        out = req.pending.get(state.seq.index)
        if out is None:
            want_lp = state.seq.params.logprobs is not None
            out = SeqOutput(
                state.seq.index,
                [],
                [] if want_lp else None,
                [] if want_lp else None,
                [] if want_lp else None,
            )
            req.pending[state.seq.index] = out
        return out

    def _apply_token(self, state: _SeqState, req: _RequestState, sampled: SampledToken) -> None:
        seq = state.seq
        out = self._pending(state, req)
        token = sampled.token_id
        out.token_ids.append(token)
        self.num_generated_tokens += 1
        grammar = state.inputs.grammar
        if grammar is not None:  # structured output: the constraint follows the sampled token
            grammar.advance(token)
            if grammar.error is not None and not seq.is_finished:
                req.error = EngineError(
                    f"structured output failed: {grammar.error}", code="structured_output_failed"
                )
                self.scheduler.finish(seq, "error")
        if out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None:
            top = sampled.top_logprobs or []
            out.logprobs.append(sampled.logprob if sampled.logprob is not None else float("nan"))
            out.top_ids.append([t for t, _ in top])
            out.top_logprobs.append([lp for _, lp in top])

    def _report_finish(self, state: _SeqState, req: _RequestState) -> None:
        out = self._pending(state, req)
        out.finish_reason = state.seq.finish_reason
        out.stop_reason = state.seq.stop_reason
        state.reported = True

    def _collect(self, req: _RequestState) -> CoreOutput:
        finished = all(s.reported or s.seq.is_finished for s in req.seqs)
        if finished:
            for s in req.seqs:
                if not s.reported:
                    self._report_finish(s, req)
            self._drop(req)
        seqs = sorted(req.pending.values(), key=lambda o: o.index)
        req.pending = {}
        first = req.seqs[0].seq
        return CoreOutput(
            request_id=req.request.request_id,
            seqs=seqs,
            prompt_tokens=first.num_prompt_tokens,
            cached_tokens=first.num_cached_tokens,
            finished=finished,
            error=error_info(req.error) if req.error is not None else None,
            first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
        )
