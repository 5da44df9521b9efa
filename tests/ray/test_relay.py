"""The relaying front and the in-process ASGI call of the replicas (no Ray: a fake `forward`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from glmv.ray.affinity import AffinityKeys, affinity_keys
from glmv.ray.relay import AppLifespan, RelayApp, call_asgi, forwardable_scope


class ReplicaDied(Exception):
    """Stands for Ray's ActorDiedError."""


def start(status: int = 200, content_type: bytes = b"application/json", extra: tuple = ()) -> dict[str, Any]:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type), *extra],
    }


def part(body: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": body, "more_body": more}


class FakeReplicas:
    """`forward` that plays a script per attempt and records what it was given."""

    def __init__(self, *scripts: list[Any]) -> None:
        self.scripts = list(scripts)
        self.calls: list[tuple[dict[str, Any], bytes, AffinityKeys]] = []
        self.app: RelayApp | None = None

    async def forward(
        self, scope: dict[str, Any], body: bytes, keys: AffinityKeys
    ) -> AsyncIterator[list[Any]]:
        self.calls.append((scope, body, keys))
        for step in self.scripts[len(self.calls) - 1]:
            if isinstance(step, BaseException):
                raise step
            yield step


def relay(replicas: FakeReplicas, **kwargs: Any) -> httpx.AsyncClient:
    replicas.app = RelayApp(
        replicas.forward, is_replica_failure=lambda e: isinstance(e, ReplicaDied), **kwargs
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=replicas.app), base_url="http://front")


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_forwards_scope_body_and_keys_and_relays_the_answer() -> None:
    replicas = FakeReplicas([[start(extra=((b"x-request-id", b"r1"),)), part(b'{"ok": true}')]])
    async with relay(replicas, drop_response_headers=(b"x-request-id",)) as client:
        r = await client.post("/v1/chat/completions?x=1", json=CHAT, headers={"authorization": "Bearer k"})
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert "x-request-id" not in r.headers
    [(scope, body, keys)] = replicas.calls
    assert json.loads(body) == CHAT
    assert keys == affinity_keys(CHAT) and keys.conversation is not None
    assert scope["path"] == "/v1/chat/completions" and scope["query_string"] == b"x=1"
    assert (b"authorization", b"Bearer k") in scope["headers"]
    assert set(scope) <= {"type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path",
                          "query_string", "headers", "client", "server"}  # fmt: skip


async def test_get_requests_and_bad_json_carry_no_keys() -> None:
    replicas = FakeReplicas([[start(), part(b"{}")]], [[start(400), part(b"{}")]])
    async with relay(replicas) as client:
        await client.get("/v1/models")
        await client.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert [bool(keys) for _, _, keys in replicas.calls] == [False, False]


async def test_replica_failure_before_the_answer_is_retried() -> None:
    replicas = FakeReplicas([ReplicaDied()], [[start()], ReplicaDied()], [[start(), part(b'{"n": 3}')]])
    async with relay(replicas, max_attempts=3) as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json() == {"n": 3}
    assert len(replicas.calls) == 3
    assert replicas.app is not None and replicas.app.retried == 2


async def test_no_replica_left_is_a_503_in_openai_shape() -> None:
    replicas = FakeReplicas([ReplicaDied()], [ReplicaDied()])
    async with relay(replicas, max_attempts=2) as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "no_replica" and r.json()["error"]["type"] == "overloaded_error"


async def test_stream_cut_by_a_replica_failure_ends_with_an_error_event() -> None:
    sse = b"text/event-stream"
    replicas = FakeReplicas([[start(content_type=sse), part(b'data: {"n":1}\n\n', more=True)], ReplicaDied()])
    async with relay(replicas) as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200 and len(replicas.calls) == 1  # never sent twice once it started
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[0] == '{"n":1}' and events[-1] == "[DONE]"
    error = json.loads(events[1])["error"]
    assert error["code"] == "replica_failed" and error["type"] == "internal_error"
    assert replicas.app is not None and replicas.app.broken_streams == 1 and replicas.app.retried == 0


async def test_other_failures_are_a_500_without_details() -> None:
    replicas = FakeReplicas([RuntimeError("secret detail")])
    async with relay(replicas) as client:
        r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 500 and "secret" not in r.text
    assert r.json()["error"]["message"] == "The server had an error while processing your request."


async def test_bodies_over_the_limit_are_cut_for_the_guard_to_refuse() -> None:
    replicas = FakeReplicas([[start(413), part(b"{}")]])
    async with relay(replicas, max_body_bytes=10) as client:
        await client.post("/v1/chat/completions", content=b"x" * 100)
    assert replicas.calls[0][1] == b"x" * 11  # one byte over: the guard says 413


def test_forwardable_scope_keeps_plain_values() -> None:
    scope = {
        "type": "http",
        "path": "/",
        "headers": [(b"a", b"b")],
        "client": ["1.2.3.4", 5],
        "app": object(),
    }
    out = forwardable_scope(scope)
    assert out == {
        "type": "http",
        "path": "/",
        "headers": [(b"a", b"b")],
        "client": ("1.2.3.4", 5),
        "root_path": "",
    }


# --- the replica side ---------------------------------------------------------------------------------


def small_app() -> FastAPI:
    app = FastAPI()
    app.state.events = []
    app.state.cancelled = asyncio.Event()

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, Any]:
        return {"got": (await request.body()).decode()}

    @app.get("/forever")
    async def forever() -> StreamingResponse:
        async def gen() -> AsyncIterator[bytes]:
            try:
                yield b"data: first\n\n"
                await asyncio.Event().wait()
            finally:
                app.state.cancelled.set()

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def scope_for(method: str, path: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip


async def test_call_asgi_runs_the_app_on_the_body_and_adds_headers() -> None:
    app = small_app()
    messages = [
        m
        async for batch in call_asgi(
            app, scope_for("POST", "/echo"), b"hello", extra_headers=[(b"x-r", b"1")]
        )
        for m in batch
    ]
    assert messages[0]["type"] == "http.response.start" and (b"x-r", b"1") in messages[0]["headers"]
    body = b"".join(m.get("body", b"") for m in messages[1:])
    assert json.loads(body) == {"got": "hello"}


async def test_closing_call_asgi_cancels_the_request() -> None:
    app = small_app()
    gen = call_asgi(app, scope_for("GET", "/forever"), b"")
    seen: list[Any] = []
    async for batch in gen:
        seen.extend(batch)
        if any(m.get("body") == b"data: first\n\n" for m in seen):
            break
    await gen.aclose()  # the caller went away
    await asyncio.wait_for(app.state.cancelled.wait(), 30)


async def test_app_lifespan_runs_startup_and_shutdown() -> None:
    import contextlib

    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("up")
        yield
        events.append("down")

    lifespan_run = AppLifespan(FastAPI(lifespan=lifespan))
    await lifespan_run.startup()
    assert events == ["up"]
    await lifespan_run.shutdown()
    assert events == ["up", "down"]

    async def no_lifespan(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("http only")

    plain = AppLifespan(no_lifespan)
    await plain.startup()  # an app without lifespan support is fine
    await plain.shutdown()


async def test_failed_startup_raises() -> None:
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("no model")
        yield

    with pytest.raises(RuntimeError, match="failed to start"):
        await AppLifespan(FastAPI(lifespan=lifespan)).startup()
