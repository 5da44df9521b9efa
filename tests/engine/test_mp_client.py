"""Both engine modes behind `start_engine`: the core in its own process (ZeroMQ, shared memory,
detokenisation in this process) answers exactly like the in-process engine; a core killed with
SIGKILL ends its requests with `EngineError` and comes back; the cores die with their parent;
data-parallel cores keep conversations on the core that has their prefix.

No test waits on time: every wait is for a condition, with a generous deadline."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from glmv.engine.client import EngineClient, start_engine
from glmv.engine.config import EngineConfig
from glmv.engine.mp_client import MPEngineClient
from glmv.engine.request import EngineRequest, TokenLogprob
from glmv.engine.sampling import SamplingParams
from glmv.engine.shm import SEGMENT_PREFIX
from glmv.engine.structured import json_object_output
from glmv.errors import (
    CheckpointError,
    ContextLengthExceededError,
    EngineError,
    GlmvError,
    InvalidRequestError,
    OverloadedError,
)
from glmv.tasks.inputs import InputBuilder, load_processors
from tests.models.reference import noise_image

REPO = Path(__file__).resolve().parents[2]
ENGINE = {"dtype": "float32", "kv_cache_gb": 0.05, "max_model_len": 2048, "max_num_seqs": 32}
GREEDY = {"temperature": 0.0, "ignore_eos": True}
DEADLINE_S = 120.0
_ids = itertools.count()


def config(model: Path, **kw: Any) -> EngineConfig:
    return EngineConfig(model=str(model), **{**ENGINE, **kw})


@dataclass
class Result:
    tokens: dict[int, list[int]] = field(default_factory=dict)
    text: dict[int, str] = field(default_factory=dict)
    finish: dict[int, tuple[str | None, int | str | None]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    usage: tuple[int, int, int] = (0, 0, 0)  # prompt, completion, cached
    error: GlmvError | None = None
    outputs: int = 0


async def collect(client: EngineClient, request: EngineRequest) -> Result:
    res = Result()
    async for out in client.generate(request):
        res.outputs += 1
        for d in out.deltas:
            res.tokens.setdefault(d.index, []).extend(d.token_ids)
            res.text[d.index] = res.text.get(d.index, "") + d.text
            if d.logprobs is not None:
                res.logprobs.setdefault(d.index, []).extend(d.logprobs)
            if d.finish_reason is not None:
                res.finish[d.index] = (d.finish_reason, d.stop_reason)
        res.usage = (out.prompt_tokens, out.completion_tokens, out.cached_tokens)
        res.error = out.error
    return res


async def wait_until(predicate: Callable[[], bool], what: str, deadline: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def same(a: Result, b: Result) -> None:
    assert (a.tokens, a.text, a.finish, a.usage, a.error) == (b.tokens, b.text, b.finish, b.usage, b.error)
    assert a.logprobs.keys() == b.logprobs.keys()
    for i in a.logprobs:
        for x, y in zip(a.logprobs[i], b.logprobs[i], strict=True):
            assert (x.token_id, x.token) == (y.token_id, y.token)
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [(t, s) for t, s, _ in x.top] == [(t, s) for t, s, _ in y.top]


# --- one client per mode for the parity tests ------------------------------------------------------------


@pytest.fixture(scope="module")
def builder(tiny41_dir: Path) -> InputBuilder:
    return load_processors(tiny41_dir)[1]


@pytest.fixture(scope="module")
def clients(tiny41_dir: Path) -> Iterator[dict[str, EngineClient]]:
    # The core process schedules asynchronously (as on a GPU), the in-process one synchronously
    # (the CPU's default): the parity tests hold both ways at once.
    started = {
        mode: start_engine(config(tiny41_dir, engine_mode=mode, async_scheduling=mode == "process"))
        for mode in ("inprocess", "process")
    }
    assert isinstance(started["process"], MPEngineClient)
    yield started
    for client in started.values():
        client.shutdown()


def build(
    builder: InputBuilder, spec: tuple[list[dict[str, Any]], list[Any], SamplingParams]
) -> EngineRequest:
    messages, images, params = spec
    return builder.build(f"req-{next(_ids)}", messages, builder.preprocess(images), params)


def user(text: str, images: int = 0) -> list[dict[str, Any]]:
    if not images:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [*([{"type": "image"}] * images), {"type": "text", "text": text}]}]


async def test_both_modes_answer_alike(clients: dict[str, EngineClient], builder: InputBuilder) -> None:
    """Text, images, n > 1 with seeds, logprobs, stop strings, stop tokens, special-token skipping
    and structured output: the same tokens, text, finish reasons, logprobs and usage, one request
    at a time so that the prefix caches see the same history."""
    img = [noise_image(w, h, s) for s, (w, h) in enumerate([(224, 160), (90, 120), (112, 112)])]
    base = (user("Count for me, please."), [], SamplingParams(max_tokens=24, **GREEDY))
    probe = await collect(clients["inprocess"], build(builder, base))
    text, toks = probe.text[0], probe.tokens[0]
    assert len(text) > 8
    specs = [
        base,
        (user("What is in the picture?", 1), img[:1], SamplingParams(max_tokens=10, logprobs=3, **GREEDY)),
        (user("Compare them.", 2), img[1:], SamplingParams(max_tokens=8, **GREEDY)),
        (
            user("Tell a story."),
            [],
            SamplingParams(
                n=3, max_tokens=10, temperature=1.0, top_p=0.9, seed=11, logprobs=1, ignore_eos=True
            ),
        ),
        (user("Count for me, please."), [], SamplingParams(max_tokens=24, stop=[text[4:7]], **GREEDY)),
        (
            user("Count for me, please."),
            [],
            SamplingParams(max_tokens=24, stop_token_ids=[toks[5]], **GREEDY),
        ),
        (
            user("Count for me, please."),
            [],
            SamplingParams(max_tokens=24, skip_special_tokens=True, **GREEDY),
        ),
        (
            user("Answer in JSON.", 1),
            img[2:],
            SamplingParams(max_tokens=30, structured=json_object_output(), **GREEDY),
        ),
        (user("Count for me, please."), [], SamplingParams(n=2, max_tokens=24, stop=[text[6:9]], **GREEDY)),
    ]
    got = {mode: [await collect(c, build(builder, spec)) for spec in specs] for mode, c in clients.items()}
    for a, b in zip(got["inprocess"], got["process"], strict=True):
        same(a, b)
    stopped = got["process"][4]
    assert stopped.text[0] == text[: text.index(text[4:7])] and stopped.finish[0] == ("stop", text[4:7])
    assert stopped.usage[1] == len(stopped.tokens[0]) < 24
    by_token = got["process"][5]
    assert by_token.finish[0] == ("stop", toks[5]) and by_token.tokens[0] == toks[: toks.index(toks[5]) + 1]
    assert len(got["process"][3].tokens) == 3 and got["process"][3].usage[1] == 30
    assert got["process"][1].usage[0] > 40 and len(got["process"][1].logprobs[0]) == 10


async def test_concurrent_requests_answer_alike(
    clients: dict[str, EngineClient], builder: InputBuilder
) -> None:
    img = noise_image(140, 100, 5)
    specs = [
        (
            user(f"Question {i}: what is the total?", i % 2),
            [img] if i % 2 else [],
            SamplingParams(max_tokens=6 + i, **GREEDY),
        )
        for i in range(8)
    ]
    got = {}
    for mode, client in clients.items():
        got[mode] = await asyncio.gather(*(collect(client, build(builder, s)) for s in specs))
    for a, b in zip(got["inprocess"], got["process"], strict=True):
        assert (a.tokens, a.text, a.finish, a.usage[:2]) == (b.tokens, b.text, b.finish, b.usage[:2])


@pytest.mark.parametrize("mode", ["inprocess", "process"])
async def test_closing_streams_aborts_and_frees_the_kv_blocks(
    clients: dict[str, EngineClient], builder: InputBuilder, mode: str
) -> None:
    client = clients[mode]
    generated_before = client.stats().num_generated_tokens
    gens = [
        client.generate(
            build(builder, (user(f"Write a long essay {i}."), [], SamplingParams(max_tokens=1500, **GREEDY)))
        )
        for i in range(4)
    ]
    for g in gens:
        await g.__anext__()  # running, with KV blocks
    assert client.num_pending == 4
    for g in gens:
        await g.aclose()
    assert client.num_pending == 0

    def freed() -> bool:
        s = client.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.kv_usage == 0.0

    await wait_until(freed, "the aborted requests to leave the core")
    # They stopped: had they run to the end, 4 × 1500 tokens would have been sampled.
    assert client.stats().num_generated_tokens - generated_before < 4 * 1500


@pytest.mark.parametrize("mode", ["inprocess", "process"])
async def test_admission_and_validation_errors_are_the_same(
    clients: dict[str, EngineClient], builder: InputBuilder, mode: str
) -> None:
    client = clients[mode]
    long = build(builder, (user("go"), [], SamplingParams(max_tokens=1500, **GREEDY)))
    running = client.generate(long)
    await running.__anext__()
    limit = client.max_pending
    client.max_pending = 1
    try:
        with pytest.raises(OverloadedError) as over:
            await client.generate(build(builder, (user("hi"), [], SamplingParams(max_tokens=2)))).__anext__()
        assert over.value.status_code == 503
    finally:
        client.max_pending = limit
        await running.aclose()
    # The same request id twice: the second is refused, the first is unharmed.
    dup = build(builder, (user("twice"), [], SamplingParams(max_tokens=4, **GREEDY)))
    first = client.generate(dup)
    await first.__anext__()
    with pytest.raises(InvalidRequestError, match="Duplicate request id"):
        await client.generate(dup).__anext__()
    async for out in first:
        if out.finished:
            assert out.deltas and out.deltas[-1].finish_reason == "length"
    bad = [
        build(builder, (user("x " * 3000), [], SamplingParams(max_tokens=4))),
        build(builder, (user("hi"), [], SamplingParams(temperature=5.0))),
    ]
    image_mismatch = build(builder, (user("look", 1), [noise_image(56, 56, 1)], SamplingParams(max_tokens=4)))
    image_mismatch.images = []
    errors = []
    for request in [*bad, image_mismatch]:
        with pytest.raises(GlmvError) as info:
            await client.generate(request).__anext__()
        errors.append((type(info.value), info.value.param, info.value.message))
    assert [e[:2] for e in errors] == [
        (ContextLengthExceededError, "messages"),
        (InvalidRequestError, "temperature"),
        (InvalidRequestError, "messages"),
    ]
    assert client.num_pending == 0


def test_a_load_error_in_the_core_is_raised_as_itself(tiny41_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny41_dir, broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    messages = {}
    for mode in ("inprocess", "process"):
        with pytest.raises(CheckpointError) as info:
            start_engine(config(broken, engine_mode=mode))
        messages[mode] = info.value.message
    assert messages["process"] == messages["inprocess"]
    assert "safetensors" in messages["process"]


# --- core failure ------------------------------------------------------------------------------------------


class GatedClient(MPEngineClient):
    """Restarts wait for the test's go-ahead, so the window without a core can be inspected."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gate = threading.Event()

    def _restart(self, core: Any, delay: float) -> None:
        self.gate.wait(DEADLINE_S)
        super()._restart(core, delay)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


def my_segments() -> list[str]:
    shm = Path("/dev/shm")
    return [p.name for p in shm.glob(f"{SEGMENT_PREFIX}{os.getpid()}-*")] if shm.is_dir() else []


async def test_a_killed_core_fails_its_streams_restarts_and_finally_gives_up(
    tiny41_dir: Path, builder: InputBuilder
) -> None:
    client = GatedClient(config(tiny41_dir, engine_mode="process", max_core_restarts=1))
    client.start()
    pids: list[int] = []
    try:
        img = noise_image(112, 84, 3)
        started = [asyncio.Event() for _ in range(16)]

        async def stream(i: int) -> BaseException | None:
            spec = (
                user(f"Stream {i}.", i % 2),
                [img] if i % 2 else [],
                SamplingParams(max_tokens=1900, **GREEDY),
            )
            try:
                async for _ in client.generate(build(builder, spec)):
                    started[i].set()
            except BaseException as exc:
                started[i].set()
                return exc
            return None

        tasks = [asyncio.create_task(stream(i)) for i in range(16)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), DEADLINE_S)
        pid = client.pids[0]
        assert pid is not None
        pids.append(pid)
        os.kill(pid, signal.SIGKILL)
        ended = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S)
        assert all(isinstance(e, EngineError) and e.code == "engine_core_died" for e in ended), ended
        assert ended[0].status_code == 500  # type: ignore[union-attr]
        # No core alive: not running, no admission, nothing pending, no segment left.
        assert not client.running and client.dead is None and client.num_pending == 0
        with pytest.raises(OverloadedError):
            client.check_admission()
        assert my_segments() == []
        client.gate.set()
        await wait_until(lambda: client.running, "the core to restart")
        new_pid = client.pids[0]
        assert new_pid is not None and new_pid != pid and not alive(pid)
        pids.append(new_pid)
        res = await collect(
            client, build(builder, (user("Back?", 1), [img], SamplingParams(max_tokens=5, **GREEDY)))
        )
        assert len(res.tokens[0]) == 5 and res.finish[0] == ("length", None)
        # Once more: max_core_restarts=1 is used up, so the client gives up for good.
        os.kill(new_pid, signal.SIGKILL)
        await wait_until(lambda: client.dead is not None, "the client to give up")
        assert not client.running and isinstance(client.dead, EngineError)
    finally:
        client.gate.set()
        client.shutdown()
    assert not any(alive(p) for p in pids)
    assert my_segments() == []


def test_shutdown_and_a_dead_parent_leave_no_core_behind(tiny41_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from glmv.engine.client import start_engine\n"
        "from glmv.engine.config import EngineConfig\n"
        "if __name__ == '__main__':\n"
        f"    c = start_engine(EngineConfig(model={str(tiny41_dir)!r}, engine_mode='process', "
        "data_parallel_size=2, kv_cache_gb=0.02))\n"
        "    print(*c.pids, flush=True)\n"
        "    time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline().decode()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(alive(p) for p in pids), line
        parent.send_signal(signal.SIGKILL)
        parent.wait(DEADLINE_S)
        end = time.monotonic() + DEADLINE_S
        while any(alive(p) for p in pids):
            assert time.monotonic() < end, "a core outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


# --- data parallel -------------------------------------------------------------------------------------------


async def test_data_parallel_keeps_conversations_on_their_core(
    tiny41_dir: Path, builder: InputBuilder
) -> None:
    client = start_engine(config(tiny41_dir, engine_mode="process", data_parallel_size=2))
    try:
        assert isinstance(client, MPEngineClient) and len(client.pids) == 2
        img = [noise_image(112, 112, 20 + i) for i in range(5)]
        convs = []
        for i in range(20):
            images = [img[i // 4]] if i % 4 == 0 else []
            convs.append(
                (user(f"Conversation {i}: please summarise the quarterly figures.", len(images)), images)
            )
        turn1 = [build(builder, (m, ims, SamplingParams(max_tokens=6, **GREEDY))) for m, ims in convs]
        first = await asyncio.gather(*(collect(client, r) for r in turn1))
        router = client.router
        assert router is not None and sorted(router.routed) == [10, 10]  # the load spread evenly
        turn2 = []
        for (msgs, ims), res in zip(convs, first, strict=True):
            follow = [
                *msgs,
                {"role": "assistant", "content": res.text[0]},
                {"role": "user", "content": "And next year?"},
            ]
            turn2.append(build(builder, (follow, ims, SamplingParams(max_tokens=6, **GREEDY))))
        second = await asyncio.gather(*(collect(client, r) for r in turn2))
        cached = [r.usage[2] for r in second]
        assert sum(c > 0 for c in cached) >= 19, cached  # ≥ 95 % found their prefix
        per_core = client.core_stats()
        assert all(s.prefix_cache_hits > 0 and s.num_generated_tokens > 0 for s in per_core)
        total = client.stats()
        assert total.num_generated_tokens == sum(s.num_generated_tokens for s in per_core) == 40 * 6
        assert total.num_blocks == sum(s.num_blocks for s in per_core)
    finally:
        client.shutdown()


async def test_engine_mode_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tiny41_dir: Path) -> None:
    monkeypatch.setenv("GLMV_ENGINE_MODE", "inprocess")
    assert EngineConfig(model=str(tiny41_dir)).engine_mode == "inprocess"
    monkeypatch.setenv("GLMV_ENGINE_MODE", "process")
    assert EngineConfig(model=str(tiny41_dir)).engine_mode == "process"
    monkeypatch.setenv("GLMV_ENGINE_MODE", "threads")
    with pytest.raises(GlmvError, match="GLMV_ENGINE_MODE"):
        EngineConfig(model=str(tiny41_dir))
