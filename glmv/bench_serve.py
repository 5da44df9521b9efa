"""`glmv bench serve`: an HTTP load generator for any OpenAI-compatible chat server.

It sends streaming `/v1/chat/completions` requests with synthetic prompts (and, optionally,
seeded synthetic images) to glmv, vLLM, SGLang or any server that speaks the OpenAI streaming
protocol, and reports client-side latency and throughput the way `vllm bench serve` does:

* **TTFT**: from sending the request to the first streamed chunk that carries text (`content`,
  `reasoning_content` or `reasoning`); role-only and empty chunks do not count.
* **ITL**: the gaps between successive text-carrying chunks of one request.
* **E2E latency** (`e2el`): from sending the request to its last text-carrying chunk.
* **TPOT**: `(e2el - ttft) / (output_tokens - 1)`, for requests with more than one output token.
* Each of these as mean, median, standard deviation, p90 and p99 (linear interpolation, in ms).
* Request throughput (successful requests / duration), output token throughput and total token
  throughput (prompt + output tokens / duration), from successful requests only. Output and prompt
  token counts come from the final `usage` chunk (`stream_options.include_usage`); without one the
  output count falls back to the number of text-carrying chunks and the prompt count to 0.
* A request fails on an HTTP status other than 200, an SSE error event (`data: {"error": ...}`),
  a stream that ends before `data: [DONE]`, a stream without any text, a transport error or the
  per-request timeout. The first few error messages are kept.

Requests have fixed lengths: `max_tokens` = `min_tokens` = `--output-tokens` with `ignore_eos`.
Arrivals are all at once (`--request-rate inf`) or a seeded Poisson process; `--max-concurrency`
bounds the requests in flight. With `--turns 2` every conversation sends a second request after
the first one finishes: the same user turn (same images), the first answer as the assistant turn
and a short new question, so a server's prefix and image caches can serve it; TTFT is reported per
turn as well as overall. The concurrency slot is held for the whole conversation.
`--request-rate 4,8,12` sweeps: one run per rate, one after another, then a table with a row per
rate (offered and served requests per second, TTFT and TPOT median and p99); `--result-json` then
holds `{"sweep": [one object per rate, as below]}`.

The JSON written by `--result-json` has: `date`, `base_url`, `endpoint`, `model`, `config`
(every option, the API key redacted), `duration_s`, `num_requests`, `completed`, `failed`,
`total_input_tokens`, `total_output_tokens`, `total_cached_tokens`, `request_throughput`,
`output_throughput`, `total_token_throughput`, `max_concurrent_requests`,
`{mean,median,std,p90,p99}_{ttft,tpot,itl,e2el}_ms`, `turns` (per turn: `turn`, `completed`,
`failed`, `{mean,median,p90,p99}_ttft_ms`, `mean_e2el_ms`, `total_cached_tokens`),
`second_turn_ttft_ratio` (median turn-2 TTFT / median turn-1 TTFT, or null), `warmup_failed`,
`errors` and `requests` (one record per request: `conversation`, `turn`, `success`,
`scheduled_s`, `start_s`, `end_s`, `ttft_ms`, `e2el_ms`, `output_tokens`, `prompt_tokens`,
`cached_tokens`, `error`).

Programmatic use (the `benchmarks/` scripts): `result = await run_benchmark(BenchConfig(...))`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime as _dt
import io
import json
import logging
import math
import os
import random
import struct
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from glmv.errors import ConfigError

log = logging.getLogger("glmv.bench")

MAX_KEPT_ERRORS = 10
PERCENTILES = (90.0, 99.0)
_LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
_TEXT_FIELDS = ("content", "reasoning_content", "reasoning")

# Common English words: with a leading space most of them are one token in the usual BPE vocabularies,
# so `n` words make a prompt of roughly `n` tokens.
_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
    "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they",
    "you", "were", "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more",
    "when", "will", "would", "who", "so", "no", "she", "other", "its", "may", "these", "about", "than",
    "into", "some", "could", "time", "them", "only", "new", "two", "very", "after", "first", "also",
    "made", "over", "such", "years", "what", "most", "where", "through", "many", "before", "must",
    "well", "should", "because", "each", "just", "those", "people", "how", "too", "little", "state",
    "good", "make", "world", "still", "own", "see", "men", "work", "long", "get", "here", "between",
    "both", "life", "being", "under", "never", "day", "same", "another", "know", "while", "last",
    "might", "us", "great", "old", "year", "off", "come", "since", "against", "go", "came", "right",
    "used", "take", "three", "small", "house", "light", "water", "colour", "window", "table", "paper",
    "river", "city", "road",
)

_FIRST_QUESTION_IMAGE = "Describe the image in detail."
_FIRST_QUESTION_TEXT = "Continue the text above."
_SECOND_QUESTION_IMAGE = "Look at the same image again. What else do you notice in it?"
_SECOND_QUESTION_TEXT = "Go on, in other words."


# --- configuration -----------------------------------------------------------------------------------


@dataclass(slots=True)
class BenchConfig:
    """Every option of `glmv bench serve`; the CLI flag of `num_prompts` is `--num-prompts`, etc."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/chat/completions"
    model: str | None = None  # None: the first entry of GET /v1/models
    api_key: str | None = None
    num_prompts: int = 100  # conversations; each sends `turns` requests
    max_concurrency: int | None = None  # None: no client-side bound
    request_rate: float = math.inf  # conversations per second; inf sends all at once
    input_tokens: int = 128  # approximate length of the synthetic text, in words ~ tokens
    output_tokens: int = 128
    ignore_eos: bool = True  # also sends min_tokens = output_tokens, so every answer has that length
    image_size: tuple[int, int] | None = None  # (width, height); None: text-only requests
    image_format: str = "png"  # png or jpeg
    images_per_request: int = 1
    same_image: bool = False  # every request gets the same image(s) instead of its own
    turns: int = 1
    seed: int = 0
    warmup: int = 0  # requests sent (and not measured) before the benchmark
    timeout: float = 600.0  # seconds per request
    temperature: float | None = None  # None: the server's default
    extra_body: dict[str, Any] | None = None  # merged into every request body
    result_json: str | None = None
    disable_tqdm: bool = False

    def validate(self) -> None:
        """Raise `ConfigError` (with `param` the option name) for an impossible setting."""

        def need(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"--{param.replace('_', '-')} {message}", param=param)

        need(self.base_url.startswith(("http://", "https://")), "base_url", "must start with http:// or https://")
        need(self.endpoint.startswith("/"), "endpoint", "must start with /")
        need(self.num_prompts >= 1, "num_prompts", "must be at least 1")
        need(self.max_concurrency is None or self.max_concurrency >= 1, "max_concurrency", "must be at least 1")
        need(self.request_rate > 0 and not math.isnan(self.request_rate), "request_rate", "must be > 0 (or inf)")
        need(self.input_tokens >= 0, "input_tokens", "must be >= 0")
        need(self.output_tokens >= 1, "output_tokens", "must be at least 1")
        need(self.image_format in ("png", "jpeg"), "image_format", "must be png or jpeg")
        need(self.images_per_request >= 0, "images_per_request", "must be >= 0")
        if self.image_size is not None:
            width, height = self.image_size
            need(width >= 1 and height >= 1, "image_size", "must be at least 1x1")
        need(self.turns >= 1, "turns", "must be at least 1")
        need(self.warmup >= 0, "warmup", "must be >= 0")
        need(self.timeout > 0, "timeout", "must be > 0")

    @property
    def num_images(self) -> int:
        return self.images_per_request if self.image_size is not None else 0

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-safe values (the API key redacted, `inf` as the string "inf")."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["api_key"]:
            out["api_key"] = "<redacted>"
        out["request_rate"] = _json_float(self.request_rate)
        if self.image_size is not None:
            out["image_size"] = f"{self.image_size[0]}x{self.image_size[1]}"
        return out


def parse_image_size(text: str) -> tuple[int, int]:
    """`"1120x1120"` (or `"1120"` for a square) -> `(width, height)`."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise ConfigError(f"--image-size must look like WIDTHxHEIGHT, got {text!r}", param="image_size")


# --- what is sent ------------------------------------------------------------------------------------------


def arrival_schedule(count: int, request_rate: float, seed: int) -> list[float]:
    """Send offsets in seconds from the start: all 0 for an infinite rate, else a Poisson process.

    The first request goes at 0; the gaps are exponential with mean `1 / request_rate`, drawn from
    `random.Random(seed)`, so one seed always gives the same schedule.
    """
    if math.isinf(request_rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets = [0.0]
    for _ in range(count - 1):
        offsets.append(offsets[-1] + rng.expovariate(request_rate))
    return offsets[:count]


def synthetic_text(words: int, seed: int, index: int) -> str:
    """`words` seeded random common words (different for every `index`)."""
    rng = random.Random(f"{seed}/{index}")
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _png_bytes(pixels: np.ndarray) -> bytes:
    """An RGB PNG of `pixels` (height, width, 3 uint8), rows unfiltered and stored uncompressed.

    Noise does not compress, and Pillow's encoder spends ~0.3 s filtering a 1120x1120 image; storing
    it takes milliseconds, so thousands of distinct large images can be made before a run.
    """
    height, width, _ = pixels.shape
    rows = np.zeros((height, 1 + width * 3), dtype=np.uint8)  # filter byte 0 (none) per row
    rows[:, 1:] = pixels.reshape(height, width * 3)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"".join(
        (b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", header), chunk(b"IDAT", zlib.compress(rows.tobytes(), 0)), chunk(b"IEND", b""))
    )


def synthetic_image(width: int, height: int, seed: int, index: int, fmt: str = "png") -> str:
    """A data URL of a seeded uniform-noise RGB image (`png` or `jpeg`); one `(seed, index)`, one image."""
    pixels = np.random.default_rng([seed, index]).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    if fmt == "png":
        data, mime = _png_bytes(pixels), "image/png"
    else:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=90)
        data, mime = buf.getvalue(), "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass(slots=True)
class Conversation:
    """The prepared inputs of one conversation: its first user message (as JSON) and the follow-ups.

    The user message is serialised once, before the run: with large images, encoding it while other
    streams are being timed would stall the event loop and inflate their latencies.
    """

    index: int
    user_message: bytes
    follow_ups: list[str]

    @property
    def user_content(self) -> list[dict[str, Any]]:
        return json.loads(self.user_message)["content"]


def build_conversations(config: BenchConfig, start: int, count: int) -> list[Conversation]:
    """Conversations `start .. start+count-1` (prompts and images depend only on the seed and index)."""
    num_images = config.num_images

    def image_key(conversation: int, j: int) -> int:
        return j if config.same_image else conversation * num_images + j

    keys = list(dict.fromkeys(image_key(i, j) for i in range(start, start + count) for j in range(num_images)))
    urls: dict[int, str] = {}
    if keys:
        assert config.image_size is not None
        width, height = config.image_size
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(keys))) as pool:
            made = pool.map(lambda k: synthetic_image(width, height, config.seed, k, config.image_format), keys)
            urls = dict(zip(keys, made, strict=True))
    question = _FIRST_QUESTION_IMAGE if num_images else _FIRST_QUESTION_TEXT
    follow_up = _SECOND_QUESTION_IMAGE if num_images else _SECOND_QUESTION_TEXT
    conversations = []
    for i in range(start, start + count):
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": urls[image_key(i, j)]}} for j in range(num_images)
        ]
        text = synthetic_text(config.input_tokens, config.seed, i)
        content.append({"type": "text", "text": f"{text}\n{question}" if text else question})
        message = json.dumps({"role": "user", "content": content}).encode()
        conversations.append(Conversation(i, message, [follow_up] * (config.turns - 1)))
    return conversations


def request_body(config: BenchConfig, model: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON body of one streaming chat-completions request."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": config.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
        body["min_tokens"] = config.output_tokens
    if config.temperature is not None:
        body["temperature"] = config.temperature
    if config.extra_body:
        body.update(config.extra_body)
    return body


def encode_body(config: BenchConfig, model: str, messages: Sequence[bytes]) -> bytes:
    """`request_body` as JSON bytes, with `messages` given as already-serialised JSON objects."""
    rest = request_body(config, model, [])
    del rest["messages"]
    tail = json.dumps(rest).encode()
    return b"".join((b'{"messages": [', b", ".join(messages), b"], ", tail[1:]))


# --- one request --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestRecord:
    """What was measured for one request. Times are seconds; `start`/`end`/`scheduled` count from the start."""

    conversation: int
    turn: int  # 1-based
    scheduled: float = 0.0
    start: float = 0.0
    end: float = 0.0
    success: bool = False
    ttft: float | None = None
    e2el: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    content: str = ""
    reasoning: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "conversation": self.conversation,
            "turn": self.turn,
            "success": self.success,
            "scheduled_s": self.scheduled,
            "start_s": self.start,
            "end_s": self.end,
            "ttft_ms": None if self.ttft is None else self.ttft * 1000,
            "e2el_ms": None if self.e2el is None else self.e2el * 1000,
            "output_tokens": self.output_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "error": self.error,
        }


def _error_message(payload: Any, fallback: str) -> str:
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str) and err:
            return err
        if payload.get("detail"):
            return str(payload["detail"])
    return fallback


class _Stream:
    """Folds the SSE events of one response into a `RequestRecord` (timestamps in clock seconds)."""

    def __init__(self, record: RequestRecord, sent_at: float) -> None:
        self.record = record
        self.sent_at = sent_at
        self.last_token_at: float | None = None
        self.chunks = 0
        self.usage_seen = False
        self.done = False

    def event(self, name: str, data: str, now: float) -> bool:
        """Handle one event; False once the stream is over (error or `[DONE]`)."""
        if data == "[DONE]":
            self.done = True
            return False
        payload = json.loads(data)
        if name == "error" or (isinstance(payload, dict) and payload.get("error") is not None):
            self.record.error = "stream error: " + _error_message(payload, data[:200])
            return False
        text = False
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") or {}
            content = delta.get("content")
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if content:
                self.record.content += content
                text = True
            if reasoning:
                self.record.reasoning += reasoning
                text = True
        if text:
            if self.last_token_at is None:
                self.record.ttft = now - self.sent_at
            else:
                self.record.itl.append(now - self.last_token_at)
            self.last_token_at = now
            self.chunks += 1
        usage = payload.get("usage")
        if usage:
            self.usage_seen = True
            self.record.output_tokens = int(usage.get("completion_tokens") or 0)
            self.record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                self.record.cached_tokens = int(details["cached_tokens"])
        return True

    def finish(self) -> None:
        record = self.record
        if record.error is not None:
            return
        if not self.done:
            record.error = "the stream ended before data: [DONE]"
        elif self.last_token_at is None:
            record.error = "the stream carried no text"
        else:
            record.success = True
            record.e2el = self.last_token_at - self.sent_at
            if not self.usage_seen or record.output_tokens <= 0:
                record.output_tokens = self.chunks


async def stream_chat(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    record: RequestRecord,
    clock: Callable[[], float],
    origin: float,
) -> None:
    """POST one streaming request (`body`: JSON bytes) and fill `record` in (errors become
    `record.error`, never raised)."""
    sent_at = clock()
    record.start = sent_at - origin
    state = _Stream(record, sent_at)
    try:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            if response.status_code != 200:
                raw = await response.aread()
                try:
                    payload: Any = json.loads(raw)
                except ValueError:
                    payload = None
                message = _error_message(payload, raw[:200].decode("utf-8", "replace").strip() or response.reason_phrase)
                record.error = f"HTTP {response.status_code}: {message}"
                return
            name, data_lines = "message", []
            async for line in response.aiter_lines():
                if line:
                    if line.startswith(":"):
                        continue  # a comment (keep-alive ping)
                    key, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if key == "data":
                        data_lines.append(value)
                    elif key == "event":
                        name = value
                    continue
                if data_lines and not state.event(name, "\n".join(data_lines), clock()):
                    break
                name, data_lines = "message", []
            else:
                if data_lines:  # the last event was not followed by a blank line
                    state.event(name, "\n".join(data_lines), clock())
    except Exception as exc:  # one failed request must not end the run
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    finally:
        record.end = clock() - origin
        state.finish()


# --- statistics --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LatencyStats:
    """Summary of one latency metric, in milliseconds (None where there were no samples)."""

    count: int = 0
    mean: float | None = None
    median: float | None = None
    std: float | None = None
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        if not seconds:
            return cls()
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return cls(len(ms), float(ms.mean()), float(np.median(ms)), float(ms.std()), p90, p99)


@dataclass(slots=True)
class TurnStats:
    """TTFT (and mean E2E latency) of the requests of one turn of the conversations."""

    turn: int
    completed: int
    failed: int
    ttft: LatencyStats
    e2el: LatencyStats
    total_cached_tokens: int


@dataclass(slots=True)
class BenchResult:
    """Everything one run measured; `to_dict()` is the JSON file, `format_table()` the printed table."""

    config: BenchConfig
    model: str
    date: str
    duration: float
    records: list[RequestRecord]
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    total_cached_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    max_concurrent_requests: int
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    turns: list[TurnStats]
    errors: list[str]
    warmup_failed: int = 0

    @property
    def second_turn_ttft_ratio(self) -> float | None:
        """Median TTFT of turn 2 over median TTFT of turn 1 (None without two measured turns)."""
        if len(self.turns) < 2:
            return None
        first, second = self.turns[0].ttft.median, self.turns[1].ttft.median
        if first is None or second is None or first == 0:
            return None
        return second / first

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "date": self.date,
            "base_url": self.config.base_url,
            "endpoint": self.config.endpoint,
            "model": self.model,
            "config": self.config.to_dict(),
            "duration_s": self.duration,
            "num_requests": len(self.records),
            "completed": self.completed,
            "failed": self.failed,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "total_cached_tokens": self.total_cached_tokens,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "max_concurrent_requests": self.max_concurrent_requests,
        }
        for name in _LATENCY_METRICS:
            stats: LatencyStats = getattr(self, name)
            for kind in ("mean", "median", "std", "p90", "p99"):
                out[f"{kind}_{name}_ms"] = getattr(stats, kind)
        out["turns"] = [
            {
                "turn": t.turn,
                "completed": t.completed,
                "failed": t.failed,
                "mean_ttft_ms": t.ttft.mean,
                "median_ttft_ms": t.ttft.median,
                "p90_ttft_ms": t.ttft.p90,
                "p99_ttft_ms": t.ttft.p99,
                "mean_e2el_ms": t.e2el.mean,
                "total_cached_tokens": t.total_cached_tokens,
            }
            for t in self.turns
        ]
        out["second_turn_ttft_ratio"] = self.second_turn_ttft_ratio
        out["warmup_failed"] = self.warmup_failed
        out["errors"] = list(self.errors)
        out["requests"] = [r.to_dict() for r in self.records]
        return out

    def format_table(self) -> str:
        """The result as a text table in the layout of `vllm bench serve`."""
        lines: list[str] = []

        def title(text: str, fill: str = "-") -> None:
            lines.append(f"{text:{fill}^50}")

        def row(label: str, value: Any, fmt: str = "") -> None:
            shown = "n/a" if value is None else format(value, fmt)
            lines.append(f"{label:<40} {shown:<10}")

        cfg = self.config
        title(" Serving Benchmark Result ", "=")
        row("Successful requests:", self.completed)
        row("Failed requests:", self.failed)
        if cfg.max_concurrency is not None:
            row("Maximum request concurrency:", cfg.max_concurrency)
        if not math.isinf(cfg.request_rate):
            row("Request rate configured (RPS):", cfg.request_rate, ".2f")
        row("Benchmark duration (s):", self.duration, ".2f")
        row("Total input tokens:", self.total_input_tokens)
        row("Total generated tokens:", self.total_output_tokens)
        if self.total_cached_tokens:
            row("Total cached prompt tokens:", self.total_cached_tokens)
        row("Request throughput (req/s):", self.request_throughput, ".2f")
        row("Output token throughput (tok/s):", self.output_throughput, ".2f")
        row("Total token throughput (tok/s):", self.total_token_throughput, ".2f")
        row("Peak concurrent requests:", self.max_concurrent_requests)
        sections = (
            ("ttft", "Time to First Token", "TTFT"),
            ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
            ("itl", "Inter-token Latency", "ITL"),
            ("e2el", "End-to-end Latency", "E2EL"),
        )
        for name, heading, short in sections:
            stats: LatencyStats = getattr(self, name)
            title(heading)
            row(f"Mean {short} (ms):", stats.mean, ".2f")
            row(f"Median {short} (ms):", stats.median, ".2f")
            row(f"P90 {short} (ms):", stats.p90, ".2f")
            row(f"P99 {short} (ms):", stats.p99, ".2f")
        if len(self.turns) > 1:
            title("TTFT by conversation turn")
            for t in self.turns:
                row(f"Turn {t.turn} requests (ok/failed):", f"{t.completed}/{t.failed}")
                row(f"Turn {t.turn} mean TTFT (ms):", t.ttft.mean, ".2f")
                row(f"Turn {t.turn} median TTFT (ms):", t.ttft.median, ".2f")
                row(f"Turn {t.turn} P99 TTFT (ms):", t.ttft.p99, ".2f")
                if t.total_cached_tokens:
                    row(f"Turn {t.turn} cached prompt tokens:", t.total_cached_tokens)
            ratio = self.second_turn_ttft_ratio
            row("Turn 2 / turn 1 median TTFT:", None if ratio is None else f"{ratio:.1%}")
        if self.errors:
            title("Errors (first few)")
            lines.extend(f"  {e}" for e in self.errors)
        lines.append("=" * 50)
        return "\n".join(lines)


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """The most requests in flight at once, over half-open intervals [start, end)."""
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records])
    peak = current = 0
    for _, delta in events:  # at equal times -1 sorts first: an end frees its slot before a start
        current += delta
        peak = max(peak, current)
    return peak


def summarize(
    config: BenchConfig, model: str, records: list[RequestRecord], duration: float, warmup_failed: int = 0
) -> BenchResult:
    """Turn the request records of one run into a `BenchResult`."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [
        (r.e2el - r.ttft) / (r.output_tokens - 1)
        for r in ok
        if r.output_tokens > 1 and r.e2el is not None and r.ttft is not None
    ]
    turns = []
    if config.turns > 1:
        for turn in range(1, config.turns + 1):
            mine = [r for r in records if r.turn == turn]
            good = [r for r in mine if r.success]
            turns.append(
                TurnStats(
                    turn=turn,
                    completed=len(good),
                    failed=len(mine) - len(good),
                    ttft=LatencyStats.of([r.ttft for r in good if r.ttft is not None]),
                    e2el=LatencyStats.of([r.e2el for r in good if r.e2el is not None]),
                    total_cached_tokens=sum(r.cached_tokens or 0 for r in good),
                )
            )
    per_second = 1.0 / duration if duration > 0 else 0.0
    return BenchResult(
        config=config,
        model=model,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        duration=duration,
        records=records,
        completed=len(ok),
        failed=len(failed),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        total_cached_tokens=sum(r.cached_tokens or 0 for r in ok),
        request_throughput=len(ok) * per_second,
        output_throughput=total_out * per_second,
        total_token_throughput=(total_in + total_out) * per_second,
        max_concurrent_requests=peak_concurrency(records),
        ttft=LatencyStats.of([r.ttft for r in ok if r.ttft is not None]),
        tpot=LatencyStats.of(tpots),
        itl=LatencyStats.of([gap for r in ok for gap in r.itl]),
        e2el=LatencyStats.of([r.e2el for r in ok if r.e2el is not None]),
        turns=turns,
        errors=[f"conversation {r.conversation} turn {r.turn}: {r.error}" for r in failed[:MAX_KEPT_ERRORS]],
        warmup_failed=warmup_failed,
    )


# --- the run ---------------------------------------------------------------------------------------------


def _server_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def _headers(config: BenchConfig) -> dict[str, str]:
    headers = {"Accept": "text/event-stream"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    return headers


async def first_model(client: httpx.AsyncClient, config: BenchConfig) -> str:
    """The id of the first model of `GET /v1/models` (ConfigError when the server cannot say)."""
    url = _server_root(config.base_url) + "/v1/models"
    headers = {k: v for k, v in _headers(config).items() if k != "Accept"}
    try:
        response = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach {url}: {type(exc).__name__}: {exc}", param="base_url") from exc
    if response.status_code != 200:
        raise ConfigError(f"GET {url} answered HTTP {response.status_code}: {response.text[:200]}", param="base_url")
    data = response.json().get("data") or []
    if not data or not data[0].get("id"):
        raise ConfigError(f"GET {url} lists no models; pass --model", param="model")
    return str(data[0]["id"])


def _answer_text(record: RequestRecord) -> str:
    # The assistant turn of the history: the answer, else its reasoning, else a stand-in (empty
    # assistant messages are refused by some servers).
    return record.content or record.reasoning or "."


async def _run_conversation(
    client: httpx.AsyncClient,
    config: BenchConfig,
    model: str,
    conversation: Conversation,
    scheduled: float,
    clock: Callable[[], float],
    origin: float,
    turns: int,
    on_done: Callable[[], None] | None,
) -> list[RequestRecord]:
    url = _server_root(config.base_url) + config.endpoint
    headers = _headers(config)
    headers["Content-Type"] = "application/json"
    messages: list[bytes] = [conversation.user_message]
    records: list[RequestRecord] = []
    for turn in range(1, turns + 1):
        record = RequestRecord(conversation.index, turn, scheduled=scheduled)
        headers["X-Request-Id"] = f"bench-{config.seed}-{conversation.index}-{turn}"
        body = encode_body(config, model, messages)
        try:
            await asyncio.wait_for(stream_chat(client, url, body, headers, record, clock, origin), config.timeout)
        except asyncio.TimeoutError:
            record.success = False
            record.end = clock() - origin
            record.error = f"timed out after {config.timeout:g} s"
        records.append(record)
        if on_done is not None:
            on_done()
        if not record.success:  # a later turn needs this turn's answer: count the rest as done
            for _ in range(turns - turn):
                if on_done is not None:
                    on_done()
            break
        if turn < turns:
            messages = [
                *messages,
                json.dumps({"role": "assistant", "content": _answer_text(record)}).encode(),
                json.dumps({"role": "user", "content": conversation.follow_ups[turn - 1]}).encode(),
            ]
    return records


async def _run_all(
    client: httpx.AsyncClient,
    config: BenchConfig,
    model: str,
    conversations: list[Conversation],
    schedule: list[float],
    turns: int,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[Any]],
    on_done: Callable[[], None] | None,
) -> tuple[list[RequestRecord], float]:
    semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    origin = clock()

    async def one(conversation: Conversation, scheduled: float) -> list[RequestRecord]:
        if semaphore is None:
            return await _run_conversation(
                client, config, model, conversation, scheduled, clock, origin, turns, on_done
            )
        async with semaphore:
            return await _run_conversation(
                client, config, model, conversation, scheduled, clock, origin, turns, on_done
            )

    tasks: list[asyncio.Task[list[RequestRecord]]] = []
    for conversation, offset in zip(conversations, schedule, strict=True):
        wait = origin + offset - clock()
        if wait > 0:
            await sleep(wait)
        tasks.append(asyncio.create_task(one(conversation, offset)))
    done = await asyncio.gather(*tasks)
    duration = clock() - origin
    records = sorted((r for rs in done for r in rs), key=lambda r: (r.conversation, r.turn))
    return records, duration


async def run_benchmark(
    config: BenchConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], Awaitable[Any]] | None = None,
) -> BenchResult:
    """Run one benchmark against `config.base_url` and return what it measured.

    `transport`, `clock` and `sleep` are for tests (an `httpx.MockTransport`, a fake clock); by
    default requests go over the network and time is `time.perf_counter`. Writes
    `config.result_json` when set.
    """
    config.validate()
    clock = clock or time.perf_counter
    sleep = sleep or asyncio.sleep
    limit = config.max_concurrency
    client = httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(config.timeout, pool=None),
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit, keepalive_expiry=60),
        trust_env=False,
    )
    async with client:
        model = config.model or await first_model(client, config)
        if config.num_images and config.image_size is not None:
            count = config.num_images * (1 if config.same_image else config.num_prompts + config.warmup)
            log.info("building %d synthetic %s image(s) of %dx%d", count, config.image_format, *config.image_size)
        conversations = build_conversations(config, 0, config.num_prompts)
        warmup_failed = 0
        if config.warmup:
            warm = build_conversations(config, config.num_prompts, config.warmup)
            log.info("warming up with %d request(s)", config.warmup)
            warm_records, _ = await _run_all(
                client, config, model, warm, [0.0] * len(warm), 1, clock, sleep, None
            )
            warmup_failed = sum(not r.success for r in warm_records)
            if warmup_failed:
                first_error = next(r.error for r in warm_records if not r.success)
                log.warning("%d of %d warm-up requests failed; first: %s", warmup_failed, len(warm_records), first_error)
        schedule = arrival_schedule(config.num_prompts, config.request_rate, config.seed)
        log.info(
            "model %s; %d conversation(s) x %d turn(s); request rate %s; max concurrency %s",
            model, config.num_prompts, config.turns, config.request_rate, config.max_concurrency or "unbounded",
        )
        bar = tqdm(total=config.num_prompts * config.turns, disable=config.disable_tqdm, unit="req", file=sys.stderr)
        try:
            records, duration = await _run_all(
                client, config, model, conversations, schedule, config.turns, clock, sleep, lambda: bar.update(1)
            )
        finally:
            bar.close()
    result = summarize(config, model, records, duration, warmup_failed)
    if config.result_json:
        write_result_json(result, config.result_json)
    return result


def _json_float(value: float | None) -> float | str | None:
    if value is None:
        return None
    return "inf" if math.isinf(value) else value


def write_result_json(result: BenchResult, path: str | Path) -> None:
    """Write `result.to_dict()` as indented JSON (parent folders are created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")


# --- command line -------------------------------------------------------------------------------------------


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _rates(text: str) -> list[float]:
    rates = [_float(part) for part in text.split(",") if part.strip()]
    if not rates:
        raise argparse.ArgumentTypeError(f"no rate in {text!r}")
    return rates


def _image_size(text: str) -> tuple[int, int]:
    try:
        return parse_image_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `glmv bench serve` (one per `BenchConfig` field)."""
    d = BenchConfig()
    p = parser.add_argument
    p("--base-url", default=d.base_url, help=f"server root (default: {d.base_url})")
    p("--endpoint", default=d.endpoint, help=f"chat completions path (default: {d.endpoint})")
    p("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    p("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (default: $OPENAI_API_KEY)")
    p("--num-prompts", type=int, default=d.num_prompts, metavar="N", help="conversations to send (default: %(default)s)")
    p("--max-concurrency", type=int, default=None, metavar="N", help="most requests in flight (default: no bound)")
    p("--request-rate", type=_rates, default=[d.request_rate], metavar="RPS[,RPS...]",
      help="conversations started per second, Poisson arrivals; inf sends all at once (default: inf). "
           "Several rates (4,8,12) run one after another, each with --num-prompts conversations, and a "
           "table per rate closes the output")
    p("--input-tokens", type=int, default=d.input_tokens, metavar="N",
      help="approximate length of the synthetic prompt text in tokens (default: %(default)s)")
    p("--output-tokens", type=int, default=d.output_tokens, metavar="N",
      help="tokens per answer: max_tokens = min_tokens with ignore_eos (default: %(default)s)")
    p("--no-ignore-eos", dest="ignore_eos", action="store_false",
      help="send neither ignore_eos nor min_tokens (for servers that refuse them)")
    p("--image-size", type=_image_size, default=None, metavar="WxH",
      help="attach seeded synthetic images of this size (default: text only)")
    p("--image-format", choices=("png", "jpeg"), default=d.image_format, help="encoding of the images (default: png)")
    p("--images-per-request", type=int, default=d.images_per_request, metavar="N", help="images per request (default: 1)")
    p("--same-image", action="store_true", help="every request gets the same image(s)")
    p("--turns", type=int, default=d.turns, metavar="N",
      help="requests per conversation; turn 2+ repeats the history with the same images (default: 1)")
    p("--seed", type=int, default=d.seed, help="seed of prompts, images and arrivals (default: 0)")
    p("--warmup", type=int, default=d.warmup, metavar="N", help="unmeasured requests sent first (default: 0)")
    p("--timeout", type=float, default=d.timeout, metavar="S", help="seconds per request (default: %(default)s)")
    p("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    p("--extra-body", type=json.loads, default=None, metavar="JSON", help="JSON object merged into every request body")
    p("--result-json", default=None, metavar="FILE", help="write every metric and the options used to FILE")
    p("--disable-tqdm", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A `BenchConfig` from parsed `glmv bench serve` flags (the first rate of a sweep)."""
    names = {f.name for f in dataclasses.fields(BenchConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if isinstance(values.get("request_rate"), list):
        values["request_rate"] = values["request_rate"][0]
    return BenchConfig(**values)


def sweep_configs(config: BenchConfig, rates: Sequence[float]) -> list[BenchConfig]:
    """One config per rate of a sweep, the same otherwise."""
    return [dataclasses.replace(config, request_rate=rate) for rate in rates]


async def run_sweep(configs: Sequence[BenchConfig]) -> list[BenchResult]:
    """The runs of a sweep, one after another (each waits for the last one's requests to end)."""
    return [await run_benchmark(config) for config in configs]


def format_sweep(results: Sequence[BenchResult]) -> str:
    """One row per rate: what was offered, what was served, and TTFT / TPOT percentiles (ms)."""

    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0f}"

    head = (
        f"{'offered req/s':>13} {'served req/s':>12} {'ok/failed':>9} {'out tok/s':>9} "
        f"{'TTFT p50':>8} {'TTFT p99':>8} {'TPOT p50':>8} {'TPOT p99':>8}"
    )
    lines = [f"{' Request-rate sweep ':=^{len(head)}}", head]
    for r in results:
        rate = r.config.request_rate
        lines.append(
            f"{'inf' if math.isinf(rate) else f'{rate:g}':>13} {r.request_throughput:>12.2f} "
            f"{f'{r.completed}/{r.failed}':>9} {r.output_throughput:>9.1f} {ms(r.ttft.median):>8} "
            f"{ms(r.ttft.p99):>8} {ms(r.tpot.median):>8} {ms(r.tpot.p99):>8}"
        )
    lines.append("=" * len(head))
    return "\n".join(lines)


def run_bench_serve(args: argparse.Namespace) -> int:
    """`glmv bench serve`: run, print the table, write the JSON; exit status 1 when no request succeeded."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    rates = args.request_rate if isinstance(args.request_rate, list) else [args.request_rate]
    try:
        configs = sweep_configs(config_from_args(args), rates)
        for config in configs:
            config.validate()
        if len(configs) > 1:
            # one JSON file for the sweep (below), not one per rate overwriting the last
            configs = [dataclasses.replace(c, result_json=None) for c in configs]
        results = asyncio.run(run_sweep(configs))
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    for result in results:
        print(result.format_table())
    path = args.result_json
    if len(results) > 1:
        print(format_sweep(results))
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps({"sweep": [r.to_dict() for r in results]}, indent=1) + "\n")
    if path:
        print(f"wrote {path}", file=sys.stderr)
    return 0 if all(r.completed for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m glmv.bench_serve ...` (the same as `glmv bench serve ...`)."""
    parser = argparse.ArgumentParser(prog="glmv bench serve", description=__doc__.splitlines()[0])
    add_bench_serve_arguments(parser)
    return run_bench_serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
