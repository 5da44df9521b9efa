"""Images through the API: a corpus of bad and odd images against a real server, each answered
with a 400 naming the image or with a normal answer, while good requests run alongside; plus the
per-request image limits in process."""

from __future__ import annotations

import asyncio
import random
import struct
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from .conftest import data_url, encode_image, parse_sse

PARAM = "messages[0].content[1].image_url"


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png_bomb(side: int = 100_000) -> bytes:
    """A valid-looking greyscale PNG that claims side x side pixels in a few hundred bytes."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (side + 1) * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def _animated_gif() -> bytes:
    frames = [Image.new("P", (40, 30), i * 40) for i in range(3)]
    return encode_image(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _sixteen_bit_png() -> bytes:
    ramp = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    image = Image.fromarray(ramp)  # uint16 -> mode I;16
    assert image.mode == "I;16"
    return encode_image(image, "PNG")


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'

# name -> (image URL, accepted?)
CORPUS: dict[str, tuple[str, bool]] = {
    "truncated_png": (data_url(encode_image(_noise(120, 90))[:6000]), False),
    "one_pixel_png": (data_url(encode_image(Image.new("RGB", (1, 1), (9, 9, 9)))), True),
    "png_bomb": (data_url(_png_bomb()), False),
    "cmyk_jpeg": (
        data_url(encode_image(Image.new("CMYK", (64, 48), (0, 128, 255, 0)), "JPEG"), "image/jpeg"),
        True,
    ),
    "sixteen_bit_png": (data_url(_sixteen_bit_png()), True),
    "animated_gif": (data_url(_animated_gif(), "image/gif"), True),
    "transparent_png": (data_url(encode_image(Image.new("RGBA", (50, 40), (255, 0, 0, 0)))), True),
    "svg": (data_url(SVG, "image/svg+xml"), False),
    "random_bytes": (data_url(random.Random(0).randbytes(3000)), False),
    "text_plain": (data_url(b"hello, I am not an image", "text/plain"), False),
    "not_base64": ("data:image/png;base64,@@@not*base64@@@", False),
    "empty_data_url": ("data:image/png;base64,", False),
    "remote_url_disabled": ("https://example.com/cat.png", False),
    "file_url": ("file:///etc/passwd", False),
    "no_scheme": ("cat.png", False),
}


def _request(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        "max_tokens": 4,
        **extra,
    }


async def test_bad_image_corpus_with_good_requests_alongside(
    live_server: Any, image_url: Callable[..., str]
) -> None:
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=60) as c:
        text_only = (
            await c.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "What is this?"}], "max_tokens": 1},
            )
        ).json()

        async def bad(name: str, url: str) -> tuple[str, httpx.Response]:
            return name, await c.post("/v1/chat/completions", json=_request(url))

        async def good(i: int) -> str:
            r = await c.post(
                "/v1/chat/completions",
                json=_request(image_url(80 + i, 60), max_tokens=12, ignore_eos=True, stream=True),
            )
            assert r.status_code == 200
            events, done = parse_sse(r.text)
            assert done and all("error" not in e for e in events)
            return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])

        results = await asyncio.gather(
            *(bad(n, u) for n, (u, _) in CORPUS.items()), *(good(i) for i in range(6))
        )
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/ready")).status_code == 200

    answers = {name: r for name, r in results[: len(CORPUS)]}
    for name, (_, accepted) in CORPUS.items():
        r = answers[name]
        if accepted:
            assert r.status_code == 200, (name, r.text)
            body = r.json()
            assert body["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"], name
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            assert r.status_code == 400, (name, r.text)
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error", name
            assert error["param"] == PARAM, (name, error)
            assert error["code"] == "invalid_image", (name, error)
    assert "too large" in answers["png_bomb"].json()["error"]["message"]
    assert "SVG" in answers["svg"].json()["error"]["message"]


async def test_too_many_images(
    make_app: Callable[..., Any], make_client: Any, image_url: Callable[..., str]
) -> None:
    async with make_client(make_app(max_images_per_request=2)) as c:
        parts: list[dict[str, Any]] = [{"type": "text", "text": "Compare."}]
        parts += [{"type": "image_url", "image_url": {"url": image_url()}} for _ in range(3)]
        r = await c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], "max_tokens": 1}
        )
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "messages[0].content[3].image_url"
        r = await c.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": parts[:3]}], "max_tokens": 1},
        )
        assert r.status_code == 200


@pytest.mark.parametrize(
    ("overrides", "param", "words"),
    [
        ({"max_request_pixels": 15_000}, "messages[0].content[2].image_url", "together"),
        ({"max_image_pixels": 5_000}, "messages[0].content[1].image_url", "too large"),
        ({"max_image_mb": 0.001}, "messages[0].content[1].image_url", "too large"),
    ],
)
async def test_image_size_limits(
    make_app: Callable[..., Any], make_client: Any, overrides: dict[str, Any], param: str, words: str
) -> None:
    url = data_url(encode_image(_noise(100, 100)))  # 10,000 pixels, ~30 kB
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Compare."}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for _ in range(2)]
    async with make_client(make_app(**overrides)) as c:
        r = await c.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], "max_tokens": 1}
        )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


async def test_images_in_several_messages_and_a_string_image_url(
    client: httpx.AsyncClient, image_url: Callable[..., str]
) -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": image_url()}, {"type": "text", "text": "First."}],
        },
        {"role": "assistant", "content": "A red picture."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages[2].content[1].image_url"
    messages[2]["content"][1]["image_url"] = {"url": image_url(30, 30, (0, 255, 0))}  # type: ignore[index]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    assert r.status_code == 200, r.text
