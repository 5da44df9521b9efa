"""`glmv.timeline`: off unless `GLMV_TIMELINE` names a file; with it, a request served over HTTP
leaves one record whose stages come in the order the request passed them, and its token counts.
No timing is asserted: only the order of the marks and what was counted."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from glmv import timeline as timeline_module
from glmv.timeline import ENV, Timeline, timeline

from .conftest import parse_sse


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_off_unless_the_variable_is_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert timeline() is None
    monkeypatch.setenv(ENV, str(tmp_path / "a.jsonl"))
    first = timeline()
    assert first is not None and first.path == str(tmp_path / "a.jsonl")
    assert timeline() is first  # read once per value
    monkeypatch.setenv(ENV, str(tmp_path / "b.jsonl"))
    second = timeline()
    assert second is not None and second is not first
    monkeypatch.delenv(ENV)
    assert timeline() is None


def test_marks_sets_counts_and_one_line_per_request(tmp_path: Path) -> None:
    trace = Timeline(str(tmp_path / "t.jsonl"))
    trace.mark("r1", "sent", 1.0)
    trace.mark("r1", "sent", 2.0)  # the first mark of a stage stays
    trace.set("r1", "last", 3.0)
    trace.set("r1", "last", 4.0)  # the latest value stays
    trace.add("r1", "chunks")
    trace.add("r1", "chunks", 2)
    trace.mark("r2", "sent", 5.0)
    trace.finish("r1", done=6.0)
    trace.finish("r1", done=7.0)  # already written: nothing more
    trace.write({"kind": "step", "n": 1})
    assert records(tmp_path / "t.jsonl") == [
        {"kind": "request", "id": "r1", "sent": 1.0, "last": 4.0, "chunks": 3, "done": 6.0},
        {"kind": "step", "n": 1},
    ]


def test_open_records_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timeline_module, "_MAX_OPEN", 3)
    trace = Timeline(str(tmp_path / "t.jsonl"))
    for i in range(5):
        trace.mark(f"r{i}", "sent", float(i))
    assert list(trace._open) == ["r2", "r3", "r4"]


async def test_a_streamed_request_leaves_its_stages_in_order(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    make_app: Callable[..., Any],
    make_client: Callable[[Any], httpx.AsyncClient],
    image_url: Callable[..., str],
    engine_mode: str,
) -> None:
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(ENV, str(path))
    body = {
        "model": "tiny", "stream": True, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url(64, 48)}}, {"type": "text", "text": "What?"}]}],
    }  # fmt: skip
    app = make_app()
    async with make_client(app) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        resp = await client.post("/v1/chat/completions", json={**body, "model": model})
    assert resp.status_code == 200
    events, done = parse_sse(resp.text)
    assert done
    rid = events[0]["id"]
    (rec,) = [r for r in records(path) if r.get("kind") == "request" and r["id"] == rid]
    order = ["headers", "body", "screened", "handler", "checked", "images", "prompt"]
    if engine_mode == "process":  # the engine client's marks, and the core's
        order += ["submit", "scheduled", "core_first_token", "io_first_token"]
    order += ["first_token", "last_token", "done"]
    assert all(stage in rec for stage in order), sorted(rec)
    times = [rec[stage] for stage in order]
    assert times == sorted(times)
    if engine_mode == "process":
        # "sent" is stamped when the send call returns, which may be after the core, in its own
        # process, has already scheduled the request: it only follows "submit".
        assert rec["submit"] <= rec["sent"] <= rec["done"]
    assert rec["completion_tokens"] == 5
    assert rec["outcome"] == "length"
    assert 1 <= rec["chunks"] <= 5
    if engine_mode == "process":
        assert rec["io_outputs"] >= rec["chunks"]
