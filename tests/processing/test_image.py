"""glmv.processing.image against transformers' Glm4vImageProcessor (Pillow backend) as the reference."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as hf_smart_resize

from glmv.errors import CheckpointError, ConfigError, InvalidImageError
from glmv.processing.image import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageProcessor,
    ImageProcessorConfig,
    ProcessedImage,
    smart_resize,
)

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference() -> Glm4vImageProcessorPil:
    return Glm4vImageProcessorPil()


@pytest.fixture(scope="module")
def processor() -> ImageProcessor:
    return ImageProcessor()


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=90)
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))  # lazily decoded, as images arrive from requests


def assert_same_as_reference(
    data: bytes,
    reference: Glm4vImageProcessorPil,
    processor: ImageProcessor,
) -> ProcessedImage:
    # Two independent decodes, so neither processor sees the other's work on the Image object.
    expected = reference(decode(data))
    ours = processor.preprocess(decode(data))
    want = expected["pixel_values"]
    got = ours.pixel_values
    assert got.dtype == torch.float32
    assert tuple(got.shape) == want.shape
    assert float(np.abs(got.numpy() - want).max()) <= TOLERANCE
    assert [list(ours.grid_thw)] == expected["image_grid_thw"].tolist()
    t, h, w = ours.grid_thw
    assert ours.num_tokens == reference.get_number_of_image_patches(*decode(data).size[::-1]) // 4
    assert ours.num_tokens == t * h * w // 4
    return ours


SIZES = [(1, 1), (27, 500), (224, 224), (1120, 1120), (1920, 1080)]  # (width, height)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_rgb_matches_transformers(
    fmt: str, width: int, height: int, reference: Glm4vImageProcessorPil, processor: ImageProcessor
) -> None:
    data = encoded(Image.fromarray(noise(width, height, seed=width * 7 + height)), fmt)
    ours = assert_same_as_reference(data, reference, processor)
    assert ours.pixel_values.shape[1] == 1176


def test_large_photo_matches_transformers(
    reference: Glm4vImageProcessorPil, processor: ImageProcessor
) -> None:
    data = encoded(Image.fromarray(noise(4000, 3000, seed=4)), "JPEG")
    ours = assert_same_as_reference(data, reference, processor)
    # 2 * h * w must stay under longest_edge: the 12-megapixel photo is scaled down.
    assert ours.grid_thw == (1, 150, 200)
    _, h, w = ours.grid_thw
    assert 2 * h * w * 14 * 14 <= DEFAULT_MAX_PIXELS


def rgba_image() -> Image.Image:
    return Image.fromarray(noise(300, 200, channels=4, seed=11), mode="RGBA")


def la_image() -> Image.Image:
    return Image.fromarray(noise(150, 301, channels=2, seed=12), mode="LA")


def palette_image() -> Image.Image:
    return Image.fromarray(noise(257, 199, seed=13)).quantize(colors=64)


def palette_transparent_image() -> Image.Image:
    image = palette_image()
    image.info["transparency"] = 3
    return image


def grey_image() -> Image.Image:
    return Image.fromarray(noise(640, 480, channels=1, seed=14), mode="L")


def cmyk_image() -> Image.Image:
    return Image.fromarray(noise(333, 222, channels=4, seed=15), mode="CMYK")


def bilevel_image() -> Image.Image:
    return Image.fromarray(noise(128, 96, channels=1, seed=16)).convert("1")


def rgb_with_transparent_colour() -> Image.Image:
    # Few distinct colours so the tRNS colour really occurs in the picture.
    image = Image.fromarray((noise(200, 140, seed=17) // 128 * 255).astype(np.uint8))
    image.info["transparency"] = (255, 0, 255)
    return image


MODES: list[tuple[str, Callable[[], Image.Image], str]] = [
    ("RGBA", rgba_image, "PNG"),
    ("LA", la_image, "PNG"),
    ("P", palette_image, "PNG"),
    ("P+transparency", palette_transparent_image, "PNG"),
    ("L", grey_image, "PNG"),
    ("L-jpeg", grey_image, "JPEG"),
    ("CMYK", cmyk_image, "JPEG"),
    ("1", bilevel_image, "PNG"),
    ("RGB+tRNS", rgb_with_transparent_colour, "PNG"),
]


@pytest.mark.parametrize(("name", "make", "fmt"), MODES, ids=[m[0] for m in MODES])
def test_modes_match_transformers(
    name: str,
    make: Callable[[], Image.Image],
    fmt: str,
    reference: Glm4vImageProcessorPil,
    processor: ImageProcessor,
) -> None:
    image = make()
    save_kwargs = {}
    if "transparency" in image.info:
        save_kwargs["transparency"] = image.info["transparency"]
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save_kwargs)
    decoded = decode(buf.getvalue())
    assert decoded.mode == image.mode
    if name in ("P+transparency", "RGB+tRNS"):
        assert decoded.info.get("transparency") is not None
    assert_same_as_reference(buf.getvalue(), reference, processor)


def test_transparency_is_composited_on_white(processor: ImageProcessor) -> None:
    clear = Image.new("RGBA", (56, 56), (10, 20, 30, 0))
    assert (processor.resize(clear) == 255).all()


def test_custom_bounds_match_transformers() -> None:
    size = {"shortest_edge": 56 * 56, "longest_edge": 2 * 448 * 448}
    reference = Glm4vImageProcessorPil(size=size)
    processor = ImageProcessor(ImageProcessorConfig.from_dict({"size": size}))
    for width, height in [(1920, 1080), (10, 10), (500, 90)]:
        data = encoded(Image.fromarray(noise(width, height, seed=width)), "PNG")
        ours = assert_same_as_reference(data, reference, processor)
        _, h, w = ours.grid_thw
        assert 2 * h * w * 14 * 14 <= size["longest_edge"]
        assert 2 * h * w * 14 * 14 >= size["shortest_edge"]


# --- smart_resize ----------------------------------------------------------------------------


def test_smart_resize_known_sizes() -> None:
    assert smart_resize(1120, 1120) == (1120, 1120)
    assert smart_resize(1080, 1920) == (1092, 1932)
    assert smart_resize(224, 224) == (224, 224)
    # A 1x1 image is upscaled (to 28x28, then to the pixel floor) like transformers does.
    assert smart_resize(1, 1) == (84, 84)
    assert smart_resize(500, 27) == (504, 28)


def test_smart_resize_equals_transformers_on_many_sizes() -> None:
    rng = np.random.default_rng(123)
    heights = np.concatenate([rng.integers(1, 60, 300), rng.integers(1, 8000, 1500)])
    widths = np.concatenate([rng.integers(1, 60, 300), rng.integers(1, 8000, 1500)])
    bounds = [(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS), (56 * 56, 2 * 448 * 448), (3136, 9633792)]
    compared = 0
    for height, width in zip(heights.tolist(), widths.tolist(), strict=True):
        for low, high in bounds:
            try:
                want = hf_smart_resize(2, height, width, 2, 28, low, high)
            except ValueError:
                with pytest.raises(InvalidImageError):
                    smart_resize(height, width, min_pixels=low, max_pixels=high)
                continue
            assert smart_resize(height, width, min_pixels=low, max_pixels=high) == want
            compared += 1
    assert compared > 4000


def test_smart_resize_bounds_and_aspect() -> None:
    rng = np.random.default_rng(7)
    for _ in range(2000):
        height, width = (int(v) for v in rng.integers(28, 6000, 2))
        if max(height, width) / min(height, width) > 50:
            continue
        h, w = smart_resize(height, width)
        assert h % 28 == 0 and w % 28 == 0
        assert h >= 28 and w >= 28
        assert DEFAULT_MIN_PIXELS <= 2 * h * w <= DEFAULT_MAX_PIXELS
        # Both sides are scaled by one common factor s, each then rounded by less than 28 px:
        # |h - height*s| < 28 and |w - width*s| < 28, so the two per-side scales differ by less than this.
        assert abs(h / height - w / width) < 28 / height + 28 / width
        if min(h, w) >= 560:
            assert abs((h / w) / (height / width) - 1) < 0.06


def test_smart_resize_refuses_extreme_aspect_ratio() -> None:
    with pytest.raises(InvalidImageError):
        smart_resize(10, 5000)
    with pytest.raises(InvalidImageError):
        smart_resize(0, 10)
    with pytest.raises(InvalidImageError):
        ImageProcessor().preprocess(Image.new("RGB", (6000, 20)))


def test_size_helpers(processor: ImageProcessor, reference: Glm4vImageProcessorPil) -> None:
    assert processor.grid_thw(1080, 1920) == (1, 78, 138)
    assert processor.num_tokens(1080, 1920) == 2691
    assert processor.num_tokens(1120, 1120) == 1600
    assert processor.num_tokens(224, 224) == 64
    for height, width in [(1, 1), (333, 777), (4000, 3000)]:
        assert processor.num_tokens(height, width) * 4 == reference.get_number_of_image_patches(height, width)


# --- content hash ------------------------------------------------------------------------------


def test_content_hash_identity(processor: ImageProcessor) -> None:
    pixels = noise(300, 200, seed=21)
    data = encoded(Image.fromarray(pixels), "PNG")
    first = processor.preprocess(decode(data))
    second = processor.preprocess(decode(data))
    assert first.content_hash == second.content_hash
    assert len(first.content_hash) == 64
    assert processor.prepare(decode(data)).content_hash == first.content_hash

    changed = pixels.copy()
    changed[100, 150, 1] ^= 0x40
    other = processor.preprocess(Image.fromarray(changed))
    assert other.content_hash != first.content_hash
    # Same picture in another mode gives other pixels, hence another hash.
    assert processor.preprocess(Image.fromarray(pixels).convert("L")).content_hash != first.content_hash
    # Same picture under settings that change the pixels gives another hash.
    small = ImageProcessor(ImageProcessorConfig(max_pixels=2 * 112 * 112))
    assert small.preprocess(decode(data)).content_hash != first.content_hash


def test_cache_key_tracks_pixel_settings() -> None:
    base = ImageProcessorConfig()
    assert base.cache_key() == ImageProcessorConfig().cache_key()
    for changed in [
        ImageProcessorConfig(min_pixels=56 * 56),
        ImageProcessorConfig(max_pixels=9633792),
        ImageProcessorConfig(image_mean=(0.5, 0.5, 0.5)),
        ImageProcessorConfig(image_std=(0.5, 0.5, 0.5)),
        ImageProcessorConfig(do_normalize=False),
        ImageProcessorConfig(resample=int(Image.Resampling.BILINEAR)),
        ImageProcessorConfig(patch_size=16),
    ]:
        assert changed.cache_key() != base.cache_key()


# --- split API ---------------------------------------------------------------------------------


def test_split_api_equals_preprocess(processor: ImageProcessor) -> None:
    image = Image.fromarray(noise(640, 360, seed=31))
    whole = processor.preprocess(image)
    resized = processor.prepare(image)
    assert resized.pixels.dtype == np.uint8 and resized.pixels.shape == (364, 644, 3)
    assert resized.grid_thw == whole.grid_thw and resized.num_tokens == whole.num_tokens
    assert torch.equal(processor.to_patches(resized.pixels), whole.pixel_values)
    assert torch.equal(
        processor.to_patches(torch.from_numpy(resized.pixels), device="cpu"), whole.pixel_values
    )
    half = processor.to_patches(resized.pixels, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, whole.pixel_values.to(torch.bfloat16))
    again = processor.preprocess_uint8(processor.resize(image))
    assert torch.equal(again.pixel_values, whole.pixel_values)
    assert again.content_hash == whole.content_hash


def test_batched_patch_bytes_equal_to_patches(processor: ImageProcessor) -> None:
    # Several images' patch bytes concatenated and normalised at once give each image's rows.
    images = [
        processor.resize(Image.fromarray(noise(w, h, seed=50 + w)))
        for w, h in [(84, 56), (252, 112), (640, 360)]
    ]
    patches = [processor.patch_bytes(px) for px in images]
    assert all(p.dtype == np.uint8 and p.shape[1:] == (3, 14, 14) for p in patches)
    together = processor.normalise_patches(torch.from_numpy(np.concatenate(patches)))
    assert torch.equal(together, torch.cat([processor.to_patches(px) for px in images]))
    half = processor.normalise_patches(torch.from_numpy(patches[0]), dtype=torch.bfloat16)
    assert torch.equal(half, processor.to_patches(images[0], dtype=torch.bfloat16))


def test_patch_layout(processor: ImageProcessor) -> None:
    # Row r of pixel_values is patch (i, j) in 2x2 merge-group order; each row is (C, T, 14, 14).
    pixels = noise(56, 84, seed=41)  # 84 high, 56 wide -> grid 6 x 4
    rows = processor.preprocess_uint8(pixels).pixel_values.view(6 * 4, 3, 2, 14, 14)
    scale = torch.tensor([1 / 255 / s for s in CLIP_STD]).view(3, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]).view(3, 1, 1)
    order = [
        (gi * 2 + mi, gj * 2 + mj) for gi in range(3) for gj in range(2) for mi in range(2) for mj in range(2)
    ]
    for r, (i, j) in enumerate(order):
        patch = torch.from_numpy(pixels[i * 14 : (i + 1) * 14, j * 14 : (j + 1) * 14]).permute(2, 0, 1)
        want = patch.float() * scale + bias
        assert torch.allclose(rows[r, :, 0], want, atol=1e-6)
        assert torch.equal(rows[r, :, 1], rows[r, :, 0])


def test_preprocess_uint8_rejects_bad_pixels(processor: ImageProcessor) -> None:
    with pytest.raises(ValueError):
        processor.preprocess_uint8(noise(30, 28))
    with pytest.raises(ValueError):
        processor.preprocess_uint8(noise(28, 28).astype(np.float32))
    with pytest.raises(ValueError):
        processor.preprocess_uint8(noise(28, 28, channels=4))


def test_no_rgb_conversion_refuses_other_modes() -> None:
    processor = ImageProcessor(ImageProcessorConfig(do_convert_rgb=False))
    assert processor.preprocess(Image.fromarray(noise(56, 56))).grid_thw == (1, 6, 6)
    with pytest.raises(InvalidImageError):
        processor.preprocess(Image.new("L", (56, 56)))


def test_truncated_image_is_invalid(processor: ImageProcessor) -> None:
    data = encoded(Image.fromarray(noise(200, 200, seed=5)), "PNG")
    with pytest.raises(InvalidImageError):
        processor.preprocess(decode(data[: len(data) // 2]))


# --- configuration -----------------------------------------------------------------------------


def test_defaults_equal_transformers(reference: Glm4vImageProcessorPil) -> None:
    config = ImageProcessorConfig()
    assert config.min_pixels == reference.size.shortest_edge
    assert config.max_pixels == reference.size.longest_edge
    assert config.image_mean == tuple(reference.image_mean)
    assert config.image_std == tuple(reference.image_std)
    assert config.rescale_factor == reference.rescale_factor
    assert config.resample == int(reference.resample)
    assert (config.patch_size, config.temporal_patch_size, config.merge_size) == (14, 2, 2)
    assert config.patch_dim == 1176 and config.factor == 28


def write_config(directory: Path, data: dict) -> Path:
    (directory / "preprocessor_config.json").write_text(json.dumps(data))
    return directory


def test_from_pretrained_size_keys(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        {
            "size": {"shortest_edge": 3136, "longest_edge": 9633792},
            "do_rescale": True,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
            "image_processor_type": "Glm4vImageProcessor",
            "processor_class": "Glm4vProcessor",
        },
    )
    config = ImageProcessorConfig.from_pretrained(tmp_path)
    assert (config.min_pixels, config.max_pixels) == (3136, 9633792)
    assert ImageProcessorConfig.from_pretrained(str(tmp_path / "preprocessor_config.json")) == config
    processor = ImageProcessor.from_pretrained(tmp_path)
    assert processor.config == config
    # 4000x3000 under 9633792 (not the class default) like the published checkpoints.
    assert processor.grid_thw(3000, 4000) == ImageProcessor(config).grid_thw(3000, 4000)
    assert processor.grid_thw(3000, 4000) != ImageProcessor().grid_thw(3000, 4000)


def test_from_pretrained_legacy_keys(tmp_path: Path) -> None:
    write_config(tmp_path, {"min_pixels": 6272, "max_pixels": 1003520, "resample": 3})
    config = ImageProcessorConfig.from_pretrained(tmp_path)
    assert (config.min_pixels, config.max_pixels) == (6272, 1003520)
    write_config(tmp_path, {"size": {"min_pixels": 6272, "max_pixels": 1003520}})
    assert ImageProcessorConfig.from_pretrained(tmp_path) == config
    # Top-level legacy keys win over `size` when both are given.
    write_config(
        tmp_path, {"size": {"shortest_edge": 1, "longest_edge": 2}, "min_pixels": 6272, "max_pixels": 1003520}
    )
    assert ImageProcessorConfig.from_pretrained(tmp_path) == config


def test_from_pretrained_custom_bounds_match_transformers(tmp_path: Path) -> None:
    size = {"shortest_edge": 28 * 28 * 16, "longest_edge": 2 * 560 * 560}
    write_config(tmp_path, {"size": size})
    processor = ImageProcessor.from_pretrained(tmp_path)
    reference = Glm4vImageProcessorPil(size=size)
    data = encoded(Image.fromarray(noise(1000, 700, seed=51)), "JPEG")
    ours = assert_same_as_reference(data, reference, processor)
    assert 2 * ours.grid_thw[1] * ours.grid_thw[2] * 196 <= size["longest_edge"]


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        ImageProcessorConfig.from_pretrained(tmp_path)  # no file
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        ImageProcessorConfig.from_pretrained(tmp_path)
    write_config(tmp_path, {"size": {"shortest_edge": 10_000, "longest_edge": 100}})
    with pytest.raises(CheckpointError):
        ImageProcessorConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "data",
    [
        {"patch_size": 0},
        {"merge_size": "2"},
        {"image_mean": [0.5, 0.5]},
        {"image_std": [0.5, 0.0, 0.5]},
        {"do_normalize": "yes"},
        {"resample": 99},
        {"size": 448},
        {"do_resize": False},
    ],
)
def test_from_dict_rejects_bad_values(data: dict) -> None:
    with pytest.raises(ConfigError):
        ImageProcessorConfig.from_dict(data)


def test_from_dict_round_trip() -> None:
    config = ImageProcessorConfig(min_pixels=3136, max_pixels=9633792, image_mean=(0.5, 0.5, 0.5))
    assert ImageProcessorConfig.from_dict(config.to_dict()) == config
    assert ImageProcessorConfig.from_dict({}) == ImageProcessorConfig()
    assert ImageProcessorConfig.from_dict({"image_mean": 0.5}).image_mean == (0.5, 0.5, 0.5)
