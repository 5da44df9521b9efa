"""glmv on Ray Serve on the CPU: 1 vs 2 engine replicas, and the cost of the Ray path per request.

On the tiny checkpoint (created in a temp dir), `glmv serve` (a subprocess) and the Ray Serve
application (a local Ray instance: proxy, relaying front, engine replicas) run side by side:
  * latency: `--latency-requests` pairs of small non-streaming requests (1 output token, short
    text prompt), one to each server in turn, so that the machine's load hits both alike; the
    median of the per-pair differences is the routing overhead (proxy -> front -> handle/router ->
    replica and back), measured with 1 and with 2 replicas;
  * throughput: `--requests` requests with their own image, `--tokens` output tokens each
    (`ignore_eos`), `--concurrency` in flight, against `glmv serve`, then 1 and 2 replicas.
Prints a table.

    .venv/bin/python benchmarks/ray_cpu.py [--requests 32] [--concurrency 16] [--tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glmv.models.tiny import create_tiny_model  # noqa: E402

MODEL = "bench-tiny"
ENGINE_FLAGS = {"max_model_len": 2048, "kv_cache_gb": 0.2, "max_num_seqs": 64}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_url(i: int, side: int) -> str:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Latency:
    median_ms: float
    p90_ms: float


@dataclass
class Throughput:
    seconds: float
    requests: int
    output_tokens: int

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def req_s(self) -> float:
        return self.requests / self.seconds


async def paired_latency(
    direct: str, ray_base: str, n: int, warmup: int = 5
) -> tuple[Latency, Latency, float]:
    """Latency of `direct` and of `ray_base`, one request to each in turn; and the median difference."""
    times: dict[str, list[float]] = {direct: [], ray_base: []}
    async with httpx.AsyncClient(timeout=300) as client:
        for i in range(warmup + n):
            order = (direct, ray_base) if i % 2 == 0 else (ray_base, direct)
            for base in order:
                body = {
                    "model": MODEL,
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": f"ping {i}"}],
                }
                start = time.perf_counter()
                r = await client.post(base + "/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - start
                r.raise_for_status()
                if i >= warmup:
                    times[base].append(elapsed * 1000)
    diffs = [b - a for a, b in zip(times[direct], times[ray_base], strict=True)]

    def summary(values: list[float]) -> Latency:
        ordered = sorted(values)
        return Latency(statistics.median(ordered), ordered[int(0.9 * (len(ordered) - 1))])

    return summary(times[direct]), summary(times[ray_base]), statistics.median(diffs)


async def throughput(base: str, images: list[str], tokens: int, concurrency: int) -> Throughput:
    semaphore = asyncio.Semaphore(concurrency)
    total = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal total
        content = [{"type": "image_url", "image_url": {"url": images[i]}},
                   {"type": "text", "text": f"Describe picture {i} in detail."}]  # fmt: skip
        body = {"model": MODEL, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
                "messages": [{"role": "user", "content": content}]}  # fmt: skip
        async with semaphore:
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            total += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await one(client, 0)  # warm-up (first image through the vision tower)
        total = 0
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(1, len(images))))
        seconds = time.perf_counter() - start
    return Throughput(seconds, len(images) - 1, total)


def wait_ready(base: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(base + "/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} did not become ready")


def start_direct(ckpt: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd = [sys.executable, "-m", "glmv", "serve", "--model", str(ckpt), "--port", str(port),
           "--served-model-name", MODEL, "--no-access-log", "--log-level", "warning"]  # fmt: skip
    for key, value in ENGINE_FLAGS.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc)
    return base, proc


@dataclass
class Row:
    name: str
    latency: Latency | None
    throughput: Throughput


def run(ckpt: Path, args: argparse.Namespace, images: list[str]) -> tuple[list[Row], dict[int, float]]:
    import ray
    from ray import serve

    from glmv.ray.serve import RayServeOptions, build_application
    from glmv.server.guard import GuardSettings
    from glmv.server.settings import Settings

    direct, proc = start_direct(ckpt)
    ray.init(address="local", num_cpus=args.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ray_base = f"http://127.0.0.1:{port}"
    settings = Settings(model=str(ckpt), served_model_name=[MODEL], **ENGINE_FLAGS)  # type: ignore[arg-type]
    settings.guard = GuardSettings(access_log=False)
    rows: list[Row] = []
    overhead: dict[int, float] = {}
    try:
        for replicas in (1, 2):
            options = RayServeOptions(
                replicas=replicas, num_cpus_per_replica=1.0, ingress_num_cpus=0.0, max_ongoing_requests=64
            )
            serve.run(build_application(settings, options), name="glmv", route_prefix="/", blocking=False)
            wait_ready(ray_base)
            lat_direct, lat_ray, overhead[replicas] = asyncio.run(
                paired_latency(direct, ray_base, args.latency_requests)
            )
            if replicas == 1:
                rows.append(
                    Row(
                        "glmv serve (direct)",
                        lat_direct,
                        asyncio.run(throughput(direct, images, args.tokens, args.concurrency)),
                    )
                )
            rows.append(
                Row(
                    f"Ray Serve, {replicas} replica(s)",
                    lat_ray,
                    asyncio.run(throughput(ray_base, images, args.tokens, args.concurrency)),
                )
            )
            serve.delete("glmv")
    finally:
        serve.shutdown()
        ray.shutdown()
        proc.terminate()
        proc.wait(60)
    return rows, overhead


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="throughput requests (each its own image)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per throughput request")
    parser.add_argument("--image", type=int, default=224, help="image side in pixels")
    parser.add_argument("--latency-requests", type=int, default=100, help="request pairs for the latency")
    parser.add_argument("--ray-num-cpus", type=float, default=2)
    args = parser.parse_args()
    images = [image_url(i, args.image) for i in range(args.requests + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = create_tiny_model(Path(tmp) / "tiny", variant="glm41v", seed=0)
        rows, overhead = run(ckpt, args, images)
    print(f"\n{args.requests} requests x {args.tokens} tokens, {args.image}px images, concurrency {args.concurrency}; "
          f"latency: {args.latency_requests} request pairs (1 token), direct and Ray in turn")  # fmt: skip
    print("| setup | latency median ms | p90 ms | req/s | output tok/s |")
    print("|---|---|---|---|---|")
    for row in rows:
        lat = row.latency
        assert lat is not None
        print(
            f"| {row.name} | {lat.median_ms:.1f} | {lat.p90_ms:.1f} | {row.throughput.req_s:.2f} | {row.throughput.tok_s:.1f} |"
        )
    one, two = rows[1].throughput, rows[2].throughput
    print(
        f"2 vs 1 replicas: {two.tok_s / one.tok_s:.2f}x output tok/s; 1 replica vs direct: {one.tok_s / rows[0].throughput.tok_s:.2f}x"
    )
    for replicas, ms in overhead.items():
        print(
            f"routing overhead per request, {replicas} replica(s) (median of paired differences): {ms:+.1f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
