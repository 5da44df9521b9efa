"""Checkpoints that are already FP8: the published block layout (`quant_method: fp8`,
`weight_scale_inv` per 128x128 block) and compressed-tensors `float-quantized` (per tensor, per
channel, per block), read through the normal loader.

Where FP8 runs (a CUDA GPU with FP8 tensor cores) FP8 layers become `Fp8Linear`s; the tests
reach that path on the CPU by patching `glmv.models.loader.keep_fp8` (the `Fp8Linear` then runs
its dequantizing reference, which the GPU kernels equal up to activation rounding:
tests/models/test_fp8.py).

Logit tolerances: e4m3 keeps 3 mantissa bits, so each weight moves by up to 1/16 of its value
(about 2.6 % RMS over a matrix); with the branches of the tiny random models calmed (as in
test_fp8.py) that keeps the logits' cosine to the float model at 0.999 or more. Block scales
turned into row scales are rounded a second time (about 3.9 % RMS): 0.998.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glmv.errors import CheckpointError
from glmv.kernels import fp8 as K
from glmv.models import loader as L
from glmv.models.loader import fused_name, map_name
from glmv.models.quant import fp8_checkpoint as FC
from glmv.models.quant.fp8 import Fp8Linear
from glmv.models.quant.fp8_checkpoint import Fp8Spec
from glmv.models.quant.fp8_writer import BLOCK_FP8, write_fp8_checkpoint
from glmv.models.registry import load_model
from tests.cli.conftest import error_line
from tests.models.test_quant import _cosine, _edit_weights, _logits, _random_ids, _scale_branches
from tests.models.weightless import weightless_copy

CHANNEL = Fp8Spec("compressed-tensors", "channel", None)
TENSOR = Fp8Spec("compressed-tensors", "tensor", None)
CT_BLOCK = Fp8Spec("compressed-tensors", "block", (32, 32))


def _reference_dequant(
    codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None
) -> torch.Tensor:
    """Dequantization written out tile by tile, independently of glmv's helpers: every element
    is `code * scale` of its `block` tile (per channel: scale [N, 1]; per tensor: one scale)."""
    if block is None:
        return codes.float() * (scale.float() if scale.ndim == 2 else scale.float().reshape(()))
    rows, cols = codes.shape
    out = torch.empty(rows, cols)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            r, c = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[r, c] = codes[r, c].float() * scale[i, j].float()
    return out


def _expected_weights(ckpt: Path, spec: Fp8Spec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """glmv parameter name -> the float weight the loader must produce from `ckpt` (fused)."""
    tensors = load_file(str(ckpt / "model.safetensors"))
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, value in tensors.items():
        if not key.endswith(".weight") or value.dtype != torch.float8_e4m3fn:
            continue
        scale = tensors[key[: -len("weight")] + spec.scale_leaf]
        name, _, idx = fused_name(map_name(key))
        parts.setdefault(name, []).append((idx, _reference_dequant(value, scale, spec.block).to(dtype)))
    return {name: torch.cat([t for _, t in sorted(p, key=lambda x: x[0])]) for name, p in parts.items()}


@pytest.fixture(scope="module")
def calm41(tiny41_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _edit_weights(tiny41_dir, tmp_path_factory.mktemp("calm") / "calm41", _scale_branches)


@pytest.fixture(scope="module")
def block41(calm41: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The calm tiny GLM-4.1V in the published block-FP8 layout."""
    dst = tmp_path_factory.mktemp("block") / "fp8"
    write_fp8_checkpoint(calm41, dst)
    return dst


@pytest.fixture
def fp8_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load as on a GPU with FP8 tensor cores: FP8 layers stay FP8."""
    monkeypatch.setattr(L, "keep_fp8", lambda device: True)


def test_block_quantization_math_and_partial_tiles() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(70, 200, generator=gen) * torch.logspace(-2, 1, 70)[:, None]
    codes, scale = K.quantize_blocks(w, (32, 64))
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (70, 200)
    assert scale.dtype == torch.float32 and scale.shape == (3, 4) == K.block_scale_shape((70, 200), (32, 64))
    # Each tile's largest magnitude maps to 448 exactly, partial tiles included.
    back = K.dequantize_blocks(codes, scale, (32, 64), torch.float32)
    assert torch.equal(back, _reference_dequant(codes, scale, (32, 64)))
    tiles = codes.float().abs()
    for i in range(3):
        for j in range(4):
            assert tiles[i * 32 : (i + 1) * 32, j * 64 : (j + 1) * 64].amax().item() == 448.0
    assert ((back - w).norm() / w.norm()).item() < 0.03


def test_block_checkpoint_is_written_in_the_published_layout(calm41: Path, block41: Path) -> None:
    qc = json.loads((block41 / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3" and qc["activation_scheme"] == "dynamic"
    assert qc["weight_block_size"] == [128, 128]
    assert "lm_head" in qc["modules_to_not_convert"]
    assert any(m.startswith("model.visual.") for m in qc["modules_to_not_convert"])
    tensors = load_file(str(block41 / "model.safetensors"))
    src = load_file(str(calm41 / "model.safetensors"))
    down = "model.language_model.layers.0.mlp.down_proj"
    assert tensors[f"{down}.weight"].dtype == torch.float8_e4m3fn
    assert tensors[f"{down}.weight_scale_inv"].dtype == torch.float32
    # [128 out, 320 in]: one tile row, three tile columns (the last one partial).
    assert tuple(tensors[f"{down}.weight_scale_inv"].shape) == (1, 3)
    fp8_weights = [k for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn]
    # q, k, v, o, gate_up (fused in this source) and down in each of the 2 layers.
    assert len(fp8_weights) == 2 * 6
    for key, value in tensors.items():  # everything else is the source's own tensor
        if value.dtype != torch.float8_e4m3fn and not key.endswith("weight_scale_inv"):
            assert torch.equal(value, src[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_checkpoint_on_the_cpu_dequantizes_exactly(
    calm41: Path, block41: Path, dtype: torch.dtype
) -> None:
    model = load_model(block41, dtype=dtype, device="cpu")
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    params = dict(model.named_parameters())
    expected = _expected_weights(block41, BLOCK_FP8, dtype)
    assert len(expected) == 2 * 4  # qkv_proj, o_proj, gate_up_proj, down_proj per layer
    for name, value in expected.items():
        assert params[name].dtype == dtype and torch.equal(params[name], value), name
    # Layers kept in bf16 by the checkpoint (vision tower, lm_head, norms) load as usual.
    ref = load_model(calm41, dtype=dtype, device="cpu")
    for name, value in ref.named_parameters():
        if name not in expected:
            assert torch.equal(params[name], value), name
    if dtype == torch.float32:
        ids = _random_ids(ref)
        assert _cosine(_logits(ref, ids), _logits(model, ids)) >= 0.999


@pytest.mark.usefixtures("fp8_runs")
def test_block_checkpoint_stays_fp8_where_fp8_runs(calm41: Path, block41: Path) -> None:
    model = load_model(block41, dtype="float32", device="cpu")
    held = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert sorted(held) == sorted(
        f"layers.{i}.{p}"
        for i in range(2)
        for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    )
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.visual.blocks[0].attn.qkv, nn.Linear)
    # Block scales become row scales: the block dequantization, rounded once more per row.
    for name, value in _expected_weights(block41, BLOCK_FP8, torch.float32).items():
        codes, scale = K.quantize_rows(value)
        module = held[name[: -len(".weight")]]
        assert torch.equal(module.weight.view(torch.uint8), codes.view(torch.uint8)), name
        assert torch.equal(module.weight_scale, scale), name
    ref = load_model(calm41, dtype="float32", device="cpu")
    ids = _random_ids(ref)
    assert _cosine(_logits(ref, ids), _logits(model, ids)) >= 0.998


def test_block_to_row_conversion_in_bands_equals_one_step(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    codes, scale = K.quantize_blocks(torch.randn(300, 96, generator=gen), (32, 32))
    spec = Fp8Spec("fp8", "block", (32, 32))
    whole = FC.row_scaled(spec, codes, scale)
    monkeypatch.setattr(FC, "_CHUNK_ELEMENTS", 64 * 96)  # two tile rows per step, the last one partial
    banded = FC.row_scaled(spec, codes, scale)
    assert torch.equal(whole[0].view(torch.uint8), banded[0].view(torch.uint8))
    assert torch.equal(whole[1], banded[1])


@pytest.mark.parametrize("spec", [CHANNEL, TENSOR, CT_BLOCK], ids=["channel", "tensor", "block"])
def test_compressed_tensors_checkpoints(
    calm41: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: Fp8Spec
) -> None:
    dst = tmp_path / "ct"
    write_fp8_checkpoint(calm41, dst, spec=spec)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == spec.strategy
    tensors = load_file(str(dst / "model.safetensors"))
    scale = tensors["model.language_model.layers.0.mlp.down_proj.weight_scale"]
    assert tuple(scale.shape) == {"channel": (128, 1), "tensor": (1,), "block": (4, 10)}[spec.strategy]
    expected = _expected_weights(dst, spec, torch.float32)
    model = load_model(dst, dtype="float32", device="cpu")
    params = dict(model.named_parameters())
    for name, value in expected.items():
        assert torch.equal(params[name], value), name
    ref = load_model(calm41, dtype="float32", device="cpu")
    ids = _random_ids(ref)
    expected_logits = _logits(ref, ids)
    assert _cosine(expected_logits, _logits(model, ids)) >= 0.999
    # Where FP8 runs, per-tensor and per-channel scales keep the checkpoint's codes as they are.
    monkeypatch.setattr(L, "keep_fp8", lambda device: True)
    held = load_model(dst, dtype="float32", device="cpu")
    down = held.layers[0].mlp.down_proj
    assert isinstance(down, Fp8Linear)
    if spec.strategy != "block":
        codes = tensors["model.language_model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(down.weight.view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(down.weight_scale, scale.float().reshape(-1).expand(128))
        assert torch.equal(down.dequantized_weight(), params["layers.0.mlp.down_proj.weight"])
    assert _cosine(expected_logits, _logits(held, ids)) >= 0.998


def test_quantization_flag_is_a_no_op_on_an_fp8_checkpoint(
    block41: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for keep in (False, True):
        monkeypatch.setattr(L, "keep_fp8", lambda device, keep=keep: keep)
        plain = load_model(block41, dtype="float32", device="cpu")
        flagged = load_model(block41, dtype="float32", device="cpu", quantization="fp8")
        a, b = plain.state_dict(), flagged.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
        # The vision tower the checkpoint keeps in bf16 is not rounded by the flag.
        assert type(flagged.visual.blocks[0].attn.qkv) is nn.Linear


def _rewrite(src: Path, dst: Path, *, config=None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        config(data)
        (dst / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        values = load_file(str(dst / "model.safetensors"))
        tensors(values)
        save_file(values, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_bad_fp8_checkpoints_are_refused_clearly(block41: Path, tmp_path: Path) -> None:
    down = "model.language_model.layers.1.mlp.down_proj"

    def qc(**changes):
        return lambda data: data["quantization_config"].update(changes)

    cases = [
        (
            dict(config=qc(quant_method="fp9")),
            r"quant_method 'fp9' is not supported \(glmv loads awq, gptq, fp8, compressed-tensors\)",
        ),
        (dict(config=qc(fmt="e5m2")), r"FP8 fmt 'e5m2' is not supported \(glmv loads e4m3\)"),
        (dict(config=qc(weight_block_size=[128])), r"weight_block_size must be two positive integers"),
        (
            dict(tensors=lambda t: t.update({f"{down}.weight_scale_inv": torch.ones(2, 2)})),
            rf"tensor '{down}.weight' has a weight_scale_inv of shape \(2, 2\), expected \(1, 3\) for a 128x320 "
            r"weight with block scales of 128x128",
        ),
        (
            dict(tensors=lambda t: t.pop(f"{down}.weight_scale_inv")),
            rf"FP8 tensor '{down}.weight' has no weight_scale_inv beside it",
        ),
        (
            dict(config=lambda data: data.pop("quantization_config")),
            r"tensor '.*' is torch.float8_e4m3fn but config.json has no FP8 quantization_config",
        ),
        (
            dict(tensors=lambda t: t.update({f"{down}.weight": t[f"{down}.weight"].to(torch.float8_e5m2)})),
            rf"tensor '{down}.weight' is torch.float8_e5m2, expected float8_e4m3fn",
        ),
    ]
    for i, (edit, message) in enumerate(cases):
        bad = _rewrite(block41, tmp_path / f"bad{i}", **edit)
        with pytest.raises(CheckpointError, match=message):
            load_model(bad, dtype="float32", device="cpu")
    ct = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int", "strategy": "channel"}}},
    }
    bad = _rewrite(block41, tmp_path / "ct", config=lambda data: data.update(quantization_config=ct))
    with pytest.raises(CheckpointError, match="compressed-tensors format 'int-quantized' is not supported"):
        load_model(bad, dtype="float32", device="cpu")
    ct = {**ct, "format": "float-quantized"}
    bad = _rewrite(block41, tmp_path / "ct-int", config=lambda data: data.update(quantization_config=ct))
    with pytest.raises(CheckpointError, match="weights are 8-bit int; glmv loads 8-bit float"):
        load_model(bad, dtype="float32", device="cpu")


def test_cli_prints_one_line_for_a_bad_fp8_checkpoint(
    block41: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from glmv.cli import main

    bad = _rewrite(
        block41, tmp_path / "bad", config=lambda data: data["quantization_config"].update(fmt="e5m2")
    )
    capsys.readouterr()
    status = main(["chat", "--model", str(bad), "--engine-mode", "inprocess", "--dtype", "float32", "hi"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # The tiny checkpoint's note on random weights comes first; the error is one line.
    line = error_line(err.splitlines()[-1], "glmv chat")
    assert status == 2 and "FP8 fmt 'e5m2' is not supported (glmv loads e4m3)" in line


def test_quantize_command_writes_a_block_fp8_checkpoint(
    tiny41_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from glmv.cli import main

    out = tmp_path / "fp8"
    status = main(["quantize", str(tiny41_dir), str(out), "--method", "fp8-block", "--quiet"])
    assert status == 0
    assert "12 linear layers in FP8 (e4m3, 128x128 blocks)" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [
        128,
        128,
    ]
    assert (out / "tokenizer.json").is_file()
    # A checkpoint that is FP8 already is not quantized again.
    status = main(["quantize", str(out), str(tmp_path / "again"), "--method", "fp8-block", "--quiet"])
    assert status == 2 and "already quantized (fp8)" in error_line(capsys.readouterr().err, "glmv quantize")


def test_weightless_fp8_checkpoint_draws_and_holds_the_text_layers(
    tiny41_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = weightless_copy(tiny41_dir, tmp_path / "weightless", seed=0)
    write_fp8_checkpoint(src, tmp_path / "fp8")
    assert not list((tmp_path / "fp8").glob("*.safetensors"))
    monkeypatch.setattr(L, "keep_fp8", lambda device: True)
    model = load_model(tmp_path / "fp8", dtype="float32", device="cpu")
    held = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    assert len(held) == 8 and all(n.startswith("layers.") for n in held)


def test_offline_llm_answers_from_an_fp8_checkpoint(block41: Path) -> None:
    import glmv

    params = glmv.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    with glmv.LLM(block41, dtype="float32", engine_mode="inprocess") as llm:
        results = llm.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False)
    assert len(results) == 1
    out = results[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    assert isinstance(out.text, str)
