"""CPU throughput: 16 concurrent image requests x 64 tokens, glmv vs transformers one by one.

On the tiny checkpoint (created in a temp dir), in one run:
  * transformers `generate`, the 16 requests one after another (what a plain script does);
  * glmv's engine offline (`LLM.chat`, all 16 submitted at once, continuous batching);
  * glmv over HTTP (`glmv serve` subprocess, 16 concurrent streaming clients), unless --no-http.
Greedy, `ignore_eos`, fixed output length. Prints a table of output tok/s and ratios last.

    .venv/bin/python benchmarks/engine_cpu.py [--requests 16] [--tokens 64] [--image 448]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glmv.models.tiny import create_tiny_model
from glmv.tasks.llm import LLM
from glmv.tasks.types import SamplingParams


def images(n: int, side: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


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

    def convs(offset: int) -> list[list[dict[str, object]]]:
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
            for i, img in enumerate(imgs)
        ]

    llm.chat(convs(1000)[:2], params, use_tqdm=False)  # warm-up (different prompts: no cache hits)
    t0 = time.perf_counter()
    results = llm.chat(convs(0), params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    llm.close()
    return sum(len(r.outputs[0].token_ids) for r in results) / elapsed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_http(ckpt: Path, imgs: list[Image.Image], tokens: int) -> float:
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
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
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("server did not become ready")

        def data_url(img: Image.Image) -> str:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

        urls = [data_url(im) for im in imgs]
        model_name = [""]

        async def one(client: httpx.AsyncClient, i: int, url: str) -> int:
            body = {
                "model": model_name[0],
                "stream": True,
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": question(i)},
                        ],
                    }
                ],
            }
            n = 0
            async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            n = chunk["usage"]["completion_tokens"]
            return n

        async def run(offset: int, count: int) -> tuple[int, float]:
            async with httpx.AsyncClient(timeout=600) as client:
                models = (await client.get(f"{base}/v1/models")).json()
                name = models["data"][0]["id"]
                model_name[0] = name
                t0 = time.perf_counter()
                done = await asyncio.gather(*(one(client, i + offset, u) for i, u in enumerate(urls[:count])))
                return sum(done), time.perf_counter() - t0

        model_name[0] = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        asyncio.run(run(1000, 2))
        total, elapsed = asyncio.run(run(0, len(urls)))
        return total / elapsed
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--no-http", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = create_tiny_model(Path(tmp) / "tiny")
        imgs = images(args.requests, args.image)
        rows = [("transformers generate, one by one", bench_transformers(ckpt, imgs, args.tokens))]
        rows.append(("glmv engine, offline (LLM.chat)", bench_offline(ckpt, imgs, args.tokens)))
        if not args.no_http:
            rows.append(("glmv over HTTP (glmv serve, streaming)", bench_http(ckpt, imgs, args.tokens)))
    base = rows[0][1]
    print(
        f"\n{args.requests} requests x {args.tokens} tokens, {args.image}x{args.image} image each, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'what':45s} {'output tok/s':>13s} {'vs transformers':>16s}")
    for name, tps in rows:
        print(f"{name:45s} {tps:13.1f} {tps / base:15.2f}x")


if __name__ == "__main__":
    main()
