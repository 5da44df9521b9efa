"""End-to-end latency of one receipt question to the demo model over HTTP (CPU target: ≤ 2 s).

    python benchmarks/demo_latency.py                 # starts `glmv serve` (the embedded demo model)
    python benchmarks/demo_latency.py --url http://127.0.0.1:8000

Each request carries a new clean receipt image (PNG data URL, so nothing comes from the prefix cache)
and "What is the total?"; the time is from sending the request to the whole answer, measured by
the client. Prints the median and the slowest of `--n` requests after two warm-ups, and how many
answers were the receipt's real total.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from glmv.synth import Augment, generate

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--model", help="serve this checkpoint instead of the embedded default")
    args = p.parse_args()
    proc = None
    url = args.url
    if url is None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen(
            [sys.executable, "-m", "glmv", "serve", "--port", str(args.port), "--log-level", "warning"]
            + (["--model", args.model] if args.model else []),
            env=env,
            cwd=REPO,
        )
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
    try:
        times: list[float] = []
        right = 0
        with httpx.Client(base_url=url, timeout=120) as client:
            for i in range(args.n + 2):
                doc = generate("receipt", 1000 + i, augment=Augment.none())
                buf = io.BytesIO()
                doc.image.save(buf, format="PNG")
                image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
                body = {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": image}},
                                {"type": "text", "text": "What is the total?"},
                            ],
                        }
                    ],
                    "temperature": 0,
                    "max_tokens": 24,
                }
                t0 = time.perf_counter()
                r = client.post("/v1/chat/completions", json=body)
                dt = time.perf_counter() - t0
                r.raise_for_status()
                if i >= 2:
                    times.append(dt)
                    right += r.json()["choices"][0]["message"]["content"] == doc.answer("total")
        print(
            f"{len(times)} receipt questions over HTTP: median {statistics.median(times):.2f} s, "
            f"slowest {max(times):.2f} s; {right}/{len(times)} answers were the real total"
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
