"""Tests of `glmv bench serve` (glmv.bench_serve).

Three layers:
* scripted SSE over an `httpx.MockTransport` with a fake clock, asserting exact metric values;
* a small fake OpenAI-compatible streaming server (FastAPI on uvicorn, 127.0.0.1, ephemeral port)
  that records the peak number of concurrent requests;
* one short run against a real `glmv serve` on the tiny random-weight checkpoint.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from glmv.bench_serve import (
    BenchConfig,
    BenchResult,
    arrival_schedule,
    build_conversations,
    config_from_args,
    encode_body,
    parse_image_size,
    request_body,
    run_benchmark,
)
from glmv.cli import build_parser, main
from glmv.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

DOCUMENTED_KEYS = {
    "date", "base_url", "endpoint", "model", "config", "duration_s", "num_requests", "completed", "failed",
    "total_input_tokens", "total_output_tokens", "total_cached_tokens", "request_throughput",
    "output_throughput", "total_token_throughput", "max_concurrent_requests", "turns",
    "second_turn_ttft_ratio", "warmup_failed", "errors", "requests",
} | {f"{k}_{m}_ms" for k in ("mean", "median", "std", "p90", "p99") for m in ("ttft", "tpot", "itl", "e2el")}  # fmt: skip


# --- scripted SSE with a fake clock ---------------------------------------------------------------------------


class FakeClock:
    """Time that moves only when the scripted server says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        # Let requests created before this sleep be sent first (a few loop turns: the per-request
        # timeout runs the request in its own task), then jump ahead.
        for _ in range(5):
            await asyncio.sleep(0)
        self.now += seconds


def sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def token_chunk(text: str, field_name: str = "content") -> bytes:
    return sse({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {field_name: text}, "finish_reason": None}]})


@dataclass
class Script:
    """What the scripted server sends for one request: waits (seconds) before each token, etc."""

    gaps: list[float]
    texts: list[str] | None = None
    usage: dict[str, Any] | None = None
    after_tokens: float = 0.01  # time spent on the finish and usage chunks
    status: int = 200
    error_event_after: int | None = None  # send an SSE error event after this many tokens
    truncate: bool = False  # end the stream without [DONE]
    field_name: str = "content"


@dataclass
class Scripted:
    """An `httpx.MockTransport` whose responses follow `script(request_id, body)`."""

    clock: FakeClock
    script: Callable[[str, dict[str, Any]], Script]
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[httpx.Headers] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            self.headers.append(request.headers)
            return httpx.Response(200, json={"object": "list", "data": [{"id": "scripted-model", "object": "model"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        self.headers.append(request.headers)
        plan = self.script(request.headers["x-request-id"], body)
        if plan.status != 200:
            return httpx.Response(plan.status, json={"error": {"message": "boom", "type": "internal_error", "param": None, "code": None}})
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self.stream(plan))

    async def stream(self, plan: Script) -> AsyncIterator[bytes]:
        clock = self.clock
        yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], "usage": None})
        texts = plan.texts or [f"t{i} " for i in range(len(plan.gaps))]
        for i, (gap, text) in enumerate(zip(plan.gaps, texts, strict=True)):
            if plan.error_event_after == i:
                yield sse({"error": {"message": "model execution failed", "type": "internal_error", "param": None, "code": "engine_error"}})
                yield b"data: [DONE]\n\n"
                return
            clock.now += gap
            yield token_chunk(text, plan.field_name)
        if plan.truncate:
            return
        clock.now += plan.after_tokens / 2
        yield sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        clock.now += plan.after_tokens / 2
        if plan.usage is not None:
            yield sse({"choices": [], "usage": plan.usage})
        yield b"data: [DONE]\n\n"


def conversation_of(request_id: str) -> tuple[int, int]:
    _, _seed, conv, turn = request_id.split("-")
    return int(conv), int(turn)


def quiet(**kwargs: Any) -> BenchConfig:
    values: dict[str, Any] = {"base_url": "http://bench.test", "disable_tqdm": True, "input_tokens": 8}
    values.update(kwargs)
    return BenchConfig(**values)


async def test_exact_metrics_from_scripted_timings() -> None:
    clock = FakeClock()

    def script(request_id: str, body: dict[str, Any]) -> Script:
        conv, _ = conversation_of(request_id)
        ttft = (0.1, 0.3)[conv]
        return Script(gaps=[ttft, 0.02, 0.02, 0.05], usage={"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})

    server = Scripted(clock, script)
    result = await run_benchmark(
        quiet(num_prompts=2, max_concurrency=1, output_tokens=4), transport=server.transport(), clock=clock, sleep=clock.sleep
    )
    assert result.model == "scripted-model"
    assert (result.completed, result.failed) == (2, 0)
    # TTFT 100 and 300 ms: linear-interpolation percentiles.
    assert result.ttft.mean == pytest.approx(200.0)
    assert result.ttft.median == pytest.approx(200.0)
    assert result.ttft.std == pytest.approx(100.0)
    assert result.ttft.p90 == pytest.approx(280.0)
    assert result.ttft.p99 == pytest.approx(298.0)
    # ITL: the gaps between the four token chunks of both requests.
    assert result.itl.count == 6
    assert result.itl.mean == pytest.approx(30.0)
    assert result.itl.median == pytest.approx(20.0)
    assert result.itl.std == pytest.approx(math.sqrt(200.0))
    assert result.itl.p90 == pytest.approx(50.0) and result.itl.p99 == pytest.approx(50.0)
    # E2E latency ends at the last token; TPOT = (E2E - TTFT) / (4 - 1) = 30 ms for both.
    assert [r.e2el for r in result.records] == [pytest.approx(0.19), pytest.approx(0.39)]
    assert result.e2el.mean == pytest.approx(290.0)
    assert result.tpot.mean == pytest.approx(30.0) and result.tpot.p99 == pytest.approx(30.0)
    # One after the other (max concurrency 1): 0.2 s then 0.4 s including the finish and usage chunks.
    assert [r.start for r in result.records] == [pytest.approx(0.0), pytest.approx(0.2)]
    assert [r.end for r in result.records] == [pytest.approx(0.2), pytest.approx(0.6)]
    assert result.duration == pytest.approx(0.6)
    assert result.max_concurrent_requests == 1
    assert (result.total_input_tokens, result.total_output_tokens) == (20, 8)
    assert result.request_throughput == pytest.approx(2 / 0.6)
    assert result.output_throughput == pytest.approx(8 / 0.6)
    assert result.total_token_throughput == pytest.approx(28 / 0.6)
    assert [r.content for r in result.records] == ["t0 t1 t2 t3 "] * 2
    # The model came from GET /v1/models; no key, no Authorization header.
    assert all("authorization" not in h for h in server.headers)


async def test_second_turn_ttft_is_reported_separately() -> None:
    clock = FakeClock()

    def script(request_id: str, body: dict[str, Any]) -> Script:
        second = len(body["messages"]) == 3
        usage = {"prompt_tokens": 300 if second else 200, "completion_tokens": 3,
                 "prompt_tokens_details": {"cached_tokens": 180 if second else 0}}  # fmt: skip
        return Script(gaps=[0.05 if second else 0.2, 0.01, 0.01], usage=usage, texts=["An ", "answer", "."])

    server = Scripted(clock, script)
    config = quiet(num_prompts=3, max_concurrency=1, output_tokens=3, turns=2, image_size=(32, 24))
    result = await run_benchmark(config, transport=server.transport(), clock=clock, sleep=clock.sleep)
    assert (result.completed, len(result.records)) == (6, 6)
    first, second = result.turns
    assert (first.turn, first.completed, second.turn, second.completed) == (1, 3, 2, 3)
    assert first.ttft.median == pytest.approx(200.0) and first.ttft.p99 == pytest.approx(200.0)
    assert second.ttft.median == pytest.approx(50.0)
    assert result.second_turn_ttft_ratio == pytest.approx(0.25)
    assert (first.total_cached_tokens, second.total_cached_tokens) == (0, 540)
    assert result.ttft.median == pytest.approx(125.0)  # overall: three of each
    # Turn 2 repeats the first user turn (same image), the answer, and a new question.
    turn1, turn2 = server.bodies[0]["messages"], server.bodies[1]["messages"]
    assert turn2[0] == turn1[0]
    assert turn2[1] == {"role": "assistant", "content": "An answer."}
    assert turn2[2]["role"] == "user" and isinstance(turn2[2]["content"], str)
    table = result.format_table()
    assert "Turn 2 median TTFT (ms):" in table and "25.0%" in table
    data = result.to_dict()
    assert data["second_turn_ttft_ratio"] == pytest.approx(0.25)
    assert [t["median_ttft_ms"] for t in data["turns"]] == [pytest.approx(200.0), pytest.approx(50.0)]


async def test_failures_are_counted_and_kept() -> None:
    clock = FakeClock()

    def script(request_id: str, body: dict[str, Any]) -> Script:
        conv, _ = conversation_of(request_id)
        usage = {"prompt_tokens": 5, "completion_tokens": 3}
        if conv == 1:
            return Script(gaps=[0.1], status=500)
        if conv == 2:
            return Script(gaps=[0.1, 0.1, 0.1], usage=usage, error_event_after=2)
        if conv == 3:
            return Script(gaps=[0.1, 0.1], usage=usage, truncate=True)
        return Script(gaps=[0.1, 0.1, 0.1], usage=usage)

    server = Scripted(clock, script)
    config = quiet(num_prompts=4, max_concurrency=1, output_tokens=3, turns=2)
    result = await run_benchmark(config, transport=server.transport(), clock=clock, sleep=clock.sleep)
    # Conversation 0 succeeds twice; the others fail on their first turn, so their second is never sent.
    assert (result.completed, result.failed, len(result.records)) == (2, 3, 5)
    assert [(r.conversation, r.turn, r.success) for r in result.records] == [
        (0, 1, True), (0, 2, True), (1, 1, False), (2, 1, False), (3, 1, False)
    ]  # fmt: skip
    assert result.errors == [
        "conversation 1 turn 1: HTTP 500: boom",
        "conversation 2 turn 1: stream error: model execution failed",
        "conversation 3 turn 1: the stream ended before data: [DONE]",
    ]
    # Only successful requests count towards tokens and throughput.
    assert (result.total_output_tokens, result.total_input_tokens) == (6, 10)
    assert result.request_throughput == pytest.approx(2 / result.duration)
    assert [t.failed for t in result.turns] == [3, 0]
    assert len(server.bodies) == 5


async def test_poisson_arrivals_follow_the_seeded_schedule() -> None:
    clock = FakeClock()
    server = Scripted(clock, lambda rid, body: Script(gaps=[0.0, 0.0], usage={"prompt_tokens": 1, "completion_tokens": 2}, after_tokens=0.0))
    config = quiet(num_prompts=6, request_rate=10.0, seed=3, output_tokens=2)
    result = await run_benchmark(config, transport=server.transport(), clock=clock, sleep=clock.sleep)
    expected = arrival_schedule(6, 10.0, 3)
    assert [r.scheduled for r in result.records] == expected
    assert [r.start for r in result.records] == [pytest.approx(t) for t in expected]
    assert result.completed == 6


async def test_output_tokens_fall_back_to_chunks_and_reasoning_counts_as_text() -> None:
    clock = FakeClock()
    server = Scripted(clock, lambda rid, body: Script(gaps=[0.5, 0.1, 0.1], field_name="reasoning_content"))
    result = await run_benchmark(
        quiet(num_prompts=1, output_tokens=3), transport=server.transport(), clock=clock, sleep=clock.sleep
    )
    (record,) = result.records
    assert record.success and record.ttft == pytest.approx(0.5)
    assert (record.output_tokens, record.prompt_tokens, record.cached_tokens) == (3, 0, None)
    assert record.reasoning == "t0 t1 t2 " and record.content == ""
    assert result.tpot.mean == pytest.approx(100.0)


async def test_request_timeout_is_a_failure() -> None:
    async def handle(request: httpx.Request) -> httpx.Response:
        async def body() -> AsyncIterator[bytes]:
            yield token_chunk("first")
            await asyncio.sleep(30)
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, content=body())

    result = await run_benchmark(
        quiet(num_prompts=2, model="m", timeout=0.2, output_tokens=2), transport=httpx.MockTransport(handle)
    )
    assert (result.completed, result.failed) == (0, 2)
    assert all(r.error == "timed out after 0.2 s" and r.ttft is not None for r in result.records)


async def test_model_listing_api_key_and_errors() -> None:
    seen: list[httpx.Request] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers.get("authorization") != "Bearer sk-test":
            return httpx.Response(401, json={"error": {"message": "bad key"}})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": []})
        return httpx.Response(200, content=token_chunk("x") + b"data: [DONE]\n\n")

    with pytest.raises(ConfigError, match="lists no models"):
        await run_benchmark(quiet(api_key="sk-test"), transport=httpx.MockTransport(handle))
    with pytest.raises(ConfigError, match="HTTP 401"):
        await run_benchmark(quiet(), transport=httpx.MockTransport(handle))
    # A base URL given with /v1 works too; the key goes with every request.
    result = await run_benchmark(
        quiet(base_url="http://bench.test/v1/", api_key="sk-test", model="given", num_prompts=2, output_tokens=1),
        transport=httpx.MockTransport(handle),
    )
    assert result.completed == 2 and result.model == "given"
    assert [str(r.url) for r in seen[-2:]] == ["http://bench.test/v1/chat/completions"] * 2
    assert result.to_dict()["config"]["api_key"] == "<redacted>"


# --- what is sent -----------------------------------------------------------------------------------------


def decode_data_url(url: str) -> Image.Image:
    header, _, data = url.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_request_body_and_synthetic_inputs() -> None:
    config = BenchConfig(num_prompts=3, input_tokens=40, output_tokens=17, image_size=(48, 32), images_per_request=2, seed=5)
    convs = build_conversations(config, 0, 3)
    body = request_body(config, "m", [{"role": "user", "content": convs[0].user_content}])
    assert body["model"] == "m" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (17, 17, True)
    assert "temperature" not in body
    # The bytes actually sent are the same JSON, built from the pre-serialised user message.
    extra = dataclasses.replace(config, extra_body={"top_k": 1}, temperature=0.5)
    sent = json.loads(encode_body(extra, "m", [convs[0].user_message, b'{"role": "assistant", "content": "x"}']))
    assert sent == request_body(extra, "m", [json.loads(convs[0].user_message), {"role": "assistant", "content": "x"}])
    assert sent["top_k"] == 1 and sent["temperature"] == 0.5
    content = convs[0].user_content
    assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
    images = [decode_data_url(part["image_url"]["url"]) for part in content[:2]]
    assert [(im.format, im.size, im.mode) for im in images] == [("PNG", (48, 32), "RGB")] * 2
    # The PNG holds exactly the seeded noise: image j of conversation i is index i * images + j.
    expected = np.random.default_rng([5, 1]).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(images[1]), expected)
    # Every request its own images and text; the same seed gives the same ones.
    urls = [p["image_url"]["url"] for c in convs for p in c.user_content[:2]]
    assert len(set(urls)) == 6
    again = build_conversations(config, 0, 3)
    assert [c.user_content for c in again] == [c.user_content for c in convs]
    texts = [c.user_content[-1]["text"] for c in convs]
    assert len(set(texts)) == 3
    assert len(texts[0].split("\n")[0].split()) == 40
    # --same-image: one image for all; JPEG on request; no ignore_eos when asked not to.
    same = BenchConfig(image_size=(20, 10), same_image=True, image_format="jpeg", ignore_eos=False, temperature=0.0)
    convs = build_conversations(same, 0, 4)
    assert len({c.user_content[0]["image_url"]["url"] for c in convs}) == 1
    assert decode_data_url(convs[0].user_content[0]["image_url"]["url"]).format == "JPEG"
    body = request_body(same, "m", [])
    assert "ignore_eos" not in body and "min_tokens" not in body and body["temperature"] == 0.0
    # Text only without --image-size.
    assert [p["type"] for p in build_conversations(BenchConfig(), 0, 1)[0].user_content] == ["text"]


def test_arrival_schedule() -> None:
    assert arrival_schedule(4, math.inf, 0) == [0.0] * 4
    a = arrival_schedule(50, 5.0, 7)
    assert a == arrival_schedule(50, 5.0, 7)
    assert a != arrival_schedule(50, 5.0, 8)
    assert a[0] == 0.0 and all(x < y for x, y in itertools.pairwise(a))
    long = arrival_schedule(20001, 4.0, 1)
    assert long[-1] / 20000 == pytest.approx(0.25, rel=0.03)  # mean gap 1 / rate


def test_config_validation_and_cli_parsing() -> None:
    assert parse_image_size("1120x896") == (1120, 896)
    assert parse_image_size("448") == (448, 448)
    with pytest.raises(ConfigError):
        parse_image_size("big")
    for bad in ({"num_prompts": 0}, {"request_rate": 0.0}, {"turns": 0}, {"max_concurrency": 0}, {"image_format": "gif"}):
        with pytest.raises(ConfigError) as info:
            BenchConfig(**bad).validate()  # type: ignore[arg-type]
        assert info.value.param == next(iter(bad))
    args = build_parser().parse_args(
        ["bench", "serve", "--base-url", "http://h:1", "--num-prompts", "7", "--max-concurrency", "3",
         "--request-rate", "2.5", "--image-size", "64x32", "--turns", "2", "--same-image", "--output-tokens", "9",
         "--extra-body", '{"top_k": 1}', "--disable-tqdm"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.base_url, config.num_prompts, config.max_concurrency, config.request_rate) == ("http://h:1", 7, 3, 2.5)
    assert (config.image_size, config.turns, config.same_image, config.output_tokens) == ((64, 32), 2, True, 9)
    assert config.extra_body == {"top_k": 1} and config.ignore_eos is True
    assert config_from_args(build_parser().parse_args(["bench", "serve"])).request_rate == math.inf
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "serve", "--image-size", "wide"])


# --- a fake OpenAI-compatible server over real sockets ------------------------------------------------------


@dataclass
class FakeServerState:
    token_delay: float = 0.005
    fail_500: set[int] = field(default_factory=set)
    fail_sse: set[int] = field(default_factory=set)
    active: int = 0
    peak: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, **kwargs: Any) -> None:
        with self.lock:
            self.active = self.peak = 0
            self.bodies.clear()
            self.fail_500, self.fail_sse = set(), set()
            self.token_delay = 0.005
            for k, v in kwargs.items():
                setattr(self, k, v)


def fake_app(state: FakeServerState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        conv = int(request.headers.get("x-request-id", "x-0-0-0").split("-")[2])
        with state.lock:
            state.bodies.append(body)
            state.active += 1
            state.peak = max(state.peak, state.active)
        if conv in state.fail_500:
            with state.lock:
                state.active -= 1
            return JSONResponse({"error": {"message": "fake overload", "type": "internal_error"}}, status_code=500)
        n = int(body["max_tokens"])
        prompt_tokens = 10 * len(body["messages"])

        async def stream() -> AsyncIterator[str]:
            try:
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}) + "\n\n"
                for i in range(n):
                    await asyncio.sleep(state.token_delay)
                    if conv in state.fail_sse and i == 1:
                        yield "data: " + json.dumps({"error": {"message": "fake engine error"}}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}) + "\n\n"
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
                yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                with state.lock:
                    state.active -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


@dataclass
class FakeServer:
    url: str
    state: FakeServerState


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    state = FakeServerState()
    server = uvicorn.Server(uvicorn.Config(fake_app(state), host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the fake server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield FakeServer(f"http://127.0.0.1:{port}", state)
    server.should_exit = True
    thread.join(10)


def assert_ordered(result: BenchResult) -> None:
    for name in ("ttft", "tpot", "itl", "e2el"):
        stats = getattr(result, name)
        assert stats.count > 0
        assert 0 <= stats.median <= stats.p90 <= stats.p99, name


async def test_real_socket_run_respects_max_concurrency(fake_server: FakeServer, tmp_path: Path) -> None:
    fake_server.state.reset(token_delay=0.01)
    out = tmp_path / "res" / "bench.json"
    config = BenchConfig(base_url=fake_server.url, num_prompts=12, max_concurrency=3, output_tokens=5,
                         image_size=(16, 16), disable_tqdm=True, result_json=str(out))  # fmt: skip
    result = await run_benchmark(config)
    assert (result.completed, result.failed, result.model) == (12, 0, "fake-model")
    assert 1 < fake_server.state.peak <= 3
    assert 1 < result.max_concurrent_requests <= 3
    assert result.total_output_tokens == 60 and result.total_input_tokens == 120
    assert result.request_throughput > 0 and result.output_throughput > 0 and result.total_token_throughput > 0
    assert_ordered(result)
    assert all(r.itl and len(r.itl) == 4 for r in result.records)
    body = fake_server.state.bodies[0]
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"], body["stream"]) == (5, 5, True, True)
    assert body["stream_options"] == {"include_usage": True}
    data = json.loads(out.read_text())
    assert set(data) == DOCUMENTED_KEYS
    assert data["completed"] == 12 and data["config"]["max_concurrency"] == 3 and data["config"]["request_rate"] == "inf"
    assert data["config"]["image_size"] == "16x16" and len(data["requests"]) == 12
    assert data["p99_ttft_ms"] == pytest.approx(result.ttft.p99)


async def test_real_socket_unbounded_concurrency(fake_server: FakeServer) -> None:
    fake_server.state.reset(token_delay=0.02)
    result = await run_benchmark(BenchConfig(base_url=fake_server.url, num_prompts=8, output_tokens=5, disable_tqdm=True))
    assert result.completed == 8
    assert fake_server.state.peak > 3


async def test_real_socket_failures(fake_server: FakeServer) -> None:
    fake_server.state.reset(fail_500={1, 4}, fail_sse={2})
    result = await run_benchmark(BenchConfig(base_url=fake_server.url, num_prompts=6, output_tokens=4, disable_tqdm=True))
    assert (result.completed, result.failed) == (3, 3)
    assert sorted(r.conversation for r in result.records if not r.success) == [1, 2, 4]
    assert "conversation 1 turn 1: HTTP 500: fake overload" in result.errors
    assert "conversation 2 turn 1: stream error: fake engine error" in result.errors
    assert result.total_output_tokens == 12


async def test_real_socket_request_rate_pacing_and_turns(fake_server: FakeServer) -> None:
    fake_server.state.reset()
    config = BenchConfig(base_url=fake_server.url, num_prompts=5, request_rate=40.0, seed=11, turns=2,
                         output_tokens=3, warmup=2, disable_tqdm=True)  # fmt: skip
    result = await run_benchmark(config)
    schedule = arrival_schedule(5, 40.0, 11)
    firsts = [r for r in result.records if r.turn == 1]
    assert [r.scheduled for r in firsts] == schedule
    assert all(r.start >= r.scheduled for r in firsts)  # never sent before its arrival time
    assert (result.completed, len(result.records), result.warmup_failed) == (10, 10, 0)
    assert [(t.turn, t.completed) for t in result.turns] == [(1, 5), (2, 5)]
    assert result.turns[1].ttft.count == 5
    # 2 warm-up requests, then 5 conversations of 2 turns; second turns carry the history.
    bodies = fake_server.state.bodies
    assert len(bodies) == 12
    assert sorted(len(b["messages"]) for b in bodies) == [1] * 7 + [3] * 5
    assert result.total_input_tokens == 5 * 10 + 5 * 30


def test_cli_prints_the_table_and_writes_json(fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_server.state.reset()
    out = tmp_path / "cli.json"
    code = main(["bench", "serve", "--base-url", fake_server.url, "--num-prompts", "4", "--output-tokens", "3",
                 "--max-concurrency", "2", "--disable-tqdm", "--result-json", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed
    assert "Successful requests:                     4" in printed
    assert "Mean TTFT (ms):" in printed and "P99 ITL (ms):" in printed
    assert json.loads(out.read_text())["completed"] == 4
    # A server that is not there: a clear error and exit status 2.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--disable-tqdm"]) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_cli_sweeps_request_rates(fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_server.state.reset()
    out = tmp_path / "sweep.json"
    code = main(["bench", "serve", "--base-url", fake_server.url, "--num-prompts", "3", "--output-tokens", "3",
                 "--request-rate", "200,inf", "--disable-tqdm", "--result-json", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("Serving Benchmark Result") == 2
    assert "Request rate configured (RPS):           200.00" in printed
    sweep = printed[printed.index("Request-rate sweep"):].splitlines()
    assert sweep[1].split() == ["offered", "req/s", "served", "req/s", "ok/failed", "out", "tok/s",
                                "TTFT", "p50", "TTFT", "p99", "TPOT", "p50", "TPOT", "p99"]  # fmt: skip
    assert [line.split()[0] for line in sweep[2:4]] == ["200", "inf"]
    assert [line.split()[2] for line in sweep[2:4]] == ["3/0", "3/0"]
    data = json.loads(out.read_text())
    assert [run["config"]["request_rate"] for run in data["sweep"]] == [200.0, "inf"]
    assert [run["completed"] for run in data["sweep"]] == [3, 3]
    assert len(fake_server.state.bodies) == 6
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "serve", "--request-rate", "4,fast"])
    assert main(["bench", "serve", "--base-url", fake_server.url, "--request-rate", "4,0", "--disable-tqdm"]) == 2
    assert "--request-rate must be > 0" in capsys.readouterr().err


# --- against a real glmv server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def glmv_server(tiny41_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("bench-glmv") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_")}
    env["GLMV_CACHE_DIR"] = str(log_path.parent / "cache")
    if os.environ.get("GLMV_ENGINE_MODE"):  # where the engine core runs, as for the other tests
        env["GLMV_ENGINE_MODE"] = os.environ["GLMV_ENGINE_MODE"]
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "glmv", "serve", "--model", str(tiny41_dir), "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "2048", "--kv-cache-gb", "0.1", "--log-level", "warning",
           "--no-access-log"]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.skip(f"glmv serve exited with {process.returncode}: {log_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                pytest.skip(f"glmv serve was not ready within 120 s: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield base
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@pytest.mark.slow
async def test_against_a_real_glmv_server(glmv_server: str) -> None:
    config = BenchConfig(base_url=glmv_server, num_prompts=4, max_concurrency=2, input_tokens=20, output_tokens=8,
                         image_size=(64, 48), turns=2, warmup=1, disable_tqdm=True)  # fmt: skip
    result = await run_benchmark(config)
    assert result.failed == 0, result.errors
    assert result.completed == 8 and result.warmup_failed == 0
    # ignore_eos + min_tokens: every answer is exactly 8 tokens long, as the server's usage says.
    assert all(r.output_tokens == 8 and r.prompt_tokens > 0 for r in result.records)
    assert result.total_output_tokens == 64
    assert all(r.cached_tokens is not None for r in result.records)
    assert [t.completed for t in result.turns] == [4, 4]
    assert result.max_concurrent_requests <= 2
    assert_ordered(result)
