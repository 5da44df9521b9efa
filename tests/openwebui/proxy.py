"""A recording reverse proxy between Open WebUI and glmv.

Every request Open WebUI sends to the OpenAI-compatible API is written, as received, to a JSON
Lines file (method, path, query, JSON body, then the status and, for streams, the raw SSE text
that came back), and forwarded unchanged to glmv; responses stream back as glmv sends them.

    python -m tests.openwebui.proxy --upstream http://127.0.0.1:8000 --port 8001 --log requests.jsonl
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding"}


class Recorder:
    """Appends one JSON object per exchange to `path` (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def make_app(upstream: str, recorder: Recorder) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(600.0, connect=10.0))

    async def forward(request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        record: dict[str, Any] = {
            "time": time.time(),
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "body": body,
        }
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        upstream_request = client.build_request(
            request.method, request.url.path, params=request.url.query, content=raw, headers=headers
        )
        response = await client.send(upstream_request, stream=True)
        record["status"] = response.status_code
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS}

        async def relay() -> AsyncIterator[bytes]:
            chunks: list[bytes] = []
            try:
                async for chunk in response.aiter_raw():
                    chunks.append(chunk)
                    yield chunk
                record["completed"] = True
            finally:
                await response.aclose()
                record.setdefault("completed", False)
                record["response"] = b"".join(chunks).decode("utf-8", "replace")
                recorder.write(record)

        return StreamingResponse(relay(), status_code=response.status_code, headers=out_headers)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    app = make_app(args.upstream, Recorder(args.log))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
