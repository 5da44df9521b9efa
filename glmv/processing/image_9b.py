"""Image preprocessing for GLM-4v-9b: one fixed square input (1120×1120 in the release).

The original squashes every image to ``image_size`` × ``image_size`` (bicubic, aspect ratio not
kept), scales to [0, 1] and normalises with the CLIP mean/std. That is the default here
(``resize_mode="squash"``) and matches the checkpoint's own preprocessing.

``resize_mode="letterbox"`` is glmv's opt-in for long screenshots and receipts: the image is scaled
(bicubic) to fit inside the square with its aspect ratio kept, centred, and the rest filled with
the CLIP mean colour (which normalises to zero). Text keeps its shape, at the cost of fewer
pixels for the content. Turn it on with ``"resize_mode": "letterbox"`` in the checkpoint's
``preprocessor_config.json`` (the original ships none; ``image_size`` comes from
``config.json``'s ``vision_config``).

Transparent images are composited onto white first. `prepare` does the CPU part only (resized
uint8 pixels, ``ResizedImage9b``: what travels to the engine) and `to_patches` normalises those
pixels on any device; `preprocess` does both on the CPU. Every image becomes one
``ProcessedImage9b`` with ``pixel_values`` of shape ``[1, 3, S, S]`` (float32), its patch grid
``(1, S/14, S/14)``, a content hash over the settings and the resized pixels (the key of the
prefix and image-embedding caches), and ``num_tokens`` = its span in the prompt
(``(S/28)² + 2``: the merged patches plus the begin/end-of-image vectors).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from glmv.errors import CheckpointError, InvalidImageError

__all__ = ["RESIZE_MODES", "ImageProcessor9b", "ImageProcessor9bConfig", "ProcessedImage9b", "ResizedImage9b"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("squash", "letterbox")


@dataclass(frozen=True, slots=True)
class ImageProcessor9bConfig:
    image_size: int = 1120
    patch_size: int = 14
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resize_mode: str = "squash"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise CheckpointError(
                f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}"
            )
        if (
            self.patch_size < 1
            or self.image_size < 2 * self.patch_size
            or self.image_size % (2 * self.patch_size)
        ):
            raise CheckpointError(
                f"image_size {self.image_size} must be a positive multiple of 2 × patch_size ({self.patch_size})"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Prompt positions of one image: merged 2×2 patches plus begin/end-of-image."""
        return (self.grid // 2) ** 2 + 2

    def cache_key(self) -> str:
        """Every setting that changes `pixel_values`; part of each image's content hash."""
        return (
            f"glm4v-9b-image-v1;size={self.image_size};p={self.patch_size};mode={self.resize_mode};"
            f"mean={self.image_mean!r};std={self.image_std!r};bicubic"
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> ImageProcessor9bConfig:
        """`image_size`/`patch_size` from ``config.json`` ``vision_config``; ``resize_mode`` (and
        mean/std) from an optional ``preprocessor_config.json``; keyword overrides win."""
        path = Path(path)
        values: dict[str, Any] = {}
        config = _read_json(path / "config.json")
        vision = (config or {}).get("vision_config")
        if isinstance(vision, dict):
            for key in ("image_size", "patch_size"):
                if isinstance(vision.get(key), int):
                    values[key] = vision[key]
        extra = _read_json(path / "preprocessor_config.json") or {}
        if isinstance(extra.get("resize_mode"), str):
            values["resize_mode"] = extra["resize_mode"]
        for key in ("image_mean", "image_std"):
            value = extra.get(key)
            if (
                isinstance(value, list)
                and len(value) == 3
                and all(isinstance(v, (int, float)) for v in value)
            ):
                values[key] = tuple(float(v) for v in value)
        values.update(overrides)
        return cls(**values)


def _read_json(file: Path) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}", param=file.name) from exc
    return data if isinstance(data, dict) else None


@dataclass(slots=True)
class ProcessedImage9b:
    """One image as GLM-4v-9b's vision tower takes it."""

    pixel_values: torch.Tensor  # float32 [1, 3, S, S], normalised
    grid_thw: tuple[int, int, int]  # (1, S / patch, S / patch)
    content_hash: str

    @property
    def num_tokens(self) -> int:
        """Positions of this image's span in the prompt (merged patches + begin/end-of-image)."""
        _, h, w = self.grid_thw
        return (h // 2) * (w // 2) + 2


@dataclass(slots=True)
class ResizedImage9b:
    """One image after resize, before normalisation: what the engine ships to its device."""

    pixels: np.ndarray  # (S, S, 3) uint8
    grid_thw: tuple[int, int, int]  # (1, S / patch, S / patch)
    content_hash: str

    @property
    def num_tokens(self) -> int:
        """Positions of this image's span in the prompt (merged patches + begin/end-of-image)."""
        _, h, w = self.grid_thw
        return (h // 2) * (w // 2) + 2


def _to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


class ImageProcessor9b:
    """Resize (squash or letterbox), normalise, hash; see the module docstring."""

    def __init__(self, config: ImageProcessor9bConfig | None = None) -> None:
        self._config = config if config is not None else ImageProcessor9bConfig()
        self._key = self._config.cache_key()
        c = self._config
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in c.image_std], dtype=torch.float32).view(
            3, 1, 1
        )
        self._bias = torch.tensor([-m / s for m, s in zip(c.image_mean, c.image_std, strict=True)]).view(
            3, 1, 1
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> ImageProcessor9b:
        return cls(ImageProcessor9bConfig.from_pretrained(path, **overrides))

    @property
    def config(self) -> ImageProcessor9bConfig:
        return self._config

    def resize(self, image: Image.Image) -> np.ndarray:
        """RGB (S, S, 3) uint8 pixels after the configured resize."""
        size = self._config.image_size
        try:
            rgb = _to_rgb(image)
            width, height = rgb.size
            if width < 1 or height < 1:
                raise InvalidImageError(f"image has no pixels ({width}x{height})")
            if self._config.resize_mode == "squash":
                out = (
                    rgb
                    if (width, height) == (size, size)
                    else rgb.resize((size, size), Image.Resampling.BICUBIC)
                )
            else:
                scale = min(size / width, size / height)
                new_w = min(size, max(1, round(width * scale)))
                new_h = min(size, max(1, round(height * scale)))
                inner = (
                    rgb
                    if (new_w, new_h) == (width, height)
                    else rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
                )
                fill = tuple(round(m * 255) for m in self._config.image_mean)
                out = Image.new("RGB", (size, size), fill)  # type: ignore[arg-type]
                out.paste(inner, ((size - new_w) // 2, (size - new_h) // 2))
            pixels = np.array(out, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidImageError(f"cannot process image: {exc}") from exc
        return pixels

    def content_hash(self, pixels: np.ndarray) -> str:
        digest = hashlib.sha256()
        digest.update(self._key.encode())
        digest.update(f"|{pixels.shape[0]}x{pixels.shape[1]}x{pixels.shape[2]}|".encode())
        digest.update(memoryview(np.ascontiguousarray(pixels)).cast("B"))
        return digest.hexdigest()

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """(S, S, 3) uint8 → float32 [1, 3, S, S]: ``(u / 255 - mean) / std``."""
        t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float()
        return torch.addcmul(self._bias, t, self._scale).unsqueeze(0).contiguous()

    def prepare(self, image: Image.Image) -> ResizedImage9b:
        """The CPU part only: resized uint8 pixels, their grid and their content hash."""
        pixels = self.resize(image)
        grid = self._config.grid
        return ResizedImage9b(pixels=pixels, grid_thw=(1, grid, grid), content_hash=self.content_hash(pixels))

    def to_patches(
        self,
        pixels: np.ndarray | torch.Tensor,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Resized (S, S, 3) uint8 pixels → normalised ``[1, 3, S, S]`` on `device` (the uint8
        pixels move first: 4x fewer bytes than float32)."""
        t = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
        if device is not None:
            t = t.to(device, non_blocking=True)
        scale, bias = self._scale.to(t.device), self._bias.to(t.device)
        out = torch.addcmul(bias, t.permute(2, 0, 1).float(), scale).unsqueeze(0).contiguous()
        return out if dtype == torch.float32 else out.to(dtype)

    def preprocess(self, image: Image.Image) -> ProcessedImage9b:
        pixels = self.resize(image)
        grid = self._config.grid
        return ProcessedImage9b(
            pixel_values=self.normalize(pixels),
            grid_thw=(1, grid, grid),
            content_hash=self.content_hash(pixels),
        )
