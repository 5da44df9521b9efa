"""A bounded load test: 64 concurrent streaming clients against a real `glmv serve` on the tiny
model for about 20 seconds. Every response must be a 200 whose SSE stream is well formed and
complete, and when the load stops the engine must be empty again (no running or waiting
requests, KV-cache usage 0)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from .conftest import metric_value, parse_sse

CLIENTS = 64
SECONDS = float(os.environ.get("GLMV_TEST_LOAD_SECONDS", "20"))
LABELS = {"model_name": "tiny-glm41v"}


def _check_stream(text: str, n: int, max_tokens: int) -> int:
    """Assert everything a client relies on in one stream; returns its completion tokens."""
    events, done = parse_sse(text)
    assert done
    assert all("error" not in e for e in events), events[-1]
    ids = {e["id"] for e in events}
    assert len(ids) == 1
    *chunks, usage_chunk = events
    assert [c["choices"][0]["delta"] for c in chunks[:n]] == [{"role": "assistant", "content": ""}] * n
    finishes: dict[int, str] = {}
    for c in chunks:
        [choice] = c["choices"]
        assert c["usage"] is None
        if choice["finish_reason"] is not None:
            assert choice["index"] not in finishes
            finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == dict.fromkeys(range(n), "length")  # ignore_eos: every choice runs to max_tokens
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == n * max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return int(usage["completion_tokens"])


@pytest.mark.slow
async def test_64_streaming_clients(live_server: Any, image_url: Callable[..., str]) -> None:
    images = [image_url(40 + 8 * i, 40, (30 * i, 90, 200)) for i in range(4)]
    deadline = time.monotonic() + SECONDS
    statuses: dict[int, int] = {}
    tokens = 0
    requests = 0

    async def client(seed: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, requests
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            max_tokens = rng.randint(2, 12)
            n = 2 if rng.random() < 0.1 else 1
            content: list[dict[str, Any]] = [{"type": "text", "text": f"Question {rng.randint(0, 99)}"}]
            if rng.random() < 0.3:
                content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(images)}})
            body = {
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "n": n,
                "ignore_eos": True,
                "temperature": rng.choice([0.0, 0.7, 1.0]),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                text = (await r.aread()).decode()
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code == 200, text[:500]
            tokens += _check_stream(text, n, max_tokens)
            requests += 1

    # One connection per client, and idle ones dropped well before uvicorn's 5 s keep-alive
    # timeout, so no request is ever sent on a connection the server is closing.
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(CLIENTS)))
        print(f"load: {requests} requests, {tokens} tokens")
        assert statuses == {200: requests}
        assert requests >= CLIENTS  # every client finished at least one request
        assert (await http.get("/health")).status_code == 200

        # The engine drains completely: nothing running or waiting, every KV block released.
        # A generous deadline, polled: a loaded CI box may take seconds to run the last steps.
        deadline = time.monotonic() + 120
        while True:
            text = (await http.get("/metrics")).text
            if (
                metric_value(text, "glmv_requests_running", LABELS) == 0.0
                and metric_value(text, "glmv_requests_waiting", LABELS) == 0.0
            ) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert metric_value(text, "glmv_requests_running", LABELS) == 0.0
    assert metric_value(text, "glmv_requests_waiting", LABELS) == 0.0
    assert metric_value(text, "glmv_kv_cache_usage_ratio", LABELS) == 0.0
    for line in text.splitlines():
        if line.startswith("glmv_http_responses_total"):
            assert 'status="5' not in line, line
    assert (metric_value(text, "glmv_generation_tokens_total", LABELS) or 0.0) >= tokens
