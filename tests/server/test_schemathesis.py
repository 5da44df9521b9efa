"""Property-based API testing with schemathesis from the app's own `/openapi.json`.

Generated requests go to an in-process app on the tiny model with a short context, so that any
generated `max_tokens`/`n` finishes quickly. Three runs: schema-valid requests as generated
(most are refused with a 400/404: random model names, random image URLs), the same made
admissible by fixing only what the schema cannot express (so that the engine really runs with
extreme sampling values), and invalid requests. No request may get a 5xx, and every response must
be documented in the schema (status code, content type, body).

schemathesis' pytest fixture loader does not work with this pytest version, so the test drives
hypothesis itself with each operation's strategy.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from glmv.server.app import create_app

from .conftest import build_engine, make_settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
RUNS = {"positive": 25, "admissible": 25, "negative": 15}
CHAT = "POST /v1/chat/completions"
NO_READ_TIMEOUT = 3600.0  # seconds; schemathesis' default of 10 s is a timing dependency


def _png_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), (10, 200, 90)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


PNG = _png_url()


def make_admissible(body: Any) -> None:
    """Fix, in place, what makes a schema-valid request inadmissible for reasons outside the schema."""
    if not isinstance(body, dict):
        return
    for key in (
        "model",
        "tools",
        "functions",
        "tool_choice",
        "function_call",
        "logit_bias",
        "chat_template_kwargs",
    ):
        body.pop(key, None)
    if (body.get("response_format") or {}).get("type") != "text":
        body.pop("response_format", None)
    if not body.get("logprobs"):
        body.pop("top_logprobs", None)
    if not body.get("stream"):
        body.pop("stream_options", None)
    if isinstance(body.get("stop"), list):
        body["stop"] = [s for s in body["stop"] if s][:4]
    elif body.get("stop") == "":
        body.pop("stop")
    for key in ("max_tokens", "max_completion_tokens"):  # the test server's context is 96 tokens
        if isinstance(body.get(key), int) and body[key] > 32:
            body[key] = 32
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is not None and (body.get("min_tokens") or 0) > limit:
        body["min_tokens"] = limit
    for message in body.get("messages") or []:
        message.pop("tool_calls", None)
        if message.get("role") in ("tool", "function"):
            message["role"] = "user"
        content = message.get("content")
        if content is None and message["role"] != "assistant":
            message["content"] = "x"
        elif isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image_url":
                    if message["role"] != "user":
                        continue
                    part["image_url"] = {"url": PNG}
                elif "<|" in part.get("text", ""):
                    part["text"] = part["text"].replace("<|", "<")
                parts.append(part)
            message["content"] = parts[:3] or "x"  # a list of parts may not be empty
        elif isinstance(content, str) and "<|" in content:
            message["content"] = content.replace("<|", "<")


@pytest.fixture(scope="module")
def api_schema(server_model_dir: Any) -> Iterator[Any]:
    # No deadline anywhere: on a loaded machine a request may take long, and a 504 from glmv's
    # request timeout (or the client's read timeout) would be the load, not the API, failing.
    config = make_settings(server_model_dir, max_model_len=96, request_timeout=0.0, max_num_seqs=16)
    engine = build_engine(config)
    yield schemathesis.openapi.from_asgi("/openapi.json", create_app(config, engine))
    engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_api_never_fails_with_a_server_error(api_schema: Any, run: str) -> None:
    mode = GenerationMode.NEGATIVE if run == "negative" else GenerationMode.POSITIVE
    operations = [result.ok() for result in api_schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {CHAT, "GET /v1/models", "GET /health", "GET /ready"} <= labels
    statuses: Counter[tuple[str, int]] = Counter()
    for operation in operations:
        if run == "admissible" and operation.label != CHAT:
            continue

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=RUNS[run],
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: Any) -> None:
            if run == "admissible":
                make_admissible(case.body)
            response = case.call_and_validate(checks=CHECKS, timeout=NO_READ_TIMEOUT)
            statuses[(case.operation.label, response.status_code)] += 1

        try:
            check()
        except Unsatisfiable:
            # Some operations have no invalid inputs at all (GET /health; any string is a model id).
            assert mode is GenerationMode.NEGATIVE and operation.label != CHAT
    if run == "admissible":
        # Most admissible requests really ran on the engine.
        assert statuses[(CHAT, 200)] >= RUNS[run] // 2, statuses
    else:
        assert sum(n for (label, _), n in statuses.items() if label == CHAT) >= RUNS[run] // 2, statuses
