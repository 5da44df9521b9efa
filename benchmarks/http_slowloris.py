"""Slow clients against `glmv serve` (issue 19, item 4), on loopback.

Holds `--connections` stalled connections open for `--seconds` (a third send nothing, a third
send half a header and then one more header line every 2 s, a third send headers and part of a
POST body), opening a new one whenever the server closes one, while a normal client sends small
chat requests (`max_tokens: 1`) and `GET /health` one after another. Reports the p50/p99/max
latency of the normal requests and, per kind of stalled connection, how many the server closed,
after how long, and how many were still open at the end past the timeout meant for them.
The server runs with its default limits unless flags are passed after `--`.

    .venv/bin/python benchmarks/http_slowloris.py [--connections 1000] [--seconds 60] [-- --header-timeout 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.http_common import percentile, serve

KINDS = ("idle", "half_header", "stalled_body")
SMALL = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@dataclass
class Tally:
    opened: int = 0
    refused: int = 0  # could not connect at all
    closed_ages: list[float] = field(default_factory=list)
    open_ages: list[float] = field(default_factory=list)


async def stalled(host: str, port: int, kind: str, end: float, tally: Tally) -> None:
    """One slot: keep a stalled connection of `kind` open until `end`, reopening when closed."""
    while time.monotonic() < end:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, TimeoutError):
            tally.refused += 1
            await asyncio.sleep(0.5)
            continue
        tally.opened += 1
        born = time.monotonic()
        try:
            if kind == "half_header":
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            elif kind == "stalled_body":
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 100000\r\n\r\n{"messages": ['
                )
            await writer.drain()
            while time.monotonic() < end:
                try:
                    data = await asyncio.wait_for(
                        reader.read(65536), min(2.0, max(0.01, end - time.monotonic()))
                    )
                except TimeoutError:
                    if kind == "half_header":
                        writer.write(b"X-Slow: 1\r\n")  # trickle, as slowloris does
                        await writer.drain()
                    continue
                if not data:  # closed by the server (a 408 may have come first)
                    tally.closed_ages.append(time.monotonic() - born)
                    break
            else:
                tally.open_ages.append(time.monotonic() - born)
        except (ConnectionError, OSError):
            tally.closed_ages.append(time.monotonic() - born)
        finally:
            writer.close()


async def normal(base: str, end: float, latencies: dict[str, list[float]], failures: list[str]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while time.monotonic() < end:
            for name, call in (
                ("chat", lambda: client.post(base + "/v1/chat/completions", json=SMALL)),
                ("health", lambda: client.get(base + "/health")),
            ):
                start = time.perf_counter()
                try:
                    r = await call()
                    ok = r.status_code == 200
                except httpx.HTTPError as exc:
                    ok, r = False, exc
                latencies[name].append(time.perf_counter() - start)
                if not ok:
                    failures.append(f"{name}: {r}")
            await asyncio.sleep(0.05)


async def run(host: str, port: int, base: str, connections: int, seconds: float) -> None:
    tallies = {kind: Tally() for kind in KINDS}
    latencies: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []
    # Normal requests on an idle server first, for comparison.
    await normal(base, time.monotonic() + 5, latencies, failures)
    idle = {k: list(v) for k, v in latencies.items()}
    latencies.clear()
    end = time.monotonic() + seconds
    slots = [stalled(host, port, KINDS[i % 3], end, tallies[KINDS[i % 3]]) for i in range(connections)]
    await asyncio.gather(normal(base, end, latencies, failures), *slots)
    print(f"{connections} stalled connections for {seconds:g} s; normal requests one after another\n")
    print("| requests | phase | n | p50 ms | p99 ms | max ms | failed |")
    print("|---|---|---|---|---|---|---|")
    for name in ("chat", "health"):
        for phase, values in (("idle server", idle.get(name, [])), ("under slowloris", latencies[name])):
            failed = sum(1 for f in failures if f.startswith(name)) if phase != "idle server" else 0
            print(
                f"| {name} | {phase} | {len(values)} | {statistics.median(values) * 1000:.1f} | "
                f"{percentile(values, 99) * 1000:.1f} | {max(values) * 1000:.1f} | {failed} |"
            )
    print(
        "\n| stalled kind | opened | refused | closed by server | close age p50 s | close age max s | open at end | oldest open s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, t in tallies.items():
        ages = t.closed_ages or [float("nan")]
        print(
            f"| {kind} | {t.opened} | {t.refused} | {len(t.closed_ages)} | {statistics.median(ages):.1f} | "
            f"{max(ages):.1f} | {len(t.open_ages)} | {max(t.open_ages, default=0.0):.1f} |"
        )
    if failures:
        print("\nfirst failures:", failures[:5])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("flags", nargs="*", help="extra `glmv serve` flags (after --)")
    args = parser.parse_args()
    with serve(*args.flags) as server:
        asyncio.run(run(server.host, server.port, server.base_url, args.connections, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
