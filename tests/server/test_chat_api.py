"""The chat-completions API in process (ASGI, the real tiny engine): shapes, streaming, errors,
thinking, reasoning split, timeouts, overload, metrics, models, health and readiness; plus
client-disconnect aborts and SIGTERM draining against a real `glmv serve` process."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from glmv.engine.client import EngineClient, EngineStats
from glmv.engine.request import CompletionDelta, EngineRequest, RequestOutput
from glmv.errors import EngineError, GlmvError, OverloadedError

from .conftest import build_engine, make_settings, metric_value, parse_sse


def user(text: str, *images: str) -> list[dict[str, Any]]:
    if not images:
        return [{"role": "user", "content": text}]
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": parts}]


# --- a scripted engine: the real tokenizer and model config, outputs from a list -------------------


Step = str | tuple[str, str] | BaseException | float


class ScriptedEngine:
    """An `EngineClient` that answers every request with the same script instead of running the
    model (the real engine's facts: its tokenizer and model config serve the prompt).

    A step is a text delta, `(text, finish_reason)` for the last one, an exception to raise, or a
    number of seconds to sleep.
    """

    def __init__(
        self,
        real: EngineClient,
        script: list[Step],
        *,
        admit: GlmvError | None = None,
        max_pending: int | None = None,
    ) -> None:
        self.real = real
        self.info = real.info
        self.max_pending = max_pending if max_pending is not None else real.max_pending
        self.dead: BaseException | None = None
        self.script = script
        self.admit_error = admit
        self.closed: list[str] = []
        self._closing = asyncio.Event()

    async def wait_closed(self, count: int) -> None:
        """Until `count` generators have been closed: a stream's generator is closed after its
        last bytes went out, so the client can see the end first."""
        while len(self.closed) < count:
            self._closing.clear()
            await asyncio.wait_for(self._closing.wait(), 60)

    @property
    def running(self) -> bool:
        return True

    @property
    def num_pending(self) -> int:
        return 0

    def start(self) -> None:
        pass

    def shutdown(self, timeout: float = 5.0) -> None:
        pass

    def validate(self, request: EngineRequest) -> None:
        pass

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return self.real.stats()

    def core_stats(self) -> list[EngineStats]:
        return [self.real.stats()]

    def check_admission(self) -> None:
        if self.admit_error is not None:
            raise self.admit_error

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.check_admission()
        produced = 0
        try:
            for step in self.script:
                if isinstance(step, BaseException):
                    raise step
                if isinstance(step, float):
                    await asyncio.sleep(step)
                    continue
                text, finish = (step, None) if isinstance(step, str) else step
                produced += 1
                yield RequestOutput(
                    request_id=request.request_id,
                    deltas=[CompletionDelta(index=0, text=text, token_ids=[1], finish_reason=finish)],
                    prompt_tokens=len(request.prompt_token_ids),
                    cached_tokens=0,
                    completion_tokens=produced,
                    finished=finish is not None,
                    arrival_time=request.arrival_time,
                    first_scheduled_time=request.arrival_time,
                    first_token_time=request.arrival_time,
                )
        finally:
            self.closed.append(request.request_id)
            self._closing.set()


# --- shapes ---------------------------------------------------------------------------------------------


async def test_non_streaming_response_has_the_openai_shape(
    client: httpx.AsyncClient, image_url: Callable[..., str]
) -> None:
    text_only = (
        await client.post("/v1/chat/completions", json={"messages": user("Describe it."), "max_tokens": 8})
    ).json()
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny-glm41v",
            "messages": user("Describe it.", image_url()),
            "max_tokens": 8,
            "seed": 1,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) > len("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "tiny-glm41v"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert "reasoning_content" in choice["message"]
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["logprobs"] is None
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0
    # The 64x48 image becomes 56x56 pixels = 4 merged patches plus its begin/end tokens.
    assert usage["prompt_tokens"] > text_only["usage"]["prompt_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 8


async def test_streaming_n2_with_usage(client: httpx.AsyncClient, image_url: Callable[..., str]) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": user("What colour?", image_url()),
            "max_tokens": 6,
            "n": 2,
            "seed": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events, done = parse_sse(r.text)
    assert done
    ids = {e["id"] for e in events}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    # One role chunk per choice first.
    assert [e["choices"][0]["delta"] for e in events[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert sorted(e["choices"][0]["index"] for e in events[:2]) == [0, 1]
    *chunks, last = events
    assert all("usage" in e and e["usage"] is None for e in chunks)
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for e in chunks:
        [c] = e["choices"]
        if c["finish_reason"] is not None:
            finishes[c["index"]].append(c["finish_reason"])
            assert c["delta"] == {}
    assert all(len(v) == 1 and v[0] in ("stop", "length") for v in finishes.values())
    assert usage["completion_tokens"] <= 12


async def test_stream_and_non_stream_give_the_same_text_for_a_seed(client: httpx.AsyncClient) -> None:
    body = {"messages": user("Tell me a story."), "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    whole = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    events, done = parse_sse(r.text)
    assert done
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    reasoning = "".join(e["choices"][0]["delta"].get("reasoning_content", "") for e in events if e["choices"])
    assert content == whole["content"]
    assert (reasoning or None) == whole["reasoning_content"]


async def test_logprobs_in_stream_and_non_stream(client: httpx.AsyncClient) -> None:
    body = {"messages": user("Hi"), "max_tokens": 5, "logprobs": True, "top_logprobs": 3, "ignore_eos": True}
    r = (await client.post("/v1/chat/completions", json=body)).json()
    entries = r["choices"][0]["logprobs"]["content"]
    assert len(entries) == 5 == r["usage"]["completion_tokens"]
    for e in entries:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["logprob"] <= 0.0
        assert len(e["top_logprobs"]) == 3
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][-1]["logprob"]
        assert e["logprob"] <= e["top_logprobs"][0]["logprob"] + 1e-5
        assert isinstance(e["bytes"], list) and all(0 <= b < 256 for b in e["bytes"])
    events, _ = parse_sse((await client.post("/v1/chat/completions", json={**body, "stream": True})).text)
    streamed = [x for e in events for c in e["choices"] if c["logprobs"] for x in c["logprobs"]["content"]]
    assert len(streamed) == 5


# --- validation errors --------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[dict[str, Any], int, str | None, str | None]] = [
    ({"messages": []}, 400, "messages", None),
    ({}, 400, "messages", "missing_required_parameter"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", None),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    (
        {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]},
        400,
        "messages[0].content[0].type",
        None,
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        400,
        "messages[0].content[0].text",
        None,
    ),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "a"},
                        {"type": "image_url", "image_url": {"detail": "low"}},
                    ],
                }
            ]
        },
        400,
        "messages[0].content[1].image_url.url",
        None,
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "tool", "content": "b", "tool_call_id": "1"},
            ]
        },
        400,
        "messages[1].role",
        None,
    ),
    (
        {
            "messages": [
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
            ]
        },
        400,
        "messages[0].content[0]",
        None,
    ),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content", None),
    ({"messages": user("x"), "temperature": 3}, 400, "temperature", None),
    ({"messages": user("x"), "top_p": 0}, 400, "top_p", None),
    ({"messages": user("x"), "n": 0}, 400, "n", None),
    ({"messages": user("x"), "max_tokens": 0}, 400, "max_tokens", None),
    ({"messages": user("x"), "max_tokens": 10**6}, 400, "max_tokens", "context_length_exceeded"),
    (
        {"messages": user("x"), "max_completion_tokens": 10**6},
        400,
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    ({"messages": user("x"), "stop": ["a", 3]}, 400, "stop[1]", None),
    ({"messages": user("x"), "stop": ""}, 400, "stop", None),
    ({"messages": user("x"), "seed": 2**70}, 400, "seed", None),
    ({"messages": user("x"), "top_logprobs": 2}, 400, "top_logprobs", None),
    ({"messages": user("x"), "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    ({"messages": user("x"), "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens", None),
    (
        {"messages": user("x"), "response_format": {"type": "xml"}},
        400,
        "response_format.type",
        "invalid_value",
    ),
    (
        {
            "messages": user("x"),
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
        },
        400,
        "response_format.json_schema.schema",
        "unsupported_schema",
    ),
    (
        {"messages": user("x"), "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
        400,
        "tool_choice",
        "unsupported_parameter",
    ),
    (
        {"messages": user("x"), "functions": [{"name": "f"}]},
        400,
        "functions",
        "unsupported_parameter",
    ),
    ({"messages": user("x"), "logit_bias": {"1": 5}}, 400, "logit_bias", "unsupported_parameter"),
    ({"messages": user("x"), "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    (
        {"messages": user("x"), "chat_template_kwargs": {"messages": []}},
        400,
        "chat_template_kwargs.messages",
        None,
    ),
    ({"messages": user("x"), "thinking": {"type": "maybe"}}, 400, "thinking.type", None),
    ({"messages": user("x"), "model": "gpt-4o"}, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_REQUESTS)
async def test_bad_requests_get_openai_errors(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, param: str | None, code: str | None
) -> None:
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["message"]


async def test_requests_that_are_not_json_objects(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", content=b"{bad", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = await client.post(
        "/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request_body"
    r = await client.post("/v1/chat/completions", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = await client.post("/v1/chat/completions", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "application/json" in r.json()["error"]["message"]


async def test_unknown_routes_and_methods(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "Unknown route: GET /v1/nothing",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
    r = await client.get("/v1/chat/completions")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"


async def test_unknown_fields_are_ignored_and_extras_accepted(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "developer", "content": "Be brief."}, *user("x")],
            "max_tokens": 3,
            "some_future_field": {"a": 1},
            "user": "u1",
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "min_tokens": 2,
            "skip_special_tokens": True,
            "stop_token_ids": [5],
            "response_format": {"type": "text"},
            "tool_choice": "none",
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 2


# --- thinking -----------------------------------------------------------------------------------------


async def test_thinking_toggle_reaches_the_template(
    server_model46_dir: Any, make_app: Callable[..., Any], make_client: Any
) -> None:
    engine = build_engine(make_settings(server_model46_dir))
    try:
        async with make_client(make_app(engine=engine)) as c:

            async def prompt_tokens(**extra: Any) -> int:
                r = await c.post(
                    "/v1/chat/completions", json={"messages": user("Hello"), "max_tokens": 1, **extra}
                )
                assert r.status_code == 200, r.text
                return int(r.json()["usage"]["prompt_tokens"])

            default = await prompt_tokens()
            disabled = await prompt_tokens(thinking={"type": "disabled"})
            via_kwargs = await prompt_tokens(chat_template_kwargs={"enable_thinking": False})
            enabled = await prompt_tokens(thinking={"type": "enabled"})
            models = (await c.get("/v1/models")).json()
    finally:
        engine.shutdown()
    # Disabled adds "/nothink" to the user turn and an empty "<think></think>" to the answer.
    assert disabled == via_kwargs > default == enabled
    assert models["data"][0]["glmv"]["supports_thinking_toggle"] is True


async def test_thinking_field_is_harmless_without_a_toggle(client: httpx.AsyncClient) -> None:
    a = (await client.post("/v1/chat/completions", json={"messages": user("Hello"), "max_tokens": 1})).json()
    b = (
        await client.post(
            "/v1/chat/completions",
            json={"messages": user("Hello"), "max_tokens": 1, "thinking": {"type": "disabled"}},
        )
    ).json()
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]


REASONING_SCRIPT: list[Step] = [
    "<think>\nI look",
    " at the pic",
    "ture.</think>\n<answer>A red",
    " square<|begin_of_box|>[1,2]<|end_of_box|>",
    ("</answer>", "stop"),
]


async def test_reasoning_is_split_from_content(
    shared_engine: EngineClient, make_app: Callable[..., Any], make_client: Any
) -> None:
    async with make_client(make_app(engine=ScriptedEngine(shared_engine, REASONING_SCRIPT))) as c:
        whole = (await c.post("/v1/chat/completions", json={"messages": user("What is it?")})).json()
        events, done = parse_sse(
            (
                await c.post("/v1/chat/completions", json={"messages": user("What is it?"), "stream": True})
            ).text
        )
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] == "I look at the picture."
    assert message["content"] == "A red square[1,2]"
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert done
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "I look at the picture."
    assert "".join(d.get("content", "") for d in deltas) == "A red square[1,2]"
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "stop"


# --- failures during generation -----------------------------------------------------------------------


async def test_mid_stream_error_is_an_error_event(
    shared_engine: EngineClient, make_app: Callable[..., Any], make_client: Any
) -> None:
    engine = ScriptedEngine(shared_engine, ["Hello", " wor", EngineError("model execution failed: boom")])
    async with make_client(make_app(engine=engine)) as c:
        r = await c.post("/v1/chat/completions", json={"messages": user("x"), "stream": True})
        events, done = parse_sse(r.text)
        assert r.status_code == 200 and done
        assert events[-1] == {
            "error": {
                "message": "model execution failed: boom",
                "type": "internal_error",
                "param": None,
                "code": "engine_error",
            }
        }
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hello wor"
        # Without streaming the same failure is a 500 in the same shape.
        r = await c.post("/v1/chat/completions", json={"messages": user("x")})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        metrics = (await c.get("/metrics")).text
    assert metric_value(metrics, "glmv_requests_finished_total", {"outcome": "error"}) == 2.0


async def test_unexpected_errors_do_not_leak_details(
    shared_engine: EngineClient, make_app: Callable[..., Any], make_client: Any
) -> None:
    engine = ScriptedEngine(shared_engine, [RuntimeError("secret internal detail")])
    async with make_client(make_app(engine=engine)) as c:
        r = await c.post("/v1/chat/completions", json={"messages": user("x")})
        assert r.status_code == 500
        assert r.json() == {
            "error": {
                "message": "The server had an error while processing your request.",
                "type": "internal_error",
                "param": None,
                "code": "internal_error",
            }
        }
        assert "secret" not in r.text and "Traceback" not in r.text
        engine.script = ["a", RuntimeError("secret internal detail")]
        r = await c.post("/v1/chat/completions", json={"messages": user("x"), "stream": True})
        events, done = parse_sse(r.text)
        assert done and events[-1]["error"]["code"] == "internal_error"
        assert "secret" not in r.text


async def test_request_timeout(
    shared_engine: EngineClient, make_app: Callable[..., Any], make_client: Any
) -> None:
    engine = ScriptedEngine(shared_engine, [30.0, ("never", "stop")])
    async with make_client(make_app(engine=engine, request_timeout=0.3)) as c:
        r = await c.post("/v1/chat/completions", json={"messages": user("x")})
        assert r.status_code == 504
        assert r.json()["error"]["type"] == "timeout_error"
        engine.script = ["first", 30.0, ("never", "stop")]
        r = await c.post("/v1/chat/completions", json={"messages": user("x"), "stream": True})
        events, done = parse_sse(r.text)
        assert done and events[-1]["error"]["code"] == "timeout"
        assert events[1]["choices"][0]["delta"] == {"content": "first"}
        await engine.wait_closed(2)  # both engine generators were closed (requests aborted)
        metrics = (await c.get("/metrics")).text
    assert len(engine.closed) == 2
    assert metric_value(metrics, "glmv_requests_finished_total", {"outcome": "timeout"}) == 2.0


async def test_overload_is_503_before_images_are_decoded(
    shared_engine: EngineClient, make_app: Callable[..., Any], make_client: Any
) -> None:
    engine = ScriptedEngine(
        shared_engine, [("x", "stop")], admit=OverloadedError("queue full", retry_after=2)
    )
    async with make_client(make_app(engine=engine)) as c:
        bad_image = user("x", "data:image/png;base64,bm90IGFuIGltYWdl")
        r = await c.post("/v1/chat/completions", json={"messages": bad_image})
        assert r.status_code == 503
        assert r.headers["retry-after"] == "2"
        assert r.json()["error"]["type"] == "overloaded_error"


async def test_capacity_counts_requests_still_preparing(
    shared_engine: EngineClient, make_app: Callable[..., Any], make_client: Any
) -> None:
    # The first request holds the only slot until its timeout; the timeout is long enough that the
    # second request is screened while the first is surely still in flight, even on a loaded box.
    engine = ScriptedEngine(shared_engine, [60.0, ("late", "stop")], max_pending=1)
    app = make_app(engine=engine, request_timeout=4.0)
    async with make_client(app) as c:
        first = asyncio.create_task(c.post("/v1/chat/completions", json={"messages": user("x")}))
        while app.state.glmv.inflight == 0:
            await asyncio.sleep(0.01)
        r = await c.post("/v1/chat/completions", json={"messages": user("y")})
        assert r.status_code == 503 and "capacity" in r.json()["error"]["message"]
        assert (await first).status_code == 504
    assert app.state.glmv.inflight == 0


async def test_slow_images_hit_the_request_timeout(
    make_app: Callable[..., Any],
    make_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    image_url: Callable[..., str],
) -> None:
    from glmv.tasks.images import ImagePreparer

    async def slow_prepare(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(30)

    monkeypatch.setattr(ImagePreparer, "prepare_one", slow_prepare)
    app = make_app(request_timeout=0.3)
    async with make_client(app) as c:
        r = await c.post("/v1/chat/completions", json={"messages": user("x", image_url())})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert app.state.glmv.inflight == 0


async def test_draining_server_refuses_new_work(make_app: Callable[..., Any], make_client: Any) -> None:
    app = make_app()
    async with make_client(app) as c:
        assert (await c.get("/ready")).status_code == 200
        app.state.glmv.draining = True
        r = await c.post("/v1/chat/completions", json={"messages": user("x"), "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        ready = await c.get("/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert (await c.get("/health")).status_code == 200


async def test_ready_is_503_when_the_engine_is_down(
    server_model_dir: Any, make_app: Callable[..., Any], make_client: Any
) -> None:
    engine = build_engine(make_settings(server_model_dir))
    app = make_app(engine=engine)
    engine.shutdown()
    async with make_client(app) as c:
        assert (await c.get("/ready")).status_code == 503
        assert (await c.get("/health")).json() == {"status": "ok"}
        r = await c.post("/v1/chat/completions", json={"messages": user("x"), "max_tokens": 1})
        assert r.status_code == 503


# --- models, metrics, docs ------------------------------------------------------------------------------


async def test_models_list_says_the_weights_are_random(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == "tiny-glm41v" and card["object"] == "model" and card["owned_by"] == "glmv"
    assert card["glmv"]["random_weights"] is True
    assert card["max_model_len"] == 2048
    assert (await client.get("/v1/models/tiny-glm41v")).json()["id"] == "tiny-glm41v"
    r = await client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_served_model_names(make_app: Callable[..., Any], make_client: Any) -> None:
    async with make_client(make_app(served_model_name=["glm-4.1v", "alias"])) as c:
        assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == ["glm-4.1v", "alias"]
        for name in ("glm-4.1v", "alias"):
            r = await c.post(
                "/v1/chat/completions", json={"model": name, "messages": user("x"), "max_tokens": 1}
            )
            assert r.status_code == 200 and r.json()["model"] == name
        r = await c.post(
            "/v1/chat/completions", json={"model": "tiny-glm41v", "messages": user("x"), "max_tokens": 1}
        )
        assert r.status_code == 404


async def test_metrics_count_requests_tokens_and_statuses(
    client: httpx.AsyncClient, image_url: Callable[..., str]
) -> None:
    r = await client.post(
        "/v1/chat/completions", json={"messages": user("x", image_url()), "max_tokens": 4, "ignore_eos": True}
    )
    assert r.status_code == 200
    await client.post("/v1/chat/completions", json={"messages": []})
    text = (await client.get("/metrics")).text
    labels = {"model_name": "tiny-glm41v"}
    assert metric_value(text, "glmv_generation_tokens_total", labels) == 4.0
    assert metric_value(text, "glmv_prompt_tokens_total", labels) == r.json()["usage"]["prompt_tokens"]
    assert metric_value(text, "glmv_time_to_first_token_seconds_count", labels) == 1.0
    # One observation per stream update after the first; under load the engine hands several tokens
    # over in one update, so only the bound is fixed: at most one gap per token after the first.
    itl_count = metric_value(text, "glmv_inter_token_latency_seconds_count", labels)
    assert itl_count is not None and 0.0 <= itl_count <= 3.0
    assert metric_value(text, "glmv_e2e_request_latency_seconds_count", labels) == 1.0
    assert metric_value(text, "glmv_request_queue_time_seconds_count", labels) == 1.0
    assert metric_value(text, "glmv_requests_finished_total", {"outcome": "length"}) == 1.0
    route = {"method": "POST", "route": "/v1/chat/completions"}
    assert metric_value(text, "glmv_http_responses_total", {**route, "status": "200"}) == 1.0
    assert metric_value(text, "glmv_http_responses_total", {**route, "status": "400"}) == 1.0
    for name in (
        "glmv_requests_running",
        "glmv_requests_waiting",
        "glmv_kv_cache_usage_ratio",
        "glmv_prefix_cache_hit_rate",
    ):
        assert metric_value(text, name, labels) is not None, name
    assert (metric_value(text, "glmv_images_encoded_total", labels) or 0) + (
        metric_value(text, "glmv_encoder_cache_hits_total", labels) or 0
    ) >= 1
    # no GPU kernel is built while serving (none at all on the CPU)
    assert metric_value(text, "glmv_kernel_builds_after_startup_total", labels) == 0.0


async def test_docs_and_openapi(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/chat/completions" in spec["paths"]
    assert "/v1/models" in spec["paths"]
    assert (await client.get("/docs")).status_code == 200
    assert (await client.get("/health")).json() == {"status": "ok"}


# --- against a real server process ---------------------------------------------------------------------


async def test_client_disconnect_aborts_the_request(live_server: Any) -> None:
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=30) as c:
        before = (
            metric_value(
                (await c.get("/metrics")).text, "glmv_requests_finished_total", {"outcome": "aborted"}
            )
            or 0.0
        )
        body = {"messages": user("Go on forever."), "max_tokens": 1900, "ignore_eos": True, "stream": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 5:
                    break  # leaving the block closes the connection mid-stream
        deadline = time.monotonic() + 120  # generous: a loaded CI box may take seconds to notice
        while True:
            text = (await c.get("/metrics")).text
            aborted = metric_value(text, "glmv_requests_finished_total", {"outcome": "aborted"}) or 0.0
            if (
                aborted > before
                and metric_value(text, "glmv_requests_running", {"model_name": "tiny-glm41v"}) == 0.0
            ) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert aborted == before + 1
        assert metric_value(text, "glmv_kv_cache_usage_ratio", {"model_name": "tiny-glm41v"}) == 0.0
        generated = metric_value(text, "glmv_generation_tokens_total", {"model_name": "tiny-glm41v"})
        assert generated is not None


def test_embedded_model_start_up_and_sigterm_drain(start_live_server: Callable[..., Any]) -> None:
    # No --model: the demo model that ships in the package is served.
    # no shutdown deadline that a loaded machine could miss: the stream must run to its end
    server = start_live_server(None, "--shutdown-timeout", "3600")
    banner = server.log()
    assert "glmv: loading the embedded demo model from" in banner
    assert f"web page: {server.base_url}/" in banner
    assert f"API:      {server.api_url}" in banner
    assert re.search(r"model ready in \d+\.\d s; engine core started in \d+\.\d s \(weights \d+\.\d s", banner)
    assert "NOTE: demo model: a small GLM-4.1V-architecture model" in banner
    assert "random weights" not in banner
    card = httpx.get(server.api_url + "/models", timeout=10).json()["data"][0]
    assert card["id"] == "glmv-demo" and card["glmv"]["random_weights"] is False
    assert card["glmv"]["demo_model"] is True and "synthetic documents" in card["glmv"]["note"]
    body = {"messages": user("Count."), "max_tokens": 500, "ignore_eos": True, "stream": True}
    events: list[dict[str, Any]] = []
    done = False
    with (
        httpx.Client(base_url=server.base_url, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        server.process.send_signal(15)  # SIGTERM while the answer is streaming
        # New work is refused while the running stream goes on to its end.
        refused = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if httpx.get(server.base_url + "/ready", timeout=5).status_code == 503:
                refused = httpx.post(
                    server.api_url + "/chat/completions", json={"messages": user("x")}, timeout=5
                )
                break
            time.sleep(0.05)
        assert refused is not None and refused.status_code == 503
        assert refused.headers["retry-after"] == "5"
        for line in [first, *lines]:
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
            else:
                events.append(json.loads(line[6:]))
    assert done
    finishes = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")]
    assert finishes[-1] == "length", (events[-3:], server.log()[-3000:])
    assert server.process.wait(60) == 0
    assert "glmv: stopped" in server.log()
