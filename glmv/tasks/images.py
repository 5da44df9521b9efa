"""A request's images, decoded and resized off the event loop.

An image arrives as an `ImageRef`: its source (a `data:` or http(s) URL, encoded bytes, a local
file, or an already decoded PIL image) and the request field that named it (`param`, used in
every error). `ImagePreparer.prepare(refs)` turns a request's refs into resized images
(`PreparedImage`: uint8 pixels, patch grid, content hash), all images of a request at once:

* remote URLs are fetched on the event loop (async, under the remote-image policy);
* decoding (base64, JPEG/PNG/...) and resizing, the CPU-heavy part, run in a pool of worker
  processes (`workers` > 0; they hold the checkpoint's image processor from their start), or in a
  worker thread of this process (`workers` = 0, for tests and debugging). Never on the event loop
  and never in the engine core;
* the results are checked in request order against the per-request limits (number of images,
  pixels together), so the error a request gets names the same image whichever finished first.
  Images of earlier turns that a conversation sends again (`ImageRef.history`, see
  `glmv.tasks.history`) are counted apart from the current turn's: the front end already bounded
  their number, and they get a pixel budget of their own of the same size.

A worker process that dies (a decoder crash) fails only the images it held; the pool is started
again for the next request.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import select
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from glmv.errors import GlmvError, InvalidImageError
from glmv.processing import host_memory
from glmv.processing.media import (
    ImageBudget,
    ImageLimits,
    RemoteImagePolicy,
    decode_data_url,
    fetch_image_data,
    load_image,
)
from glmv.tasks.inputs import PreparedImage

__all__ = ["ImagePreparer", "ImageRef", "ImageSource", "decode_and_prepare"]

log = logging.getLogger("glmv.tasks.images")

ImageSource = str | bytes | Path | Image.Image


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image of a request and the request field that named it (for errors). `history`:
    an image of an earlier turn, sent again with the conversation."""

    source: ImageSource
    param: str = "image"
    history: bool = False


@dataclass(slots=True)
class _Decoded:
    image: PreparedImage
    pixels: int  # width x height of the decoded original (the per-request pixel budget)


# --- the work itself (a worker process or thread) ---------------------------------------------------

_WORKER_PROCESSOR: Any = None


def _init_worker(processor: Any, parent_pid: int) -> None:
    """Worker-process start: keep the checkpoint's image processor for every task, and end this
    process when the one that owns the pool dies (a pool worker waits on its task queue forever
    otherwise: it holds both ends of it)."""
    global _WORKER_PROCESSOR
    _WORKER_PROCESSOR = processor
    host_memory.retain_freed_memory()  # each image's buffers reuse the previous image's pages
    threading.Thread(target=_exit_with, args=(parent_pid,), name="glmv-parent-watch", daemon=True).start()


def _exit_with(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)  # Linux: readable once the process has ended
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
        os._exit(0)
    while True:  # elsewhere: look every second
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass
        time.sleep(1.0)


def _ready() -> bool:
    return _WORKER_PROCESSOR is not None


def decode_and_prepare(
    source: ImageSource, param: str, limits: ImageLimits, processor: Any = None
) -> _Decoded:
    """Decode `source` (a `data:` URL, encoded bytes, a local file or a PIL image) under `limits`
    and resize it with `processor` (the worker's own when None)."""
    processor = processor if processor is not None else _WORKER_PROCESSOR
    opened = True
    if isinstance(source, Image.Image):
        image, opened = source, False
    elif isinstance(source, Path):
        image = _open_file(source, param)  # the offline API's own files: trusted, no size limits
    elif isinstance(source, str):
        image = load_image(decode_data_url(source, param=param, limits=limits), param=param, limits=limits)
    else:
        image = load_image(source, param=param, limits=limits)
    try:
        width, height = image.size
        prepared = processor.prepare(image)
    except InvalidImageError as exc:
        exc.param = exc.param or param
        raise
    finally:
        if opened:
            image.close()
    return _Decoded(prepared, width * height)


def _open_file(path: Path, param: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise InvalidImageError(f"{path} does not exist", param=param) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{path} is not a readable image: {exc}", param=param) from None


# --- the preparer (event loop side) ------------------------------------------------------------------


class ImagePreparer:
    """Decodes and resizes images for one checkpoint's image processor; see the module docstring."""

    def __init__(
        self,
        processor: Any,
        *,
        limits: ImageLimits | None = None,
        remote: RemoteImagePolicy | None = None,
        workers: int = 0,
    ) -> None:
        self.processor = processor
        self.limits = limits if limits is not None else ImageLimits()
        self.remote = remote if remote is not None else RemoteImagePolicy()
        self.workers = max(0, int(workers))
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()  # the pool is made by the first of two threads
        self._closed = False

    # --- the process pool -----------------------------------------------------------------------

    def _executor(self) -> Executor | None:
        if self.workers == 0:
            return None
        with self._pool_lock:
            if self._closed:
                raise GlmvError("the image pool is shut down")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=_pool_context(),
                    initializer=_init_worker,
                    initargs=(self.processor, os.getpid()),
                )
            return self._pool

    def start(self) -> None:
        """Start the worker processes now, in the background (the first one imports the image
        code, seconds on a busy machine), rather than on the first image."""
        if self.workers == 0:
            return

        def warm_up() -> None:
            try:
                pool = self._executor()
                if pool is not None:
                    for _ in range(self.workers):
                        pool.submit(_ready)
            except Exception as exc:  # the first request will try again and report it
                log.warning("could not start the image workers: %s", exc)

        threading.Thread(target=warm_up, name="glmv-image-pool-start", daemon=True).start()

    def shutdown(self) -> None:
        with self._pool_lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # --- one request ----------------------------------------------------------------------------

    async def prepare(self, refs: Sequence[ImageRef]) -> list[PreparedImage]:
        """The resized images of one request, in order; raises the first failure in request order."""
        if not refs:
            return []
        budget = ImageBudget(self.limits)
        # Earlier turns' images: their number is bounded by whoever kept them (not max_images).
        history_budget = ImageBudget(replace(self.limits, max_images=len(refs)))
        for ref in refs:
            (history_budget if ref.history else budget).add_image(param=ref.param)
        tasks = [asyncio.ensure_future(self.prepare_one(ref)) for ref in refs]
        try:
            await asyncio.wait(tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        out: list[PreparedImage] = []
        for ref, task in zip(refs, tasks, strict=True):
            decoded = task.result()  # the first failure in request order
            (history_budget if ref.history else budget).add_pixels(decoded.pixels, param=ref.param)
            out.append(decoded.image)
        return out

    async def prepare_one(self, ref: ImageRef) -> _Decoded:
        source: ImageSource = ref.source
        if isinstance(source, str):
            source = await self._fetch(source.strip(), ref.param)
        return await self._decode(source, ref.param)

    async def _fetch(self, url: str, param: str) -> str | bytes:
        """A `data:` URL as it is (the worker decodes its base64); anything else through
        `fetch_image_data` (an http(s) URL is fetched on the event loop; errors for the rest)."""
        if url[:5].lower() == "data:":
            return url
        return await fetch_image_data(url, param=param, limits=self.limits, remote=self.remote)

    async def _decode(self, source: ImageSource, param: str) -> _Decoded:
        pool = self._executor()
        if pool is None:
            return await asyncio.to_thread(decode_and_prepare, source, param, self.limits, self.processor)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, decode_and_prepare, source, param, self.limits)
        except BrokenProcessPool:
            # A decoder crashed its process (and with it the pool): start a fresh pool next time.
            with self._pool_lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            log.error("an image worker process died while decoding %s", param)
            raise InvalidImageError("image could not be decoded: the decoder crashed", param=param) from None


def _pool_context() -> Any:
    """Workers start from a clean fork server (this process runs threads: the engine, uvicorn),
    which has imported the decoding modules once; spawn where there is no fork server."""
    if sys.platform == "win32":  # pragma: no cover - no fork server on Windows
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["glmv.tasks.images"])
    return ctx
