"""The access log of glmv's own app: the error code of every 4xx/5xx a route answers (not only
the guard's refusals), the code of a stream's error event, and `aborted` for clients that left."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from glmv.errors import EngineError
from glmv.server.app import create_app
from glmv.server.guard import GuardSettings
from tests.server.conftest import asgi_client, make_settings
from tests.tasks.scripted import ScriptedClient

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="glmv.access")
    return caplog


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "glmv.access"]


def app_for(model_dir: Path, script: list[Any]) -> Any:
    return create_app(make_settings(model_dir, guard=GuardSettings()), ScriptedClient(model_dir, script))


async def test_route_errors_are_logged_with_their_code(
    server_model_dir: Path, access: pytest.LogCaptureFixture
) -> None:
    app = app_for(server_model_dir, [("Hello", [1], None), (" there", [2], None)])
    tools = [{"type": "function", "function": {"name": "f"}}]
    async with asgi_client(app) as c:
        answers = [
            await c.post(CHAT, json={"messages": ASK, "temperature": 3}),
            await c.post(CHAT, json={"messages": ASK, "model": "gpt-4o"}),
            await c.post(CHAT, json={"messages": ASK, "tools": tools, "tool_choice": "required"}),
            await c.post(CHAT, json={"messages": [{"role": "user", "content": None}]}),
            await c.post(CHAT, json={"messages": ASK, "max_tokens": 10**6}),
            await c.get("/v1/nothing"),
            await c.post(CHAT, json={"messages": ASK}),
            await c.post(CHAT, json={"messages": ASK, "stream": True}),
        ]
    logged = lines(access)
    assert [(x["status"], x["error"]) for x in logged] == [
        (400, "invalid_value"),
        (404, "model_not_found"),
        (400, "unsupported_parameter"),
        (400, "invalid_request_error"),  # an error without a code: its type
        (400, "context_length_exceeded"),
        (404, "not_found"),
        (200, None),
        (200, None),
    ]
    assert [x["request_id"] for x in logged] == [a.headers["x-request-id"] for a in answers]


async def test_a_stream_that_fails_is_logged_with_the_code_of_its_error_event(
    server_model_dir: Path, access: pytest.LogCaptureFixture
) -> None:
    app = app_for(server_model_dir, [("Hello", [1], None), EngineError("boom"), ("x", [2], None)])
    async with asgi_client(app) as c:
        r = await c.post(CHAT, json={"messages": ASK, "stream": True})
    assert r.status_code == 200 and '"code":"engine_error"' in r.text
    (line,) = lines(access)
    assert (line["status"], line["error"]) == (200, "engine_error")


async def call_and_leave(app: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST `body` over raw ASGI and disconnect: a stream right after the first bytes of its
    answer, a whole answer as soon as the app listens for the client after reading the request."""
    sent: list[dict[str, Any]] = []
    got_bytes = asyncio.Event()
    stream = bool(body.get("stream"))
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        if stream:
            await got_bytes.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            got_bytes.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), 120)
    return sent


async def test_clients_that_leave_are_logged_as_aborted(
    server_model_dir: Path, access: pytest.LogCaptureFixture
) -> None:
    never = asyncio.Event()  # the engine's answer never comes: the client leaves first
    app = app_for(server_model_dir, [("Hello", [1], None), never, ("x", [2], None)])
    streamed = await call_and_leave(app, {"messages": ASK, "stream": True})
    assert streamed[0]["status"] == 200
    assert not any(m["type"] == "http.response.body" and not m.get("more_body") for m in streamed)
    app = app_for(server_model_dir, [never, ("x", [2], None)])
    whole = await call_and_leave(app, {"messages": ASK})
    assert whole[0]["status"] == 499
    left_stream, left_request = lines(access)
    assert (left_stream["status"], left_stream["error"]) == (200, "aborted")
    assert (left_request["status"], left_request["error"]) == (499, "aborted")
