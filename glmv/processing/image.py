"""GLM-4.1V / GLM-4.6V-Flash image preprocessing.

Turns a decoded Pillow image into what the vision tower eats: `smart_resize` to multiples of
`patch_size * merge_size` (28) inside the configured pixel bounds, RGB conversion, bicubic resize
on uint8, rescale + normalise with the CLIP mean/std, and the patch layout that lets the vision
tower merge 2x2 neighbouring patches into one token.

The numbers match transformers' `Glm4vImageProcessor` (its Pillow backend, which is what it
resolves to without torchvision) to within float32 rounding, but the work is split in two so the
expensive float part can run where it is cheapest:

* `ImageProcessor.prepare` / `resize` do the Pillow part on the CPU and return uint8 pixels
  (a quarter of the bytes of float32, and a sixth of the duplicated-in-time patches), plus the
  grid and a content hash that keys the embedding cache;
* `ImageProcessor.to_patches` normalises and patchifies those pixels in one fused pass on any
  torch device, the GPU included.

`ImageProcessor.preprocess` does both on the CPU and returns the same `pixel_values` rows as
transformers.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from glmv.errors import CheckpointError, ConfigError, InvalidImageError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "PREPROCESSOR_CONFIG_NAME",
    "ImageProcessor",
    "ImageProcessorConfig",
    "ProcessedImage",
    "ResizedImage",
    "smart_resize",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# transformers' Glm4vImageProcessor class defaults (`size.shortest_edge` / `size.longest_edge`).
# The published GLM-4.1V checkpoints override the upper bound with 9633792 in their config.
DEFAULT_MIN_PIXELS = 112 * 112
DEFAULT_MAX_PIXELS = 28 * 28 * 15000
MAX_ASPECT_RATIO = 200
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

_BICUBIC = int(Image.Resampling.BICUBIC)
_VALID_RESAMPLE = {int(r) for r in Image.Resampling}


def _positive_int(name: str, value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
        or value < 1
    ):
        raise ConfigError(f"image processor setting {name!r} must be a positive integer, got {value!r}")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"image processor setting {name!r} must be true or false, got {value!r}")
    return value


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(
            f"image processor setting {name!r} must be a number or a list of 3 numbers, got {value!r}"
        )
    return (float(value[0]), float(value[1]), float(value[2]))


@dataclass(frozen=True, slots=True)
class ImageProcessorConfig:
    """The settings of `preprocessor_config.json` that glmv uses (defaults: transformers' defaults)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = _BICUBIC

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            _positive_int(name, getattr(self, name))
        if self.min_pixels > self.max_pixels:
            raise ConfigError(
                f"image processor min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})"
            )
        _triple("image_mean", self.image_mean)
        if any(s == 0 for s in _triple("image_std", self.image_std)):
            raise ConfigError(f"image processor image_std must not contain 0, got {self.image_std!r}")
        if isinstance(self.rescale_factor, bool) or not isinstance(self.rescale_factor, (int, float)):
            raise ConfigError(f"image processor rescale_factor must be a number, got {self.rescale_factor!r}")
        for name in ("do_rescale", "do_normalize", "do_convert_rgb"):
            _flag(name, getattr(self, name))
        if isinstance(self.resample, bool) or self.resample not in _VALID_RESAMPLE:
            raise ConfigError(
                f"image processor resample must be a Pillow filter number, got {self.resample!r}"
            )

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this (28 for GLM-4.1V)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one `pixel_values` row: 3 * temporal_patch_size * patch_size**2 (1176)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessorConfig:
        """Read the keys of a `preprocessor_config.json`; unknown keys are ignored.

        Pixel bounds come from `size: {shortest_edge, longest_edge}` (current transformers) or
        `size: {min_pixels, max_pixels}`; legacy top-level `min_pixels` / `max_pixels` keys, where
        present, win over `size` (as Qwen2-VL-style processors treat them).
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"image processor config must be a JSON object, got {type(d).__name__}")
        if d.get("do_resize", True) is False:
            raise ConfigError("image processor setting do_resize=false is not supported")
        kwargs: dict[str, Any] = {}
        size = d.get("size")
        if size is not None:
            if not isinstance(size, Mapping):
                raise ConfigError(f"image processor 'size' must be an object with pixel bounds, got {size!r}")
            low = size.get("shortest_edge", size.get("min_pixels"))
            high = size.get("longest_edge", size.get("max_pixels"))
            if low is not None:
                kwargs["min_pixels"] = _positive_int("size.shortest_edge", low)
            if high is not None:
                kwargs["max_pixels"] = _positive_int("size.longest_edge", high)
        for name in (
            "min_pixels",
            "max_pixels",
            "patch_size",
            "temporal_patch_size",
            "merge_size",
            "resample",
        ):
            if d.get(name) is not None:
                kwargs[name] = _positive_int(name, d[name]) if name != "resample" else d[name]
        for name in ("image_mean", "image_std"):
            if d.get(name) is not None:
                kwargs[name] = _triple(name, d[name])
        for name in ("do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(name) is not None:
                kwargs[name] = _flag(name, d[name])
        if d.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = d["rescale_factor"]
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImageProcessorConfig:
        """Read `preprocessor_config.json` from a checkpoint directory (or that file's own path)."""
        path = Path(path)
        file = path / PREPROCESSOR_CONFIG_NAME if path.is_dir() else path
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise CheckpointError(f"cannot read image processor config {file}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"image processor config {file} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise CheckpointError(f"{file}: {exc.message}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The settings in `preprocessor_config.json` form (current `size` key style)."""
        return {
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "do_convert_rgb": self.do_convert_rgb,
            "resample": self.resample,
        }

    def cache_key(self) -> str:
        """A string of every setting that changes `pixel_values`; part of each image's content hash."""
        return (
            f"glm4v-image-v1;p={self.patch_size};t={self.temporal_patch_size};m={self.merge_size};"
            f"min={self.min_pixels};max={self.max_pixels};mean={self.image_mean!r};std={self.image_std!r};"
            f"rescale={int(self.do_rescale)}:{self.rescale_factor!r};norm={int(self.do_normalize)};"
            f"rgb={int(self.do_convert_rgb)};resample={self.resample}"
        )


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    temporal_factor: int = 2,
    num_frames: int | None = None,
) -> tuple[int, int]:
    """The (height, width) an image of `height` x `width` is resized to, as transformers' glm4v does.

    Both sides become multiples of `factor` close to the original aspect ratio, with
    `num_frames * h * w` inside [`min_pixels`, `max_pixels`]: the pixel bounds count the temporal
    factor, because a still image is fed as `temporal_factor` identical frames (`num_frames`
    defaults to `temporal_factor`). So with the defaults an image holds at most
    `max_pixels / 2` pixels after resizing.

    Images with a side shorter than `factor` are scaled up first so that side reaches `factor`
    (current transformers does this; older versions raised). A 1x1 image therefore becomes 84x84
    with the default bounds, exactly as in transformers. An aspect ratio above 200 (after that
    upscale) is refused with `InvalidImageError`, as transformers refuses it.
    """
    if num_frames is None:
        num_frames = temporal_factor
    if num_frames < temporal_factor:
        raise ValueError(f"num_frames ({num_frames}) must be at least temporal_factor ({temporal_factor})")
    if height < 1 or width < 1:
        raise InvalidImageError(f"image has no pixels ({width}x{height})")
    # The float operations below mirror transformers step for step so the rounding agrees.
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidImageError(
            f"image aspect ratio must be at most {MAX_ASPECT_RATIO}:1, got {max(height, width) / min(height, width):g}:1"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(slots=True)
class ResizedImage:
    """An image after resize, before normalisation: what the engine ships to the device."""

    pixels: np.ndarray  # (H, W, 3) uint8, C-contiguous; H and W are multiples of patch_size * merge_size
    grid_thw: tuple[int, int, int]  # (1, H / patch_size, W / patch_size)
    content_hash: str
    merge_size: int = 2

    @property
    def num_tokens(self) -> int:
        """Image tokens in the prompt for this image (`<|image|>` copies)."""
        t, h, w = self.grid_thw
        return t * h * w // (self.merge_size * self.merge_size)


@dataclass(slots=True)
class ProcessedImage:
    """One image as the vision tower takes it; `pixel_values` equals transformers' rows for it."""

    pixel_values: torch.Tensor  # float32 (grid_t * grid_h * grid_w, 3 * temporal_patch * patch * patch)
    grid_thw: tuple[int, int, int]
    content_hash: str
    merge_size: int = 2

    @property
    def num_tokens(self) -> int:
        """Image tokens in the prompt for this image (`<|image|>` copies)."""
        t, h, w = self.grid_thw
        return t * h * w // (self.merge_size * self.merge_size)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way transformers' `convert_to_rgb` makes it: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image  # convert("RGB") would only copy it
    return image.convert("RGB")


class ImageProcessor:
    """Resizes, normalises and patchifies images for GLM-4.1V-style vision towers."""

    __slots__ = ("_cache_key", "_config", "_constants")

    def __init__(self, config: ImageProcessorConfig | None = None) -> None:
        self._config = config if config is not None else ImageProcessorConfig()
        self._cache_key = self._config.cache_key()
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImageProcessor:
        return cls(ImageProcessorConfig.from_pretrained(path))

    @property
    def config(self) -> ImageProcessorConfig:
        return self._config

    # --- sizes --------------------------------------------------------------------------------

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after `smart_resize` under this processor's settings."""
        c = self._config
        return smart_resize(
            height,
            width,
            factor=c.factor,
            min_pixels=c.min_pixels,
            max_pixels=c.max_pixels,
            temporal_factor=c.temporal_patch_size,
        )

    def grid_thw(self, height: int, width: int) -> tuple[int, int, int]:
        """The patch grid (t, h, w) of an image of the given original size."""
        h, w = self.target_size(height, width)
        return (1, h // self._config.patch_size, w // self._config.patch_size)

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens an image of the given original size takes in the prompt."""
        t, h, w = self.grid_thw(height, width)
        return t * h * w // (self._config.merge_size**2)

    # --- CPU part: Pillow ---------------------------------------------------------------------

    def resize(self, image: Image.Image) -> np.ndarray:
        """RGB-convert and resize `image`; returns (H, W, 3) uint8 with H, W multiples of the factor."""
        try:
            if self._config.do_convert_rgb:
                rgb = _to_rgb(image)
            elif image.mode == "RGB":
                rgb = image
            else:
                raise InvalidImageError(
                    f"image mode {image.mode!r} is not RGB and RGB conversion is turned off (do_convert_rgb)"
                )
            width, height = rgb.size
            th, tw = self.target_size(height, width)
            if (tw, th) != (width, height):
                rgb = rgb.resize((tw, th), resample=self._config.resample)
            # np.array (not asarray) so the pixels are writable and torch.from_numpy takes them as is.
            pixels = np.array(rgb, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidImageError(f"cannot process image: {exc}") from exc
        if pixels.shape != (th, tw, 3):  # pragma: no cover - defensive, Pillow always gives this
            raise InvalidImageError(f"unexpected decoded image shape {pixels.shape}")
        return pixels

    def content_hash(self, pixels: np.ndarray) -> str:
        """sha256 over the settings, the shape and the resized uint8 pixels."""
        pixels = np.ascontiguousarray(pixels)
        digest = hashlib.sha256()
        digest.update(self._cache_key.encode())
        digest.update(f"|{pixels.shape[0]}x{pixels.shape[1]}x{pixels.shape[2]}|".encode())
        digest.update(memoryview(pixels).cast("B"))
        return digest.hexdigest()

    def prepare(self, image: Image.Image) -> ResizedImage:
        """The CPU part only: resized uint8 pixels, their grid and their content hash."""
        return self._resized(self.resize(image))

    def _resized(self, pixels: np.ndarray) -> ResizedImage:
        c = self._config
        h, w = self._check_pixels(pixels)
        return ResizedImage(
            pixels=pixels,
            grid_thw=(1, h // c.patch_size, w // c.patch_size),
            content_hash=self.content_hash(pixels),
            merge_size=c.merge_size,
        )

    def _check_pixels(self, pixels: np.ndarray | torch.Tensor) -> tuple[int, int]:
        factor = self._config.factor
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"pixels must have shape (H, W, 3), got {tuple(pixels.shape)}")
        uint8 = torch.uint8 if isinstance(pixels, torch.Tensor) else np.uint8
        if pixels.dtype != uint8:
            raise ValueError(f"pixels must be uint8, got {pixels.dtype}")
        h, w = int(pixels.shape[0]), int(pixels.shape[1])
        if h < factor or w < factor or h % factor or w % factor:
            raise ValueError(f"pixel height and width must be positive multiples of {factor}, got {h}x{w}")
        return h, w

    # --- float part: torch, any device --------------------------------------------------------

    def _scale_bias(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._constants.get(device)
        if cached is None:
            c = self._config
            std = np.asarray(c.image_std, dtype=np.float64) if c.do_normalize else np.ones(3)
            mean = np.asarray(c.image_mean, dtype=np.float64) if c.do_normalize else np.zeros(3)
            rescale = float(c.rescale_factor) if c.do_rescale else 1.0
            # ((u * rescale) - mean) / std == u * scale + bias, shaped to broadcast over (C, p, p)
            scale = torch.tensor(rescale / std, dtype=torch.float32, device=device).view(3, 1, 1)
            bias = torch.tensor(-mean / std, dtype=torch.float32, device=device).view(3, 1, 1)
            cached = self._constants[device] = (scale, bias)
        return cached

    def to_patches(
        self,
        pixels: torch.Tensor | np.ndarray,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Normalise and patchify resized uint8 (H, W, 3) pixels into `pixel_values` rows.

        Moves the uint8 pixels to `device` first (4x fewer bytes than float32), then computes
        `u * scale + bias` straight into the patch layout in one pass and duplicates it over the
        temporal patch. Rows are ordered (h/m, w/m, m, m) so each 2x2 merge group is contiguous;
        each row is (channel, time, patch row, patch column), as in transformers.
        """
        c = self._config
        h, w = self._check_pixels(pixels)
        t = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
        if device is not None:
            t = t.to(device, non_blocking=True)
        p, m, tp = c.patch_size, c.merge_size, c.temporal_patch_size
        gh, gw = h // p, w // p
        # (H, W, C) -> (gh/m, m, p, gw/m, m, p, C) -> (gh/m, gw/m, m, m, C, p, p): a strided view
        grouped = t.reshape(gh // m, m, p, gw // m, m, p, 3).permute(0, 3, 1, 4, 6, 2, 5)
        out = torch.empty((gh // m, gw // m, m, m, 3, tp, p, p), dtype=torch.float32, device=t.device)
        scale, bias = self._scale_bias(t.device)
        first = out[:, :, :, :, :, 0]
        torch.addcmul(bias, grouped, scale, out=first)
        if tp > 1:
            out[:, :, :, :, :, 1:].copy_(first.unsqueeze(5).expand(-1, -1, -1, -1, -1, tp - 1, -1, -1))
        rows = out.view(gh * gw, 3 * tp * p * p)
        return rows if dtype == torch.float32 else rows.to(dtype)

    def patch_bytes(self, pixels: np.ndarray) -> np.ndarray:
        """The uint8 (patches, 3, p, p) of resized (H, W, 3) pixels, in `to_patches`' row order.

        For batching many images: concatenate their patch bytes, move them to the device once and
        call `normalise_patches` once, instead of one `to_patches` (one copy, four kernels) per image.
        """
        c = self._config
        h, w = self._check_pixels(pixels)
        p, m = c.patch_size, c.merge_size
        gh, gw = h // p, w // p
        grouped = pixels.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
        return np.ascontiguousarray(grouped).reshape(gh * gw, 3, p, p)

    def normalise_patches(self, patches: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`pixel_values` rows from uint8 (patches, 3, p, p) (see `patch_bytes`), on their device."""
        c = self._config
        tp = c.temporal_patch_size
        n, _, p, _ = patches.shape
        out = torch.empty((n, 3, tp, p, p), dtype=torch.float32, device=patches.device)
        scale, bias = self._scale_bias(patches.device)
        first = out[:, :, 0]
        torch.addcmul(bias, patches, scale, out=first)
        if tp > 1:
            out[:, :, 1:].copy_(first.unsqueeze(2).expand(-1, -1, tp - 1, -1, -1))
        rows = out.view(n, 3 * tp * p * p)
        return rows if dtype == torch.float32 else rows.to(dtype)

    # --- both ---------------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> ProcessedImage:
        """Resize, normalise and patchify one image on the CPU."""
        return self.preprocess_uint8(self.resize(image))

    def preprocess_uint8(self, pixels: np.ndarray) -> ProcessedImage:
        """Normalise and patchify already-resized (H, W, 3) uint8 pixels on the CPU."""
        resized = self._resized(pixels)
        return ProcessedImage(
            pixel_values=self.to_patches(resized.pixels),
            grid_thw=resized.grid_thw,
            content_hash=resized.content_hash,
            merge_size=resized.merge_size,
        )
