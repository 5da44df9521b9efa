"""GLM-4v-9b full-size speed on a GPU: random weights, bf16, through glmv's engine.

    PYTHONPATH=. python3 benchmarks/device_glm4v_9b.py [--quick] [--parity]

Writes a weightless full-size GLM-4v-9b checkpoint (the published config: text 9.40 B +
EVA2-CLIP-E vision 4.51 B = 13.9 B parameters, a tiny tokenizer; the loader draws the weights on
the GPU), builds `LLMEngine` on it (bf16, CUDA graphs for decode, Triton paged decode attention)
and measures, for the table in RESULTS.md next to GLM-4.6V-Flash:
  - vision encode of one 1120x1120 image (63 EVA2-CLIP layers over 6401 tokens + adapter), GPU time;
  - batch-1 decode ms/token after a 1120x1120 image + 32 text tokens, vs the floor (LM bytes
    read per step / copy bandwidth measured here);
  - TTFT for one fresh image + 32 text tokens (idle), and a second turn about the same image
    (prefix + image-embedding caches);
  - N concurrent requests, each its own image + 64 text tokens, 128 output tokens: output tok/s.
With --parity (needs a GPU with ~90 GB, e.g. H200): the bf16 model against a float32 copy of the
same weights on one image prompt: relative error of the last logits and 16 greedy tokens.
Prints a table last. Every timing is measured in this run; nothing is assumed.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import copy_bandwidth

from glmv.engine.engine import EngineConfig, LLMEngine
from glmv.engine.request import EngineRequest
from glmv.engine.sampling import SamplingParams
from glmv.kernels.metadata import AttentionMetadata
from glmv.models.tiny_glm4v_9b import FULL_9B, create_tiny_glm4v_9b
from glmv.tasks.inputs import InputBuilder, load_processors

ROWS: list[tuple[str, str, str]] = []
DEVICE = "cuda"
_ids = itertools.count()


def row(name: str, value: str, note: str = "") -> None:
    ROWS.append((name, value, note))
    print(f"  {name}: {value} {note}", flush=True)


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (1120, 1120, 3), dtype=np.uint8))


def request(
    builder: InputBuilder, seed: int, words: int, max_tokens: int, follow_up: bool = False
) -> EngineRequest:
    text = " ".join(["invoice", "total", "date", "vendor"] * (words // 4))
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
    ]
    if follow_up:
        messages += [
            {"role": "assistant", "content": "The total is 1,895.34 and the vendor is Northwind."},
            {"role": "user", "content": "And the due date?"},
        ]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return builder.build(f"r{next(_ids)}", messages, builder.preprocess([noise(seed)]), params)


def run(engine: LLMEngine, reqs: list[EngineRequest]) -> dict[str, list[float]]:
    """Submit together; per request the wall time of every token's arrival (first = TTFT)."""
    t0 = time.perf_counter()
    times: dict[str, list[float]] = {r.request_id: [] for r in reqs}
    for r in reqs:
        engine.add_request(r)
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(f"{out.request_id}: {out.error}")
            now = time.perf_counter() - t0
            for d in out.deltas:
                times[out.request_id].extend([now] * len(d.token_ids))
    return times


def speed(ckpt: Path, quick: bool) -> None:
    tokenizer, builder = load_processors(ckpt)
    t0 = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(model=str(ckpt), dtype="bfloat16", max_num_seqs=32 if quick else 64), tokenizer=tokenizer
    )
    row("engine start-up (random init + profile + graph capture)", f"{time.perf_counter() - t0:.1f} s")
    if engine.memory is not None:
        row("memory", engine.memory.describe())
    m = engine.model
    row("parameters", f"{sum(p.numel() for p in m.parameters()) / 1e9:.3f} B")

    # Vision encode alone.
    pixels = builder.image_processor.preprocess(noise(1)).pixel_values.to("cuda")
    for _ in range(2):
        m.encode_images(pixels, [(1, 80, 80)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        out = m.encode_images(pixels, [(1, 80, 80)])
    end.record()
    torch.cuda.synchronize()
    assert out[0].shape == (1602, 4096) and torch.isfinite(out[0]).all()
    row("vision encode, one 1120x1120 image (GPU time)", f"{start.elapsed_time(end) / 5:.1f} ms")

    bw = copy_bandwidth()
    lm_bytes = sum(
        p.numel() * p.element_size()
        for n, p in m.named_parameters()
        if not n.startswith("vision.") and not n.startswith("embedding.")
    )
    run(engine, [request(builder, 999, 32, 8)])  # warm-up

    # 1. batch-1 decode after an image prompt.
    times = next(iter(run(engine, [request(builder, 2, 32, 257)]).values()))
    tpot = statistics.median(b - a for a, b in itertools.pairwise(times[1:]))
    kv_bytes = (1650 + 128) * m.num_layers * 2 * m.num_kv_heads * m.head_dim * 2
    floor = (lm_bytes + kv_bytes) / bw
    row("copy bandwidth", f"{bw / 1e12:.2f} TB/s")
    row(
        "batch-1 decode ms/token (median step, 1120x1120 image + 32 words)",
        f"{tpot * 1e3:.2f} ms",
        f"floor {floor * 1e3:.2f} ms ({lm_bytes / 1e9:.2f} GB LM) -> {tpot / floor:.2f}x floor",
    )

    # 2. TTFT idle, fresh images.
    ttfts = [next(iter(run(engine, [request(builder, 10 + i, 32, 1)]).values()))[0] for i in range(3)]
    row(
        "TTFT, one fresh 1120x1120 image + 32 words (engine, median of 3)",
        f"{statistics.median(ttfts) * 1e3:.1f} ms",
    )

    # 3. second turn about the same image.
    run(engine, [request(builder, 40, 32, 1)])
    run(engine, [request(builder, 40, 32, 1, follow_up=True)])
    first = next(iter(run(engine, [request(builder, 50, 32, 1)]).values()))[0]
    second = next(iter(run(engine, [request(builder, 50, 32, 1, follow_up=True)]).values()))[0]
    row(
        "second-turn TTFT / first-turn TTFT",
        f"{second * 1e3:.1f} / {first * 1e3:.1f} ms = {second / first:.2f}",
    )

    # 4. concurrent image requests.
    n_req = 16 if quick else 32
    reqs = [request(builder, 100 + i, 64, 128) for i in range(n_req)]
    t = time.perf_counter()
    done = run(engine, reqs)
    elapsed = time.perf_counter() - t
    total = sum(len(v) for v in done.values())
    row(
        f"{n_req} concurrent image requests x 128 tokens: output tok/s (engine)",
        f"{total / elapsed:.0f} tok/s",
    )
    del engine
    torch.cuda.empty_cache()


def parity(ckpt: Path) -> None:
    """bf16 vs a float32 copy of the very same weights on one image prompt: 16 greedy float32
    tokens through the paged decode path, then both models over prompt + those tokens in one pass
    (teacher forcing, so a near-tie flipped once does not derail the rest of the comparison)."""
    from glmv.models.glm4v_9b import Glm4v9bModel
    from glmv.models.registry import load_model

    _, builder = load_processors(ckpt)
    bf16 = load_model(ckpt, dtype="bfloat16", device=DEVICE)
    assert isinstance(bf16, Glm4v9bModel)
    fp32 = copy.deepcopy(bf16).float()
    req = request(builder, 7, 32, 16)
    n = len(req.prompt_token_ids)
    (im,) = req.images
    steps = 16
    bs = 16  # the engine's block size (the GPU decode kernel expects such blocks)

    def table(tokens: int) -> list[int]:
        return list(range((tokens + bs - 1) // bs))

    def caches(model: Glm4v9bModel, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (len(table(tokens)), bs, model.num_kv_heads, model.head_dim)
        return [
            (
                torch.zeros(shape, dtype=model.dtype, device=DEVICE),
                torch.zeros(shape, dtype=model.dtype, device=DEVICE),
            )
            for _ in range(model.num_layers)
        ]

    def prefill(
        model: Glm4v9bModel, ids: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Logits at every position of `ids` (the prompt, maybe followed by generated tokens)."""
        pos, delta = model.prompt_positions(n, req.images)
        pos = torch.cat([pos, model.positions_after_prompt(n, len(ids), delta)], dim=1).to(DEVICE)
        emb = model.encode_images(im.pixel_values.to(DEVICE), [im.grid_thw])[0]  # type: ignore[union-attr]
        mask = torch.zeros(len(ids), dtype=torch.bool, device=DEVICE)
        mask[im.offset : im.offset + im.length] = True
        meta = AttentionMetadata.build(
            query_lens=[len(ids)],
            seq_lens=[len(ids)],
            block_tables=[table(len(ids))],
            block_size=bs,
            device=DEVICE,
        )
        with torch.inference_mode():
            return model.compute_logits(model(torch.tensor(ids, device=DEVICE), pos, kv, meta, emb, mask))

    # float32 greedy through the decode path.
    kv = caches(fp32, n + steps)
    tokens = [int(prefill(fp32, list(req.prompt_token_ids), kv)[-1].argmax())]
    _, delta = fp32.prompt_positions(n, req.images)
    with torch.inference_mode():
        for i in range(steps - 1):
            p = n + i
            meta = AttentionMetadata.build(
                query_lens=[1],
                seq_lens=[p + 1],
                block_tables=[table(n + steps)],
                block_size=bs,
                device=DEVICE,
            )
            h = fp32(
                torch.tensor([tokens[-1]], device=DEVICE),
                fp32.positions_after_prompt(p, p + 1, delta).to(DEVICE),
                kv,
                meta,
            )
            tokens.append(int(fp32.compute_logits(h)[0].argmax()))
    seq = list(req.prompt_token_ids) + tokens
    ref = prefill(fp32, seq, caches(fp32, len(seq)))[n - 1 : -1]
    got = prefill(bf16, seq, caches(bf16, len(seq)))[n - 1 : -1]
    assert ref.argmax(-1).tolist() == tokens, "float32 decode path disagrees with its own prefill"
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    agree = int((got.argmax(-1) == ref.argmax(-1)).sum())
    row("bf16 vs float32 (same weights), 16 teacher-forced steps: worst relative logit error", f"{rel:.2e}")
    row("bf16 vs float32: argmax agreement over those steps", f"{agree}/{steps}", "(near-ties may differ)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parity", action="store_true", help="bf16 vs float32 copy (needs ~90 GB of GPU memory)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    row("device", torch.cuda.get_device_name(0))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = create_tiny_glm4v_9b(Path(tmp) / "glm-4v-9b-full", spec=FULL_9B)
        speed(ckpt, args.quick)
        if args.parity:
            parity(ckpt)
    print("\n| what | value | note |\n|---|---|---|")
    for name, value, note in ROWS:
        print(f"| {name} | {value} | {note} |")


if __name__ == "__main__":
    main()
