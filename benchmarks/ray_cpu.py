"""glmv on Ray Serve on the CPU: 1 vs 2 engine replicas, and the cost of the Ray path per request.

On the tiny checkpoint (created in a temp dir), in one run:
  * `glmv serve` directly (a subprocess): latency of small requests, then throughput; once as it
    starts by default and once with OMP_NUM_THREADS=1 (what Ray gives a 1-CPU replica);
  * the Ray Serve application (local Ray instance, the relaying front + engine replicas) with 1
    replica: the same latency and throughput workloads; then redeployed with 2 replicas.
Latency: `--latency-requests` sequential non-streaming requests, 1 output token, short text
prompt (median and p90 after warm-ups); the difference to `glmv serve` is the routing overhead
(proxy → front → handle/router → replica and back). Throughput: `--requests` requests with their
own image, `--tokens` output tokens each (`ignore_eos`), `--concurrency` in flight. Prints a table.

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


async def latency(base: str, n: int, warmup: int = 5) -> Latency:
    times: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        for i in range(warmup + n):
            body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": f"ping {i}"}]}
            start = time.perf_counter()
            r = await client.post("/v1/chat/completions", json=body)
            elapsed = time.perf_counter() - start
            r.raise_for_status()
            if i >= warmup:
                times.append(elapsed * 1000)
    times.sort()
    return Latency(statistics.median(times), times[int(0.9 * (len(times) - 1))])


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


def bench_direct(
    ckpt: Path, args: argparse.Namespace, images: list[str], threads: int | None = None
) -> tuple[Latency, Throughput]:
    port = free_port()
    cmd = [sys.executable, "-m", "glmv", "serve", "--model", str(ckpt), "--port", str(port),
           "--served-model-name", MODEL, "--no-access-log", "--log-level", "warning"]  # fmt: skip
    for key, value in ENGINE_FLAGS.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if threads is not None:  # as Ray does for its workers (OMP_NUM_THREADS from the actor's CPUs)
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        lat = asyncio.run(latency(base, args.latency_requests))
        thr = asyncio.run(throughput(base, images, args.tokens, args.concurrency))
        return lat, thr
    finally:
        proc.terminate()
        proc.wait(60)


def bench_ray(
    ckpt: Path, args: argparse.Namespace, images: list[str]
) -> dict[int, tuple[Latency, Throughput]]:
    import ray
    from ray import serve

    from glmv.ray.serve import RayServeOptions, build_application
    from glmv.server.guard import GuardSettings
    from glmv.server.settings import Settings

    ray.init(address="local", num_cpus=args.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    settings = Settings(model=str(ckpt), served_model_name=[MODEL], **ENGINE_FLAGS)  # type: ignore[arg-type]
    settings.guard = GuardSettings(access_log=False)
    out: dict[int, tuple[Latency, Throughput]] = {}
    try:
        for replicas in (1, 2):
            options = RayServeOptions(
                replicas=replicas, num_cpus_per_replica=1.0, ingress_num_cpus=0.0, max_ongoing_requests=64
            )
            serve.run(build_application(settings, options), name="glmv", route_prefix="/", blocking=False)
            wait_ready(base)
            lat = asyncio.run(latency(base, args.latency_requests))
            thr = asyncio.run(throughput(base, images, args.tokens, args.concurrency))
            out[replicas] = (lat, thr)
            serve.delete("glmv")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="throughput requests (each its own image)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per throughput request")
    parser.add_argument("--image", type=int, default=224, help="image side in pixels")
    parser.add_argument("--latency-requests", type=int, default=40)
    parser.add_argument("--ray-num-cpus", type=float, default=2)
    args = parser.parse_args()
    images = [image_url(i, args.image) for i in range(args.requests + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = create_tiny_model(Path(tmp) / "tiny", variant="glm41v", seed=0)
        direct = bench_direct(ckpt, args, images)
        direct_1 = bench_direct(ckpt, args, images, threads=1)
        on_ray = bench_ray(ckpt, args, images)
    rows = [("glmv serve (direct)", *direct), ("glmv serve (direct, OMP_NUM_THREADS=1)", *direct_1)]
    rows += [(f"Ray Serve, {n} replica(s)", *on_ray[n]) for n in (1, 2)]
    print(f"\n{args.requests} requests x {args.tokens} tokens, {args.image}px images, concurrency {args.concurrency}; "
          f"latency: {args.latency_requests} sequential 1-token requests")  # fmt: skip
    print("| setup | latency median ms | p90 ms | req/s | output tok/s |")
    print("|---|---|---|---|---|")
    for name, lat, thr in rows:
        print(f"| {name} | {lat.median_ms:.1f} | {lat.p90_ms:.1f} | {thr.req_s:.2f} | {thr.tok_s:.1f} |")
    one, two = on_ray[1][1], on_ray[2][1]
    print(f"2 vs 1 replicas: {two.tok_s / one.tok_s:.2f}x output tok/s")
    for name, base in (("direct", direct), ("direct, 1 thread", direct_1)):
        overhead = on_ray[1][0].median_ms - base[0].median_ms
        print(f"routing overhead per request (median, vs {name}): {overhead:+.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
