"""Tests for glmv.processing.media: data URLs, safe decoding, and the SSRF-guarded remote fetch.

No traffic leaves loopback: remote fetches either go through an httpx.MockTransport or to a
server started on 127.0.0.1 inside the test, with names resolved by an injected resolver.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import shutil
import socket
import ssl
import struct
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile

from glmv.errors import ConfigError, InvalidImageError
from glmv.processing import media
from glmv.processing.media import (
    ImageBudget,
    ImageLimits,
    RemoteImagePolicy,
    decode_data_url,
    fetch_remote_image,
    load_image,
    resolve_image,
)

PARAM = "messages[2].content[1].image_url"
LIMITS = ImageLimits()


# --- helpers ---------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def png_chunk(tag: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, scanlines: bytes) -> bytes:
    """A PNG written by hand (filter byte 0 must already prefix every scanline)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(scanlines))
        + png_chunk(b"IEND", b"")
    )


def bilevel_png(width: int, height: int) -> bytes:
    """A real all-black 1-bit PNG; huge sizes stay small on disk (a decompression bomb)."""
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(6)
    rows_per_block = 1000
    parts = [compressor.compress(row * rows_per_block) for _ in range(height // rows_per_block)]
    parts.append(compressor.compress(row * (height % rows_per_block)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", b"".join(parts))
        + png_chunk(b"IEND", b"")
    )


def small_png(colour: tuple[int, int, int] = (10, 200, 30), size: tuple[int, int] = (4, 3)) -> bytes:
    return encode(Image.new("RGB", size, colour))


def reject(call: Callable[[], object], *fragments: str) -> InvalidImageError:
    with pytest.raises(InvalidImageError) as info:
        call()
    error = info.value
    assert error.param == PARAM
    assert error.status_code == 400
    assert error.code == "invalid_image"
    for fragment in fragments:
        assert fragment in error.message, error.message
    return error


async def areject(awaitable: object, *fragments: str) -> InvalidImageError:
    with pytest.raises(InvalidImageError) as info:
        await awaitable  # type: ignore[misc]
    error = info.value
    assert error.param == PARAM
    assert error.status_code == 400
    for fragment in fragments:
        assert fragment in error.message, error.message
    return error


# --- limits ----------------------------------------------------------------------------------


def test_limits_defaults_and_normalisation() -> None:
    limits = ImageLimits()
    assert limits.max_image_bytes == 20 * 1024 * 1024
    assert limits.max_pixels == 40_000_000
    assert limits.min_side == 1
    assert limits.max_images == 8
    assert limits.allowed_formats == ("PNG", "JPEG", "WEBP", "GIF")
    assert ImageLimits(allowed_formats=["png", "jpg", "PNG"]).allowed_formats == ("PNG", "JPEG")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_pixels": 0},
        {"min_side": 0},
        {"max_image_bytes": -1},
        {"max_images": -1},
        {"allowed_formats": ()},
        {"allowed_formats": ("NOSUCHFORMAT",)},
        {"allowed_formats": "PNG"},
    ],
)
def test_limits_reject_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ImageLimits(**kwargs)  # type: ignore[arg-type]


# --- data URLs -------------------------------------------------------------------------------


def test_data_url_round_trip() -> None:
    png = small_png()
    assert decode_data_url(data_url(png), param=PARAM, limits=LIMITS) == png


@pytest.mark.parametrize(
    "make",
    [
        lambda b64: f"data:;base64,{b64}",
        lambda b64: f"data:base64;base64,{b64}".replace("data:base64;", "data:"),
        lambda b64: f"DATA:IMAGE/PNG;BASE64,{b64}",
        lambda b64: f"data:image/png;charset=utf-8;base64,{b64}",
        lambda b64: f"data:application/octet-stream;base64,{b64}",
        lambda b64: "data:image/png;base64," + "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),
        lambda b64: f"data:image/png;base64,  {b64[:10]} \t {b64[10:]}\r\n",
        lambda b64: f"data:image/png;base64,{b64.rstrip('=')}",
        lambda b64: (
            "data:image/png;base64," + b64.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
        ),
        lambda b64: "data:image/jpeg;base64," + b64,  # a wrong image subtype: the bytes decide
    ],
)
def test_data_url_tolerated_variants(make: Callable[[str], str]) -> None:
    png = small_png()
    b64 = base64.b64encode(png).decode("ascii")
    assert decode_data_url(make(b64), param=PARAM, limits=LIMITS) == png


def test_data_url_urlsafe_alphabet() -> None:
    payload = bytes(range(256)) * 3
    url = "data:image/png;base64," + base64.urlsafe_b64encode(payload).decode("ascii")
    assert decode_data_url(url, param=PARAM, limits=LIMITS) == payload


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:text/plain;base64,aGVsbG8=", "'text/plain', which is not an image"),
        ("data:text/html;base64,aGVsbG8=", "not an image"),
        ("data:application/json;base64,e30=", "not an image"),
        ("data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=", "SVG images are not supported"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:image/png;base64", "no ',' found"),
        ("data:image/png;base64,", "contains no image data"),
        ("data:image/png;base64,====", "contains no image data"),
        ("data:image/png;base64,not*base64!", "not valid base64"),
        ("data:image/png;base64,abcde", "not valid base64"),
        ("https://example.com/a.png", "not a data: URL"),
    ],
)
def test_data_url_rejections(url: str, fragment: str) -> None:
    reject(lambda: decode_data_url(url, param=PARAM, limits=LIMITS), fragment)


def test_data_url_size_cap_uses_base64_length(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = ImageLimits(max_image_bytes=1000)
    url = "data:image/png;base64," + "A" * 1400  # 1050 bytes once decoded

    def must_not_decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded despite being over the cap")

    monkeypatch.setattr(base64, "b64decode", must_not_decode)
    reject(lambda: decode_data_url(url, param=PARAM, limits=limits), "too large", "1050 bytes", "1000 bytes")


def test_data_url_exactly_at_cap_is_accepted() -> None:
    payload = bytes(999)
    limits = ImageLimits(max_image_bytes=999)
    assert decode_data_url(data_url(payload), param=PARAM, limits=limits) == payload


# --- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "save"), [("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {})])
def test_load_lossless_formats_exact(fmt: str, save: dict[str, object]) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    if fmt == "GIF":  # a palette format: keep to a few colours
        pixels = (pixels // 128) * 255
    source = Image.fromarray(pixels)
    result = load_image(encode(source, fmt, **save), param=PARAM, limits=LIMITS)
    assert result.mode == "RGB"
    assert result.size == (17, 13)
    np.testing.assert_array_equal(np.asarray(result), pixels)


def test_load_jpeg() -> None:
    result = load_image(
        encode(Image.new("RGB", (32, 16), (200, 40, 90)), "JPEG", quality=95), param=PARAM, limits=LIMITS
    )
    assert result.mode == "RGB"
    assert result.size == (32, 16)
    assert np.abs(np.asarray(result).astype(int) - [200, 40, 90]).max() <= 3


def test_result_is_a_detached_plain_image() -> None:
    result = load_image(small_png(), param=PARAM, limits=LIMITS)
    assert type(result) is Image.Image
    assert result.getpixel((0, 0)) == (10, 200, 30)


def test_truncated_png_is_rejected() -> None:
    rng = np.random.default_rng(1)
    png = encode(Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)))
    truncated = png[: len(png) * 6 // 10]
    reject(lambda: load_image(truncated, param=PARAM, limits=LIMITS), "could not be decoded", "PNG")


def test_truncated_png_is_rejected_even_if_truncation_was_switched_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(2)
    png = encode(Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    reject(lambda: load_image(png[: len(png) // 2], param=PARAM, limits=LIMITS), "could not be decoded")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_jpeg_is_rejected() -> None:
    rng = np.random.default_rng(3)
    jpeg = encode(Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)), "JPEG")
    reject(lambda: load_image(jpeg[: len(jpeg) // 2], param=PARAM, limits=LIMITS), "could not be decoded")


def test_one_pixel_image_and_min_side() -> None:
    png = small_png(size=(1, 1))
    assert load_image(png, param=PARAM, limits=LIMITS).size == (1, 1)
    reject(
        lambda: load_image(png, param=PARAM, limits=ImageLimits(min_side=2)), "too small", "1x1", "at least 2"
    )


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    return bilevel_png(30000, 30000)


def test_decompression_bomb_rejected_before_decoding(bomb_png: bytes) -> None:
    assert len(bomb_png) < 200_000  # 900 megapixels in ~110 kB
    reject(lambda: load_image(bomb_png, param=PARAM, limits=LIMITS), "too large")
    # Even when our own limit is set above it, Pillow's hard limit still turns into a 400.
    reject(lambda: load_image(bomb_png, param=PARAM, limits=ImageLimits(max_pixels=10**9)), "too large")


async def test_decompression_bomb_through_data_url(bomb_png: bytes) -> None:
    await areject(
        resolve_image(data_url(bomb_png), param=PARAM, limits=LIMITS, remote=RemoteImagePolicy()), "too large"
    )


def test_declared_size_checked_against_max_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    png = bilevel_png(8000, 8000)  # 64 M pixels: under Pillow's own warning level, over ours

    def must_not_load(self: Image.Image) -> None:
        raise AssertionError("pixels decoded despite the declared size")

    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_load)
    reject(lambda: load_image(png, param=PARAM, limits=LIMITS), "8000x8000", "64000000 pixels", "40000000")


@pytest.mark.parametrize(
    ("header", "size"),
    [
        # An animated-WebP (VP8X) header: Pillow's decoder would allocate the canvas on open.
        (
            b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x02\x00\x00\x00"
            + (15999).to_bytes(3, "little")
            + (9999).to_bytes(3, "little"),
            "16000x10000",
        ),
        (
            b"GIF89a" + (20000).to_bytes(2, "little") + (5000).to_bytes(2, "little") + b"\x00" * 10,
            "20000x5000",
        ),
    ],
)
def test_header_size_checked_before_opening(
    monkeypatch: pytest.MonkeyPatch, header: bytes, size: str
) -> None:
    def must_not_open(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("opened despite the size in the header")

    monkeypatch.setattr(Image, "open", must_not_open)
    reject(lambda: load_image(header + b"\x00" * 64, param=PARAM, limits=LIMITS), "too large", size)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP", "JPEG"])
def test_declared_size_parser_matches_pillow(fmt: str) -> None:
    saves: list[dict[str, object]] = [{}]
    if fmt == "WEBP":
        saves.append({"lossless": True})
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[0x0112] = 6
        saves += [{"progressive": True}, {"exif": exif.tobytes(), "quality": 50}]
    for save in saves:
        data = encode(Image.new("RGB", (123, 45), (3, 4, 5)), fmt, **save)
        assert media._declared_size(data) == (123, 45)
    assert media._declared_size(encode(Image.new("CMYK", (7, 9)), "JPEG")) == (7, 9)
    assert media._declared_size(b"\xff\xd8\xff\xe0\x00") is None
    assert media._declared_size(random.Random(1).randbytes(64)) is None


def test_jpeg_header_size_checked_before_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    jpeg = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 12000, 12000)

    def must_not_open(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("opened despite the size in the header")

    monkeypatch.setattr(Image, "open", must_not_open)
    reject(lambda: load_image(bytes(jpeg), param=PARAM, limits=LIMITS), "12000x12000")


def test_small_max_pixels() -> None:
    png = small_png(size=(20, 20))
    reject(lambda: load_image(png, param=PARAM, limits=ImageLimits(max_pixels=399)), "20x20")
    assert load_image(png, param=PARAM, limits=ImageLimits(max_pixels=400)).size == (20, 20)


def test_image_bytes_cap() -> None:
    png = small_png()
    reject(
        lambda: load_image(png, param=PARAM, limits=ImageLimits(max_image_bytes=len(png) - 1)), "too large"
    )


def test_cmyk_jpeg_colours() -> None:
    colours = {
        (0, 255, 255, 0): (255, 0, 0),  # magenta + yellow = red
        (255, 0, 255, 0): (0, 255, 0),
        (255, 255, 0, 0): (0, 0, 255),
        (0, 0, 0, 255): (0, 0, 0),
        (0, 0, 0, 0): (255, 255, 255),
    }
    cmyk = Image.new("CMYK", (16 * len(colours), 16))
    for i, colour in enumerate(colours):
        cmyk.paste(colour, (16 * i, 0, 16 * (i + 1), 16))
    jpeg = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(jpeg)).mode == "CMYK"
    result = load_image(jpeg, param=PARAM, limits=LIMITS)
    assert result.mode == "RGB"
    for i, expected in enumerate(colours.values()):
        got = np.asarray(result)[8, 16 * i + 8].astype(int)
        assert np.abs(got - expected).max() <= 6, (expected, got)


def test_sixteen_bit_grey_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 4096, 32768, 65535]], dtype=np.uint16)
    png = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    result = load_image(png, param=PARAM, limits=LIMITS)
    assert result.mode == "RGB"
    grey = np.asarray(result)[0, :, 0]
    np.testing.assert_array_equal(grey, [0, 1, 16, 128, 255])
    assert (np.asarray(result)[..., 0] == np.asarray(result)[..., 2]).all()


def test_sixteen_bit_rgb_png() -> None:
    # Two pixels: (65535, 32768, 0) and (0, 4096, 65535), big-endian 16-bit samples.
    scanline = b"\x00" + struct.pack(">6H", 65535, 32768, 0, 0, 4096, 65535)
    result = load_image(raw_png(2, 1, 16, 2, scanline), param=PARAM, limits=LIMITS)
    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == (255, 128, 0)
    assert result.getpixel((1, 0)) == (0, 16, 255)


def test_sixteen_bit_grey_alpha_png() -> None:
    # Grey 0 fully opaque, grey 0 fully transparent (-> white).
    scanline = b"\x00" + struct.pack(">4H", 0, 65535, 0, 0)
    result = load_image(raw_png(2, 1, 16, 4, scanline), param=PARAM, limits=LIMITS)
    assert result.getpixel((0, 0)) == (0, 0, 0)
    assert result.getpixel((1, 0)) == (255, 255, 255)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 3
    result = load_image(gif, param=PARAM, limits=LIMITS)
    assert result.size == (8, 8)
    assert result.getpixel((3, 3)) == (255, 0, 0)


def test_animated_webp_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(0, 0, 255), (255, 0, 0)]]
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=50)
    result = load_image(webp, param=PARAM, limits=LIMITS)
    assert result.getpixel((3, 3)) == (0, 0, 255)


def test_svg_text_is_rejected() -> None:
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    reject(
        lambda: load_image(svg, param=PARAM, limits=LIMITS),
        "SVG images are not supported",
        "PNG, JPEG, WEBP, GIF",
    )
    reject(lambda: load_image(b"  <svg></svg>", param=PARAM, limits=LIMITS), "SVG")


def test_random_bytes_are_rejected() -> None:
    noise = random.Random(0).randbytes(4096)
    reject(
        lambda: load_image(noise, param=PARAM, limits=LIMITS),
        "not in a recognised image format",
        "allowed formats: PNG, JPEG, WEBP, GIF",
    )


def test_empty_bytes_are_rejected() -> None:
    reject(lambda: load_image(b"", param=PARAM, limits=LIMITS), "empty")


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_other_formats_are_not_opened(fmt: str) -> None:
    data = encode(Image.new("RGB", (4, 4), (1, 2, 3)), fmt)
    reject(
        lambda: load_image(data, param=PARAM, limits=LIMITS), f"format {fmt} is not supported", "PNG, JPEG"
    )
    assert load_image(data, param=PARAM, limits=ImageLimits(allowed_formats=(fmt,))).getpixel((0, 0)) == (
        1,
        2,
        3,
    )


def test_restricted_allowed_formats() -> None:
    jpeg = encode(Image.new("RGB", (4, 4)), "JPEG")
    reject(
        lambda: load_image(jpeg, param=PARAM, limits=ImageLimits(allowed_formats=("PNG",))),
        "JPEG is not supported",
    )


def test_corrupt_png_with_valid_signature() -> None:
    png = bytearray(small_png())
    png[29:33] = b"\x00\x00\x00\x00"  # break the IHDR checksum
    reject(
        lambda: load_image(bytes(png), param=PARAM, limits=LIMITS), "looks like PNG but could not be decoded"
    )
    png = bytearray(small_png())
    png[20:24] = b"\xff\xff\xff\xff"  # an absurd height
    reject(lambda: load_image(bytes(png), param=PARAM, limits=LIMITS), "too large", "4x4294967295")


def test_exif_rotated_jpeg_is_transposed() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    jpeg = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    result = load_image(jpeg, param=PARAM, limits=LIMITS)
    assert result.size == (20, 40)
    top, bottom = np.asarray(result)[5, 10].astype(int), np.asarray(result)[35, 10].astype(int)
    assert np.abs(top - (255, 0, 0)).max() <= 8, top
    assert np.abs(bottom - (0, 0, 255)).max() <= 8, bottom


def test_rgba_composited_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    result = load_image(encode(rgba), param=PARAM, limits=LIMITS)
    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((1, 0)) == (0, 0, 255)
    assert all(abs(c - 127) <= 1 for c in result.getpixel((2, 0)))


def test_la_composited_on_white() -> None:
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (50, 255))
    result = load_image(encode(la), param=PARAM, limits=LIMITS)
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((1, 0)) == (50, 50, 50)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_composited_on_white(fmt: str) -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 0, 200, 10, 10] + [0, 0, 0] * 254)
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    data = encode(palette_image, fmt, transparency=0)
    result = load_image(data, param=PARAM, limits=LIMITS)
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((1, 0)) == (200, 10, 10)


def test_grey_and_bilevel_and_palette_modes() -> None:
    assert load_image(encode(Image.new("L", (2, 2), 77)), param=PARAM, limits=LIMITS).getpixel((1, 1)) == (
        77,
        77,
        77,
    )
    assert (
        load_image(encode(Image.new("1", (2, 2), 1)), param=PARAM, limits=LIMITS).getpixel((0, 0))
        == (255,) * 3
    )
    palette_image = Image.new("RGB", (2, 2), (12, 34, 56)).quantize(4)
    assert load_image(encode(palette_image), param=PARAM, limits=LIMITS).getpixel((0, 0)) == (12, 34, 56)


def test_rgb_colour_key_transparency() -> None:
    # A PNG tRNS colour key on an RGB image: pixels of that colour are transparent.
    image = Image.new("RGB", (2, 1), (1, 2, 3))
    image.putpixel((1, 0), (9, 9, 9))
    result = load_image(encode(image, transparency=(1, 2, 3)), param=PARAM, limits=LIMITS)
    assert result.getpixel((0, 0)) == (255, 255, 255)
    assert result.getpixel((1, 0)) == (9, 9, 9)


def test_float_and_int_modes_convert_sensibly() -> None:
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [media._to_rgb(floats).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    ints = Image.fromarray(np.array([[0, 65535, 70000, -5]], dtype=np.int32))
    assert ints.mode == "I"
    assert [media._to_rgb(ints).getpixel((x, 0))[0] for x in range(4)] == [0, 255, 255, 0]


# --- per-request budget ----------------------------------------------------------------------


async def test_budget_counts_images_and_pixels() -> None:
    limits = ImageLimits(max_images=2, max_total_pixels=250)
    budget = ImageBudget(limits)
    url = data_url(small_png(size=(10, 10)))
    remote = RemoteImagePolicy()
    await resolve_image(url, param=PARAM, limits=limits, remote=remote, budget=budget)
    await resolve_image(url, param=PARAM, limits=limits, remote=remote, budget=budget)
    assert (budget.images, budget.pixels) == (2, 200)
    await areject(
        resolve_image(url, param=PARAM, limits=limits, remote=remote, budget=budget), "at most 2 images"
    )

    big = data_url(small_png(size=(8, 8)))
    budget = ImageBudget(ImageLimits(max_total_pixels=250))
    for _ in range(3):
        await resolve_image(big, param=PARAM, limits=limits, remote=remote, budget=budget)
    await areject(
        resolve_image(big, param=PARAM, limits=limits, remote=remote, budget=budget), "250 pixels per request"
    )


# --- dispatch --------------------------------------------------------------------------------


async def test_resolve_data_url() -> None:
    result = await resolve_image(
        "  " + data_url(small_png((1, 2, 3))) + "\n", param=PARAM, limits=LIMITS, remote=RemoteImagePolicy()
    )
    assert result.mode == "RGB"
    assert result.getpixel((0, 0)) == (1, 2, 3)


async def test_resolve_text_plain_data_url() -> None:
    url = "data:text/plain;base64," + base64.b64encode(b"hello").decode()
    await areject(resolve_image(url, param=PARAM, limits=LIMITS, remote=RemoteImagePolicy()), "not an image")


async def test_resolve_one_pixel_data_url_with_min_side() -> None:
    url = data_url(small_png(size=(1, 1)))
    remote = RemoteImagePolicy()
    assert (await resolve_image(url, param=PARAM, limits=LIMITS, remote=remote)).size == (1, 1)
    await areject(resolve_image(url, param=PARAM, limits=ImageLimits(min_side=2), remote=remote), "too small")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("file:///etc/passwd", "unsupported image URL scheme 'file'"),
        ("FILE:///etc/passwd", "scheme 'file'"),
        ("ftp://example.com/a.png", "scheme 'ftp'"),
        ("gopher://127.0.0.1:6379/_INFO", "scheme 'gopher'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("//example.com/a.png", "no scheme"),
        ("example.com/a.png", "no scheme"),
        ("/etc/passwd", "no scheme"),
        ("iVBORw0KGgo=", "no scheme"),
        ("", "empty"),
    ],
)
async def test_resolve_rejects_other_schemes(url: str, fragment: str) -> None:
    for remote in (RemoteImagePolicy(), RemoteImagePolicy(enabled=True, allow_http=True)):
        await areject(resolve_image(url, param=PARAM, limits=LIMITS, remote=remote), fragment, "data URL")


async def test_resolve_rejects_non_string() -> None:
    await areject(resolve_image(123, param=PARAM, limits=LIMITS, remote=RemoteImagePolicy()), "string")  # type: ignore[arg-type]


# --- remote: policy and address checks -------------------------------------------------------


async def never_resolve(host: str, port: int) -> list[str]:
    raise AssertionError(f"DNS lookup for {host!r} should not have happened")


def no_transport() -> httpx.AsyncBaseTransport:
    raise AssertionError("no connection should have been opened")


def fixed_resolver(table: dict[str, list[str]], calls: list[str] | None = None) -> media.Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


def mock_transport_factory(
    handler: Callable[[httpx.Request], httpx.Response], seen: list[httpx.Request]
) -> Callable[[], httpx.AsyncBaseTransport]:
    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    return lambda: httpx.MockTransport(record)


OPEN_POLICY = RemoteImagePolicy(enabled=True, allow_http=True)


async def test_remote_disabled_by_default() -> None:
    policy = RemoteImagePolicy()
    assert policy.enabled is False and policy.allow_http is False and policy.max_redirects == 3
    for call in (
        resolve_image(
            "https://example.com/cat.png",
            param=PARAM,
            limits=LIMITS,
            remote=policy,
            resolver=never_resolve,
            transport_factory=no_transport,
        ),
        fetch_remote_image(
            "https://example.com/cat.png",
            policy=policy,
            param=PARAM,
            resolver=never_resolve,
            transport_factory=no_transport,
        ),
    ):
        await areject(call, "remote image URLs are disabled", "data:image/png;base64")


async def test_fetch_rejects_non_http_schemes() -> None:
    for url in (
        "file:///etc/passwd",
        "ftp://example.com/x",
        "gopher://example.com/",
        "data:image/png;base64,AA==",
    ):
        await areject(
            fetch_remote_image(
                url, policy=OPEN_POLICY, param=PARAM, resolver=never_resolve, transport_factory=no_transport
            ),
            "unsupported scheme",
        )


async def test_plain_http_needs_allow_http() -> None:
    policy = RemoteImagePolicy(enabled=True)
    await areject(
        fetch_remote_image(
            "http://example.com/a.png",
            policy=policy,
            param=PARAM,
            resolver=never_resolve,
            transport_factory=no_transport,
        ),
        "must use https",
    )


@pytest.mark.parametrize(
    ("url", "address", "reason"),
    [
        ("http://127.0.0.1/", "127.0.0.1", "loopback"),
        ("http://127.0.0.1:6379/", "127.0.0.1", "loopback"),
        ("http://localhost./", None, None),  # a name: resolved, see the resolver tests
        ("http://10.0.0.1/", "10.0.0.1", "private"),
        ("http://172.16.5.4/", "172.16.5.4", "private"),
        ("http://192.168.1.1/", "192.168.1.1", "private"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "link-local"),
        ("http://100.64.0.1/", "100.64.0.1", "carrier-grade NAT"),
        ("http://0.0.0.0/", "0.0.0.0", "unspecified"),
        ("http://224.0.0.1/", "224.0.0.1", "multicast"),
        ("http://255.255.255.255/", "255.255.255.255", "reserved"),
        ("http://2130706433/", "127.0.0.1", "loopback"),
        ("http://0x7f000001/", "127.0.0.1", "loopback"),
        ("http://0X7F000001/", "127.0.0.1", "loopback"),
        ("http://017700000001/", "127.0.0.1", "loopback"),
        ("http://127.1/", "127.0.0.1", "loopback"),
        ("http://127.0.1/", "127.0.0.1", "loopback"),
        ("http://0x7f.1/", "127.0.0.1", "loopback"),
        ("http://127.0.0.1./", "127.0.0.1", "loopback"),
        ("http://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254", "link-local"),
        ("http://2852039166/", "169.254.169.254", "link-local"),
        ("http://0/", "0.0.0.0", "unspecified"),
        ("http://[::1]/", "::1", "loopback"),
        ("http://[::1]:8080/x", "::1", "loopback"),
        ("http://[::]/", "::", "unspecified"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1", "IPv4-mapped loopback address 127.0.0.1"),
        ("http://[::ffff:7f00:1]/", "::ffff:7f00:1", "IPv4-mapped loopback"),
        ("http://[::ffff:169.254.169.254]/", "::ffff:a9fe:a9fe", "IPv4-mapped link-local"),
        ("http://[::ffff:10.0.0.1]/", "::ffff:a00:1", "IPv4-mapped private"),
        ("http://[::127.0.0.1]/", "::7f00:1", "IPv4-compatible"),
        ("http://[64:ff9b::127.0.0.1]/", "64:ff9b::7f00:1", "NAT64 loopback"),
        ("http://[64:ff9b::a9fe:a9fe]/", "64:ff9b::a9fe:a9fe", "NAT64 link-local"),
        ("http://[64:ff9b:1::1]/", "64:ff9b:1::1", "local-use NAT64"),
        ("http://[2002:7f00:1::1]/", "2002:7f00:1::1", "6to4 loopback"),
        ("http://[2002:a00:1::]/", "2002:a00:1::", "6to4 private"),
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "IETF"),
        ("http://[fe80::1]/", "fe80::1", "link-local"),
        ("http://[fc00::1]/", "fc00::1", "unique-local"),
        ("http://[fd12:3456::1]/", "fd12:3456::1", "unique-local"),
        ("http://[ff02::1]/", "ff02::1", "multicast"),
        ("http://[2001:db8::1]/", "2001:db8::1", "documentation"),
    ],
)
async def test_ip_literals_rejected_without_any_connection(
    url: str, address: str | None, reason: str | None
) -> None:
    if address is None:
        resolver = fixed_resolver({"localhost": ["127.0.0.1", "::1"]})
        await areject(
            fetch_remote_image(
                url, policy=OPEN_POLICY, param=PARAM, resolver=resolver, transport_factory=no_transport
            ),
            "non-public address 127.0.0.1",
        )
        return
    assert reason is not None
    await areject(
        fetch_remote_image(
            url, policy=OPEN_POLICY, param=PARAM, resolver=never_resolve, transport_factory=no_transport
        ),
        f"non-public address {address} ",
        reason,
    )


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://0177.0.0.1/", "not a valid URL"),  # httpx refuses octal parts itself
        ("http://1.2.3.4.5/", "invalid IPv4 address"),
        ("http://256.1/x", "invalid IPv4 address '256.1'"),
        ("http://1.0x1000000/", "invalid IPv4 address"),
        ("http://4294967296/", "invalid IPv4 address"),
        ("http://0x/", "invalid IPv4 address"),
        ("http://example.123/", "invalid IPv4 address"),
        ("http://127.0.0.1%00.evil.com/", "invalid host name"),
        ("http://exa%6dple.com/", "invalid host name"),
        ("http://a b/", "invalid host name"),
        ("http://[fe80::1%25eth0]/", "non-public address"),
        ("http:///nohost", "no host"),
        ("http://example.com:99999/", "invalid port"),
        ("http://example.com:0/", "invalid port"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com@127.0.0.1/", "credentials"),
        ("https://" + "a" * 9000 + ".com/", "too long"),
    ],
)
async def test_malformed_hosts_rejected(url: str, fragment: str) -> None:
    await areject(
        fetch_remote_image(
            url, policy=OPEN_POLICY, param=PARAM, resolver=never_resolve, transport_factory=no_transport
        ),
        fragment,
    )


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("192.168.257", "192.168.1.1"),
        ("0xc0.0xa8.0x1.0x1", "192.168.1.1"),
        ("8.8.8.8", "8.8.8.8"),
        ("0", "0.0.0.0"),
        ("4294967295", "255.255.255.255"),
    ],
)
def test_inet_aton_spellings(host: str, expected: str) -> None:
    assert str(media._inet_aton(host.split("."))) == expected


@pytest.mark.parametrize(
    "host", ["08.0.0.1", "1.2.3.4.5", "256.0.0.1", "1.16777216", "0x", "1..2", "4294967296"]
)
def test_inet_aton_rejects(host: str) -> None:
    assert media._inet_aton(host.split(".")) is None


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "64:ff9b::808:808",
    ],
)
def test_public_addresses(address: str) -> None:
    import ipaddress

    assert media._non_public_reason(ipaddress.ip_address(address), OPEN_POLICY) is None


async def test_dns_name_resolving_to_loopback() -> None:
    calls: list[str] = []
    resolver = fixed_resolver({"evil.example": ["127.0.0.1"]}, calls)
    await areject(
        fetch_remote_image(
            "https://evil.example/a.png",
            policy=OPEN_POLICY,
            param=PARAM,
            resolver=resolver,
            transport_factory=no_transport,
        ),
        "image URL resolves to a non-public address 127.0.0.1 (loopback)",
        "evil.example",
    )
    assert calls == ["evil.example"]


@pytest.mark.parametrize(
    ("answers", "fragment"),
    [
        (["93.184.216.34", "10.0.0.1"], "non-public address 10.0.0.1"),
        (["2606:4700::1", "::1"], "non-public address ::1"),
        (["::ffff:169.254.169.254"], "non-public address ::ffff:a9fe:a9fe"),
        (["fe80::1%eth0"], "non-public address"),
        (["169.254.169.254"], "169.254.169.254 (link-local)"),
        ([], "could not resolve"),
        (["not-an-address"], "invalid address"),
    ],
)
async def test_every_resolved_address_must_be_public(answers: list[str], fragment: str) -> None:
    await areject(
        fetch_remote_image(
            "https://images.example/a.png",
            policy=OPEN_POLICY,
            param=PARAM,
            resolver=fixed_resolver({"images.example": answers}),
            transport_factory=no_transport,
        ),
        fragment,
    )


async def test_unresolvable_host() -> None:
    await areject(
        fetch_remote_image(
            "https://nowhere.example/a.png",
            policy=OPEN_POLICY,
            param=PARAM,
            resolver=fixed_resolver({}),
            transport_factory=no_transport,
        ),
        "could not resolve image URL host 'nowhere.example'",
    )


async def test_default_resolver_numeric_host() -> None:
    assert await media._default_resolver("127.0.0.1", 80) == ["127.0.0.1"]


async def test_connection_is_pinned_to_the_checked_address() -> None:
    png = small_png((5, 6, 7))
    seen: list[httpx.Request] = []
    calls: list[str] = []
    factory = mock_transport_factory(lambda request: httpx.Response(200, content=png), seen)
    policy = RemoteImagePolicy(enabled=True)
    body = await fetch_remote_image(
        "https://Images.Example.com:8443/cat.png?size=large",
        policy=policy,
        param=PARAM,
        resolver=fixed_resolver({"images.example.com": ["93.184.216.34"]}, calls),
        transport_factory=factory,
    )
    assert body == png
    assert calls == ["images.example.com"]
    (request,) = seen
    assert str(request.url) == "https://93.184.216.34:8443/cat.png?size=large"
    assert request.headers["host"] == "images.example.com:8443"
    assert request.extensions["sni_hostname"] == "images.example.com"
    assert request.headers["accept-encoding"] == "identity"


async def test_ipv6_pinning_and_ip_literal_has_no_sni() -> None:
    png = small_png()
    seen: list[httpx.Request] = []
    factory = mock_transport_factory(lambda request: httpx.Response(200, content=png), seen)
    policy = RemoteImagePolicy(enabled=True)
    await fetch_remote_image(
        "https://v6.example/a.png",
        policy=policy,
        param=PARAM,
        resolver=fixed_resolver({"v6.example": ["2606:4700::1111"]}),
        transport_factory=factory,
    )
    await fetch_remote_image(
        "https://93.184.216.34/a.png",
        policy=policy,
        param=PARAM,
        resolver=never_resolve,
        transport_factory=factory,
    )
    assert str(seen[0].url) == "https://[2606:4700::1111]/a.png"
    assert seen[0].headers["host"] == "v6.example"
    assert "sni_hostname" not in seen[1].extensions
    assert seen[1].headers["host"] == "93.184.216.34"


async def test_domain_allowlist() -> None:
    png = small_png()
    seen: list[httpx.Request] = []
    factory = mock_transport_factory(lambda request: httpx.Response(200, content=png), seen)
    policy = RemoteImagePolicy(enabled=True, allowed_domains=("*.Example.com.", "bücher.de"))
    assert policy.allowed_domains == ("example.com", "xn--bcher-kva.de")
    resolver = fixed_resolver(
        {
            "example.com": ["93.184.216.34"],
            "cdn.example.com": ["93.184.216.34"],
            "xn--bcher-kva.de": ["93.184.216.34"],
        }
    )
    for url in ("https://example.com/a.png", "https://cdn.example.com/a.png", "https://bücher.de/a.png"):
        assert (
            await fetch_remote_image(
                url, policy=policy, param=PARAM, resolver=resolver, transport_factory=factory
            )
            == png
        )
    for url in (
        "https://example.com.evil.net/a.png",
        "https://notexample.com/a.png",
        "https://evil.net/a.png?u=example.com",
        "https://93.184.216.34/a.png",
    ):
        await areject(
            fetch_remote_image(
                url, policy=policy, param=PARAM, resolver=never_resolve, transport_factory=no_transport
            ),
            "not in the list of allowed image domains",
        )
    assert len(seen) == 3


def test_policy_validation() -> None:
    with pytest.raises(ConfigError):
        RemoteImagePolicy(allowed_domains=("bad domain!",))
    with pytest.raises(ConfigError):
        RemoteImagePolicy(allowed_domains="example.com")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        RemoteImagePolicy(read_timeout=0)
    with pytest.raises(ConfigError):
        RemoteImagePolicy(max_redirects=-1)
    with pytest.raises(ConfigError):
        RemoteImagePolicy(_trusted_test_networks=("not-a-net",))
    assert RemoteImagePolicy(allowed_domains=()).allowed_domains is None
    assert RemoteImagePolicy(allowed_domains=("[::1]", "10.0.0.1")).allowed_domains == ("::1", "10.0.0.1")


@pytest.mark.parametrize(
    ("location", "allow_http", "fragment"),
    [
        ("http://127.0.0.1/secret", True, "non-public address 127.0.0.1"),
        ("https://127.0.0.1/secret", False, "non-public address 127.0.0.1"),
        ("http://[::1]/", True, "non-public address ::1"),
        ("http://169.254.169.254/latest/meta-data/", True, "non-public address 169.254.169.254"),
        ("http://0x7f000001/", True, "non-public address 127.0.0.1"),
        ("//[::ffff:10.0.0.1]/x", True, "non-public address ::ffff:a00:1"),
        ("https://internal.example/", False, "non-public address 10.1.2.3"),
        ("file:///etc/passwd", True, "redirect has unsupported scheme 'file'"),
        ("gopher://example.com/", True, "unsupported scheme"),
        ("http://public.example/downgrade.png", False, "redirect must use https"),
        ("https://user:pw@public.example/", False, "credentials"),
    ],
)
async def test_redirect_targets_are_rechecked(location: str, allow_http: bool, fragment: str) -> None:
    seen: list[httpx.Request] = []
    factory = mock_transport_factory(
        lambda request: httpx.Response(302, headers={"Location": location}), seen
    )
    resolver = fixed_resolver({"public.example": ["93.184.216.34"], "internal.example": ["10.1.2.3"]})
    await areject(
        fetch_remote_image(
            "https://public.example/a.png",
            policy=RemoteImagePolicy(enabled=True, allow_http=allow_http),
            param=PARAM,
            resolver=resolver,
            transport_factory=factory,
        ),
        fragment,
    )
    assert [str(r.url) for r in seen] == ["https://93.184.216.34/a.png"]


async def test_redirect_leaving_the_allowlist_is_rejected() -> None:
    seen: list[httpx.Request] = []
    factory = mock_transport_factory(
        lambda request: httpx.Response(301, headers={"Location": "https://elsewhere.example/x.png"}), seen
    )
    await areject(
        fetch_remote_image(
            "https://img.example.com/a.png",
            policy=RemoteImagePolicy(enabled=True, allowed_domains=("example.com",)),
            param=PARAM,
            resolver=fixed_resolver({"img.example.com": ["93.184.216.34"]}),
            transport_factory=factory,
        ),
        "'elsewhere.example' is not in the list of allowed image domains",
    )
    assert len(seen) == 1


async def test_redirect_without_location_and_bad_status() -> None:
    for response, fragment in (
        (httpx.Response(302), "without a Location header"),
        (httpx.Response(404), "HTTP 404"),
        (httpx.Response(500), "HTTP 500"),
        (httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"x"), "Content-Encoding: gzip"),
    ):
        await areject(
            fetch_remote_image(
                "https://93.184.216.34/a.png",
                policy=RemoteImagePolicy(enabled=True),
                param=PARAM,
                transport_factory=mock_transport_factory(lambda request, r=response: r, []),
            ),
            fragment,
        )


async def test_falls_back_to_the_next_checked_address_on_connect_error() -> None:
    png = small_png()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "93.184.216.34":
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, content=png)

    body = await fetch_remote_image(
        "https://two.example/a.png",
        policy=RemoteImagePolicy(enabled=True),
        param=PARAM,
        resolver=fixed_resolver({"two.example": ["93.184.216.34", "93.184.216.35"]}),
        transport_factory=mock_transport_factory(handler, seen),
    )
    assert body == png
    assert [r.url.host for r in seen] == ["93.184.216.34", "93.184.216.35"]


# --- remote: a real local server on loopback -------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0  # before the status line
    chunked: bool = False
    drip: float = 0.0  # pause between body chunks (chunked replies)
    chunk_size: int = 65536


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


class LocalServer:
    """A minimal HTTP/1.1 server on 127.0.0.1 (ephemeral port) serving canned replies."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.routes: dict[str, Reply] = {}
        self.requests: list[Seen] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def __aenter__(self) -> LocalServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            self.requests.append(Seen(path, headers))
            reply = self.routes.get(path, Reply(404, body=b"not found"))
            if reply.delay:
                await asyncio.sleep(reply.delay)
            out = [f"HTTP/1.1 {reply.status} X", "Connection: close"]
            out += [f"{k}: {v}" for k, v in reply.headers.items()]
            out.append(
                "Transfer-Encoding: chunked" if reply.chunked else f"Content-Length: {len(reply.body)}"
            )
            writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
            if not reply.chunked:
                writer.write(reply.body)
            else:
                for start in range(0, len(reply.body), reply.chunk_size):
                    piece = reply.body[start : start + reply.chunk_size]
                    writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    await writer.drain()
                    if reply.drip:
                        await asyncio.sleep(reply.drip)
                writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)  # type: ignore[arg-type]


LOOPBACK_TRUSTED = RemoteImagePolicy(
    enabled=True,
    allow_http=True,
    read_timeout=5.0,
    total_timeout=10.0,
    _trusted_test_networks=("127.0.0.1/32",),
)


async def test_local_server_happy_path_through_resolve_image() -> None:
    png = small_png((9, 99, 199), size=(6, 5))
    async with LocalServer() as server:
        server.routes["/ok.png"] = Reply(headers={"Content-Type": "image/png"}, body=png)
        image = await resolve_image(
            server.url("/ok.png"), param=PARAM, limits=LIMITS, remote=LOOPBACK_TRUSTED
        )
        assert image.mode == "RGB" and image.size == (6, 5)
        assert image.getpixel((2, 2)) == (9, 99, 199)
        (request,) = server.requests
        assert request.headers["host"] == f"127.0.0.1:{server.port}"
        assert request.headers["accept-encoding"] == "identity"


async def test_local_server_by_name_and_redirect_chain_within_limit() -> None:
    png = small_png((1, 1, 1))
    calls: list[str] = []
    resolver = fixed_resolver({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}, calls)
    async with LocalServer() as server:
        server.routes["/r1"] = Reply(302, headers={"Location": "/r2"})
        server.routes["/r2"] = Reply(307, headers={"Location": server.url("/r3", host="other.test")})
        server.routes["/r3"] = Reply(301, headers={"Location": "ok.png"})
        server.routes["/ok.png"] = Reply(body=png)
        body = await fetch_remote_image(
            server.url("/r1", host="images.test"), policy=LOOPBACK_TRUSTED, param=PARAM, resolver=resolver
        )
        assert body == png
        assert [r.path for r in server.requests] == ["/r1", "/r2", "/r3", "/ok.png"]
        assert [r.headers["host"] for r in server.requests] == [
            f"images.test:{server.port}",
            f"images.test:{server.port}",
            f"other.test:{server.port}",
            f"other.test:{server.port}",
        ]
        assert calls == ["images.test", "images.test", "other.test", "other.test"]


async def test_local_server_too_many_redirects() -> None:
    async with LocalServer() as server:
        for i in range(5):
            server.routes[f"/r{i}"] = Reply(302, headers={"Location": f"/r{i + 1}"})
        server.routes["/r5"] = Reply(body=small_png())
        await areject(
            fetch_remote_image(server.url("/r0"), policy=LOOPBACK_TRUSTED, param=PARAM),
            "redirected too many times",
            "3 redirects",
        )
        assert [r.path for r in server.requests] == ["/r0", "/r1", "/r2", "/r3"]


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("http://127.0.0.2:{port}/ok.png", "non-public address 127.0.0.2 (loopback)"),
        ("http://[::1]:{port}/ok.png", "non-public address ::1 (loopback)"),
        ("http://internal.test:{port}/ok.png", "resolves to a non-public address 127.0.0.5"),
        ("http://2130706434:{port}/ok.png", "non-public address 127.0.0.2"),
        ("http://10.0.0.1/", "non-public address 10.0.0.1"),
        ("file:///etc/passwd", "unsupported scheme 'file'"),
    ],
)
async def test_local_server_redirect_to_loopback_is_rejected(target: str, fragment: str) -> None:
    async with LocalServer() as server:
        server.routes["/start"] = Reply(302, headers={"Location": target.format(port=server.port)})
        server.routes["/ok.png"] = Reply(body=small_png())
        await areject(
            fetch_remote_image(
                server.url("/start"),
                policy=LOOPBACK_TRUSTED,
                param=PARAM,
                resolver=fixed_resolver({"internal.test": ["127.0.0.5"]}),
            ),
            fragment,
        )
        assert [r.path for r in server.requests] == ["/start"]


async def test_local_server_size_caps() -> None:
    big = bytes(300_000)
    policy = RemoteImagePolicy(
        enabled=True, allow_http=True, max_bytes=100_000, _trusted_test_networks=("127.0.0.0/8",)
    )
    async with LocalServer() as server:
        server.routes["/declared"] = Reply(body=big)
        server.routes["/chunked"] = Reply(body=big, chunked=True, chunk_size=16_384)
        await areject(
            fetch_remote_image(server.url("/declared"), policy=policy, param=PARAM),
            "declares 300000 bytes",
            "100000 bytes",
        )
        await areject(
            fetch_remote_image(server.url("/chunked"), policy=policy, param=PARAM),
            "exceeded the limit of 100000 bytes",
        )
        # The per-image byte limit also caps remote downloads.
        server.routes["/ok.png"] = Reply(body=small_png(size=(64, 64)))
        await areject(
            resolve_image(
                server.url("/ok.png"),
                param=PARAM,
                limits=ImageLimits(max_image_bytes=50),
                remote=LOOPBACK_TRUSTED,
            ),
            "limit is 50 bytes",
        )


async def test_local_server_timeouts() -> None:
    async with LocalServer() as server:
        server.routes["/slow"] = Reply(delay=30.0, body=small_png())
        server.routes["/drip"] = Reply(body=bytes(200), chunked=True, chunk_size=1, drip=0.05)
        slow = RemoteImagePolicy(
            enabled=True, allow_http=True, read_timeout=0.3, _trusted_test_networks=("127.0.0.1/32",)
        )
        await areject(
            fetch_remote_image(server.url("/slow"), policy=slow, param=PARAM), "timed out reading", "0.3 s"
        )
        dripping = RemoteImagePolicy(
            enabled=True,
            allow_http=True,
            read_timeout=2.0,
            total_timeout=0.5,
            _trusted_test_networks=("127.0.0.1/32",),
        )
        await areject(
            fetch_remote_image(server.url("/drip"), policy=dripping, param=PARAM), "took longer than 0.5 s"
        )


async def test_local_server_http_errors_and_refused_connection() -> None:
    async with LocalServer() as server:
        await areject(
            resolve_image(server.url("/missing.png"), param=PARAM, limits=LIMITS, remote=LOOPBACK_TRUSTED),
            "HTTP 404",
        )
        server.routes["/text"] = Reply(body=b"<html>hello</html>", headers={"Content-Type": "text/html"})
        await areject(
            resolve_image(server.url("/text"), param=PARAM, limits=LIMITS, remote=LOOPBACK_TRUSTED),
            "not in a recognised image format",
        )
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    await areject(
        fetch_remote_image(f"http://127.0.0.1:{closed_port}/a.png", policy=LOOPBACK_TRUSTED, param=PARAM),
        "could not connect",
    )


# --- remote: TLS keeps the real host name while connecting to the pinned address -------------


def make_tls_contexts(directory: Path, hostname: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway CA and a server certificate for `hostname`: (server context, client context)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={hostname}")
    (directory / "ext.cnf").write_text(f"subjectAltName=DNS:{hostname}\nbasicConstraints=critical,CA:FALSE\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "2",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    )
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(directory / "server.pem", directory / "server.key")
    client_context = ssl.create_default_context(cafile=str(directory / "ca.pem"))
    return server_context, client_context


async def test_tls_uses_real_host_name_for_sni_and_verification(tmp_path: Path) -> None:
    server_context, client_context = make_tls_contexts(tmp_path, "images.test")
    sni_seen: list[str | None] = []
    server_context.sni_callback = lambda sock, name, ctx: sni_seen.append(name)  # type: ignore[assignment]
    png = small_png((4, 5, 6))
    resolver = fixed_resolver({"images.test": ["127.0.0.1"], "impostor.test": ["127.0.0.1"]})
    policy = RemoteImagePolicy(enabled=True, read_timeout=5.0, _trusted_test_networks=("127.0.0.1/32",))

    def transport() -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport(verify=client_context, retries=0)

    async with LocalServer(ssl_context=server_context) as server:
        server.routes["/ok.png"] = Reply(body=png)
        body = await fetch_remote_image(
            f"https://images.test:{server.port}/ok.png",
            policy=policy,
            param=PARAM,
            resolver=resolver,
            transport_factory=transport,
        )
        assert body == png
        assert sni_seen == ["images.test"]
        assert server.requests[0].headers["host"] == f"images.test:{server.port}"
        # Same address, another name: the certificate does not match, so nothing is fetched.
        await areject(
            fetch_remote_image(
                f"https://impostor.test:{server.port}/ok.png",
                policy=policy,
                param=PARAM,
                resolver=resolver,
                transport_factory=transport,
            ),
            "could not connect to image URL host 'impostor.test'",
            "certificate",
        )
        assert len(server.requests) == 1
