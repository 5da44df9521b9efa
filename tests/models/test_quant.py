"""4-bit weights: formats, loading AWQ/GPTQ checkpoints, `glmv quantize`, and the CPU path.

Measured on the tiny checkpoints (200 random tokens, mean cosine of the logits against the float
model): as written — i.i.d. Gaussian weights with residual branches as large as the residual
stream, a chaotic random network — RTN gives 0.977-0.983 (group 32) and 0.974-0.977 (group 64),
AWQ 0.978-0.980 / 0.973-0.976: the plain 4-bit error of Gaussian weights (about 9 % per layer at
group 64), which no activation-aware scale removes because such activations have no outlier
channels. With the residual branches scaled by 0.2 (the convention of glmv's full-size
random-init checkpoints, closer to trained networks) it is 0.997-0.998 for RTN and AWQ at groups
32 and 64. With planted activation-outlier channels AWQ recovers what RTN loses (0.998 vs 0.989).
The tests assert these with small margins.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from glmv.cli import main as cli_main
from glmv.errors import CheckpointError
from glmv.kernels.metadata import AttentionMetadata
from glmv.models.generate import generate
from glmv.models.loader import load_model
from glmv.models.quant import int4 as q4
from glmv.models.quant.awq import AwqSettings, search_scale
from glmv.models.quant.calibration import build_calibration_set
from glmv.models.quant.linear import Int4Linear
from glmv.models.quant.quantize import quantize_checkpoint
from glmv.models.quant.report import weight_memory
from glmv.models.quant.writer import gptq_quantization_config, write_quantized_checkpoint
from tests.kernels.interpreter import requires_triton, run_in_interpreter
from tests.models.weightless import weightless_copy

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ helpers


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    t = model.config.text
    n, bs = ids.numel(), 16
    nb = (n + bs - 1) // bs
    shape = (nb, bs, t.num_key_value_heads, t.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(t.num_hidden_layers)]
    meta = AttentionMetadata.build(
        query_lens=[n], seq_lens=[n], block_tables=[list(range(nb))], block_size=bs
    )
    with torch.inference_mode():
        return model.compute_logits(model(ids, torch.arange(n).expand(3, n), caches, meta))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=-1).mean().item()


def _random_ids(model: torch.nn.Module, n: int = 200) -> torch.Tensor:
    return torch.randint(0, model.vocab_size, (n,), generator=torch.Generator().manual_seed(0))


def _edit_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _scale_branches(tensors: dict[str, torch.Tensor], factor: float = 0.2) -> None:
    for key in tensors:
        if "post_self_attn_layernorm" in key or "post_mlp_layernorm" in key:
            tensors[key] = tensors[key] * factor


def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's own unpacking (shift every nibble out, then undo the [0,2,4,6,1,3,5,7] order)."""
    shifts = torch.arange(0, 32, 4)
    nibbles = (words[:, :, None] >> shifts[None, None, :]) & 0xF
    nibbles = nibbles.view(words.shape[0], -1)
    reverse = torch.arange(nibbles.shape[-1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    return nibbles[:, reverse]


def _awq_dequant(tensors: dict[str, torch.Tensor], prefix: str, group: int) -> torch.Tensor:
    """The reference formula (q - z) * s from the raw AWQ tensors, as an [out, in] matrix."""
    q = _awq_unpack(tensors[f"{prefix}.qweight"]).float()  # [K, N]
    z = _awq_unpack(tensors[f"{prefix}.qzeros"]).float()  # [K/g, N]
    s = tensors[f"{prefix}.scales"].float()
    w = (q - z.repeat_interleave(group, 0)) * s.repeat_interleave(group, 0)
    return w.t()


def _gptq_dequant(tensors: dict[str, torch.Tensor], prefix: str, *, v1: bool) -> torch.Tensor:
    words = tensors[f"{prefix}.qweight"]  # [K/8, N], rows packed in order
    q = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], 1).reshape(-1, words.shape[1]).float()
    zw = tensors[f"{prefix}.qzeros"]
    z = torch.stack([(zw >> (4 * i)) & 0xF for i in range(8)], -1).reshape(zw.shape[0], -1).float()
    z = z + 1 if v1 else z
    g_idx = tensors[f"{prefix}.g_idx"].long()
    s = tensors[f"{prefix}.scales"].float()
    return ((q - z[g_idx]) * s[g_idx]).t()


def _fused_slices(model: torch.nn.Module) -> dict[str, list[tuple[str, int, int]]]:
    t = model.config.text
    qs, kv, inter = (
        t.num_attention_heads * t.head_dim,
        t.num_key_value_heads * t.head_dim,
        t.intermediate_size,
    )
    return {
        "self_attn.qkv_proj": [
            ("self_attn.q_proj", 0, qs),
            ("self_attn.k_proj", qs, kv),
            ("self_attn.v_proj", qs + kv, kv),
        ],
        "mlp.gate_up_proj": [("mlp.gate_up_proj", 0, 2 * inter)],
        "self_attn.o_proj": [("self_attn.o_proj", 0, t.hidden_size)],
        "mlp.down_proj": [("mlp.down_proj", 0, t.hidden_size)],
    }


@pytest.fixture(scope="module")
def awq41(tiny41_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("awq41") / "ckpt"
    quantize_checkpoint(tiny41_dir, dst, method="awq", group_size=64, device="cpu", num_samples=6)
    return dst


# -------------------------------------------------------------------------------- formats


def test_awq_packing_matches_autoawq_and_round_trips() -> None:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 48), generator=gen, dtype=torch.uint8)
    expected = torch.zeros(64, 6, dtype=torch.int32)
    for col in range(6):  # AutoAWQ's WQLinear_GEMM.from_linear packing loop
        for i, j in enumerate([0, 2, 4, 6, 1, 3, 5, 7]):
            expected[:, col] |= codes[:, col * 8 + j].to(torch.int32) << (i * 4)
    packed = q4.pack_columns(codes, q4.AWQ_ORDER)
    assert torch.equal(packed, expected)
    assert torch.equal(_awq_unpack(packed).to(torch.uint8), codes)
    assert torch.equal(q4.unpack_columns(packed, q4.AWQ_ORDER), codes)
    assert torch.equal(q4.unpack_rows(q4.pack_rows(codes)), codes)


def test_rtn_codes_and_reference_dequantization() -> None:
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(1))
    for sym in (False, True):
        qw = q4.quantize_rtn(w, 64, sym=sym)
        assert int(qw.q.max()) <= 15 and qw.scales.dtype == torch.float16
        s = qw.scales.float().repeat_interleave(64, 1)
        z = qw.zeros.float().repeat_interleave(64, 1)
        assert torch.equal(qw.dequantize(), (qw.q.float() - z) * s)
        assert (qw.dequantize() - w).abs().max() <= 0.5 * s.max() + 1e-6
        if sym:
            assert bool((qw.zeros == 8).all())
    packed = q4.to_packed(q4.quantize_rtn(w, 64))
    x = torch.randn(3, 256)
    ref = x @ q4.quantize_rtn(w, 64).dequantize().t()
    got = q4.int4_matmul_reference(x, packed.qweight, packed.zeros, packed.scales, 64, block_k=128)
    assert torch.allclose(got, ref, atol=1e-5)
    with pytest.raises(ValueError):
        q4.quantize_rtn(w, 96)


# ------------------------------------------------------------------------- AWQ checkpoints


def test_awq_checkpoint_layout_and_exact_dequantization(awq41: Path) -> None:
    config = json.loads((awq41 / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 64,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ["lm_head", "visual"],
    }
    raw = load_file(str(awq41 / "model.safetensors"))
    model = load_model(awq41, dtype="float32", device="cpu")
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(
        model.visual.blocks[0].attn.qkv, Int4Linear
    )
    checked = 0
    for i, layer in enumerate(model.layers):
        p = f"model.language_model.layers.{i}"
        assert raw[f"{p}.self_attn.q_proj.qweight"].dtype == torch.int32
        assert raw[f"{p}.self_attn.q_proj.scales"].dtype == torch.float16
        assert f"{p}.self_attn.q_proj.weight" not in raw
        for fused, parts in _fused_slices(model).items():
            module = layer.get_submodule(fused)
            assert isinstance(module, Int4Linear)
            w = module.dequantized_weight()
            for name, start, length in parts:
                assert torch.equal(w[start : start + length], _awq_dequant(raw, f"{p}.{name}", 64))
                checked += 1
    assert checked == 12


def test_quantized_tiny_logits_close_to_float(tiny41_dir: Path, tiny46_dir: Path, tmp_path: Path) -> None:
    for name, src in (("41", tiny41_dir), ("46", tiny46_dir)):
        calm = _edit_weights(src, tmp_path / f"calm{name}", _scale_branches)
        for base, floor in ((src, 0.96), (calm, 0.995)):
            ref = load_model(base, dtype="float32", device="cpu")
            ids = _random_ids(ref)
            expected = _logits(ref, ids)
            for method in ("rtn", "awq"):
                dst = tmp_path / f"{base.name}-{name}-{method}"
                quantize_checkpoint(base, dst, method=method, group_size=64, device="cpu", num_samples=6)
                got = _logits(load_model(dst, dtype="float32", device="cpu"), ids)
                assert _cosine(expected, got) >= floor, (name, base.name, method)


def test_awq_recovers_activation_outliers(tiny41_dir: Path, tmp_path: Path) -> None:
    """Large activations on a few channels (norm weight × 30, the weight columns ÷ 30: the same
    float function) ruin round-to-nearest; the activation-aware scales undo it."""
    channels = torch.arange(0, 128, 16)

    def plant(tensors: dict[str, torch.Tensor]) -> None:
        _scale_branches(tensors)
        for i in range(2):
            p = f"model.language_model.layers.{i}"
            tensors[f"{p}.input_layernorm.weight"][channels] *= 30
            tensors[f"{p}.post_attention_layernorm.weight"][channels] *= 30
            for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_up_proj"):
                tensors[f"{p}.{proj}.weight"][:, channels] /= 30

    src = _edit_weights(tiny41_dir, tmp_path / "outliers", plant)
    ref = load_model(src, dtype="float32", device="cpu")
    ids = _random_ids(ref)
    expected = _logits(ref, ids)
    cos = {}
    for method in ("rtn", "awq"):
        quantize_checkpoint(src, tmp_path / method, method=method, group_size=64, device="cpu", num_samples=8)
        cos[method] = _cosine(
            expected, _logits(load_model(tmp_path / method, dtype="float32", device="cpu"), ids)
        )
    assert cos["awq"] >= 0.995
    assert cos["awq"] - cos["rtn"] >= 0.005


def test_scale_search_prefers_outlier_channels() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)
    x[:, :4] *= 40
    w = torch.randn(64, 128, generator=gen) / 128**0.5
    s = search_scale(x, w, AwqSettings(group_size=64))
    assert s[:4].min() > s[4:].max()
    assert torch.equal(
        search_scale(torch.randn(64, 128, generator=gen), w, AwqSettings(group_size=64, n_grid=0)),
        torch.ones(128),
    )


def test_quantized_model_generates_and_reports_memory(awq41: Path, tiny41_dir: Path) -> None:
    model = load_model(awq41, dtype="float32", device="cpu")
    out = generate(model, [1, 2, 3, 4, 5], max_new_tokens=6)
    assert len(out) == 6
    mem = weight_memory(model)
    full = weight_memory(load_model(tiny41_dir, dtype="float32", device="cpu"))
    t = model.config.text
    per_layer = [
        (t.hidden_size, 256),
        (128, t.hidden_size),
        (t.hidden_size, 2 * t.intermediate_size),
        (t.intermediate_size, t.hidden_size),
    ]
    expected_int4 = t.num_hidden_layers * sum(k * n // 2 + (k // 64) * n * 3 for k, n in per_layer)
    assert mem.int4_layers == 4 * t.num_hidden_layers
    assert mem.int4_bytes == expected_int4
    assert mem.total_bytes < full.total_bytes
    assert "int4 layers" in mem.describe()
    # The codes keep the K-major layout the CUDA kernels read (a transposed view), also after the
    # model skeleton was built on meta and materialised.
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.qweight.t().is_contiguous() and not m.qweight.is_contiguous() for m in layers)


def test_cpu_paths_agree_and_never_import_triton(awq41: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from glmv.models.quant import linear

    model = load_model(awq41, dtype="float32", device="cpu")
    layer = model.layers[0].mlp.gate_up_proj
    x = torch.randn(5, layer.in_features)
    cached = layer(x)
    monkeypatch.setattr(linear, "CACHE_MAX_ELEMENTS", 0)
    layer.invalidate_cache()
    assert torch.allclose(layer(x), cached, atol=1e-5)
    code = (
        "import sys, torch\n"
        "from glmv.models.loader import load_model\n"
        "import glmv.models.quant.quantize\n"
        f"m = load_model({str(awq41)!r}, dtype='float32', device='cpu')\n"
        "from glmv.models.generate import generate\n"
        "generate(m, [1, 2, 3], max_new_tokens=2)\n"
        "assert 'glmv.kernels.int4_triton' not in sys.modules, 'the Triton kernels were imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=120)


# ------------------------------------------------------------------------ GPTQ checkpoints


@pytest.mark.parametrize(("sym", "v1"), [(True, True), (False, True), (False, False)])
def test_gptq_checkpoint_loads_with_exact_dequantization(
    tiny46_dir: Path, tmp_path: Path, sym: bool, v1: bool
) -> None:
    float_model = load_model(tiny46_dir, dtype="float32", device="cpu")
    targets = [f"layers.{i}.{m}" for i in range(3) for m in _fused_slices(float_model)]
    quantized = {n: q4.quantize_rtn(float_model.get_submodule(n).weight, 64, sym=sym) for n in targets}
    dst = tmp_path / "gptq"
    config = gptq_quantization_config(64, sym=sym, v1=v1)
    write_quantized_checkpoint(
        tiny46_dir, dst, float_model, quantized, (), config, fmt="gptq", shard_bytes=1 << 20
    )
    assert (dst / "model.safetensors.index.json").is_file()  # small shards: the index path
    raw: dict[str, torch.Tensor] = {}
    for f in dst.glob("*.safetensors"):
        raw.update(load_file(str(f)))
    model = load_model(dst, dtype="float32", device="cpu")
    for i, layer in enumerate(model.layers):
        p = f"model.language_model.layers.{i}"
        for fused, parts in _fused_slices(model).items():
            w = layer.get_submodule(fused).dequantized_weight()
            assert torch.equal(w, quantized[f"layers.{i}.{fused}"].dequantize())
            for name, start, length in parts:
                assert torch.equal(w[start : start + length], _gptq_dequant(raw, f"{p}.{name}", v1=v1))
    ids = _random_ids(model, 64)
    assert _cosine(_logits(float_model, ids), _logits(model, ids)) > 0.9


def test_gptq_act_order_and_bad_configs_are_refused(tiny46_dir: Path, tmp_path: Path) -> None:
    float_model = load_model(tiny46_dir, dtype="float32", device="cpu")
    targets = [f"layers.{i}.mlp.down_proj" for i in range(3)]
    quantized = {n: q4.quantize_rtn(float_model.get_submodule(n).weight, 64) for n in targets}
    dst = tmp_path / "gptq"
    write_quantized_checkpoint(
        tiny46_dir, dst, float_model, quantized, (), gptq_quantization_config(64, sym=False), fmt="gptq"
    )
    tensors = load_file(str(dst / "model.safetensors"))
    key = "model.language_model.layers.0.mlp.down_proj.g_idx"
    tensors[key] = tensors[key].flip(0).contiguous()  # act-order permutation
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(CheckpointError, match="act-order"):
        load_model(dst, dtype="float32", device="cpu")
    config = json.loads((dst / "config.json").read_text())
    for bad, message in (({"bits": 8}, "8-bit"), ({"quant_method": "bitsandbytes"}, "not supported")):
        (dst / "config.json").write_text(
            json.dumps({**config, "quantization_config": {**config["quantization_config"], **bad}})
        )
        with pytest.raises(CheckpointError, match=message):
            load_model(dst, dtype="float32", device="cpu")


# ------------------------------------------------------------------- quantize, CLI, random


def test_cli_quantize_rtn_and_refusals(
    tiny41_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "rtn"
    args = [
        "quantize",
        str(tiny41_dir),
        str(dst),
        "--method",
        "rtn",
        "--group-size",
        "64",
        "--device",
        "cpu",
        "--quiet",
    ]
    assert cli_main(args) == 0
    assert "8 linear layers in 4 bits (rtn, group 64)" in capsys.readouterr().out
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["group_size"] == 64
    for name in ("tokenizer.json", "preprocessor_config.json", "generation_config.json"):
        assert (dst / name).is_file()
    model = load_model(dst, dtype="float32", device="cpu")
    assert isinstance(model.layers[1].self_attn.o_proj, Int4Linear)
    # Quantizing a quantized checkpoint, or onto itself, is refused (usage errors: status 2).
    assert cli_main(["quantize", str(dst), str(tmp_path / "again"), "--method", "rtn", "--quiet"]) == 2
    assert cli_main(["quantize", str(tiny41_dir), str(tiny41_dir), "--quiet"]) == 2


def test_quantize_vision_and_lm_head(tiny46_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "all"
    report = quantize_checkpoint(
        tiny46_dir,
        dst,
        method="awq",
        group_size=32,
        quantize_vision=True,
        quantize_lm_head=True,
        device="cpu",
        num_samples=4,
    )
    model = load_model(dst, dtype="float32", device="cpu")
    assert isinstance(model.lm_head, Int4Linear)
    assert isinstance(model.visual.blocks[0].attn.qkv, Int4Linear)
    assert isinstance(model.visual.merger.mlp.gate_up_proj, Int4Linear)
    assert not isinstance(model.visual.patch_embed, Int4Linear)  # 1176 inputs: no group of 32 fits
    assert "visual.patch_embed" in report.float_linears
    float_model = load_model(tiny46_dir, dtype="float32", device="cpu")
    pixels = torch.randn(64, 1176, generator=torch.Generator().manual_seed(0))
    a = float_model.encode_images(pixels, [(1, 8, 8)])[0]
    b = model.encode_images(pixels, [(1, 8, 8)])[0]
    assert _cosine(a, b) > 0.9  # measured 0.946: the random vision tower is as sensitive as the LM


def test_weightless_checkpoint_becomes_random_int4(tiny41_dir: Path, tmp_path: Path) -> None:
    src = weightless_copy(tiny41_dir, tmp_path / "weightless", seed=3)
    dst = tmp_path / "int4"
    quantize_checkpoint(src, dst, method="rtn", group_size=64)
    assert not list(dst.glob("*.safetensors"))
    model = load_model(dst, dtype="float32", device="cpu")
    assert isinstance(model.layers[0].self_attn.qkv_proj, Int4Linear)
    assert not isinstance(model.lm_head, Int4Linear)
    assert weight_memory(model).int4_layers == 8
    assert torch.isfinite(_logits(model, torch.arange(20))).all()


def test_calibration_set_is_bilingual_with_images(tiny41_dir: Path) -> None:
    samples = build_calibration_set(tiny41_dir, num_samples=8, max_tokens=512, seed=0)
    assert len(samples) == 8
    assert sum(bool(s.images) for s in samples) == 6
    assert all(len(s.token_ids) <= 512 for s in samples)
    again = build_calibration_set(tiny41_dir, num_samples=8, max_tokens=512, seed=0)
    assert [s.token_ids for s in samples] == [s.token_ids for s in again]
    image_id = json.loads((tiny41_dir / "config.json").read_text())["image_token_id"]
    for s in samples:
        for im in s.images:
            t, h, w = im.grid_thw
            count = t * h * w // 4
            assert s.token_ids[im.offset : im.offset + count] == [image_id] * count
            assert s.token_ids.count(image_id) == count


# --------------------------------------------------------------- Triton kernels (interpreter)


@requires_triton
def test_triton_kernels_match_reference_in_interpreter() -> None:
    """The GEMV, GEMM and dequantize kernels against the reference, run by Triton's interpreter:
    exact and half-shift unpacking, split K with either reduction, ragged N and K, small groups,
    K-major words (what `Int4Linear` holds) and row-major ones (copied first)."""
    code = """
import torch
from glmv.models.quant.int4 import quantize_rtn, to_packed, dequantize_packed
from glmv.models.quant import int4 as q4
from glmv.kernels import int4_triton as T
from glmv.models.quant.linear import Int4Linear
torch.manual_seed(0)
L = T.LaunchConfig
assert [T.choose_config(m, 27392, 4096, 132).kind for m in (1, 2, 64, 127, 128)] == ["gemv", "gemm", "gemm", "gemm", "dequant"]
assert T.choose_config(1, 4096, 13696, 132).split_k > 1 and T.choose_config(1, 151552, 4096, 132).split_k == 1
assert T.is_k_major(Int4Linear(256, 40, bias=False, group_size=128).qweight)
for m, n, k, g in [(1, 40, 264, 8), (2, 40, 384, 128), (17, 24, 256, 256), (3, 70, 512, 64), (1, 33, 256, 32)]:
    qw = quantize_rtn(torch.randn(n, k), g); p = to_packed(qw)
    qk = T.k_major(p.qweight)
    assert T.is_k_major(qk) and not T.is_k_major(p.qweight) and torch.equal(qk, p.qweight)
    x = torch.randn(m, k); b = torch.randn(n)
    ref = x @ qw.dequantize().t() + b
    cfgs = [L("gemm", 16, 32, 1, 4, 2), L("gemm", 16, 32, 3, 4, 2), L("gemm", 16, 32, 3, 4, 2, 1, True), L("dequant")]
    cfgs += [L("gemm", 16, 32, 3, 4, 2, 1, True, prefetch=True)]
    cfgs += [L("gemv", 1, 16, 1, 4, 2), L("gemv", 1, 32, 3, 4, 2, 2), L("gemv", 1, 32, 3, 4, 2, 1, True)]
    cfgs += [L("gemv", 1, 16, 3, 4, 2, 1, True, prefetch=True), L("gemv", 1, 32, 2, 4, 2, 2, prefetch=True)]
    for cfg in cfgs:
        for w in (qk, p.qweight):  # row-major words are copied to K-major first
            out = T.int4_matmul_triton(x, w, p.zeros, p.scales, p.group_size, b, cfg)
            assert (out - ref).abs().max() <= 1e-4 * ref.abs().max(), (m, n, k, g, cfg)
    for w in (qk, p.qweight):
        assert torch.equal(T.dequantize_triton(w, p.zeros, p.scales, p.group_size, torch.float32),
                           dequantize_packed(p.qweight, p.zeros, p.scales, p.group_size))
# Half-shift unpacking (16-bit activations, whole-chunk groups), the kernels' default on CUDA.
for m, n, k, g in [(1, 40, 384, 128), (5, 72, 512, 256), (1, 24, 256, 128)]:
    qw = quantize_rtn(torch.randn(n, k), g); p = to_packed(qw)
    qk = T.k_major(p.qweight)
    x = torch.randn(m, k).half(); b = torch.randn(n).half()
    ref = x.float() @ qw.dequantize().t() + b.float()
    cfgs = [L("gemm", 16, 32, 2, 4, 2, 1, True), L("gemm", 16, 32, 1, 4, 2, 1, False, False)]
    cfgs += [L("gemm", 16, 32, 2, 4, 2, 1, True, prefetch=True)]
    if m == 1:
        cfgs += [L("gemv", 1, 16, 2, 4, 2, 1, True), L("gemv", 1, 32, 1, 1, 2, 2)]
        cfgs += [L("gemv", 1, 16, 2, 4, 2, 1, True, prefetch=True), L("gemv", 1, 32, 3, 1, 2, 2, prefetch=True)]
    for cfg in cfgs:
        out = T.int4_matmul_triton(x, qk, p.zeros, p.scales, p.group_size, b, cfg).float()
        assert ((out - ref).norm() / ref.norm()).item() < 2e-3, (m, n, k, g, cfg)  # measured <= 3e-4
    # Pair-permuted words: the activations load straight into the weight tile's layout.
    pw = T.permute_for_pairs(qk)
    got = q4.unpack_rows(pw).view(k // 128, 16, 4, 2, n)  # [chunk, word j, p, b, out]: nibble 2p + b
    want = qw.q.t().reshape(k // 128, 4, 16, 2, n).permute(0, 2, 1, 3, 4)  # channel 32p + 2j + b
    assert T.is_k_major(pw) and torch.equal(got, want)
    pair_cfgs = [L("gemv_pairs", 1, 16, 1, 4, 2), L("gemv_pairs", 1, 32, 3, 2, 2, 2, True)]
    pair_cfgs += [L("gemv_pairs", 1, 16, 2, 4, 2, 1, True, prefetch=True), L("gemv_pairs", 1, 32, 3, 2, 2, 2, prefetch=True)]
    for cfg in pair_cfgs:
        out = T.int4_matmul_triton(x, pw, p.zeros, p.scales, p.group_size, b, cfg).float()
        assert ((out - ref).norm() / ref.norm()).item() < 2e-3, (m, n, k, g, cfg)
"""
    run_in_interpreter(code)
