"""A page to draw a synthetic document on, and the photo-like damage applied afterwards.

`Canvas` draws in logical pixels of the final image; `scale` > 1 renders everything larger and
`finish()` scales it back down, the way a phone photo or a scan is shrunk before the model sees
it. `finish()` then applies the augmentations: a slight rotation, blur, sensor noise and JPEG
compression. Every choice comes from the `random.Random` passed in, so a seed fixes the image.
`glyphs` records where each printed character ended up (its centre in the finished image), so
training can tell the vision tower which character each image token shows.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from glmv.synth.fonts import FontFace, FontSet

__all__ = ["Augment", "Canvas", "Glyph", "Style", "ink_colour", "paper_colour"]

RGB = tuple[int, int, int]
Glyph = tuple[str, float, float]  # a printed character and its centre (x, y) in logical pixels


def paper_colour(rng: random.Random) -> RGB:
    """White to slightly tinted paper."""
    base = rng.randint(236, 255)
    return (
        min(255, base + rng.randint(-6, 4)),
        min(255, base + rng.randint(-6, 4)),
        min(255, base + rng.randint(-10, 2)),
    )


def ink_colour(rng: random.Random) -> RGB:
    """Near-black ink, sometimes dark blue or dark brown."""
    kind = rng.random()
    if kind < 0.7:
        v = rng.randint(0, 50)
        return (v, v, v)
    if kind < 0.85:
        return (rng.randint(10, 40), rng.randint(20, 50), rng.randint(80, 130))
    return (rng.randint(60, 90), rng.randint(30, 50), rng.randint(20, 40))


@dataclass(slots=True)
class Style:
    """The font and colours of one document."""

    face: FontFace
    ink: RGB
    paper: RGB
    accent: RGB


@dataclass(frozen=True, slots=True)
class Augment:
    """How strongly `Canvas.finish` damages the page (probabilities and maxima)."""

    rotate_deg: float = 1.2
    p_rotate: float = 0.4
    p_blur: float = 0.35
    blur_max: float = 0.7
    p_noise: float = 0.3
    noise_max: float = 6.0
    p_jpeg: float = 0.5
    jpeg_min: int = 55
    p_rescale: float = 0.3
    rescale_max: float = 1.6

    @staticmethod
    def none() -> Augment:
        return Augment(p_rotate=0, p_blur=0, p_noise=0, p_jpeg=0, p_rescale=0)


class Canvas:
    """A `width` x `height` page (logical pixels) drawn at `scale`."""

    def __init__(self, width: int, height: int, paper: RGB, scale: float = 1.0) -> None:
        self.width = width
        self.height = height
        self.scale = scale
        self.image = Image.new("RGB", (round(width * scale), round(height * scale)), paper)
        self.draw = ImageDraw.Draw(self.image)
        self.paper = paper
        self.glyphs: list[Glyph] = []

    def _p(self, v: float) -> int:
        return round(v * self.scale)

    def text(
        self,
        x: float,
        y: float,
        s: str,
        face: FontFace,
        size: float,
        fill: RGB,
        anchor: str = "la",
        bold: bool = False,
    ) -> float:
        """Draw `s` with its anchor at (x, y); returns the text's width in logical pixels."""
        if not s:
            return 0.0
        font = FontSet.get(face, round(size * self.scale), bold=bold)
        self.draw.text((self._p(x), self._p(y)), s, font=font, fill=fill, anchor=anchor)
        total = font.getlength(s)
        _, top, _, bottom = font.getbbox(s, anchor=anchor)
        cy = self._p(y) + (top + bottom) / 2
        left = self._p(x) - {"l": 0.0, "m": total / 2, "r": total}.get(anchor[0], 0.0)
        for i, ch in enumerate(s):
            if not ch.isspace():
                cx = left + font.getlength(s[:i]) + font.getlength(ch) / 2
                self.glyphs.append((ch, cx / self.scale, cy / self.scale))
        return total / self.scale

    def width_of(self, s: str, face: FontFace, size: float, bold: bool = False) -> float:
        return FontSet.get(face, round(size * self.scale), bold=bold).getlength(s) / self.scale

    def fit_size(self, s: str, face: FontFace, size: float, max_width: float, bold: bool = False) -> float:
        """`size`, reduced until `s` fits in `max_width`."""
        while size > 8 and self.width_of(s, face, size, bold) > max_width:
            size -= 1
        return size

    def line(self, x0: float, y0: float, x1: float, y1: float, fill: RGB, width: float = 1) -> None:
        self.draw.line(
            (self._p(x0), self._p(y0), self._p(x1), self._p(y1)), fill=fill, width=max(1, self._p(width))
        )

    def dashed(self, x0: float, y: float, x1: float, fill: RGB, dash: float = 5, gap: float = 3) -> None:
        x = x0
        while x < x1:
            self.line(x, y, min(x + dash, x1), y, fill)
            x += dash + gap

    def rect(
        self,
        x0: float,
        y0: float,
        x1: float,
        y1: float,
        outline: RGB | None = None,
        fill: RGB | None = None,
        width: float = 1,
        radius: float = 0,
    ) -> None:
        box = (self._p(x0), self._p(y0), self._p(x1), self._p(y1))
        if radius:
            self.draw.rounded_rectangle(
                box, radius=self._p(radius), outline=outline, fill=fill, width=max(1, self._p(width))
            )
        else:
            self.draw.rectangle(box, outline=outline, fill=fill, width=max(1, self._p(width)))

    def ellipse(
        self, x0: float, y0: float, x1: float, y1: float, fill: RGB | None = None, outline: RGB | None = None
    ) -> None:
        self.draw.ellipse((self._p(x0), self._p(y0), self._p(x1), self._p(y1)), fill=fill, outline=outline)

    def finish(self, rng: random.Random, augment: Augment) -> Image.Image:
        """The page at its final size with the augmentations applied (RGB)."""
        img = self.image
        size = (self.width, self.height)
        if augment.p_rotate and rng.random() < augment.p_rotate:
            angle = rng.uniform(-augment.rotate_deg, augment.rotate_deg)
            img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=self.paper)
            self.glyphs = _rotated(self.glyphs, angle, self.width / 2, self.height / 2)
        if img.size != size:
            img = img.resize(size, resample=Image.Resampling.LANCZOS)
        if augment.p_blur and rng.random() < augment.p_blur:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, augment.blur_max)))
        if augment.p_noise and rng.random() < augment.p_noise:
            arr = np.asarray(img, dtype=np.float32)
            noise = np.random.default_rng(rng.getrandbits(32)).standard_normal(arr.shape, dtype=np.float32)
            arr += noise * rng.uniform(1, augment.noise_max)
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        if augment.p_jpeg and rng.random() < augment.p_jpeg:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=rng.randint(augment.jpeg_min, 95))
            buf.seek(0)
            img = Image.open(buf).convert("RGB")
        return img

    @staticmethod
    def pick_scale(rng: random.Random, augment: Augment) -> float:
        if augment.p_rescale and rng.random() < augment.p_rescale:
            return rng.uniform(1.15, augment.rescale_max)
        return 1.0


def _rotated(glyphs: list[Glyph], degrees: float, cx: float, cy: float) -> list[Glyph]:
    """Glyph centres after Pillow's counter-clockwise `rotate(degrees)` about (cx, cy)."""
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    return [
        (ch, cx + (x - cx) * cos + (y - cy) * sin, cy - (x - cx) * sin + (y - cy) * cos)
        for ch, x, y in glyphs
    ]
