"""Rate limits shared through a real Redis server by two app instances (as two replicas would)."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from glmv.server.guard import GuardSettings, install_guards, record_usage

KEY = "sk-shared-replica-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A throw-away redis-server on 127.0.0.1 (no persistence), stopped after the test."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    redis = pytest.importorskip("redis", reason="the redis Python client is needed for Redis storage")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert proc.poll() is None, "redis-server exited at start-up"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.02)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()


def make_app(settings: GuardSettings) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict[str, Any]:
        body = await request.json()
        record_usage(request, prompt_tokens=int(body.get("tokens", 0)), completion_tokens=0, cached_tokens=0, ttft=None)
        return {"ok": True}

    install_guards(app, settings)
    return app


async def shut_down(*apps: FastAPI) -> None:
    """Run each app's lifespan shutdown, as uvicorn does on exit (the guard closes its Redis client)."""
    for app in apps:
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
        sent: list[str] = []

        async def receive(messages: Iterator[dict[str, str]] = messages) -> dict[str, Any]:
            return next(messages)

        async def send(message: dict[str, Any], sent: list[str] = sent) -> None:
            sent.append(message["type"])

        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://glmv.test")


async def test_two_replicas_share_request_and_token_limits(redis_url: str) -> None:
    import redis

    settings = GuardSettings(api_keys=[KEY], requests_per_minute=3, tokens_per_minute=10, rate_limit_storage=redis_url)
    replica_a, replica_b = make_app(settings), make_app(settings)
    async with client_for(replica_a) as a, client_for(replica_b) as b:
        r1 = await a.post("/v1/echo", json={"tokens": 4}, headers=AUTH)
        r2 = await b.post("/v1/echo", json={"tokens": 5}, headers=AUTH)
        r3 = await a.post("/v1/echo", json={"tokens": 0}, headers=AUTH)
        r4 = await b.post("/v1/echo", json={"tokens": 0}, headers=AUTH)
    await shut_down(replica_a, replica_b)
    assert [r.status_code for r in (r1, r2, r3, r4)] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in (r1, r2, r3, r4)] == ["2", "1", "0", "0"]
    # tokens are charged after each response: 4 by replica A, then 5 by replica B
    assert [r.headers["x-ratelimit-remaining-tokens"] for r in (r1, r2, r3, r4)] == ["10", "6", "1", "1"]
    assert r4.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r4.headers["retry-after"]) <= 60

    host_port = redis_url.removeprefix("redis://").split("/")[0]
    host, port = host_port.split(":")
    client = redis.Redis(host=host, port=int(port))
    keys = sorted(k.decode() for k in client.keys("*"))
    client.close()
    assert any("glmv-requests" in k for k in keys) and any("glmv-tokens" in k for k in keys)
    assert not any(KEY in k for k in keys)  # identities are key names, never keys


async def test_token_limit_exhausted_on_one_replica_stops_the_other(redis_url: str) -> None:
    settings = GuardSettings(tokens_per_minute=10, rate_limit_storage=redis_url)
    replica_a, replica_b = make_app(settings), make_app(settings)
    async with client_for(replica_a) as a, client_for(replica_b) as b:
        first = await a.post("/v1/echo", json={"tokens": 12})
        blocked = await b.post("/v1/echo", json={"tokens": 1})
    await shut_down(replica_a, replica_b)
    assert first.status_code == 200
    assert blocked.status_code == 429
    assert blocked.headers["x-ratelimit-remaining-tokens"] == "0"
    assert blocked.json()["error"]["message"].startswith("Rate limit reached for tokens per minute (client 127.0.0.1)")


async def test_storage_down_admits_requests_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("redis")
    caplog.set_level(logging.WARNING, logger="glmv.guard")
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = make_app(GuardSettings(requests_per_minute=1, rate_limit_storage=url))
    async with client_for(app) as c:
        statuses = [(await c.post("/v1/echo", json={})).status_code for _ in range(2)]
    await shut_down(app)
    assert statuses == [200, 200]
    warnings = [r.getMessage() for r in caplog.records if r.name == "glmv.guard"]
    assert len(warnings) == 1 and "admitting requests unlimited" in warnings[0]
