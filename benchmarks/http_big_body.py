"""A huge text prompt against `glmv serve` (issue 19, item 1), on loopback.

Posts one chat request whose user message is N MB of plain text (under the 32 MB body cap) and
measures: the status and latency of its answer, the server's RSS before, at peak (VmHWM) and
after, and the latency of small chat requests (`max_tokens: 1`) sent every 20 ms while the big
one is in flight, against the same small requests on an idle server. Bounded: each big request
has a 300 s client timeout.

    .venv/bin/python benchmarks/http_big_body.py [--sizes-mb 4 24 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.http_common import peak_rss_mb, percentile, reset_peak_rss, rss_mb, serve

SMALL = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def small_latencies(url: str, stop: threading.Event, out: list[float]) -> None:
    """Small requests one after another, every 20 ms, until `stop` (its own thread and client, so
    the big upload never delays them on the client side)."""
    with httpx.Client(timeout=300) as client:
        while not stop.is_set():
            start = time.perf_counter()
            r = client.post(url, json=SMALL)
            assert r.status_code == 200, r.text
            out.append(time.perf_counter() - start)
            time.sleep(0.02)


def one_size(base: str, pid: int, size_mb: int) -> dict[str, float | int | str]:
    url = base + "/v1/chat/completions"
    text = ("hello world " * (size_mb * 1024 * 1024 // 12 + 1))[: size_mb * 1024 * 1024]
    body = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
    with httpx.Client(timeout=300) as client:
        baseline: list[float] = []
        for _ in range(10):
            start = time.perf_counter()
            client.post(url, json=SMALL)
            baseline.append(time.perf_counter() - start)
        rss_before = rss_mb(pid)
        reset_peak_rss(pid)
        stop = threading.Event()
        during: list[float] = []
        prober = threading.Thread(target=small_latencies, args=(url, stop, during))
        prober.start()
        start = time.perf_counter()
        r = client.post(url, content=body, headers={"content-type": "application/json"})
        latency = time.perf_counter() - start
        stop.set()
        prober.join()
        time.sleep(1.0)  # let the server hand freed memory back before reading RSS
        error = (
            r.json().get("error", {})
            if r.headers.get("content-type", "").startswith("application/json")
            else {}
        )
    base_p50 = statistics.median(baseline)
    return {
        "size_mb": size_mb,
        "status": r.status_code,
        "code": str(error.get("code")),
        "latency_s": round(latency, 3),
        "rss_before_mb": round(rss_before, 1),
        "rss_peak_growth_mb": round(peak_rss_mb(pid) - rss_before, 1),
        "rss_after_growth_mb": round(rss_mb(pid) - rss_before, 1),
        "small_idle_p50_ms": round(base_p50 * 1000, 1),
        "small_during_n": len(during),
        "small_during_max_ms": round(max(during) * 1000, 1) if during else float("nan"),
        "small_delay_max_ms": round((max(during) - base_p50) * 1000, 1) if during else float("nan"),
        "small_during_p99_ms": round(percentile(during, 99) * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[4, 24, 30])
    args = parser.parse_args()
    with serve() as server:
        rows = [one_size(server.base_url, server.process.pid, mb) for mb in args.sizes_mb]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
