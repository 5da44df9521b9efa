"""The guard's access log: one JSON line per request on `glmv.access`, with usage and without content."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from glmv.server.guard import GuardSettings, install_guards, record_usage
from glmv.server.guard_auth import hash_api_key
from glmv.server.guard_log import loggable_content

KEY = "sk-log-test-key-000111"
PROMPT = "What is written on this invoice? SECRET-PROMPT-TEXT"
IMAGE = "data:image/png;base64," + "iVBORw0KGgo" * 200


def make_app(settings: GuardSettings) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/echo")
    async def echo(request: Request) -> Any:
        body = await request.json()
        if body.get("stream"):

            async def events() -> AsyncIterator[str]:
                for i in range(3):
                    yield f"data: {i}\n\n"
                # usage is only known at the end of the stream
                record_usage(request, prompt_tokens=11, completion_tokens=3, cached_tokens=8, ttft=0.25)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        record_usage(request, prompt_tokens=20, completion_tokens=7, cached_tokens=16, ttft=0.0125)
        return {"answer": "ANSWER-TEXT"}

    @app.get("/v1/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    install_guards(app, settings)
    return app


def client_for(app: FastAPI, ip: str = "10.9.8.7", **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(ip, 5000), **kwargs), base_url="http://glmv.test"
    )


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "glmv.access"]


def chat_body(stream: bool = False) -> dict[str, Any]:
    return {
        "model": "glmv",
        "stream": stream,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": IMAGE}}],
            }
        ],
    }


@pytest.fixture
def caplog_access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="glmv.access")
    return caplog


async def test_line_fields_without_content(caplog_access: pytest.LogCaptureFixture) -> None:
    app = make_app(GuardSettings(api_keys=[KEY]))
    body = json.dumps(chat_body()).encode()
    async with client_for(app) as c:
        r = await c.post(
            "/v1/echo", content=body, headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
        )
    assert r.status_code == 200
    (record,) = [rec for rec in caplog_access.records if rec.name == "glmv.access"]
    assert record.levelno == logging.INFO
    raw = record.getMessage()
    line = json.loads(raw)
    assert record.glmv_access == line  # type: ignore[attr-defined]
    assert KEY not in raw and PROMPT not in raw and "iVBORw0KGgo" not in raw and "ANSWER-TEXT" not in raw
    assert set(line) == {
        "ts", "request_id", "key_name", "client_ip", "method", "path", "route", "status", "latency_ms", "ttft_ms",
        "prompt_tokens", "completion_tokens", "cached_tokens", "bytes_in", "bytes_out", "error",
    }
    assert line["request_id"] == r.headers["x-request-id"]
    assert line["key_name"] == f"key-{hash_api_key(KEY)[:8]}"
    assert line["client_ip"] == "10.9.8.7"
    assert (line["method"], line["path"], line["route"], line["status"]) == ("POST", "/v1/echo", "/v1/echo", 200)
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0
    assert line["ttft_ms"] == 12.5
    assert (line["prompt_tokens"], line["completion_tokens"], line["cached_tokens"]) == (20, 7, 16)
    assert line["bytes_in"] == len(body)
    assert line["bytes_out"] == len(r.content)
    assert line["error"] is None
    assert line["ts"].endswith("Z")


async def test_keys_file_name_is_logged_never_the_key(
    caplog_access: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "billing-team", "key_sha256": hash_api_key(KEY)}]))
    app = make_app(GuardSettings(api_keys_file=str(path)))
    async with client_for(app) as c:
        await c.post("/v1/echo", json={}, headers={"Authorization": f"Bearer {KEY}"})
    (line,) = access_lines(caplog_access)
    assert line["key_name"] == "billing-team"
    assert KEY not in json.dumps(line) and hash_api_key(KEY) not in json.dumps(line)


async def test_route_template_and_open_paths(caplog_access: pytest.LogCaptureFixture) -> None:
    app = make_app(GuardSettings())
    async with client_for(app) as c:
        await c.get("/v1/items/42?secret=query")
        await c.get("/health")
        await c.get("/nope")
    items, health, nope = access_lines(caplog_access)
    assert (items["path"], items["route"], items["status"]) == ("/v1/items/42", "/v1/items/{item_id}", 200)
    assert "secret" not in json.dumps(items)
    assert (health["path"], health["route"], health["key_name"], health["prompt_tokens"]) == (
        "/health", "/health", None, None,
    )
    assert health["ttft_ms"] is None
    assert (nope["path"], nope["route"], nope["status"]) == ("/nope", None, 404)


async def test_rejections_are_logged_with_their_code(caplog_access: pytest.LogCaptureFixture) -> None:
    app = make_app(
        GuardSettings(api_keys=[KEY], allowed_ips=["10.0.0.0/8"], requests_per_minute=1, max_body_bytes=64)
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    async with client_for(app) as c, client_for(app, ip="192.0.2.1") as outsider:
        await c.post("/v1/echo", json={})
        await c.post("/v1/echo", json={}, headers={"Authorization": "Bearer wrong"})
        await c.post("/v1/echo", content=b"x" * 100, headers=auth)
        await c.post("/v1/echo", json={}, headers=auth)
        await c.post("/v1/echo", json={}, headers=auth)
        await outsider.get("/health")
    lines = access_lines(caplog_access)
    assert [(x["status"], x["error"], x["key_name"]) for x in lines] == [
        (401, "invalid_api_key", None),
        (401, "invalid_api_key", None),
        (413, "request_too_large", f"key-{hash_api_key(KEY)[:8]}"),
        (200, None, f"key-{hash_api_key(KEY)[:8]}"),
        (429, "rate_limit_exceeded", f"key-{hash_api_key(KEY)[:8]}"),
        (403, "forbidden", None),
    ]
    assert lines[-1]["client_ip"] == "192.0.2.1"
    assert lines[0]["prompt_tokens"] is None
    assert "wrong" not in json.dumps(lines)


async def test_content_only_with_log_content(caplog_access: pytest.LogCaptureFixture) -> None:
    app = make_app(GuardSettings(api_keys=[KEY], log_content=True))
    async with client_for(app) as c:
        await c.post("/v1/echo", json=chat_body(), headers={"Authorization": f"Bearer {KEY}"})
    (line,) = access_lines(caplog_access)
    content = line["content"]
    assert content["messages"][0]["content"][0]["text"] == PROMPT
    assert content["messages"][0]["content"][1]["image_url"]["url"] == f"data:image/png;base64,<{len(IMAGE) - 22} chars>"
    assert "iVBORw0KGgo" not in json.dumps(line)
    assert KEY not in json.dumps(line)


def test_loggable_content_for_non_json() -> None:
    assert loggable_content(b"") is None
    assert loggable_content(b"plain words") == "plain words"
    assert loggable_content(b"a" * 5000) == "a" * 4096 + "…"
    assert loggable_content(b'{"x": "data:,short"}') == {"x": "data:,short"}


async def test_streaming_line_is_written_when_the_stream_ends(caplog_access: pytest.LogCaptureFixture) -> None:
    app = make_app(GuardSettings(requests_per_minute=10))
    async with client_for(app) as c, c.stream("POST", "/v1/echo", json=chat_body(stream=True)) as r:
        chunks = [chunk async for chunk in r.aiter_bytes()]
    streamed = b"".join(chunks)
    assert streamed == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    (line,) = access_lines(caplog_access)
    # the usage was recorded by the generator after the last data event: the line came after it
    assert (line["prompt_tokens"], line["completion_tokens"], line["cached_tokens"], line["ttft_ms"]) == (
        11, 3, 8, 250.0,
    )
    assert line["status"] == 200
    assert line["bytes_out"] == len(streamed)
    assert PROMPT not in json.dumps(line)


async def test_access_log_can_be_turned_off(caplog_access: pytest.LogCaptureFixture) -> None:
    app = make_app(GuardSettings(access_log=False, api_keys=[KEY]))
    async with client_for(app) as c:
        r = await c.post("/v1/echo", json={})
        ok = await c.post("/v1/echo", json={}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 401 and ok.status_code == 200
    assert "x-request-id" in ok.headers
    assert access_lines(caplog_access) == []


async def test_unhandled_error_is_logged_as_500(caplog_access: pytest.LogCaptureFixture) -> None:
    app = make_app(GuardSettings())
    async with client_for(app, raise_app_exceptions=False) as c:
        r = await c.get("/v1/boom")
    assert r.status_code == 500
    (line,) = access_lines(caplog_access)
    assert (line["status"], line["error"], line["request_id"]) == (500, "internal_error", r.headers["x-request-id"])
