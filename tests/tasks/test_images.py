"""Image decoding and resizing off the event loop: the process pool and the in-thread mode give the
same images, errors name the request field of the first bad image in request order, the
per-request limits hold, a crashed worker costs only its image, and workers end with their owner."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from glmv.errors import InvalidImageError
from glmv.processing.image import ImageProcessor
from glmv.processing.image_9b import ImageProcessor9b, ImageProcessor9bConfig
from glmv.processing.media import ImageLimits
from glmv.tasks.images import ImagePreparer, ImageRef

REPO = Path(__file__).resolve().parents[2]


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class CrashingProcessor(ImageProcessor):
    """Kills its process on 13-pixel-wide images (a decoder crash, as far as the pool can tell)."""

    def prepare(self, image: Image.Image) -> Any:
        if image.size[0] == 13:
            os._exit(3)
        return super().prepare(image)


@pytest.fixture(scope="module")
def pooled() -> Iterator[ImagePreparer]:
    preparer = ImagePreparer(CrashingProcessor(), workers=2)
    yield preparer
    preparer.shutdown()


def refs(tmp_path: Path) -> list[ImageRef]:
    path = tmp_path / "file.png"
    noise(70, 50, 3).save(path)
    return [
        ImageRef(data_url(encoded(noise(64, 48, 1))), "a"),
        ImageRef(encoded(noise(120, 40, 2), "JPEG"), "b"),
        ImageRef(noise(33, 90, 4), "c"),
        ImageRef(path, "d"),
    ]


async def test_pool_and_thread_give_the_same_images(pooled: ImagePreparer, tmp_path: Path) -> None:
    in_thread = ImagePreparer(ImageProcessor(), workers=0)
    a = await pooled.prepare(refs(tmp_path))
    b = await in_thread.prepare(refs(tmp_path))
    assert [im.content_hash for im in a] == [im.content_hash for im in b]
    assert [im.grid_thw for im in a] == [im.grid_thw for im in b]
    for x, y in zip(a, b, strict=True):
        assert x.pixels.dtype == np.uint8 and np.array_equal(x.pixels, y.pixels)
    # The same pixels as the processor gives for the decoded image.
    direct = ImageProcessor().prepare(noise(64, 48, 1))
    assert a[0].content_hash == direct.content_hash and a[0].num_tokens == direct.num_tokens


async def test_glm4v_9b_images_are_uint8_pixels_too() -> None:
    processor = ImageProcessor9b(ImageProcessor9bConfig(image_size=112))
    [image] = await ImagePreparer(processor).prepare([ImageRef(noise(90, 40), "x")])
    assert image.pixels.shape == (112, 112, 3) and image.pixels.dtype == np.uint8
    assert image.num_tokens == (112 // 28) ** 2 + 2
    # Normalised on any device from those pixels: what `preprocess` makes on the CPU.
    expected = processor.preprocess(noise(90, 40)).pixel_values
    assert np.array_equal(processor.to_patches(image.pixels).numpy(), expected.numpy())


async def test_the_first_bad_image_in_request_order_is_reported(pooled: ImagePreparer) -> None:
    good = ImageRef(data_url(encoded(noise(40, 40))), "images[0]")
    bad1 = ImageRef("data:image/png;base64,AAAA", "images[1]")
    bad2 = ImageRef(b"not an image at all", "images[2]")
    for preparer in (pooled, ImagePreparer(ImageProcessor())):
        with pytest.raises(InvalidImageError) as info:
            await preparer.prepare([good, bad1, bad2])
        assert info.value.param == "images[1]"
        with pytest.raises(InvalidImageError) as info:
            await preparer.prepare([good, ImageRef("ftp://x/y.png", "images[1]")])
        assert info.value.param == "images[1]" and "scheme" in info.value.message
        with pytest.raises(InvalidImageError) as info:
            await preparer.prepare([ImageRef("https://example.com/a.png", "p")])
        assert "remote image URLs are disabled" in info.value.message


async def test_request_limits(pooled: ImagePreparer) -> None:
    image = ImageRef(encoded(noise(100, 100)), "")
    many = [ImageRef(image.source, f"images[{i}]") for i in range(3)]
    limits = ImageLimits(max_images=2, max_total_pixels=15_000)
    for workers in (0, 2):
        preparer = ImagePreparer(ImageProcessor(), limits=limits, workers=workers)
        try:
            with pytest.raises(InvalidImageError) as info:
                await preparer.prepare(many)
            assert info.value.param == "images[2]" and "too many images" in info.value.message
            with pytest.raises(InvalidImageError) as info:
                await preparer.prepare(many[:2])
            assert info.value.param == "images[1]" and "together" in info.value.message
            assert len(await preparer.prepare(many[:1])) == 1
        finally:
            preparer.shutdown()


async def test_earlier_turns_images_are_counted_apart() -> None:
    """Images of earlier turns (`ImageRef.history`) do not count against max_images, and have a
    pixel budget of their own; the current turn's images keep theirs."""
    source = encoded(noise(100, 100))
    limits = ImageLimits(max_images=1, max_total_pixels=15_000)
    preparer = ImagePreparer(ImageProcessor(), limits=limits)
    history = [ImageRef(source, "h0", history=True)]
    assert len(await preparer.prepare([*history, ImageRef(source, "c0")])) == 2
    with pytest.raises(InvalidImageError) as info:
        await preparer.prepare([*history, ImageRef(source, "c0"), ImageRef(source, "c1")])
    assert info.value.param == "c1" and "too many images" in info.value.message
    with pytest.raises(InvalidImageError) as info:
        await preparer.prepare([*history, ImageRef(source, "h1", history=True), ImageRef(source, "c0")])
    assert info.value.param == "h1" and "together" in info.value.message


async def test_a_crashed_worker_fails_only_its_image(pooled: ImagePreparer) -> None:
    with pytest.raises(InvalidImageError) as info:
        await pooled.prepare([ImageRef(noise(13, 20), "images[0]")])
    assert info.value.param == "images[0]" and "crashed" in info.value.message
    # The pool is started again for the next request.
    [image] = await pooled.prepare([ImageRef(noise(14, 20), "images[0]")])
    assert image.pixels.dtype == np.uint8


OWNER = """
import asyncio, sys
from glmv.processing.image import ImageProcessor
from glmv.tasks.images import ImagePreparer, ImageRef
from PIL import Image
preparer = ImagePreparer(ImageProcessor(), workers=2)
asyncio.run(preparer.prepare([ImageRef(Image.new("RGB", (30, 30)), "x")] * 2))
print(" ".join(str(pid) for pid in preparer._pool._processes), flush=True)
sys.stdin.read()
"""


def test_workers_end_when_their_owner_is_killed() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=REPO
    )
    try:
        assert owner.stdout is not None
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert pids and all(_alive(p) for p in pids)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
