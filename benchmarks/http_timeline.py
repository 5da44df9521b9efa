"""Where the time of N concurrent streaming image requests goes, over HTTP vs straight on the engine.

    PYTHONPATH=. python benchmarks/http_timeline.py                       # tiny checkpoint, CPU
    PYTHONPATH=. python benchmarks/http_timeline.py --full --dtype bfloat16 \\
        --requests 64 --max-tokens 256                                    # the H200 workload

One run, one workload: N requests, each its own JPEG (random pixels, `--image-size`) and
`--text-words` words, `--max-tokens` output tokens (ignore_eos, greedy), all sent at once.

1. Engine: the same prompts, built by the server's own input code (chat template, image decode and
   resize, done before the clock starts), submitted together to an in-process `LLMEngine`
   (as `benchmarks/device_engine.py`'s `run_requests` does); per request the token arrival times,
   per step how many sequences were in prefill and in decode.
2. HTTP: `glmv serve` on the same checkpoint with `GLMV_TIMELINE` set (`glmv.timeline`), N
   streaming clients with the JPEGs as data URLs (like device_engine's `http_phase`); the trace
   gives each request's stages (body read, parsed, images decoded in the pool, prompt, sent to the
   core, first scheduled, outputs in the front end, streamed, done), the event loop's late
   wake-ups and the core's steps.

A warm-up wave (other images, `--warm-tokens` tokens) runs before each timed wave. Prints per
stage medians / p90 / max, the moments (since the wave started) each stage was reached, the loop's
blocked time, the core's batch sizes in both runs, and the HTTP / engine throughput ratio.
`--full` builds the full-size GLM-4.6V-Flash shape (random weights, as device_engine does).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (label, from-stage, to-stage) of the HTTP timeline; "client_*" are the client's own marks.
STAGES = (
    ("client send -> headers in app", "client_send", "headers"),
    ("body upload", "headers", "body"),
    ("body text screen", "body", "screened"),
    ("JSON parse + validation -> handler", "screened", "handler"),
    ("handler checks", "handler", "checked"),
    ("images: pool decode + resize", "checked", "images"),
    ("prompt (template thread)", "images", "prompt"),
    ("hop to engine client", "prompt", "submit"),
    ("shared memory pack + send", "submit", "sent"),
    ("core queue (sent -> scheduled)", "sent", "scheduled"),
    ("prefill (scheduled -> first token)", "scheduled", "core_first_token"),
    ("core -> front-end I/O thread", "core_first_token", "io_first_token"),
    ("I/O thread -> stream (first token)", "io_first_token", "first_token"),
    ("stream -> client (first token)", "first_token", "client_first"),
    ("last token: I/O thread -> stream", "io_last_token", "last_token"),
    ("last token: stream -> client", "last_token", "client_last"),
    ("last token -> response done", "last_token", "done"),
)
MOMENTS = ("headers", "body", "handler", "images", "sent", "scheduled", "client_first", "client_last")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def jpeg_data_url(seed: int, width: int, height: int) -> str:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# --- 1. the engine alone ------------------------------------------------------------------------------


def engine_requests(ckpt: Path, urls: list[str], text: str, max_tokens: int, tag: str) -> list[Any]:
    """The prompts the server would build for these requests (the server's own input code)."""
    from glmv.engine.sampling import SamplingParams
    from glmv.processing.media import ImageLimits
    from glmv.tasks.images import decode_and_prepare
    from glmv.tasks.inputs import load_processors

    _, builder = load_processors(ckpt)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    out = []
    for i, url in enumerate(urls):
        image = decode_and_prepare(url, "image", ImageLimits(), builder.image_processor).image
        out.append(builder.build(f"{tag}{i}", messages, [image], params))
    return out


def engine_wave(engine: Any, reqs: list[Any]) -> dict[str, Any]:
    """Submit together, step to the end: per request first/last token time, per step its shape."""
    t0 = time.monotonic()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    tokens = 0
    steps: list[dict[str, Any]] = []
    for r in reqs:
        engine.add_request(r)
    while engine.has_unfinished():
        t_step = time.monotonic()
        outs = engine.step()
        now = time.monotonic()
        shape = engine.core.last_scheduled.shape() if engine.core.last_scheduled is not None else {}
        steps.append({"t_step": t_step, "t_send": now, **shape})
        for out in outs:
            n = sum(len(d.token_ids) for d in out.deltas)
            if n:
                tokens += n
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
    elapsed = time.monotonic() - t0
    return {
        "t0": t0,
        "elapsed": elapsed,
        "tokens": tokens,
        "ttft": sorted(first[r.request_id] - t0 for r in reqs),
        "last": sorted(last[r.request_id] - t0 for r in reqs),
        "steps": steps,
    }


def engine_phase(
    args: argparse.Namespace, ckpt: Path, warm: list[str], timed: list[str], text: str
) -> dict[str, Any]:
    import torch

    from glmv.engine.engine import EngineConfig, LLMEngine

    t = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(
            model=str(ckpt),
            dtype=args.dtype,
            max_num_seqs=args.max_num_seqs,
            cudnn_attention="--cudnn-attention" in args.serve_arg,
        )
    )
    print(f"engine start-up {time.perf_counter() - t:.1f} s", flush=True)
    engine_wave(engine, engine_requests(ckpt, warm, text, args.warm_tokens, "w"))
    result = engine_wave(engine, engine_requests(ckpt, timed, text, args.max_tokens, "t"))
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


# --- 2. over HTTP ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_wave(
    base: str, model: str, urls: list[str], text: str, max_tokens: int
) -> list[dict[str, Any]]:
    import httpx

    async def one(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
        body = {
            "model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}],
        }  # fmt: skip
        content = json.dumps(body).encode()  # encoded before the clock, like a client that has it ready
        rec: dict[str, Any] = {"client_send": time.monotonic(), "tokens": 0}
        async with client.stream(
            "POST",
            f"{base}/v1/chat/completions",
            content=content,
            headers={"content-type": "application/json"},
        ) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.monotonic()
                if "id" not in rec:  # the role chunk: the request id joins the server's trace
                    rec["id"] = json.loads(line[6:])["id"]
                    continue
                if '"content":"' in line or '"reasoning_content":"' in line:
                    rec.setdefault("client_first", now)
                    rec["client_last"] = now
                elif '"usage":{' in line:
                    rec["tokens"] = json.loads(line[6:])["usage"]["completion_tokens"]
        rec["client_done"] = time.monotonic()
        return rec

    limits = httpx.Limits(max_connections=len(urls) + 8, max_keepalive_connections=len(urls) + 8)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        return list(await asyncio.gather(*(one(client, u) for u in urls)))


def read_trace(path: Path, offset: int) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def http_phase(
    args: argparse.Namespace, ckpt: Path, tmp: Path, warm: list[str], timed: list[str], text: str
) -> dict[str, Any]:
    import httpx

    trace = tmp / "timeline.jsonl"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_")}
    env.update({"GLMV_TIMELINE": str(trace), "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    log_path = tmp / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    cmd = [sys.executable, "-m", "glmv", "serve", "--model", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning",
           "--no-access-log", *args.serve_arg]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("server exited:\n" + log_path.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        print(f"server start-up {time.perf_counter() - t:.1f} s", flush=True)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        asyncio.run(http_wave(base, model, warm, text, args.warm_tokens))
        time.sleep(0.5)  # the warm wave's last records
        offset = trace.stat().st_size
        spy = None
        if args.profile_api:  # py-spy on the API process only (its threads), for the timed wave
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(proc.pid), "--rate", "200", "--format", "raw",
                 "--threads", "--gil", "-o", args.profile_api],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)
        t0 = time.monotonic()
        clients = asyncio.run(http_wave(base, model, timed, text, args.max_tokens))
        t_end = time.monotonic()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        time.sleep(0.5)
        records = read_trace(trace, offset)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
    return {"t0": t0, "t_end": t_end, "clients": clients, "records": records}


# --- the report ------------------------------------------------------------------------------------


def step_summary(steps: list[dict[str, Any]]) -> dict[str, float]:
    decode = [s for s in steps if s.get("decode_seqs", 0) and not s.get("prefill_seqs", 0)]
    mixed = [s for s in steps if s.get("prefill_seqs", 0)]
    busy = sum(s["t_send"] - s["t_step"] for s in steps if "prefill_seqs" in s)
    out = {
        "steps": len([s for s in steps if "prefill_seqs" in s]),
        "steps with prefill": len(mixed),
        "decode-only steps": len(decode),
        "decode seqs per decode-only step (mean)": statistics.fmean(s["decode_seqs"] for s in decode)
        if decode
        else 0,
        "decode-only step ms (median)": statistics.median((s["t_send"] - s["t_step"]) * 1e3 for s in decode)
        if decode
        else 0,
        "stepping time s": busy,
    }
    if any("t_wait" in s for s in steps):
        # Handling commands (unpacking images, adding requests) while it had work to step.
        out["core time in receive while busy s"] = sum(
            s["t_step"] - s["t_wait"] for s in steps if not s["idle"]
        )
        out["core time sending outputs s"] = sum(s["t_end"] - s["t_send"] for s in steps)
    return out


def report(args: argparse.Namespace, eng: dict[str, Any] | None, http: dict[str, Any]) -> None:
    clients = http["clients"]
    t0 = min(c["client_send"] for c in clients)
    by_id = {r["id"]: r for r in http["records"] if r.get("kind") == "request"}
    rows = []
    for c in clients:
        rows.append({**by_id.get(c.get("id", ""), {}), **c})
    elapsed = max(c["client_done"] for c in clients) - t0
    tokens = sum(c["tokens"] for c in clients)
    print("\n" + "=" * 100)
    print(
        f"{len(clients)} requests, {args.image_size}x{args.image_size} JPEG, {args.max_tokens} tokens, {args.dtype}"
    )
    print(f"{'stage (per request, ms)':45s} {'median':>9s} {'p90':>9s} {'max':>9s} {'n':>4s}")
    for label, a, b in STAGES:
        vals = [(r[b] - r[a]) * 1e3 for r in rows if a in r and b in r]
        if vals:
            print(
                f"{label:45s} {statistics.median(vals):9.1f} {pct(vals, 90):9.1f} {max(vals):9.1f} {len(vals):4d}"
            )
    print(f"\n{'moment reached (s since the wave started)':45s} {'min':>9s} {'median':>9s} {'max':>9s}")
    for stage in MOMENTS:
        vals = [r[stage] - t0 for r in rows if stage in r]
        if vals:
            print(f"{stage:45s} {min(vals):9.3f} {statistics.median(vals):9.3f} {max(vals):9.3f}")
    chunks = [r.get("chunks", 0) for r in rows]
    io_outputs = [r.get("io_outputs", 0) for r in rows]
    print(
        f"outputs per request: from the core {statistics.median(io_outputs):.0f}, streamed chunks "
        f"{statistics.median(chunks):.0f} (fewer: the stream fell behind and merged outputs)"
    )
    lags = [
        r
        for r in http["records"]
        if r.get("kind") == "lag" and r["t1"] > http["t0"] and r["t0"] < http["t_end"]
    ]
    print(
        f"event loop: timer late by {sum(r['lag'] for r in lags):.3f} s in all over the wave's "
        f"{http['t_end'] - http['t0']:.2f} s ({sum(r['late'] for r in lags)} wake-ups > 1 ms late, worst "
        f"{max((r['max'] for r in lags), default=0) * 1e3:.1f} ms)"
    )
    steps = [r for r in http["records"] if r.get("kind") == "step" and r["t_step"] >= t0]
    http_steps = step_summary(steps)
    eng_steps = step_summary(eng["steps"]) if eng else {}
    print(f"\n{'core steps':45s} {'engine':>12s} {'HTTP':>12s}")
    for key, value in http_steps.items():
        e = eng_steps.get(key)
        print(f"{key:45s} {'' if e is None else f'{e:12.2f}'} {value:12.2f}")
    http_tps = tokens / elapsed
    ttft = sorted(c["client_first"] - c["client_send"] for c in clients if "client_first" in c)
    print(f"\n{'':45s} {'engine':>12s} {'HTTP':>12s}")
    if eng:
        print(f"{'wall time of the wave s':45s} {eng['elapsed']:12.2f} {elapsed:12.2f}")
        print(f"{'output tok/s':45s} {eng['tokens'] / eng['elapsed']:12.0f} {http_tps:12.0f}")
        for name, q in (("min", 0), ("median", 50), ("max", 100)):
            print(f"{'TTFT ' + name + ' s':45s} {pct(eng['ttft'], q):12.2f} {pct(ttft, q):12.2f}")
        print(
            f"{'last token median s':45s} {pct(eng['last'], 50):12.2f} {pct([r['client_last'] - t0 for r in rows], 50):12.2f}"
        )
        print(
            f"HTTP / engine throughput: {http_tps / (eng['tokens'] / eng['elapsed']) * 100:.1f} % (target >= 95 %)"
        )
    else:
        print(f"{'wall time of the wave s':45s} {'':12s} {elapsed:12.2f}")
        print(f"{'output tok/s':45s} {'':12s} {http_tps:12.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random one)")
    ap.add_argument(
        "--full", action="store_true", help="build the full-size GLM-4.6V-Flash shape (random weights)"
    )
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=1120)
    ap.add_argument("--text-words", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warm-tokens", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--profile-api", metavar="FILE", help="py-spy the API process during the timed wave")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `glmv serve` flag (repeatable)")
    args = ap.parse_args()
    text = " ".join(["invoice"] * args.text_words)
    size = args.image_size
    warm = [jpeg_data_url(5000 + i, size, size) for i in range(args.requests)]
    timed = [jpeg_data_url(9000 + i, size, size) for i in range(args.requests)]
    print(f"data URL {len(timed[0]) / 1e6:.2f} MB each", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.model:
            ckpt = Path(args.model)
        else:
            from glmv.models.tiny import create_tiny_model

            ckpt = create_tiny_model(
                tmp / ("full" if args.full else "tiny"), variant="full" if args.full else "glm41v"
            )
        eng = None if args.skip_engine else engine_phase(args, ckpt, warm, timed, text)
        http = http_phase(args, ckpt, tmp, warm, timed, text)
        report(args, eng, http)


if __name__ == "__main__":
    main()
