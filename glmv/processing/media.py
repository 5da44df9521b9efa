"""Turning an OpenAI `image_url` value into a validated RGB Pillow image, safely.

Two sources are accepted:

* `data:` URLs (base64) — always. The size cap is applied to the base64 length before anything
  is decoded, and the declared media type must be an image type.
* `http(s)` URLs — only when the operator enables remote images (`RemoteImagePolicy.enabled`,
  off by default). Fetching is guarded against server-side request forgery: only http(s);
  https only unless plain http is allowed; an optional domain allowlist; IP literals in every
  spelling the C library accepts are decoded and checked; a host name is resolved exactly once
  per hop and *every* address it resolves to must be public; the connection goes to the checked
  address (the URL's host is replaced by the IP while the `Host` header, TLS SNI and certificate
  verification keep the real name), so a second DNS answer can never redirect it; redirects are
  followed by hand with the same checks on every hop; the body is streamed under a byte cap;
  connect/read/total timeouts bound the whole fetch. Proxies and netrc from the environment are
  ignored.

Decoding is guarded against decompression bombs: Pillow only opens the allowed formats, the
declared size is checked against the per-image and per-request pixel budgets *before* any pixel
is decoded, truncated files are rejected rather than padded, and the first frame of an animated
image is used. The result is always RGB: EXIF orientation is applied, transparency is composited
on white, CMYK and 16-bit images are converted to sensible 8-bit RGB.

Every rejection raises `glmv.errors.InvalidImageError(param=...)` (HTTP 400) with a message that
says what is wrong.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import socket
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Final

import httpx
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from glmv.errors import ConfigError, InvalidImageError

logger = logging.getLogger(__name__)

MiB: Final = 1024 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses the host resolves to, as strings.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
TransportFactory = Callable[[], httpx.AsyncBaseTransport]

_MAX_URL_LENGTH: Final = 8192
_USER_AGENT: Final = "glmv-image-fetch/1"
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})

_FORMAT_MIME: Final = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
_FORMAT_ALIASES: Final = {"JPG": "JPEG", "TIF": "TIFF"}


# --- limits ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What an image (and a request's images together) may be.

    `max_pixels` and `max_total_pixels` count decoded pixels (width x height as declared in the
    file header, checked before decoding). `min_side` rejects images whose shorter side is smaller;
    the default 1 accepts any size because the image processor upscales tiny images.
    """

    max_image_bytes: int = 20 * MiB
    max_pixels: int = 40_000_000
    max_total_pixels: int = 100_000_000
    min_side: int = 1
    max_images: int = 8
    allowed_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF")

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_pixels", "max_total_pixels", "min_side"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("max_images", self.max_images, minimum=0)
        if isinstance(self.allowed_formats, str):
            raise ConfigError("allowed_formats must be a sequence of format names, not one string")
        formats: list[str] = []
        for raw in self.allowed_formats:
            name = str(raw).strip().upper()
            name = _FORMAT_ALIASES.get(name, name)
            if not name:
                raise ConfigError("allowed_formats contains an empty format name")
            if name not in Image.OPEN:
                Image.init()  # registers every plugin Pillow has
                if name not in Image.OPEN:
                    raise ConfigError(f"Pillow cannot read image format {name!r} (in allowed_formats)")
            if name not in formats:
                formats.append(name)
        if not formats:
            raise ConfigError("allowed_formats must name at least one image format")
        object.__setattr__(self, "allowed_formats", tuple(formats))


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"image limit {name} must be an integer >= {minimum}, got {value!r}")


@dataclass(slots=True)
class ImageBudget:
    """Running tally of one request's images and declared pixels.

    Create one per request and pass it to every `resolve_image` call of that request; the call
    that would exceed `max_images` or `max_total_pixels` fails (before its pixels are decoded).
    Safe to share between concurrent calls (decoding runs in worker threads).
    """

    limits: ImageLimits
    images: int = 0
    pixels: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_image(self, *, param: str) -> None:
        with self._lock:
            if self.images >= self.limits.max_images:
                raise InvalidImageError(
                    f"too many images: this server accepts at most {self.limits.max_images} "
                    "images per request",
                    param=param,
                )
            self.images += 1

    def add_pixels(self, pixels: int, *, param: str) -> None:
        with self._lock:
            if self.pixels + pixels > self.limits.max_total_pixels:
                raise InvalidImageError(
                    f"the request's images are too large together: adding this image's {pixels} "
                    f"pixels to the {self.pixels} already accepted exceeds the limit of "
                    f"{self.limits.max_total_pixels} pixels per request",
                    param=param,
                )
            self.pixels += pixels


# --- data: URLs ------------------------------------------------------------------------------


def decode_data_url(url: str, *, param: str, limits: ImageLimits) -> bytes:
    """Decode `data:[<image mime>][;params];base64,<payload>` into the image's bytes.

    Tolerated: a missing media type, `application/octet-stream`, extra parameters, whitespace and
    line breaks inside the payload, missing `=` padding, the URL-safe alphabet, percent-encoding.
    """
    if url[:5].lower() != "data:":
        raise InvalidImageError("image URL is not a data: URL", param=param)
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidImageError(
            "malformed data URL: expected 'data:image/<type>;base64,<data>' (no ',' found)", param=param
        )
    if len(header) > 256:
        raise InvalidImageError("malformed data URL: the media type part is too long", param=param)
    parts = [p.strip().lower() for p in header.split(";")]
    mime, params = parts[0], parts[1:]
    if mime == "base64" and not params:  # "data:base64,..." (media type left out)
        mime, params = "", ["base64"]
    _check_data_url_mime(mime, param=param, limits=limits)
    if "base64" not in params:
        raise InvalidImageError(
            "data URL must be base64-encoded: expected 'data:image/<type>;base64,<data>'", param=param
        )

    compact = "".join(payload.split())
    if "%" in compact:
        compact = urllib.parse.unquote(compact)
        compact = "".join(compact.split())
    compact = compact.rstrip("=")
    if not compact:
        raise InvalidImageError("data URL contains no image data", param=param)
    # Upper bound of the decoded size, known without decoding anything.
    decoded_size = len(compact) * 3 // 4
    if decoded_size > limits.max_image_bytes:
        raise InvalidImageError(
            f"image is too large: about {decoded_size} bytes after base64 decoding, the limit is "
            f"{limits.max_image_bytes} bytes",
            param=param,
        )
    if len(compact) % 4 == 1:
        raise InvalidImageError("data URL payload is not valid base64 (bad length)", param=param)
    if "-" in compact or "_" in compact:
        compact = compact.translate(_URLSAFE_TO_STANDARD)
    compact += "=" * (-len(compact) % 4)
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"data URL payload is not valid base64: {exc}", param=param) from None
    if not data:
        raise InvalidImageError("data URL contains no image data", param=param)
    return data


_URLSAFE_TO_STANDARD: Final = str.maketrans("-_", "+/")


def _check_data_url_mime(mime: str, *, param: str, limits: ImageLimits) -> None:
    if mime in ("", "application/octet-stream"):
        return
    if mime in ("image/svg+xml", "image/svg"):
        raise InvalidImageError(
            f"SVG images are not supported; allowed formats: {_allowed_list(limits)}", param=param
        )
    if not re.fullmatch(r"image/[a-z0-9][a-z0-9.+_-]*", mime):
        shown = mime if len(mime) <= 64 else mime[:64] + "..."
        expected = ", ".join(_FORMAT_MIME.get(f, f"image/{f.lower()}") for f in limits.allowed_formats)
        raise InvalidImageError(
            f"data URL has media type {shown!r}, which is not an image; expected one of {expected}",
            param=param,
        )


def _allowed_list(limits: ImageLimits) -> str:
    return ", ".join(limits.allowed_formats)


# --- decoding --------------------------------------------------------------------------------

_ALPHA_MODES: Final = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_COLOUR_KEY_MODES: Final = frozenset({"1", "L", "P", "RGB"})
_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def load_image(
    data: bytes, *, param: str, limits: ImageLimits, budget: ImageBudget | None = None
) -> Image.Image:
    """Decode image bytes into an RGB image, or raise InvalidImageError.

    CPU-bound (up to a few hundred ms for a large image): call it from a worker thread in
    async code (`resolve_image` does).
    """
    if not data:
        raise InvalidImageError("image data is empty", param=param)
    if len(data) > limits.max_image_bytes:
        raise InvalidImageError(
            f"image is too large: {len(data)} bytes, the limit is {limits.max_image_bytes} bytes",
            param=param,
        )
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A truncated upload must fail, never be padded with grey; this is a process-wide switch.
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was switched on; switching it off")
        ImageFile.LOAD_TRUNCATED_IMAGES = False

    # Some decoders allocate their canvas while opening (WebP does), so the size written in the
    # header is checked before Pillow sees the data; the opened size is checked again below.
    declared = _declared_size(data)
    if declared is not None:
        _check_dimensions(*declared, param=param, limits=limits)
    try:
        image = Image.open(BytesIO(data), formats=limits.allowed_formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(
            f"image is too large to decode safely (limit {limits.max_pixels} pixels): {exc}", param=param
        ) from None
    except UnidentifiedImageError:
        raise InvalidImageError(_unrecognised_message(data, limits), param=param) from None
    except Exception as exc:  # Pillow raises assorted error types on malformed headers
        raise InvalidImageError(f"image could not be decoded: {_describe(exc)}", param=param) from None

    try:
        return _decode_opened(image, param=param, limits=limits, budget=budget)
    finally:
        image.close()


def _decode_opened(
    image: Image.Image, *, param: str, limits: ImageLimits, budget: ImageBudget | None
) -> Image.Image:
    width, height = image.size
    _check_dimensions(width, height, param=param, limits=limits)
    if min(width, height) < limits.min_side:
        raise InvalidImageError(
            f"image is too small: {width}x{height}; each side must be at least {limits.min_side} pixels",
            param=param,
        )
    if budget is not None:
        budget.add_pixels(width * height, param=param)

    # Only the current frame (frame 0 right after opening) is decoded; `n_frames` is never
    # touched because it would walk every frame of an animation.
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"image is too large to decode safely: {exc}", param=param) from None
    except Exception as exc:  # truncated data, bad checksums, codec errors...
        raise InvalidImageError(
            f"image could not be decoded ({image.format or 'unknown format'}): {_describe(exc)}",
            param=param,
        ) from None

    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # a malformed EXIF block must not cost the user their image
        logger.debug("ignoring unusable EXIF orientation: %s", _describe(exc))

    try:
        return _to_rgb(image)
    except (ValueError, OSError) as exc:
        raise InvalidImageError(
            f"image mode {image.mode!r} cannot be converted to RGB: {_describe(exc)}", param=param
        ) from None


def _check_dimensions(width: int, height: int, *, param: str, limits: ImageLimits) -> None:
    pixels = width * height
    if pixels > limits.max_pixels:
        raise InvalidImageError(
            f"image is too large: {width}x{height} is {pixels} pixels, the limit is "
            f"{limits.max_pixels} pixels per image",
            param=param,
        )


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height as written in a PNG, GIF, WebP or JPEG header, without decoding anything."""
    if data[:2] == b"\xff\xd8":
        return _jpeg_declared_size(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
        if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
            return (
                int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF,
            )
        if chunk == b"VP8L" and data[20] == 0x2F:
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


_JPEG_SOF_MARKERS: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_declared_size(data: bytes) -> tuple[int, int] | None:
    """Walk the JPEG segments up to the first start-of-frame (a bounded number of them)."""
    position = 2
    for _ in range(1024):
        if position + 4 > len(data) or data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker in _JPEG_SOF_MARKERS:
            if position + 9 > len(data):
                return None
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            return width, height
        if length < 2:
            return None
        position += 2 + length
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image: alpha composited on white, wide integer/float modes scaled to 8 bits."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own I;16 -> L conversion clips at 255 (a 16-bit photo turns white); scale instead.
        values = np.asarray(image).astype(np.int64)
        values = np.clip(values, 0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and float(values.max()) <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES or (mode in _COLOUR_KEY_MODES and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


_MAGIC: Final = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
)


def _sniff_format(data: bytes) -> str | None:
    head = data[:64]
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
    if head[:2] == b"BM" and len(data) >= 26:
        return "BMP"
    text = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<?xml", b"<svg", b"<!doctype svg")) or b"<svg" in text:
        return "SVG"
    return None


def _unrecognised_message(data: bytes, limits: ImageLimits) -> str:
    allowed = _allowed_list(limits)
    sniffed = _sniff_format(data)
    if sniffed == "SVG":
        return f"SVG images are not supported; allowed formats: {allowed}"
    if sniffed is not None and sniffed not in limits.allowed_formats:
        return f"image format {sniffed} is not supported; allowed formats: {allowed}"
    if sniffed is not None:
        return f"image data looks like {sniffed} but could not be decoded (corrupt file?)"
    return f"image data is not in a recognised image format; allowed formats: {allowed}"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- remote URLs -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteImagePolicy:
    """Whether and how http(s) image URLs may be fetched. Off by default.

    `allowed_domains`: None or empty means any public host; otherwise each entry matches itself
    and its subdomains (a leading `*.` or `.` is ignored; an IP literal entry matches only that
    address). Addresses must be public whether or not the domain is allowed.
    `_trusted_test_networks` is for tests only: addresses in these networks count as public, so
    that a fetch can be exercised against a server on loopback.
    """

    enabled: bool = False
    allowed_domains: tuple[str, ...] | None = None
    allow_http: bool = False
    max_redirects: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    max_bytes: int = 20 * MiB
    _trusted_test_networks: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        _require_int("max_redirects", self.max_redirects, minimum=0)
        _require_int("max_bytes", self.max_bytes, minimum=1)
        for name in ("connect_timeout", "read_timeout", "total_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"remote image {name} must be a positive number of seconds, got {value!r}")
        if self.allowed_domains is not None:
            if isinstance(self.allowed_domains, str):
                raise ConfigError("allowed_domains must be a sequence of domain names, not one string")
            domains = tuple(dict.fromkeys(_normalise_domain(d) for d in self.allowed_domains))
            object.__setattr__(self, "allowed_domains", domains or None)
        networks = []
        for net in self._trusted_test_networks:
            try:
                networks.append(str(ipaddress.ip_network(str(net), strict=False)))
            except ValueError:
                raise ConfigError(f"not an IP network: {net!r}") from None
        object.__setattr__(self, "_trusted_test_networks", tuple(networks))

    def domain_allowed(self, host: str) -> bool:
        """Whether a normalised host (lower-case, IDNA, no trailing dot) passes the allowlist."""
        if not self.allowed_domains:
            return True
        return any(host == d or host.endswith("." + d) for d in self.allowed_domains)


def _normalise_domain(entry: str) -> str:
    text = str(entry).strip().lower()
    for prefix in ("*.", "."):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    text = text.rstrip(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    try:
        host = httpx.URL(f"https://{text}/").raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, ValueError):
        raise ConfigError(f"not a valid domain name in allowed_domains: {entry!r}") from None
    if not host or not _is_valid_hostname(host):
        raise ConfigError(f"not a valid domain name in allowed_domains: {entry!r}")
    return host


def _remote_disabled_error(param: str) -> InvalidImageError:
    return InvalidImageError(
        "remote image URLs are disabled on this server; send the image inline as a base64 data URL "
        "(data:image/png;base64,...)",
        param=param,
    )


@dataclass(frozen=True, slots=True)
class _Target:
    """One hop: the URL as the user wrote it and the facts checked about it."""

    url: httpx.URL
    host: str  # lower-case, IDNA, no trailing dot; canonical text for an IP literal
    port: int
    ip: IPAddress | None  # set when the host is an IP literal
    host_header: str


@dataclass(frozen=True, slots=True)
class _Redirect:
    location: str


async def fetch_remote_image(
    url: str,
    *,
    policy: RemoteImagePolicy,
    param: str,
    resolver: Resolver | None = None,
    transport_factory: TransportFactory | None = None,
) -> bytes:
    """Fetch an http(s) image URL under `policy`, returning the body (at most `policy.max_bytes`).

    `resolver(host, port)` returns the addresses of a host name (default: the event loop's
    getaddrinfo); `transport_factory()` returns the httpx transport for one hop (default: a plain
    `httpx.AsyncHTTPTransport`); both exist so tests can run without leaving the machine.
    """
    return await _fetch_remote(
        url,
        policy=policy,
        param=param,
        max_bytes=policy.max_bytes,
        resolver=resolver,
        transport_factory=transport_factory,
    )


async def _fetch_remote(
    url: str,
    *,
    policy: RemoteImagePolicy,
    param: str,
    max_bytes: int,
    resolver: Resolver | None,
    transport_factory: TransportFactory | None,
) -> bytes:
    if not policy.enabled:
        raise _remote_disabled_error(param)
    try:
        return await asyncio.wait_for(
            _follow(url, policy, param, max_bytes, resolver or _default_resolver, transport_factory),
            timeout=policy.total_timeout,
        )
    except asyncio.TimeoutError:
        raise InvalidImageError(
            f"fetching the image URL took longer than {policy.total_timeout:g} s", param=param
        ) from None


async def _follow(
    url: str,
    policy: RemoteImagePolicy,
    param: str,
    max_bytes: int,
    resolver: Resolver,
    transport_factory: TransportFactory | None,
) -> bytes:
    target = _parse_target(url, policy, param)
    redirects = 0
    while True:
        addresses = await _resolve_public(target, policy, param, resolver)
        outcome = await _request(target, addresses, policy, param, max_bytes, transport_factory)
        if isinstance(outcome, bytes):
            return outcome
        if redirects >= policy.max_redirects:
            raise InvalidImageError(
                f"image URL redirected too many times (the limit is {policy.max_redirects} redirects)",
                param=param,
            )
        redirects += 1
        try:
            next_url = target.url.join(outcome.location)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise InvalidImageError(
                f"image URL redirected to an invalid location: {_describe(exc)}", param=param
            ) from None
        target = _parse_target(str(next_url), policy, param, redirected=True)


def _parse_target(url: str, policy: RemoteImagePolicy, param: str, *, redirected: bool = False) -> _Target:
    what = "image URL redirect" if redirected else "image URL"
    if len(url) > _MAX_URL_LENGTH:
        raise InvalidImageError(f"{what} is too long (more than {_MAX_URL_LENGTH} characters)", param=param)
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError) as exc:
        raise InvalidImageError(f"{what} is not a valid URL: {_describe(exc)}", param=param) from None
    scheme = parsed.scheme
    if scheme not in ("http", "https"):
        raise InvalidImageError(
            f"{what} has unsupported scheme {scheme[:20]!r}; only https"
            f"{' and http' if policy.allow_http else ''} URLs can be fetched",
            param=param,
        )
    if scheme == "http" and not policy.allow_http:
        raise InvalidImageError(f"{what} must use https (plain http is not allowed)", param=param)
    if parsed.userinfo:
        raise InvalidImageError(f"{what} must not contain credentials (user:password@)", param=param)
    try:
        host = parsed.raw_host.decode("ascii").lower()
    except UnicodeError:
        raise InvalidImageError(f"{what} has an invalid host name", param=param) from None
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise InvalidImageError(f"{what} has no host", param=param)
    port = parsed.port if parsed.port is not None else (443 if scheme == "https" else 80)
    if not 1 <= port <= 65535:
        raise InvalidImageError(f"{what} has an invalid port {port}", param=param)

    ip = _parse_ip_literal(host, what=what, param=param)
    if ip is None and not _is_valid_hostname(host):
        raise InvalidImageError(f"{what} has an invalid host name {host[:100]!r}", param=param)
    canonical = str(ip) if ip is not None else host
    if not policy.domain_allowed(canonical):
        raise InvalidImageError(
            f"{what} host {canonical!r} is not in the list of allowed image domains", param=param
        )
    return _Target(url=parsed, host=canonical, port=port, ip=ip, host_header=parsed.netloc.decode("ascii"))


_LABEL_RE: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_PART_RE: Final = re.compile(r"0x[0-9a-f]*|[0-9]+")


def _is_valid_hostname(host: str) -> bool:
    if len(host) > 253:
        return False
    return all(_LABEL_RE.fullmatch(label) for label in host.split("."))


def _parse_ip_literal(host: str, *, what: str, param: str) -> IPAddress | None:
    """The address an IP-literal host denotes, None for a host name.

    IPv4 is read the way inet_aton reads it (what getaddrinfo would do with it): 1 to 4 parts,
    each decimal, 0x-hex or 0-octal, the last part filling the remaining bytes — so `2130706433`,
    `0x7f000001`, `0177.0.0.1` and `127.1` all mean 127.0.0.1. A host whose last label is numeric
    but that is not a valid address is rejected rather than sent to DNS.
    """
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidImageError(
                f"{what} has an invalid IPv6 address {host[:100]!r}", param=param
            ) from None
    labels = host.split(".")
    if not _NUMERIC_PART_RE.fullmatch(labels[-1]):
        return None
    address = _inet_aton(labels)
    if address is None:
        raise InvalidImageError(f"{what} has an invalid IPv4 address {host[:100]!r}", param=param)
    return address


def _inet_aton(parts: list[str]) -> ipaddress.IPv4Address | None:
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        if not _NUMERIC_PART_RE.fullmatch(part):
            return None
        if part.startswith("0x"):
            if len(part) == 2:
                return None
            values.append(int(part[2:], 16))
        elif len(part) > 1 and part.startswith("0"):
            if any(c not in "01234567" for c in part):
                return None
            values.append(int(part, 8))
        else:
            values.append(int(part, 10))
    *leading, last = values
    if any(v > 255 for v in leading) or last >= 256 ** (5 - len(values)):
        return None
    number = 0
    for v in leading:
        number = number * 256 + v
    number = number * 256 ** (5 - len(values)) + last
    return ipaddress.IPv4Address(number)


_V4_BLOCKED: Final = tuple(
    (ipaddress.IPv4Network(net), label)
    for net, label in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)
_V6_BLOCKED: Final = tuple(
    (ipaddress.IPv6Network(net), label)
    for net, label in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("::ffff:0:0:0/96", "IPv4-translated"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/23", "IETF protocol assignments"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment routing"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")


def _non_public_reason(ip: IPAddress, policy: RemoteImagePolicy) -> str | None:
    """Why an address may not be fetched from, or None when it is public."""
    for net in policy._trusted_test_networks:
        if ip in ipaddress.ip_network(net):
            return None
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_reason(ip)
    if ip.scope_id:
        return "scoped IPv6"
    # Addresses that carry an IPv4 address are judged by the address they lead to.
    embedded: tuple[str, ipaddress.IPv4Address] | None = None
    if ip.ipv4_mapped is not None:
        embedded = ("IPv4-mapped", ip.ipv4_mapped)
    elif ip.sixtofour is not None:
        embedded = ("6to4", ip.sixtofour)
    elif ip in _NAT64:
        embedded = ("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if embedded is not None:
        kind, inner = embedded
        inner_reason = _v4_reason(inner)
        return f"{kind} {inner_reason} address {inner}" if inner_reason else None
    for net, label in _V6_BLOCKED:
        if ip in net:
            return label
    if not ip.is_global:
        return "not globally routable"
    return None


def _v4_reason(ip: ipaddress.IPv4Address) -> str | None:
    for net, label in _V4_BLOCKED:
        if ip in net:
            return label
    if not ip.is_global:
        return "not globally routable"
    return None


async def _default_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


async def _resolve_public(
    target: _Target, policy: RemoteImagePolicy, param: str, resolver: Resolver
) -> list[IPAddress]:
    """The target's addresses, each checked to be public; resolved exactly once."""
    if target.ip is not None:
        reason = _non_public_reason(target.ip, policy)
        if reason is not None:
            raise InvalidImageError(
                f"image URL points to a non-public address {target.ip} ({reason})", param=param
            )
        return [target.ip]

    try:
        answers = await resolver(target.host, target.port)
    except (OSError, UnicodeError, ValueError) as exc:
        raise InvalidImageError(
            f"could not resolve image URL host {target.host!r}: {_describe(exc)}", param=param
        ) from None
    addresses: list[IPAddress] = []
    for answer in answers:
        try:
            address = ipaddress.ip_address(str(answer))
        except ValueError:
            raise InvalidImageError(
                f"image URL host {target.host!r} resolved to an invalid address {str(answer)[:60]!r}",
                param=param,
            ) from None
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise InvalidImageError(f"could not resolve image URL host {target.host!r}", param=param)
    # Every answer must be public: a mixed answer is how DNS rebinding gets a foot in the door.
    for address in addresses:
        reason = _non_public_reason(address, policy)
        if reason is not None:
            raise InvalidImageError(
                f"image URL resolves to a non-public address {address} ({reason}); host {target.host!r}",
                param=param,
            )
    return addresses


async def _request(
    target: _Target,
    addresses: list[IPAddress],
    policy: RemoteImagePolicy,
    param: str,
    max_bytes: int,
    transport_factory: TransportFactory | None,
) -> bytes | _Redirect:
    """One GET to the target, connected to a checked address (falling back on connect errors)."""
    timeout = httpx.Timeout(
        connect=policy.connect_timeout,
        read=policy.read_timeout,
        write=policy.read_timeout,
        pool=policy.connect_timeout,
    )
    headers = {
        "Host": target.host_header,
        "User-Agent": _USER_AGENT,
        "Accept": "image/*",
        # Compressed transfer encodings could inflate past the byte cap in a single chunk.
        "Accept-Encoding": "identity",
    }
    extensions: dict[str, object] = {}
    if target.url.scheme == "https" and target.ip is None:
        # TLS SNI and certificate verification use the real host name, not the pinned IP.
        extensions["sni_hostname"] = target.host
    last_error: Exception | None = None
    for address in addresses:
        pinned = target.url.copy_with(host=str(address))
        transport = transport_factory() if transport_factory is not None else _default_transport()
        # A fresh client per hop: no connection (and its TLS session for another name) is reused;
        # trust_env=False keeps proxies and netrc credentials from the environment out of it.
        async with httpx.AsyncClient(
            transport=transport, timeout=timeout, follow_redirects=False, trust_env=False
        ) as client:
            try:
                async with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                    return await _read_response(response, target, param, max_bytes)
            except httpx.ConnectTimeout:
                raise InvalidImageError(
                    f"timed out connecting to image URL host {target.host!r} "
                    f"(after {policy.connect_timeout:g} s)",
                    param=param,
                ) from None
            except httpx.ConnectError as exc:
                last_error = exc
                continue
            except httpx.TimeoutException:
                raise InvalidImageError(
                    f"timed out reading the image URL from {target.host!r} "
                    f"(no data for {policy.read_timeout:g} s)",
                    param=param,
                ) from None
            except httpx.HTTPError as exc:
                raise InvalidImageError(
                    f"could not fetch the image URL from {target.host!r}: {_describe(exc)}", param=param
                ) from None
    assert last_error is not None
    raise InvalidImageError(
        f"could not connect to image URL host {target.host!r}: {_describe(last_error)}", param=param
    )


def _default_transport() -> httpx.AsyncBaseTransport:
    return httpx.AsyncHTTPTransport(retries=0)


async def _read_response(
    response: httpx.Response, target: _Target, param: str, max_bytes: int
) -> bytes | _Redirect:
    status = response.status_code
    if status in _REDIRECT_STATUSES:
        location = response.headers.get("location")
        if not location:
            raise InvalidImageError(
                f"image URL answered HTTP {status} without a Location header", param=param
            )
        return _Redirect(location)
    if not 200 <= status < 300:
        raise InvalidImageError(f"image URL answered HTTP {status} from {target.host!r}", param=param)
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise InvalidImageError(
            f"image URL sent a compressed body (Content-Encoding: {encoding[:30]}); only "
            "uncompressed transfers are accepted",
            param=param,
        )
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise InvalidImageError(
            f"image is too large: the server declares {int(declared)} bytes, the limit is {max_bytes} bytes",
            param=param,
        )
    body = bytearray()
    # Content-Encoding is identity (checked above), so these are the bytes on the wire.
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise InvalidImageError(
                f"image is too large: the download exceeded the limit of {max_bytes} bytes", param=param
            )
    return bytes(body)


# --- dispatch --------------------------------------------------------------------------------

_SCHEME_RE: Final = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]{0,31}):")


async def fetch_image_data(
    url: str,
    *,
    param: str,
    limits: ImageLimits,
    remote: RemoteImagePolicy,
    resolver: Resolver | None = None,
    transport_factory: TransportFactory | None = None,
) -> bytes:
    """The encoded image bytes behind one `image_url.url` value, not decoded yet.

    `data:` URLs are decoded from base64; `http(s)` URLs are fetched under `remote` (rejected
    when remote images are disabled); anything else is rejected. `param` names the offending
    input in errors, e.g. `messages[2].content[1].image_url`.
    """
    if not isinstance(url, str):
        raise InvalidImageError("image URL must be a string", param=param)
    url = url.strip()
    if not url:
        raise InvalidImageError(
            "image URL is empty; send a base64 data URL (data:image/png;base64,...)", param=param
        )
    match = _SCHEME_RE.match(url)
    scheme = match.group(1).lower() if match else None
    if scheme == "data":
        return decode_data_url(url, param=param, limits=limits)
    if scheme in ("http", "https"):
        if not remote.enabled:
            raise _remote_disabled_error(param)
        return await _fetch_remote(
            url,
            policy=remote,
            param=param,
            max_bytes=min(remote.max_bytes, limits.max_image_bytes),
            resolver=resolver,
            transport_factory=transport_factory,
        )
    accepted = "a base64 data URL (data:image/png;base64,...)"
    if remote.enabled:
        accepted += " or an https URL" if not remote.allow_http else " or an http(s) URL"
    if scheme is None:
        raise InvalidImageError(f"image URL has no scheme; send {accepted}", param=param)
    raise InvalidImageError(f"unsupported image URL scheme {scheme!r}; send {accepted}", param=param)


async def resolve_image(
    url: str,
    *,
    param: str,
    limits: ImageLimits,
    remote: RemoteImagePolicy,
    budget: ImageBudget | None = None,
    resolver: Resolver | None = None,
    transport_factory: TransportFactory | None = None,
) -> Image.Image:
    """Turn one `image_url.url` value into a validated RGB image (`fetch_image_data`, then
    `load_image` in a worker thread)."""
    if budget is not None and isinstance(url, str) and url.strip():
        budget.add_image(param=param)
    data = await fetch_image_data(
        url, param=param, limits=limits, remote=remote, resolver=resolver, transport_factory=transport_factory
    )
    return await asyncio.to_thread(load_image, data, param=param, limits=limits, budget=budget)


__all__ = [
    "ImageBudget",
    "ImageLimits",
    "RemoteImagePolicy",
    "Resolver",
    "TransportFactory",
    "decode_data_url",
    "fetch_image_data",
    "fetch_remote_image",
    "load_image",
    "resolve_image",
]
