"""FP8 weights (`--quantization fp8`): rounding, the CPU reference path, model conversion, refusals.

The GPU path (`torch._scaled_mm` on FP8 tensor cores) is timed and compared in
benchmarks/device_fp8.py; here the same conversion runs on the CPU through the dequantizing
reference, which the GPU path equals up to the per-token rounding of the activations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmv.errors import ConfigError
from glmv.kernels import fp8 as K
from glmv.models.quant.fp8 import Fp8Linear, check_fp8_device, convert_to_fp8, fp8_linear_names
from glmv.models.registry import load_model
from tests.kernels.interpreter import requires_triton, run_in_interpreter
from tests.models.test_quant import _cosine, _edit_weights, _logits, _random_ids, _scale_branches


def test_row_rounding_is_within_e4m3_precision() -> None:
    gen = torch.Generator().manual_seed(0)
    w = (
        torch.randn(64, 256, generator=gen) * torch.logspace(-3, 1, 64)[:, None]
    )  # rows of very different size
    codes, scale = K.quantize_rows(w)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    # Each row's largest magnitude maps to 448 exactly; e4m3 keeps 3 mantissa bits (relative step 1/8).
    assert torch.equal(codes.float().abs().amax(dim=1), torch.full((64,), 448.0))
    back = K.dequantize_rows(codes, scale, torch.float32)
    rel = ((back - w).abs() / w.abs().amax(dim=1, keepdim=True)).amax().item()
    assert rel <= 1 / 16 + 1e-6  # half a step at the top of the range
    assert (back - w).norm() / w.norm() < 0.03
    zero_codes, zero_scale = K.quantize_rows(torch.zeros(2, 16))
    assert torch.equal(zero_codes.float(), torch.zeros(2, 16)) and bool((zero_scale > 0).all())


def test_fp8_linear_equals_the_dequantized_product() -> None:
    gen = torch.Generator().manual_seed(1)
    linear = nn.Linear(128, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 128, generator=gen) / 11)
        linear.bias.copy_(torch.randn(48, generator=gen))
    layer = Fp8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.element_size() == 1
    x = torch.randn(3, 5, 128, generator=gen)
    expected = F.linear(x, layer.dequantized_weight(torch.float32), linear.bias)
    assert torch.equal(layer(x), expected)
    assert layer(x).shape == (3, 5, 48)
    # Close to the full-precision layer: the rounding of the weight only.
    full = linear(x)
    assert ((layer(x) - full).norm() / full.norm()).item() < 0.03


def test_conversion_skips_the_head_and_unaligned_layers() -> None:
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(32, 64))
    model.add_module("odd", nn.Linear(30, 64))
    model.add_module("lm_head", nn.Linear(64, 32))
    assert fp8_linear_names(model) == ["proj"]
    assert convert_to_fp8(model) == ["proj"]
    assert isinstance(model.proj, Fp8Linear)
    assert isinstance(model.odd, nn.Linear) and isinstance(model.lm_head, nn.Linear)


def test_fp8_model_logits_close_to_float(tiny41_dir: Path, tiny46_dir: Path, tmp_path: Path) -> None:
    for name, src in (("41", tiny41_dir), ("46", tiny46_dir)):
        calm = _edit_weights(src, tmp_path / f"calm{name}", _scale_branches)
        ref = load_model(calm, dtype="float32", device="cpu")
        ids = _random_ids(ref)
        expected = _logits(ref, ids)
        model = load_model(calm, dtype="float32", device="cpu", quantization="fp8")
        converted = [m for m in model.modules() if isinstance(m, Fp8Linear)]
        assert len(converted) >= 4 * model.config.text.num_hidden_layers
        assert not isinstance(model.lm_head, Fp8Linear)
        assert _cosine(expected, _logits(model, ids)) >= 0.999, name
        # Weight bytes of the converted layers halve against bf16 (one byte per weight + scales).
        fp8_bytes = sum(m.weight.numel() + 4 * m.weight_scale.numel() for m in converted)
        bf16_bytes = sum(2 * m.weight.numel() for m in converted)
        assert fp8_bytes < 0.55 * bf16_bytes


def test_unknown_quantization_and_gpus_without_fp8_are_refused(
    tiny41_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="unknown quantization 'int3'"):
        load_model(tiny41_dir, device="cpu", quantization="int3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"A100 is 8\.0"):
        check_fp8_device(torch.device("cuda", 0))
    check_fp8_device(torch.device("cpu"))  # the CPU runs the reference path
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert K.supports_fp8(torch.device("cuda", 0)) and not K.supports_fp8(torch.device("cpu"))


@requires_triton
def test_fp8_triton_kernels_match_reference_in_interpreter() -> None:
    run_in_interpreter(
        """
import torch
from glmv.kernels import fp8 as F8
from glmv.kernels.fp8_triton import fp8_weight_matmul, quantize_rows_fp8
torch.manual_seed(0)
for m, n, k, bias in ((1, 48, 256, True), (5, 40, 200, False), (33, 64, 128, True)):
    w = torch.randn(n, k) / k**0.5
    codes, scale = F8.quantize_rows(w)
    x = torch.randn(m, k)
    b = torch.randn(n) if bias else None
    ref = F8.fp8_linear_reference(x, codes, scale, b)
    got = fp8_weight_matmul(x, codes, scale, b)
    assert got.shape == (m, n)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5, (m, n, k)
    q, s = quantize_rows_fp8(x)
    rq, rs = F8.quantize_rows(x)
    # The scales are exact; the codes are checked on the GPU only (benchmarks/device_fp8.py): the
    # interpreter's float8 conversion does not round as the hardware does (124.3 became 64).
    assert torch.allclose(s, rs) and q.dtype == torch.float8_e4m3fn and q.shape == (m, k)
"""
    )


def test_engine_config_quantization_loads_fp8_weights(tiny41_dir: Path) -> None:
    """`--quantization fp8` flows as one setting: flag → EngineConfig → the core's `load_model`."""
    from glmv.engine.core import EngineCore
    from glmv.engine.engine import EngineConfig
    from glmv.server.settings import Settings

    settings = Settings(model=str(tiny41_dir), quantization="fp8", device="cpu", engine_mode="inprocess")
    config = settings.engine_config(tiny41_dir)
    assert config.quantization == "fp8"
    core = EngineCore(config)
    converted = [m for m in core.model.modules() if isinstance(m, Fp8Linear)]
    assert len(converted) >= 4 * core.model.config.text.num_hidden_layers
    with pytest.raises(ConfigError, match="quantization must be one of fp8"):
        EngineConfig(model=str(tiny41_dir), quantization="int3")
