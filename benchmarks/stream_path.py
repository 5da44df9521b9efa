"""The API process's own cost per streamed token: the app alone, over raw ASGI, with a fake engine.

    PYTHONPATH=. python benchmarks/stream_path.py --requests 64 --tokens 256 --passes 5

No model runs: an engine client that answers every request with `--tokens` one-token outputs
(yielding to the loop after each, so the streams interleave as they do when a core step feeds
them all) stands behind `create_app` (guard on, access log on, metrics), and N streaming
requests are driven through the app's ASGI interface with a `send` that only collects the
messages. The process's CPU time for the wave, divided by the tokens streamed, is what the app
spends per token (the route, the service, the SSE events, the middleware, metrics); a real
server adds uvicorn's socket writes and the engine client's hand-off on top. Prints the median
of `--passes` waves and the body sends per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class FakeEngine:
    """An `EngineClient` whose every request streams `tokens` outputs of one token each."""

    def __init__(self, model_dir: Path, tokens: int) -> None:
        from glmv.engine.client import EngineInfo

        self.info = EngineInfo(
            model_dir=str(model_dir), model_type="glm4v", device="cpu", max_model_len=4096,
            vocab_size=1 << 20, image_token_id=0, eos_token_ids=(), num_blocks=4096, block_size=16,
        )  # fmt: skip
        self.tokens = tokens
        self.max_pending = 10_000
        self.dead: BaseException | None = None

    running = True
    num_pending = 0

    def start(self) -> None:
        pass

    def shutdown(self, timeout: float = 5.0) -> None:
        pass

    def check_admission(self) -> None:
        pass

    def validate(self, request: Any) -> None:
        pass

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> Any:
        from glmv.engine.client import EngineStats

        return EngineStats(0, 0, 0.0, 4096, 0, 0, 0, 0, 0)

    def core_stats(self) -> list[Any]:
        return [self.stats()]

    async def generate(self, request: Any) -> AsyncIterator[Any]:
        from glmv.engine.request import CompletionDelta, RequestOutput

        for i in range(self.tokens):
            last = i == self.tokens - 1
            yield RequestOutput(
                request_id=request.request_id,
                deltas=[CompletionDelta(0, " word", [7], None, "length" if last else None)],
                prompt_tokens=len(request.prompt_token_ids),
                cached_tokens=0,
                completion_tokens=i + 1,
                finished=last,
                arrival_time=request.arrival_time,
                first_scheduled_time=request.arrival_time,
            )
            await asyncio.sleep(0)  # the next "step": every other stream gets its token first


def scope() -> dict[str, Any]:
    path = "/v1/chat/completions"
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 40000), "server": ("testserver", 80),
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
    }  # fmt: skip


async def one(app: Any, tokens: int) -> tuple[int, int]:
    """(body sends, body bytes) of one streamed request."""
    body = json.dumps({
        "messages": [{"role": "user", "content": "Count the words."}], "stream": True,
        "max_tokens": tokens, "stream_options": {"include_usage": True},
    }).encode()  # fmt: skip
    requested = False
    done = asyncio.Event()
    sends = 0
    size = 0

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal sends, size
        if message["type"] == "http.response.body":
            sends += 1
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    await app(scope(), receive, send)
    return sends, size


async def wave(app: Any, requests: int, tokens: int) -> tuple[float, float, list[tuple[int, int]]]:
    cpu, wall = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(one(app, tokens) for _ in range(requests)))
    return time.process_time() - cpu, time.perf_counter() - wall, list(results)


async def main_async(args: argparse.Namespace, model_dir: Path) -> None:
    from glmv.server.app import create_app
    from glmv.server.guard import GuardSettings
    from glmv.server.settings import Settings

    settings = Settings(model=str(model_dir), image_workers=0)
    settings.guard = GuardSettings()  # access log on, as `glmv serve` runs by default
    settings.validate()
    app = create_app(settings, FakeEngine(model_dir, args.tokens))
    await wave(app, 4, args.tokens)  # warm-up
    cpus, walls = [], []
    results: list[tuple[int, int]] = []
    for _ in range(args.passes):
        cpu, wall, results = await wave(app, args.requests, args.tokens)
        cpus.append(cpu)
        walls.append(wall)
    tokens = args.requests * args.tokens
    cpu = statistics.median(cpus)
    print(f"{args.requests} streams x {args.tokens} tokens, median of {args.passes} waves")
    print(
        f"CPU per wave {cpu:.3f} s (all: {', '.join(f'{c:.2f}' for c in cpus)}), wall {statistics.median(walls):.3f} s"
    )
    print(f"CPU per streamed token {cpu / tokens * 1e6:.1f} us")
    print(f"body sends per request {statistics.median(s for s, _ in results):.0f}, bytes {results[0][1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random one, for its tokenizer)")
    args = ap.parse_args()
    logging.getLogger("glmv.access").setLevel(logging.INFO)  # formatted, as a server does
    logging.getLogger("glmv.access").addHandler(logging.NullHandler())
    logging.getLogger("glmv.access").propagate = False
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            from glmv.models.tiny import create_tiny_model

            model_dir = create_tiny_model(Path(tmp) / "tiny", variant="glm41v")
        asyncio.run(main_async(args, model_dir))


if __name__ == "__main__":
    main()
