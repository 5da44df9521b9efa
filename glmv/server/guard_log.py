"""The access log of the HTTP server: one JSON line per request on the `glmv.access` logger.

Fields: `ts` (UTC, ISO-8601), `request_id`, `key_name` (the API key's *name*, never the key),
`client_ip`, `method`, `path`, `route` (the matched route template), `status`, `latency_ms`,
`ttft_ms`, `prompt_tokens`, `completion_tokens`, `cached_tokens` (null unless the route recorded
usage), `bytes_in`, `bytes_out`, `error` (the `code` of an error response: a guard refusal, a 4xx
or a 500; the code of the error event of a stream that failed after its 200; `aborted` when the
client left before the response ended).
With `--log-content` a `content` field carries the request body (parsed JSON), with `data:` URLs
(inline images) replaced by a short placeholder. Streaming responses are logged when the stream
ends. The record is also attached to the log record as `glmv_access` for structured handlers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

ACCESS_LOGGER_NAME = "glmv.access"
access_logger = logging.getLogger(ACCESS_LOGGER_NAME)

# Where the per-request records live in the ASGI scope's "state" (visible as request.state.*).
STATE_REQUEST_ID = "request_id"
STATE_CLIENT_IP = "client_ip"
STATE_KEY_NAME = "api_key_name"
STATE_USAGE = "glmv_usage"
STATE_ERROR = "glmv_error"

_MAX_TEXT_CONTENT = 4096
_DATA_URL_KEEP = 48


@dataclass(slots=True)
class Usage:
    """Token usage and time to first token of one request, as recorded by the route."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        if value.startswith("data:") and len(value) > _DATA_URL_KEEP:
            head = value.split(",", 1)[0]
            return f"{head},<{len(value) - len(head) - 1} chars>"
        return value
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    return value


def loggable_content(body: bytes) -> Any:
    """The request body for `--log-content`: parsed JSON with inline images elided, or short text."""
    if not body:
        return None
    try:
        return _redact(json.loads(body))
    except (ValueError, UnicodeDecodeError):
        text = body[:_MAX_TEXT_CONTENT].decode("utf-8", "replace")
        return text + ("…" if len(body) > _MAX_TEXT_CONTENT else "")


@dataclass(slots=True)
class AccessRecord:
    """What the access log knows about one request while it is served."""

    request_id: str
    method: str
    path: str
    client_ip: str | None = None
    key_name: str | None = None
    route: str | None = None
    status: int | None = None
    error: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0

    def to_json(self, *, latency_s: float, usage: Usage | None, content: Any = None, with_content: bool) -> dict[str, Any]:
        record: dict[str, Any] = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": self.request_id,
            "key_name": self.key_name,
            "client_ip": self.client_ip,
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "latency_ms": round(latency_s * 1000.0, 2),
            "ttft_ms": None,
            "prompt_tokens": None,
            "completion_tokens": None,
            "cached_tokens": None,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "error": self.error,
        }
        if usage is not None:
            record["prompt_tokens"] = usage.prompt_tokens
            record["completion_tokens"] = usage.completion_tokens
            record["cached_tokens"] = usage.cached_tokens
            if usage.ttft is not None:
                record["ttft_ms"] = round(usage.ttft * 1000.0, 2)
        if with_content:
            record["content"] = content
        return record


def write_access_line(record: dict[str, Any]) -> None:
    access_logger.info(json.dumps(record, ensure_ascii=False), extra={"glmv_access": record})
