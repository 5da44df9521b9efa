"""Image preprocessing speed: glmv's ImageProcessor against transformers' Glm4vImageProcessor.

Builds seeded random-noise JPEGs, checks both processors give the same pixel_values, then times
each (median of --runs after --warmup runs, time.perf_counter) and prints the speed-up.

    .venv/bin/python benchmarks/preprocess.py [--runs 20] [--warmup 3]

transformers is only the reference here (a test dependency); its Pillow backend is what
`Glm4vImageProcessor()` resolves to without torchvision.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from glmv.processing.image import ImageProcessor


def noise_jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def median_ms(fn: Callable[[], object], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    reference = Glm4vImageProcessorPil()
    ours = ImageProcessor()

    rows: list[tuple[str, float, float]] = []
    for width, height in [(1120, 1120), (1920, 1080)]:
        data = noise_jpeg(width, height, seed=width + height)
        image = decoded(data)
        want = reference(image)["pixel_values"]
        got = ours.preprocess(image).pixel_values.numpy()
        diff = float(np.abs(want - got).max())
        assert want.shape == got.shape and diff <= 1e-5, (want.shape, got.shape, diff)
        label = f"{width}x{height} JPEG, decoded"
        rows.append(
            (
                f"{label}: preprocess",
                median_ms(lambda image=image: reference(image), args.runs, args.warmup),
                median_ms(lambda image=image: ours.preprocess(image), args.runs, args.warmup),
            )
        )
        if (width, height) == (1120, 1120):
            rows.append(
                (
                    f"{width}x{height} JPEG bytes: decode + preprocess",
                    median_ms(lambda data=data: reference(decoded(data)), args.runs, args.warmup),
                    median_ms(lambda data=data: ours.preprocess(decoded(data)), args.runs, args.warmup),
                )
            )
            rows.append(
                (
                    f"{label}: glmv prepare only (uint8 + hash)",
                    float("nan"),
                    median_ms(lambda image=image: ours.prepare(image), args.runs, args.warmup),
                )
            )
            if torch.cuda.is_available():

                def on_gpu(image: Image.Image = image) -> None:
                    ours.to_patches(ours.prepare(image).pixels, device="cuda")
                    torch.cuda.synchronize()

                rows.append(
                    (
                        f"{label}: glmv prepare + to_patches on cuda",
                        median_ms(lambda image=image: reference(image), args.runs, args.warmup),
                        median_ms(on_gpu, args.runs, args.warmup),
                    )
                )

    print(
        f"image preprocessing, median of {args.runs} runs after {args.warmup} warm-up "
        f"({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()})"
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'transformers ms':>15}  {'glmv ms':>8}  {'speed-up':>8}")
    for name, ref_ms, our_ms in rows:
        ref_text = "-" if ref_ms != ref_ms else f"{ref_ms:.1f}"
        ratio = "-" if ref_ms != ref_ms else f"{ref_ms / our_ms:.1f}x"
        print(f"{name:<{width}}  {ref_text:>15}  {our_ms:>8.1f}  {ratio:>8}")


if __name__ == "__main__":
    main()
