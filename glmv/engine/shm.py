"""Image arrays from the API process to an engine core through POSIX shared memory.

`pack_images` copies the arrays of one request's images into one fresh segment and describes
where each lies (`ImageMeta`); only that description travels in the `AddRequest` message.
`unpack_images` (in the core) copies them out into the core's own arrays and closes its mapping.

Ownership: the API process creates every segment and is the only one to unlink it: when the core
reports the request's images copied (`CoreOutputs.consumed`), when that core dies, or at shutdown.
The core never unlinks. Python's resource tracker is shared by the API process and the cores it
spawned and keeps a *set* of names, so the core's attach (which registers the name again on
Python < 3.13) adds nothing, and the API process's single unlink removes the entry: no
"leaked shared_memory" warnings and no double unlink. If the API process is killed, the tracker
unlinks whatever it still holds.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any

import numpy as np

from glmv.engine.messages import ImageMeta

if TYPE_CHECKING:
    from glmv.engine.request import ImageInput

SEGMENT_PREFIX = "glmv-"
_counter = itertools.count()


def segment_name() -> str:
    """A unique name that says whose segment it is (`glmv-<pid>-<n>-<random>`)."""
    return f"{SEGMENT_PREFIX}{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"


def _array(image: ImageInput) -> tuple[str, str, np.ndarray | None]:
    """(kind, dtype name, array) of what the image carries."""
    if image.pixels is not None:
        arr = np.ascontiguousarray(image.pixels)
        return "pixels", arr.dtype.name, arr
    values: Any = image.pixel_values
    if values is None:
        return "none", "", None
    if isinstance(values, np.ndarray):
        return "values", values.dtype.name, np.ascontiguousarray(values)
    values = values.detach().cpu().contiguous()
    if str(values.dtype) == "torch.bfloat16":  # numpy has no bfloat16: send the bits
        import torch

        return "values", "bfloat16", values.view(torch.int16).numpy()
    return "values", str(values.dtype).removeprefix("torch."), values.numpy()


def pack_images(images: list[ImageInput]) -> tuple[shared_memory.SharedMemory | None, list[ImageMeta]]:
    """One segment holding every image array of a request (None when there is nothing to send).
    The segment's mapping is closed here; the caller unlinks it later (`release`)."""
    parts = [_array(im) for im in images]
    total = sum(arr.nbytes for _, _, arr in parts if arr is not None)
    shm = shared_memory.SharedMemory(name=segment_name(), create=True, size=total) if total else None
    metas: list[ImageMeta] = []
    start = 0
    for image, (kind, dtype, arr) in zip(images, parts, strict=True):
        nbytes = arr.nbytes if arr is not None else 0
        if arr is not None and shm is not None:
            write_at(shm, start, arr)
        metas.append(
            ImageMeta(
                offset=image.offset,
                length=image.length,
                content_hash=image.content_hash,
                grid_thw=tuple(image.grid_thw),  # type: ignore[arg-type]
                kind=kind,
                dtype=dtype,
                shape=list(arr.shape) if arr is not None else [],
                start=start,
                nbytes=nbytes,
            )
        )
        start += nbytes
    if shm is not None:
        shm.close()
    return shm, metas


def write_at(shm: shared_memory.SharedMemory, start: int, arr: np.ndarray) -> None:
    """Copy a C-contiguous array into `shm` at byte `start`: with pwrite(2) on the segment's
    descriptor where it has one (1.4 ms for 3.7 MB on a 2-core machine, against 3.3 ms through
    the fresh mapping, whose every page faults), else through the mapping."""
    fd = getattr(shm, "_fd", -1)
    if fd >= 0 and hasattr(os, "pwrite"):
        data = memoryview(arr).cast("B")
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], start + done)
        return
    dst: np.ndarray = np.ndarray(arr.shape, dtype=arr.dtype, buffer=shm.buf, offset=start)
    dst[...] = arr
    del dst  # a live view would keep the mapping from closing


def release(shm: shared_memory.SharedMemory) -> None:
    """Unlink a segment made by `pack_images` (once; a missing segment is fine)."""
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()


def unpack_images(name: str | None, metas: list[ImageMeta]) -> list[ImageInput]:
    """The core's own copies of a request's images (torch is imported here, in the core)."""
    import torch

    from glmv.engine.request import ImageInput

    shm = shared_memory.SharedMemory(name=name) if name is not None else None
    try:
        images = []
        for meta in metas:
            pixels = values = None
            if meta.kind != "none" and shm is not None:
                dtype = np.int16 if meta.dtype == "bfloat16" else np.dtype(meta.dtype)
                view: np.ndarray = np.ndarray(
                    tuple(meta.shape), dtype=dtype, buffer=shm.buf, offset=meta.start
                )
                arr = view.copy()
                del view
                if meta.kind == "pixels":
                    pixels = arr
                else:
                    values = torch.from_numpy(arr)
                    if meta.dtype == "bfloat16":
                        values = values.view(torch.bfloat16)
            images.append(
                ImageInput(
                    offset=meta.offset,
                    length=meta.length,
                    content_hash=meta.content_hash,
                    grid_thw=tuple(meta.grid_thw),  # type: ignore[arg-type]
                    pixel_values=values,
                    pixels=pixels,
                )
            )
        return images
    finally:
        if shm is not None:
            shm.close()
