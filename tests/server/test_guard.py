"""The HTTP guard: API keys, IP allowlist, forwarded-for, rate limits, body cap, request ids, settings.

A small FastAPI app with a dummy /v1/echo route is built here, so these tests do not depend on
the server core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel

import glmv.server.guard_ratelimit as guard_ratelimit
from glmv.errors import ConfigError
from glmv.server.guard import (
    GuardSettings,
    add_guard_arguments,
    guard_settings_from,
    install_guards,
    record_usage,
    request_id_of,
)
from glmv.server.guard_auth import hash_api_key, load_api_keys_file
from glmv.server.guard_net import ClientAddressResolver, parse_ip, parse_networks
from glmv.server.guard_ratelimit import format_duration

# --- a dummy app -------------------------------------------------------------------------------


class Typed(BaseModel):
    text: str


def make_app(settings: GuardSettings) -> FastAPI:
    app = FastAPI()
    app.state.calls = 0

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/")
    async def index() -> PlainTextResponse:
        return PlainTextResponse("index")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse("glmv_up 1\n")

    @app.post("/v1/echo")
    async def echo(request: Request) -> Any:
        app.state.calls += 1
        body = await request.json()
        tokens = int(body.get("tokens", 0))
        record_usage(request, prompt_tokens=tokens, completion_tokens=0, cached_tokens=0, ttft=0.01)
        info = {
            "echo": body.get("text"),
            "request_id": request.state.request_id,
            "request_id_of": request_id_of(request),
            "key_name": getattr(request.state, "api_key_name", None),
            "client_ip": request.state.client_ip,
        }
        if body.get("stream"):

            async def events() -> AsyncIterator[str]:
                for i in range(3):
                    yield f"data: {i}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return info

    @app.post("/v1/typed")
    async def typed(item: Typed) -> dict[str, int]:
        app.state.calls += 1
        return {"len": len(item.text)}

    install_guards(app, settings)
    return app


def client_for(app: FastAPI, ip: str = "127.0.0.1", **kwargs: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000), **kwargs)
    return httpx.AsyncClient(transport=transport, base_url="http://glmv.test")


KEY_A = "sk-alice-0123456789"
KEY_B = "sk-bob-9876543210"
REQ_ID = re.compile(r"^req_[0-9a-f]{32}$")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            [
                {"name": "alice", "key_sha256": hash_api_key(KEY_A), "requests_per_minute": 1},
                {"name": "bob", "key_sha256": hash_api_key(KEY_B)},
            ]
        )
    )
    return path


# --- authentication -----------------------------------------------------------------------------


async def test_missing_key_is_401_in_openai_shape() -> None:
    app = make_app(GuardSettings(api_keys=[KEY_A]))
    async with client_for(app) as c:
        r = await c.post("/v1/echo", json={"text": "hi"})
    assert r.status_code == 401
    assert r.json() == error_body(
        "You didn't provide an API key. Send it in the Authorization header as 'Authorization: Bearer YOUR_KEY'.",
        "authentication_error",
        "invalid_api_key",
    )
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["content-type"] == "application/json"
    assert REQ_ID.match(r.headers["x-request-id"])
    assert app.state.calls == 0


@pytest.mark.parametrize(
    "header",
    [f"Bearer {KEY_A}x", "Bearer sk-nope", f"Basic {KEY_A}", "Bearer", f"Token {KEY_A}"],
)
async def test_wrong_or_malformed_key_is_401(header: str) -> None:
    app = make_app(GuardSettings(api_keys=[KEY_A]))
    async with client_for(app) as c:
        r = await c.post("/v1/echo", json={"text": "hi"}, headers={"Authorization": header})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    expected = "Incorrect API key provided." if header.startswith("Bearer ") and len(header) > 7 else None
    if expected:
        assert r.json()["error"]["message"] == expected
    assert app.state.calls == 0


async def test_right_key_passes_and_names_the_key() -> None:
    app = make_app(GuardSettings(api_keys=[KEY_A, KEY_B]))
    async with client_for(app) as c:
        r = await c.post("/v1/echo", json={"text": "hi"}, headers={"Authorization": f"bearer  {KEY_B} "})
    assert r.status_code == 200
    assert r.json()["echo"] == "hi"
    assert r.json()["key_name"] == f"key-{hash_api_key(KEY_B)[:8]}"


async def test_non_ascii_key_matches_its_utf8_bytes() -> None:
    key = "sk-clé-密钥"
    app = make_app(GuardSettings(api_keys=[key]))
    async with client_for(app) as c:
        ok = await c.post("/v1/echo", json={}, headers=[(b"authorization", b"Bearer " + key.encode())])
        bad = await c.post("/v1/echo", json={}, headers=[(b"authorization", b"Bearer " + key.encode("utf-16"))])
    assert (ok.status_code, bad.status_code) == (200, 401)


async def test_keys_file_names_and_per_key_limits(keys_file: Path) -> None:
    text = keys_file.read_text()
    assert KEY_A not in text and KEY_B not in text
    assert hashlib.sha256(KEY_A.encode()).hexdigest() in text
    app = make_app(GuardSettings(api_keys_file=str(keys_file), requests_per_minute=3))
    async with client_for(app) as c:
        r1 = await c.post("/v1/echo", json={}, headers=bearer(KEY_A))
        r2 = await c.post("/v1/echo", json={}, headers=bearer(KEY_A))
        bob = [await c.post("/v1/echo", json={}, headers=bearer(KEY_B)) for _ in range(4)]
    assert r1.status_code == 200 and r1.json()["key_name"] == "alice"
    assert r1.headers["x-ratelimit-limit-requests"] == "1"  # alice's own limit beats the global 3
    assert r2.status_code == 429
    assert [r.status_code for r in bob] == [200, 200, 200, 429]
    assert bob[0].json()["key_name"] == "bob"
    assert bob[0].headers["x-ratelimit-limit-requests"] == "3"


def test_keys_file_toml(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[[keys]]\nname = "ci"\nkey_sha256 = "{hash_api_key("k1")}"\ntokens_per_minute = 500\n'
        f'[[keys]]\nname = "ops"\nkey_sha256 = "{hash_api_key("k2").upper()}"\n'
    )
    keys = load_api_keys_file(path)
    assert [(k.name, k.requests_per_minute, k.tokens_per_minute) for k in keys] == [
        ("ci", None, 500),
        ("ops", None, None),
    ]
    assert keys[1].digest == hashlib.sha256(b"k2").digest()


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ([{"name": "a", "key": "sk-plain"}], "plain key"),
        ([{"name": "a", "key_sha256": "abc"}], "64 hex"),
        ([{"key_sha256": "0" * 64}], "name"),
        ([{"name": "a", "key_sha256": "0" * 64}, {"name": "a", "key_sha256": "1" * 64}], "duplicate"),
        ([{"name": "a", "key_sha256": "0" * 64, "rpm": 3}], "unknown fields"),
        ([{"name": "a", "key_sha256": "0" * 64, "requests_per_minute": -1}], "non-negative"),
    ],
)
def test_bad_keys_file_is_a_config_error(tmp_path: Path, entries: list[dict[str, Any]], needle: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": entries}))
    with pytest.raises(ConfigError, match=needle):
        make_app(GuardSettings(api_keys_file=str(path)))


def test_missing_keys_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        make_app(GuardSettings(api_keys_file=str(tmp_path / "nope.json")))


async def test_open_paths_stay_open_while_v1_is_protected() -> None:
    app = make_app(GuardSettings(api_keys=[KEY_A]))
    async with client_for(app) as c:
        for path in ("/health", "/", "/docs", "/openapi.json", "/metrics"):
            r = await c.get(path)
            assert r.status_code == 200, path
            assert "x-ratelimit-limit-requests" not in r.headers
        assert (await c.get("/v1/models")).status_code == 401  # unknown /v1 routes are protected too
        assert (await c.get("/v1/models", headers=bearer(KEY_A))).status_code == 404


async def test_metrics_protected_only_when_asked() -> None:
    app = make_app(GuardSettings(api_keys=[KEY_A], protect_metrics=True))
    async with client_for(app) as c:
        denied = await c.get("/metrics")
        allowed = await c.get("/metrics", headers=bearer(KEY_A))
        health = await c.get("/health")
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert allowed.status_code == 200 and allowed.text == "glmv_up 1\n"
    assert health.status_code == 200


async def test_no_keys_means_open_v1() -> None:
    app = make_app(GuardSettings(protect_metrics=True))
    async with client_for(app) as c:
        assert (await c.post("/v1/echo", json={"text": "x"})).status_code == 200
        assert (await c.get("/metrics")).status_code == 200


async def test_cors_preflight_is_not_asked_for_a_key() -> None:
    app = make_app(GuardSettings(api_keys=[KEY_A], requests_per_minute=1))
    async with client_for(app) as c:
        r = await c.options(
            "/v1/echo", headers={"Origin": "http://x", "Access-Control-Request-Method": "POST"}
        )
        plain = await c.options("/v1/echo")
    assert r.status_code == 405  # reached the app (no CORS middleware in this dummy app)
    assert "x-ratelimit-limit-requests" not in r.headers
    assert plain.status_code == 401


# --- IP allowlist and X-Forwarded-For --------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "status"),
    [
        ("10.1.2.3", 200),
        ("192.168.7.7", 200),
        ("192.168.8.1", 403),
        ("8.8.8.8", 403),
        ("2001:db8::1", 200),
        ("2001:db8:ffff::42", 200),
        ("2001:db9::1", 403),
        ("::1", 403),
        ("::ffff:10.0.0.5", 200),
    ],
)
async def test_ip_allowlist(ip: str, status: int) -> None:
    app = make_app(GuardSettings(allowed_ips=["10.0.0.0/8", "192.168.7.0/24", "2001:db8::/32"]))
    async with client_for(app, ip=ip) as c:
        r = await c.post("/v1/echo", json={"text": "x"})
        h = await c.get("/health")
    assert r.status_code == status
    assert h.status_code == status  # the allowlist covers every path
    if status == 403:
        assert r.json() == error_body(
            "Your IP address is not allowed to use this server.", "permission_error", "forbidden"
        )
        assert "x-request-id" in r.headers
        assert app.state.calls == 0


async def test_allowlist_runs_before_auth() -> None:
    app = make_app(GuardSettings(api_keys=[KEY_A], allowed_ips=["10.0.0.0/8"]))
    async with client_for(app, ip="8.8.4.4") as c:
        r = await c.post("/v1/echo", json={}, headers=bearer(KEY_A))
    assert r.status_code == 403


async def test_forwarded_for_is_ignored_from_untrusted_peer() -> None:
    app = make_app(GuardSettings(allowed_ips=["10.0.0.0/8"], trusted_proxies=["127.0.0.1"]))
    async with client_for(app, ip="203.0.113.9") as c:
        r = await c.post("/v1/echo", json={}, headers={"X-Forwarded-For": "10.0.0.1"})
    assert r.status_code == 403
    app = make_app(GuardSettings(allowed_ips=["203.0.113.0/24"]))  # no trusted proxies at all
    async with client_for(app, ip="203.0.113.9") as c:
        r = await c.post("/v1/echo", json={}, headers={"X-Forwarded-For": "10.0.0.1"})
    assert r.status_code == 200 and r.json()["client_ip"] == "203.0.113.9"


@pytest.mark.parametrize(
    ("xff", "status", "client_ip"),
    [
        ("10.0.0.7", 200, "10.0.0.7"),
        ("203.0.113.9, 10.0.0.7", 200, "10.0.0.7"),  # left entries come from the client
        ("10.0.0.7, 203.0.113.9", 403, "203.0.113.9"),  # spoofed allowed address on the left
        ("10.0.0.7, 172.16.0.2", 200, "10.0.0.7"),  # a second trusted proxy is skipped
        ("garbage, 10.0.0.7", 200, "10.0.0.7"),
        ("10.0.0.7, garbage", 403, "127.0.0.1"),  # unparsable: stop at the last trusted hop
    ],
)
async def test_forwarded_for_from_trusted_proxy(xff: str, status: int, client_ip: str) -> None:
    settings = GuardSettings(allowed_ips=["10.0.0.0/8"], trusted_proxies=["127.0.0.0/8", "172.16.0.0/12"])
    app = make_app(settings)
    async with client_for(app, ip="127.0.0.1") as c:
        r = await c.post("/v1/echo", json={}, headers={"X-Forwarded-For": xff})
    assert r.status_code == status
    if status == 200:
        assert r.json()["client_ip"] == client_ip


def test_resolver_ipv6_and_ports() -> None:
    resolver = ClientAddressResolver(parse_networks(["fd00::/8"], param="t"))
    assert str(resolver.resolve("fd00::1", ["[2001:db8::5]:4711"])) == "2001:db8::5"
    assert str(resolver.resolve("fd00::1", ["198.51.100.4:5555"])) == "198.51.100.4"
    assert str(resolver.resolve("2001:db8::9", ["198.51.100.4"])) == "2001:db8::9"
    assert resolver.resolve(None, ["198.51.100.4"]) is None
    assert str(parse_ip("::ffff:192.0.2.1")) == "192.0.2.1"
    with pytest.raises(ConfigError, match="not an IP"):
        parse_networks(["10.0.0.0/33"], param="allowed_ips")


# --- rate limits ---------------------------------------------------------------------------------


class FakeTime:
    """Stands in for the `time` module inside the limits memory storage and the guard's limiter."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    import limits.aio.storage.memory as memory_storage

    clock = FakeTime()
    monkeypatch.setattr(memory_storage, "time", clock)
    monkeypatch.setattr(guard_ratelimit, "time", clock)
    return clock


async def test_requests_per_minute_headers_and_429(fake_time: FakeTime) -> None:
    app = make_app(GuardSettings(api_keys=[KEY_A, KEY_B], requests_per_minute=2))
    async with client_for(app) as c:
        r1 = await c.post("/v1/echo", json={}, headers=bearer(KEY_A))
        fake_time.now += 10
        r2 = await c.post("/v1/echo", json={}, headers=bearer(KEY_A))
        fake_time.now += 5
        r3 = await c.post("/v1/echo", json={}, headers=bearer(KEY_A))
        other = await c.post("/v1/echo", json={}, headers=bearer(KEY_B))
        fake_time.now += 45.5  # the first request has left the window
        r4 = await c.post("/v1/echo", json={}, headers=bearer(KEY_A))
    assert [r.status_code for r in (r1, r2, r3, other, r4)] == [200, 200, 429, 200, 200]
    assert r1.headers["x-ratelimit-limit-requests"] == "2"
    assert r1.headers["x-ratelimit-remaining-requests"] == "1"
    assert r1.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert r2.headers["x-ratelimit-remaining-requests"] == "0"
    assert r2.headers["x-ratelimit-reset-requests"] == "50s"
    assert r3.json() == error_body(
        f"Rate limit reached for requests per minute (key 'key-{hash_api_key(KEY_A)[:8]}'): limit 2. "
        "Please try again in 45s.",
        "rate_limit_error",
        "rate_limit_exceeded",
    )
    assert r3.headers["retry-after"] == "45"
    assert r3.headers["x-ratelimit-remaining-requests"] == "0"
    assert r3.headers["x-ratelimit-reset-requests"] == "45s"
    assert "x-ratelimit-limit-tokens" not in r3.headers
    assert "x-request-id" in r3.headers
    assert other.headers["x-ratelimit-remaining-requests"] == "1"
    assert r4.headers["x-ratelimit-remaining-requests"] == "0"
    assert app.state.calls == 4


async def test_rate_limit_per_client_ip_without_keys(fake_time: FakeTime) -> None:
    app = make_app(GuardSettings(requests_per_minute=1))
    async with client_for(app, ip="10.0.0.1") as c1, client_for(app, ip="10.0.0.2") as c2:
        a1 = await c1.post("/v1/echo", json={})
        a2 = await c1.post("/v1/echo", json={})
        b1 = await c2.post("/v1/echo", json={})
        health = await c1.get("/health")
    assert [a1.status_code, a2.status_code, b1.status_code, health.status_code] == [200, 429, 200, 200]
    assert a2.json()["error"]["message"].startswith("Rate limit reached for requests per minute (client 10.0.0.1)")
    assert a2.headers["retry-after"] == "60"


async def test_tokens_per_minute(fake_time: FakeTime) -> None:
    app = make_app(GuardSettings(api_keys=[KEY_A], tokens_per_minute=10))
    async with client_for(app) as c:
        r1 = await c.post("/v1/echo", json={"tokens": 8}, headers=bearer(KEY_A))
        fake_time.now += 20
        r2 = await c.post("/v1/echo", json={"tokens": 8}, headers=bearer(KEY_A))  # overshoots to 16
        fake_time.now += 10
        r3 = await c.post("/v1/echo", json={"tokens": 1}, headers=bearer(KEY_A))
        fake_time.now += 30.5  # the window started with the first charge; it has reset
        r4 = await c.post("/v1/echo", json={"tokens": 1}, headers=bearer(KEY_A))
    assert [r.status_code for r in (r1, r2, r3, r4)] == [200, 200, 429, 200]
    assert r1.headers["x-ratelimit-limit-tokens"] == "10"
    assert r1.headers["x-ratelimit-remaining-tokens"] == "10"  # before its own tokens are charged
    assert r1.headers["x-ratelimit-reset-tokens"] == "0ms"
    assert r2.headers["x-ratelimit-remaining-tokens"] == "2"
    assert r2.headers["x-ratelimit-reset-tokens"] == "40s"
    assert "x-ratelimit-limit-requests" not in r1.headers
    assert r3.headers["retry-after"] == "30"
    assert r3.headers["x-ratelimit-remaining-tokens"] == "0"
    assert r3.json()["error"]["code"] == "rate_limit_exceeded"
    assert r3.json()["error"]["message"].startswith("Rate limit reached for tokens per minute")
    assert r4.headers["x-ratelimit-remaining-tokens"] == "10"
    assert app.state.calls == 3


async def test_request_and_token_limits_together(fake_time: FakeTime) -> None:
    app = make_app(GuardSettings(requests_per_minute=5, tokens_per_minute=100))
    async with client_for(app) as c:
        r = await c.post("/v1/echo", json={"tokens": 30})
        r2 = await c.post("/v1/echo", json={"tokens": 30})
    for name in ("requests", "tokens"):
        for kind in ("limit", "remaining", "reset"):
            assert f"x-ratelimit-{kind}-{name}" in r.headers
    assert r2.headers["x-ratelimit-remaining-requests"] == "3"
    assert r2.headers["x-ratelimit-remaining-tokens"] == "70"


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 0.35, 1, 12.5, 59.9996, 60, 61.25)] == [
        "0ms", "350ms", "1s", "12.5s", "60s", "1m0s", "1m1.25s",
    ]


# --- body cap ------------------------------------------------------------------------------------


TOO_LARGE = error_body(
    "Request body is larger than the server accepts (see --max-body-mb).", "invalid_request_error", "request_too_large"
)


@pytest.mark.parametrize("path", ["/v1/echo", "/v1/typed"])
async def test_content_length_over_cap_is_413_before_parsing(path: str) -> None:
    app = make_app(GuardSettings(max_body_bytes=1000))
    body = json.dumps({"text": "x" * 2000}).encode()
    async with client_for(app) as c:
        r = await c.post(path, content=body, headers={"content-type": "application/json"})
        ok = await c.post(path, json={"text": "y" * 900})
    assert r.status_code == 413
    assert r.json() == TOO_LARGE
    assert "x-request-id" in r.headers
    assert ok.status_code == 200
    assert app.state.calls == 1


@pytest.mark.parametrize("path", ["/v1/echo", "/v1/typed"])
async def test_chunked_body_over_cap_is_413(path: str) -> None:
    app = make_app(GuardSettings(max_body_bytes=1000))

    async def chunks(n: int) -> AsyncIterator[bytes]:
        yield b'{"text": "'
        for _ in range(n):
            yield b"z" * 300
        yield b'"}'

    async with client_for(app) as c:
        big = await c.post(path, content=chunks(5), headers={"content-type": "application/json"})
        small = await c.post(path, content=chunks(2), headers={"content-type": "application/json"})
    assert "content-length" not in big.request.headers
    assert big.request.headers["transfer-encoding"] == "chunked"
    assert big.status_code == 413
    assert big.json() == TOO_LARGE
    assert small.status_code == 200
    # /v1/echo reads the body itself (it starts, then never gets it whole); /v1/typed's body is
    # parsed by FastAPI before the handler runs, so the handler never runs for the big body.
    assert app.state.calls == {"/v1/echo": 2, "/v1/typed": 1}[path]


async def test_body_cap_applies_before_rate_limit(fake_time: FakeTime) -> None:
    app = make_app(GuardSettings(max_body_bytes=100, requests_per_minute=1))
    async with client_for(app) as c:
        big = await c.post("/v1/echo", content=b"{" + b" " * 200 + b"}")
        ok = await c.post("/v1/echo", json={})
    assert big.status_code == 413 and "x-ratelimit-limit-requests" not in big.headers
    assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-requests"] == "0"


# --- request id and streaming ---------------------------------------------------------------------


async def test_request_id_generated_and_propagated() -> None:
    app = make_app(GuardSettings(api_keys=[KEY_A]))
    async with client_for(app) as c:
        fresh = await c.post("/v1/echo", json={}, headers=bearer(KEY_A))
        given = await c.post("/v1/echo", json={}, headers={**bearer(KEY_A), "X-Request-ID": "trace-42.a:b_c"})
        insane = await c.post("/v1/echo", json={}, headers={**bearer(KEY_A), "X-Request-ID": "bad id<script>"})
        too_long = await c.post("/v1/echo", json={}, headers={**bearer(KEY_A), "X-Request-ID": "a" * 129})
        rejected = await c.post("/v1/echo", json={}, headers={"X-Request-ID": "trace-43"})
        health = await c.get("/health")
    assert REQ_ID.match(fresh.headers["x-request-id"])
    assert fresh.json()["request_id"] == fresh.headers["x-request-id"] == fresh.json()["request_id_of"]
    assert given.headers["x-request-id"] == "trace-42.a:b_c" == given.json()["request_id"]
    assert REQ_ID.match(insane.headers["x-request-id"])
    assert REQ_ID.match(too_long.headers["x-request-id"])
    assert rejected.status_code == 401 and rejected.headers["x-request-id"] == "trace-43"
    assert REQ_ID.match(health.headers["x-request-id"])
    assert len({fresh.headers["x-request-id"], insane.headers["x-request-id"], health.headers["x-request-id"]}) == 3


async def test_streaming_response_passes_through_all_guards(fake_time: FakeTime) -> None:
    settings = GuardSettings(
        api_keys=[KEY_A], allowed_ips=["127.0.0.0/8"], requests_per_minute=5, tokens_per_minute=1000
    )
    app = make_app(settings)
    async with client_for(app) as c, c.stream(
        "POST", "/v1/echo", json={"text": "s", "stream": True, "tokens": 3}, headers=bearer(KEY_A)
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-ratelimit-remaining-requests"] == "4"
        assert REQ_ID.match(r.headers["x-request-id"])
        lines = [line async for line in r.aiter_lines() if line]
    assert lines == ["data: 0", "data: 1", "data: 2", "data: [DONE]"]


@contextlib.contextmanager
def running_server(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on an ephemeral loopback port in a thread."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False, proxy_headers=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def make_streaming_app(settings: GuardSettings) -> tuple[FastAPI, threading.Event, threading.Event]:
    """/v1/stream yields one event, then waits until the test says the client has it."""
    app = FastAPI()
    client_has_first = threading.Event()
    stream_closed = threading.Event()

    @app.post("/v1/stream")
    async def stream(request: Request) -> StreamingResponse:
        body = await request.json()

        async def events() -> AsyncIterator[str]:
            try:
                yield "data: first\n\n"
                for _ in range(1000):  # bounded wait; a buffering middleware would make this time out
                    if client_has_first.is_set():
                        break
                    await asyncio.sleep(0.01)
                yield "data: after\n\n" if client_has_first.is_set() else "data: timeout\n\n"
                if body.get("hang"):
                    while True:  # until the client goes away and the response is cancelled
                        await asyncio.sleep(0.01)
                record_usage(request, prompt_tokens=5, completion_tokens=2, cached_tokens=0, ttft=0.001)
                yield "data: [DONE]\n\n"
            finally:
                stream_closed.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    install_guards(app, settings)
    return app, client_has_first, stream_closed


FULL_GUARD = GuardSettings(
    api_keys=[KEY_A], allowed_ips=["127.0.0.0/8"], requests_per_minute=50, tokens_per_minute=10_000,
    max_body_bytes=4096, log_content=True,
)


def test_sse_streams_incrementally_through_a_real_server() -> None:
    app, client_has_first, _ = make_streaming_app(FULL_GUARD)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as c, c.stream(
        "POST", "/v1/stream", json={"q": 1}, headers=bearer(KEY_A)
    ) as r:
        assert r.status_code == 200
        assert r.headers["x-ratelimit-remaining-requests"] == "49"
        assert r.headers["x-ratelimit-limit-tokens"] == "10000"
        assert REQ_ID.match(r.headers["x-request-id"])
        lines = r.iter_lines()
        assert next(line for line in lines if line) == "data: first"
        client_has_first.set()
        rest = [line for line in lines if line]
    assert rest == ["data: after", "data: [DONE]"]


def test_client_disconnect_reaches_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="glmv.access")
    app, client_has_first, stream_closed = make_streaming_app(FULL_GUARD)
    with running_server(app) as url:
        with httpx.Client(base_url=url, timeout=30) as c, c.stream(
            "POST", "/v1/stream", json={"hang": True}, headers={**bearer(KEY_A), "x-request-id": "gone-1"}
        ) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line) == "data: first"
            client_has_first.set()
            assert next(line for line in lines if line) == "data: after"
        # leaving the block closed the connection mid-stream
        assert stream_closed.wait(20), "the streaming generator never saw the disconnect"
        deadline = time.monotonic() + 20
        while not [rec for rec in caplog.records if rec.name == "glmv.access"]:
            assert time.monotonic() < deadline, "no access-log line after the disconnect"
            time.sleep(0.01)
    (line,) = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "glmv.access"]
    assert line["request_id"] == "gone-1"
    assert line["status"] == 200
    assert line["key_name"] == f"key-{hash_api_key(KEY_A)[:8]}"
    assert line["prompt_tokens"] is None  # the stream never finished, nothing was recorded


async def test_unhandled_error_is_500_json_with_request_id() -> None:
    app = FastAPI()

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail")

    install_guards(app, GuardSettings())
    async with client_for(app, raise_app_exceptions=False) as c:
        r = await c.get("/v1/boom", headers={"x-request-id": "boom-1"})
    assert r.status_code == 500
    assert r.json() == error_body("Internal server error", "internal_error", None)
    assert r.headers["x-request-id"] == "boom-1"


def test_record_usage_without_guard_and_on_scope() -> None:
    scope: dict[str, Any] = {"type": "http"}
    record_usage(scope, prompt_tokens=3, completion_tokens=4, cached_tokens=1, ttft=0.5)
    usage = scope["state"]["glmv_usage"]
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.ttft) == (3, 4, 1, 0.5)
    assert usage.total_tokens == 7
    assert request_id_of(scope) is None


# --- settings ------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_guard_arguments(parser)
    return parser.parse_args(argv)


def test_settings_repr_hides_keys() -> None:
    assert KEY_A not in repr(GuardSettings(api_keys=[KEY_A]))


def test_defaults() -> None:
    s = guard_settings_from(parse([]), {}, {})
    assert s == GuardSettings()
    assert s.max_body_bytes == 32 * 1024 * 1024 and s.access_log is True and s.log_content is False


def test_flags_env_toml_precedence() -> None:
    args = parse(
        ["--api-key", "k1", "--api-key", "k2,with,commas", "--allow-ip", "10.0.0.0/8,::1", "--allow-ip", "fd00::/8",
         "--rate-limit-rpm", "7", "--max-body-mb", "0.5", "--no-access-log", "--protect-metrics"]
    )
    env = {
        "GLMV_API_KEY": "e1,e2",
        "GLMV_RATE_LIMIT_RPM": "8",
        "GLMV_RATE_LIMIT_TPM": "900",
        "GLMV_LOG_CONTENT": "yes",
        "GLMV_TRUSTED_PROXY": "",
        "GLMV_ACCESS_LOG": "1",
    }
    toml = {
        "guard": {"rate-limit-tpm": 1, "trusted_proxies": ["192.0.2.0/24"], "api_keys_file": "/k.toml"},
        "rate_limit_storage": "redis://127.0.0.1:6379/0",
        "tokens_per_minute": 2,
        "protect_metrics": False,
    }
    s = guard_settings_from(args, env, toml)
    assert s.api_keys == ["k1", "k2,with,commas"]  # flag keys are never split
    assert s.allowed_ips == ["10.0.0.0/8", "::1", "fd00::/8"]
    assert s.requests_per_minute == 7
    assert s.tokens_per_minute == 900  # env beats TOML
    assert s.log_content is True
    assert s.trusted_proxies == ["192.0.2.0/24"]  # empty env counts as unset; [guard] table
    assert s.api_keys_file == "/k.toml"
    assert s.rate_limit_storage == "redis://127.0.0.1:6379/0"  # top-level TOML key
    assert s.max_body_bytes == 512 * 1024
    assert s.access_log is False  # flag beats env
    assert s.protect_metrics is True
    s2 = guard_settings_from(parse([]), env, toml)
    assert s2.api_keys == ["e1", "e2"] and s2.requests_per_minute == 8 and s2.access_log is True
    s3 = guard_settings_from(parse([]), {}, {"guard": {"tokens_per_minute": 3}, "max_body_bytes": 2048})
    assert s3.tokens_per_minute == 3 and s3.max_body_bytes == 2048
    s4 = guard_settings_from(parse(["--rate-limit-rpm", "0"]), {"GLMV_MAX_BODY_MB": "2"}, {})
    assert s4.requests_per_minute is None and s4.max_body_bytes == 2 * 1024 * 1024


@pytest.mark.parametrize(
    ("argv", "env", "toml", "needle"),
    [
        (["--rate-limit-rpm", "-1"], {}, {}, "non-negative"),
        ([], {"GLMV_RATE_LIMIT_TPM": "lots"}, {}, "integer"),
        ([], {"GLMV_LOG_CONTENT": "maybe"}, {}, "true/false"),
        (["--max-body-mb", "0"], {}, {}, "positive"),
        ([], {}, {"guard": {"allowed_ips": 5}}, "list"),
        ([], {}, {"max_body_bytes": -3}, "positive"),
    ],
)
def test_bad_settings_are_config_errors(argv: list[str], env: dict[str, str], toml: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        guard_settings_from(parse(argv), env, toml)


def test_help_names_every_env_var() -> None:
    parser = argparse.ArgumentParser()
    add_guard_arguments(parser)
    text = " ".join(parser.format_help().split())
    for var in (
        "GLMV_API_KEY", "GLMV_API_KEYS_FILE", "GLMV_PROTECT_METRICS", "GLMV_ALLOW_IP", "GLMV_TRUSTED_PROXY",
        "GLMV_RATE_LIMIT_RPM", "GLMV_RATE_LIMIT_TPM", "GLMV_RATE_LIMIT_STORAGE", "GLMV_MAX_BODY_MB",
        "GLMV_LOG_CONTENT", "GLMV_ACCESS_LOG",
    ):
        assert var in text, var


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        (GuardSettings(allowed_ips=["10.0.0.300"]), "allowed_ips"),
        (GuardSettings(trusted_proxies=["proxy.local"]), "trusted_proxies"),
        (GuardSettings(requests_per_minute=5, rate_limit_storage="nosuch://x"), "rate limit storage"),
        (GuardSettings(requests_per_minute=5, rate_limit_storage="localhost:6379"), "not a URI"),
        (GuardSettings(max_body_bytes=0), "max_body_bytes"),
    ],
)
def test_install_rejects_bad_settings(settings: GuardSettings, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        install_guards(FastAPI(), settings)
