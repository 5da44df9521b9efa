"""Checkpoint loading: layouts, dtypes and the errors a broken checkpoint gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glmv.errors import CheckpointError
from glmv.models.config import ModelConfig
from glmv.models.loader import load_model
from glmv.models.registry import load_model as load_any


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_sharded_checkpoint_with_index_loads_identically(tiny41_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny41_dir, tmp_path / "sharded")
    tensors = _tensors(ckpt)
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(ckpt / fname))
        weight_map |= {k: fname for k in keys}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a = load_model(tiny41_dir, dtype="float32", device="cpu")
    b = load_model(ckpt, dtype="float32", device="cpu")
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("float32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        ("auto", torch.float32),
    ],
)
def test_dtypes(tiny41_dir: Path, dtype: str, expected: torch.dtype) -> None:
    model = load_model(tiny41_dir, dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {expected}


def test_missing_tensor_is_named(tiny41_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny41_dir, tmp_path / "missing")
    tensors = _tensors(ckpt)
    del tensors["model.language_model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors for: layers\.1\.mlp\.down_proj\.weight"):
        load_model(ckpt, device="cpu")


def test_mismatched_shape_names_file_and_tensor(tiny41_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny41_dir, tmp_path / "shape")
    tensors = _tensors(ckpt)
    tensors["model.language_model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_model(ckpt, device="cpu")
    msg = str(info.value)
    assert "model.safetensors" in msg and "model.language_model.layers.0.self_attn.k_proj.weight" in msg
    assert "(3, 3)" in msg


def test_unexpected_tensor_is_named(tiny41_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny41_dir, tmp_path / "extra")
    tensors = _tensors(ckpt)
    tensors["model.language_model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor 'model\.language_model\.layers\.0\.mystery\.weight'"
    ):
        load_model(ckpt, device="cpu")


def test_corrupt_file_is_named(tiny41_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny41_dir, tmp_path / "corrupt")
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_model(ckpt, device="cpu")


def test_wrong_model_type(tiny41_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny41_dir, tmp_path / "type")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type 'llama' is not supported"):
        load_model(ckpt, device="cpu")
    with pytest.raises(CheckpointError, match=r"model_type 'llama' is not supported"):
        load_any(ckpt, device="cpu")


def test_missing_config_and_bad_json(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        load_model(tmp_path / "empty", device="cpu")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path / "bad")


def test_both_rope_config_forms_parse_alike(tiny41_dir: Path) -> None:
    v4 = json.loads((tiny41_dir / "config.json").read_text())
    v5 = json.loads(json.dumps(v4))
    t = v5["text_config"]
    t["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": t.pop("rope_theta"),
        "partial_rotary_factor": t.pop("partial_rotary_factor"),
        "mrope_section": t.pop("rope_scaling")["mrope_section"],
    }
    assert ModelConfig.from_dict(v4) == ModelConfig.from_dict(v5)
    bad = json.loads(json.dumps(v4))
    bad["text_config"]["rope_scaling"]["mrope_section"] = [1, 1, 1]
    with pytest.raises(CheckpointError, match="mrope_section"):
        ModelConfig.from_dict(bad)


def test_weightless_random_init_checkpoint(tiny41_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny41_dir, tmp_path / "random")
    (ckpt / "model.safetensors").unlink()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["glmv_random_init"] = {"seed": 3, "branch_scale": 0.2}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    a = load_model(ckpt, device="cpu")
    b = load_model(ckpt, device="cpu")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb) and torch.isfinite(pa).all()
    assert torch.all(a.layers[0].post_mlp_layernorm.weight == 0.2)
    # Without the marker a weightless directory is an error, not a random model.
    cfg.pop("glmv_random_init")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights found"):
        load_model(ckpt, device="cpu")
