"""CPU throughput: 16 concurrent image requests x 64 tokens, glmv vs transformers one by one.

On the tiny checkpoint (created in a temp dir), in one run:
  * transformers `generate`, the 16 requests one after another (what a plain script does);
  * glmv's engine offline (`LLM.chat`, all 16 submitted at once, continuous batching);
  * glmv over HTTP (`glmv serve` subprocess, 16 concurrent streaming clients), with the engine
    core in its own process and in a thread of the server, unless --no-http;
  * with --dp: two-turn conversations against `--data-parallel-size 2` vs 1 (throughput, and the
    share of second turns that found their first turn in the prefix cache).
Greedy, `ignore_eos`, fixed output length; glmv rows are the median of --passes passes. Prints a
table of output tok/s and ratios last.

    .venv/bin/python benchmarks/engine_cpu.py [--requests 16] [--tokens 64] [--image 448] [--dp]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glmv.models.tiny import create_tiny_model
from glmv.tasks.llm import LLM
from glmv.tasks.types import SamplingParams


def images(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def warm_up_images(imgs: list[Image.Image]) -> list[Image.Image]:
    """Two images unlike the measured ones (another seed), for a warm-up that leaves nothing in the
    encoder or prefix cache for the measured pass."""
    return images(2, imgs[0].width, seed=1)


def question(i: int) -> str:
    return f"Read invoice number {i} and list every line item with its amount."


def bench_transformers(ckpt: Path, imgs: list[Image.Image], tokens: int) -> float:
    from transformers import AutoTokenizer, Glm4vForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    model = Glm4vForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    proc = Glm4vImageProcessorPil.from_pretrained(ckpt)
    image_id = tok.convert_tokens_to_ids("<|image|>")

    def one(i: int, img: Image.Image) -> int:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question(i)}]}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        pix = proc(images=[img], return_tensors="pt")
        n_img = int(pix["image_grid_thw"][0].prod()) // 4
        text = text.replace("<|image|>", "<|image|>" * n_img)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                pixel_values=pix["pixel_values"],
                image_grid_thw=pix["image_grid_thw"],
                mm_token_type_ids=(ids == image_id).int(),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )
        return out.shape[1] - ids.shape[1]

    one(0, imgs[0])  # warm-up
    t0 = time.perf_counter()
    total = sum(one(i, img) for i, img in enumerate(imgs))
    return total / (time.perf_counter() - t0)


def bench_offline(ckpt: Path, imgs: list[Image.Image], tokens: int) -> float:
    llm = LLM(ckpt, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

    def convs(batch: list[Image.Image], offset: int) -> list[list[dict[str, object]]]:
        return [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": img},
                        {"type": "text", "text": question(i + offset)},
                    ],
                }
            ]
            for i, img in enumerate(batch)
        ]

    # Warm-up on other images and prompts: nothing of it is in a cache the measured pass reads.
    llm.chat(convs(warm_up_images(imgs), 1000), params, use_tqdm=False)
    t0 = time.perf_counter()
    results = llm.chat(convs(imgs, 0), params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    llm.close()
    return sum(len(r.outputs[0].token_ids) for r in results) / elapsed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@contextlib.contextmanager
def server(ckpt: Path, *extra: str) -> Iterator[str]:
    """`glmv serve` on the checkpoint (float32) with `extra` flags; yields its base URL."""
    import httpx

    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "glmv",
        "serve",
        "--model",
        str(ckpt),
        "--port",
        str(port),
        "--dtype",
        "float32",
    ]
    proc = subprocess.Popen(
        [*cmd, *extra],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1500):
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("server did not become ready")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


async def chat(
    client: Any, base: str, messages: list[dict[str, Any]], tokens: int
) -> tuple[int, int, str, int]:
    """One streaming chat request: (completion tokens, cached prompt tokens, answer, prompt tokens)."""
    body = {
        "model": (await client.get(f"{base}/v1/models")).json()["data"][0]["id"],
        "stream": True,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
        "messages": messages,
    }
    n = cached = prompt = 0
    text: list[str] = []
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                text.append(choice["delta"].get("content") or "")
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
                prompt = chunk["usage"]["prompt_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return n, cached, "".join(text), prompt


def first_turn(url: str, i: int) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question(i)},
            ],
        }
    ]


def bench_http(ckpt: Path, imgs: list[Image.Image], tokens: int, *extra: str) -> float:
    """16 concurrent streaming image requests against one `glmv serve`; output tok/s."""
    import httpx

    urls = [data_url(im) for im in imgs]
    warm_urls = [data_url(im) for im in warm_up_images(imgs)]

    async def run(batch: list[str], offset: int) -> tuple[int, float]:
        async with httpx.AsyncClient(timeout=600) as client:
            t0 = time.perf_counter()
            done = await asyncio.gather(
                *(chat(client, base, first_turn(u, i + offset), tokens) for i, u in enumerate(batch))
            )
            return sum(d[0] for d in done), time.perf_counter() - t0

    with server(ckpt, *extra) as base:
        asyncio.run(run(warm_urls, 1000))  # warm-up on other images and prompts: no cache hits
        total, elapsed = asyncio.run(run(urls, 0))
    return total / elapsed


def bench_conversations(ckpt: Path, imgs: list[Image.Image], tokens: int, dp: int) -> tuple[float, float]:
    """Two-turn conversations about one image each, all conversations at once per turn, against
    `--data-parallel-size dp`: (output tok/s over both turns, share of second turns whose whole
    first turn was found in the prefix cache)."""
    import httpx

    urls = [data_url(im) for im in imgs]

    async def run() -> tuple[int, float, float]:
        async with httpx.AsyncClient(timeout=600) as client:
            t0 = time.perf_counter()
            firsts = await asyncio.gather(
                *(chat(client, base, first_turn(u, i), tokens) for i, u in enumerate(urls))
            )
            seconds = await asyncio.gather(
                *(
                    chat(
                        client,
                        base,
                        [
                            *first_turn(u, i),
                            {"role": "assistant", "content": firsts[i][2]},
                            {"role": "user", "content": "And the total, with tax?"},
                        ],
                        tokens,
                    )
                    for i, u in enumerate(urls)
                )
            )
            elapsed = time.perf_counter() - t0
            # A second turn that found its first turn cached reports the first turn's prompt as
            # cached, but for the last partial KV block (16 tokens).
            hits = sum(1 for f, s in zip(firsts, seconds, strict=True) if s[1] >= f[3] - 16)
            return sum(f[0] for f in firsts) + sum(s[0] for s in seconds), elapsed, hits / len(seconds)

    with server(ckpt, "--engine-mode", "process", "--data-parallel-size", str(dp)) as base:
        asyncio.run(run_warmup(base, data_url(images(1, 64)[0]), tokens))
        total, elapsed, share = asyncio.run(run())
    return total / elapsed, share


async def run_warmup(base: str, url: str, tokens: int) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(chat(client, base, first_turn(url, 5000 + i), tokens) for i in range(4)))


def median_of(passes: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(passes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--passes", type=int, default=3, help="median of this many passes per row")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument(
        "--dp", action="store_true", help="also: two-turn conversations, --data-parallel-size 2 vs 1"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = create_tiny_model(Path(tmp) / "tiny")
        imgs = images(args.requests, args.image)
        rows = [("transformers generate, one by one", bench_transformers(ckpt, imgs, args.tokens))]
        rows.append(
            (
                "glmv engine, offline (LLM.chat)",
                median_of(args.passes, lambda: bench_offline(ckpt, imgs, args.tokens)),
            )
        )
        if not args.no_http:
            for mode in ("process", "inprocess"):
                tps = median_of(
                    args.passes, lambda m=mode: bench_http(ckpt, imgs, args.tokens, "--engine-mode", m)
                )
                rows.append((f"glmv over HTTP, engine {mode}", tps))
        dp_rows = []
        if args.dp:
            for dp in (1, 2):
                dp_rows.append((dp, *bench_conversations(ckpt, imgs, args.tokens, dp)))
    base = rows[0][1]
    print(
        f"\n{args.requests} requests x {args.tokens} tokens, {args.image}x{args.image} image each, "
        f"torch threads {torch.get_num_threads()}, median of {args.passes} passes (transformers: one)"
    )
    print(f"{'what':45s} {'output tok/s':>13s} {'vs transformers':>16s}")
    for name, tps in rows:
        print(f"{name:45s} {tps:13.1f} {tps / base:15.2f}x")
    if dp_rows:
        print(f"\ntwo-turn conversations over HTTP ({args.requests} at once per turn)")
        print(f"{'data-parallel-size':>18s} {'output tok/s':>13s} {'vs dp 1':>8s} {'2nd turns cached':>17s}")
        for dp, tps, share in dp_rows:
            print(f"{dp:18d} {tps:13.1f} {tps / dp_rows[0][1]:7.2f}x {share:16.0%}")


if __name__ == "__main__":
    main()
