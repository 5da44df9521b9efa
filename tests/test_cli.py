"""The command line: create a tiny checkpoint, ask it a question about an image offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glmv.cli import main


def test_create_tiny_model_and_chat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "tiny"
    assert main(["create-tiny-model", str(ckpt)]) == 0
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "glm4v"
    image = tmp_path / "invoice.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    args = ["chat", "--model", str(ckpt), "--image", str(image), "--max-tokens", "12", "What is the total?"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "random weights" in first.err
    assert first.out.strip()
    assert main(args) == 0  # greedy: the same answer again
    assert capsys.readouterr().out == first.out


def test_python_dash_m_lists_the_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "glmv", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("serve", "chat", "create-tiny-model", "bench"):
        assert command in out


def test_offline_api_from_the_package(tiny41_dir: Path) -> None:
    import glmv

    llm = glmv.LLM(tiny41_dir, dtype="float32")
    params = glmv.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    results = llm.chat(
        [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "你好"}]], params, use_tqdm=False
    )
    assert [len(r.outputs[0].token_ids) for r in results] == [6, 6]
    assert all(r.outputs[0].finish_reason == "length" for r in results)
