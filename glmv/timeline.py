"""Per-request and per-step timelines for performance work: off unless `GLMV_TIMELINE` names a file.

With `GLMV_TIMELINE=/path/trace.jsonl` in the environment, every glmv process (the API process,
its engine cores, which inherit the environment) appends JSON lines to that file:

* `{"kind": "request", "id": ..., <stage>: <time>, ...}` once per request when it ends: the
  moments it passed each stage (`time.monotonic()`, one clock for every process of the machine),
  marked by the layers it went through (HTTP body read, parsed, images decoded, prompt built,
  sent to the core, first scheduled, first/last output in the front end, done);
* `{"kind": "step", ...}` once per engine-core loop iteration: when it started waiting for
  commands, stepped and sent, and how many sequences the step held (prefill / decode);
* `{"kind": "lag", ...}` once a second: how late the API process's event loop woke a 5 ms timer,
  in total (the loop was busy for that long), how often and at worst.

`benchmarks/http_timeline.py` reads the file and prints where the time went. Each record is one
`os.write` on an `O_APPEND` descriptor, so lines of several processes never interleave. When the
variable is unset, `timeline()` is None and every call site costs one global lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any

__all__ = ["ENV", "Timeline", "timeline", "watch_loop_lag"]

ENV = "GLMV_TIMELINE"
_MAX_OPEN = 10_000  # requests whose record nobody closes (offline use) are dropped beyond this


class Timeline:
    """Stage marks of open requests, and the file their records go to."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._open: dict[str, dict[str, Any]] = {}

    def _record(self, request_id: str) -> dict[str, Any]:
        rec = self._open.get(request_id)
        if rec is None:
            if len(self._open) >= _MAX_OPEN:
                self._open.pop(next(iter(self._open)))
            rec = self._open[request_id] = {"kind": "request", "id": request_id}
        return rec

    def mark(self, request_id: str, stage: str, t: float | None = None) -> None:
        """The first time `request_id` reached `stage` (later marks of the same stage are ignored)."""
        rec = self._record(request_id)
        if stage not in rec:
            rec[stage] = time.monotonic() if t is None else t

    def set(self, request_id: str, key: str, value: Any) -> None:
        """A value that the latest call decides (e.g. the last output's time)."""
        self._record(request_id)[key] = value

    def add(self, request_id: str, key: str, amount: int = 1) -> None:
        rec = self._record(request_id)
        rec[key] = rec.get(key, 0) + amount

    def finish(self, request_id: str, **extra: Any) -> None:
        """Write the request's record (with `extra`) and forget it."""
        rec = self._open.pop(request_id, None)
        if rec is None:
            return
        rec.update(extra)
        self.write(rec)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with contextlib.suppress(OSError):  # a trace must never fail a request
            os.write(self._fd, line.encode())


_timeline: Timeline | None = None
_loaded_for: str | None = None


def timeline() -> Timeline | None:
    """This process's timeline, or None when `GLMV_TIMELINE` is unset (read once per value)."""
    global _timeline, _loaded_for
    path = os.environ.get(ENV) or None
    if path != _loaded_for:
        _loaded_for = path
        _timeline = Timeline(path) if path else None
    return _timeline


async def watch_loop_lag(trace: Timeline, interval: float = 0.005, period: float = 1.0) -> None:
    """Every `period` seconds, one `lag` record: how late an `interval`-second timer woke in
    total (the event loop was busy, or the process had no CPU, for that long), how often it
    woke more than a millisecond late, and the worst delay."""
    loop = asyncio.get_running_loop()
    total = worst = 0.0
    count = 0
    since = loop.time()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        now = loop.time()
        late = max(0.0, now - start - interval)
        total += late
        worst = max(worst, late)
        count += late > 0.001
        if now - since >= period:
            trace.write(
                {"kind": "lag", "t0": time.monotonic() - (now - since), "t1": time.monotonic(),
                 "lag": round(total, 6), "late": count, "max": round(worst, 6)}
            )  # fmt: skip
            total = worst = 0.0
            count = 0
            since = now
