"""Locust load profile for `glmv serve`: users stream chat completions about a small generated image.

    pip install locust
    glmv serve --model DIR &
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:8000 --headless -u 64 -r 8 -t 2m

Each user posts `stream: true` requests with one PNG (a fresh random image per user, so the
encoder cache only helps repeat questions of the same user), reads the SSE stream to `[DONE]`,
and reports three extra entries next to the HTTP request itself (whose time is the time to the
response headers): `TTFT` (time to the first content chunk), `ITL` (mean time between later
chunks) and `E2E` (time to `[DONE]`; its "size" column is the completion tokens). A stream without `[DONE]`, with an error event, or a non-200
status is a failure.

Settings (environment): GLMV_BENCH_MODEL (default: the server's first model), GLMV_BENCH_API_KEY,
GLMV_BENCH_IMAGE_SIZE (448), GLMV_BENCH_MAX_TOKENS (64), GLMV_BENCH_IGNORE_EOS (1: every answer
runs to max tokens, for steady load), GLMV_BENCH_REUSE_IMAGE (0.5: share of requests that repeat
the user's previous question and image, to exercise the prefix and image caches).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import time
from typing import Any

import numpy as np
from locust import HttpUser, between, events, task
from PIL import Image

MODEL = os.environ.get("GLMV_BENCH_MODEL")
API_KEY = os.environ.get("GLMV_BENCH_API_KEY")
IMAGE_SIZE = int(os.environ.get("GLMV_BENCH_IMAGE_SIZE", "448"))
MAX_TOKENS = int(os.environ.get("GLMV_BENCH_MAX_TOKENS", "64"))
IGNORE_EOS = os.environ.get("GLMV_BENCH_IGNORE_EOS", "1") not in ("0", "false", "no")
REUSE = float(os.environ.get("GLMV_BENCH_REUSE_IMAGE", "0.5"))

QUESTIONS = [
    "What is in this picture?",
    "这张图片里有什么？",
    "Extract the total amount from this invoice as JSON.",
    "图中的文字是什么？",
    "Describe the chart and its trend.",
]


def random_png_data_url(size: int, rng: np.random.Generator) -> str:
    """A noisy RGB image with a few flat blocks: neither trivially compressible nor all noise."""
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    for _ in range(6):
        x, y = rng.integers(0, size - size // 4, 2)
        pixels[y : y + size // 4, x : x + size // 4] = rng.integers(0, 256, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _report(name: str, kind: str, value: float, length: int = 0) -> None:
    events.request.fire(
        request_type=kind, name=name, response_time=value, response_length=length, exception=None, context={}
    )


class ChatUser(HttpUser):
    wait_time = between(0.0, 0.5)

    def on_start(self) -> None:
        self.rng = np.random.default_rng(random.randrange(2**32))
        self.headers = {"Content-Type": "application/json"}
        if API_KEY:
            self.headers["Authorization"] = f"Bearer {API_KEY}"
        self.model = MODEL
        if self.model is None:
            r = self.client.get("/v1/models", headers=self.headers, name="/v1/models")
            self.model = r.json()["data"][0]["id"] if r.status_code == 200 else None
        self.image = random_png_data_url(IMAGE_SIZE, self.rng)
        self.question = random.choice(QUESTIONS)

    @task
    def stream_chat_about_an_image(self) -> None:
        if random.random() >= REUSE:
            self.image = random_png_data_url(IMAGE_SIZE, self.rng)
            self.question = random.choice(QUESTIONS)
        body: dict[str, Any] = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": self.image}},
                        {"type": "text", "text": self.question},
                    ],
                }
            ],
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": IGNORE_EOS,
        }
        if self.model:
            body["model"] = self.model
        name = "/v1/chat/completions (stream)"
        start = time.perf_counter()
        first: float | None = None
        last: float | None = None
        gaps: list[float] = []
        tokens = 0
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers=self.headers,
            stream=True,
            catch_response=True,
            name=name,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            done = False
            for raw in response.iter_lines():
                if not raw:
                    continue
                line = raw.decode() if isinstance(raw, bytes) else raw
                if not line.startswith("data: "):
                    response.failure(f"malformed SSE line: {line[:100]}")
                    return
                payload = line[6:]
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    response.failure(f"error event: {event['error'].get('message')}")
                    return
                if event.get("usage"):
                    tokens = int(event["usage"]["completion_tokens"])
                has_text = any(
                    c["delta"].get("content") or c["delta"].get("reasoning_content")
                    for c in event.get("choices", [])
                )
                if has_text:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    elif last is not None:
                        gaps.append(now - last)
                    last = now
            if not done:
                response.failure("stream ended without [DONE]")
                return
            response.success()
        if first is not None:
            _report(name, "TTFT", (first - start) * 1000)
        if gaps:
            _report(name, "ITL", sum(gaps) / len(gaps) * 1000)
        _report(name, "E2E", (time.perf_counter() - start) * 1000, length=tokens)
