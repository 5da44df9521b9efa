"""Mistakes on the command line: one line on stderr (what is wrong, what to do), exit status 2,
found before any model loads (`no_model_load` fails a test that loads one); `--version`;
`--force` for output folders that hold files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import glmv
from glmv.cli import main
from glmv.models.loader import load_model
from glmv.models.quant.linear import Int4Linear

from .conftest import error_line

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    status = main(argv)
    return status, capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"glmv {glmv.__version__}"


def test_bad_argument_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["chat", "--max-tokens", "many", "hi"])
    assert info.value.code == 2
    line = error_line(capsys.readouterr().err, "glmv chat")
    assert "--max-tokens: invalid int value: 'many'" in line and "glmv chat --help" in line


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "glmv", "chat", "--model", str(tmp_path / "nonexistent"), "hi"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert error_line(result.stderr, "glmv chat") == (
        f"glmv chat: error: --model {tmp_path / 'nonexistent'} does not exist; pass a checkpoint directory"
    )
    assert result.stdout == ""


@pytest.mark.usefixtures("no_model_load")
def test_chat_model_that_is_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run(["chat", "--model", "/nonexistent", "hi"], capsys)
    assert status == 2 and "--model /nonexistent does not exist" in error_line(err, "glmv chat")
    (tmp_path / "empty").mkdir()
    status, err = run(["chat", "--model", str(tmp_path / "empty"), "hi"], capsys)
    assert status == 2 and "has no config.json" in error_line(err, "glmv chat")
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    status, err = run(["chat", "--model", str(tmp_path / "weights.safetensors"), "hi"], capsys)
    assert status == 2 and "is a file; pass the checkpoint directory" in error_line(err, "glmv chat")


@pytest.mark.usefixtures("no_model_load")
def test_chat_hub_id_says_how_to_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no folder THUDM here
    status, err = run(["chat", "--model", "THUDM/GLM-4.1V-9B-Thinking", "hi"], capsys)
    assert status == 2
    line = error_line(err, "glmv chat")
    assert "THUDM/GLM-4.1V-9B-Thinking is not a local directory" in line
    assert "does not download from model hubs" in line
    assert "hf download THUDM/GLM-4.1V-9B-Thinking --local-dir models/GLM-4.1V-9B-Thinking" in line
    assert line.endswith("then pass --model models/GLM-4.1V-9B-Thinking")
    # A path of the same form whose first folder exists is a path, not a hub id.
    (tmp_path / "models").mkdir()
    status, err = run(["chat", "--model", "models/missing", "hi"], capsys)
    assert status == 2 and error_line(err, "glmv chat").endswith(
        "models/missing does not exist; pass a checkpoint directory"
    )


@pytest.mark.usefixtures("no_model_load")
def test_chat_images_are_checked_before_the_model_loads(
    tiny41_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32)).save(good)
    base = ["chat", "--model", str(tiny41_dir), "--image", str(good)]
    status, err = run([*base, "--image", str(tmp_path / "missing.png"), "hi"], capsys)
    assert status == 2
    assert (
        error_line(err, "glmv chat")
        == f"glmv chat: error: --image {tmp_path / 'missing.png'} does not exist; check the path"
    )
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    status, err = run([*base, "--image", str(text), "hi"], capsys)
    assert status == 2
    line = error_line(err, "glmv chat")
    assert f"--image {text} is not a readable image" in line and "pass a PNG, JPEG" in line
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:40])
    status, err = run([*base, "--image", str(truncated), "hi"], capsys)
    assert status == 2 and f"--image {truncated} is not a readable image" in error_line(err, "glmv chat")
    status, err = run([*base, "--image", str(tmp_path), "hi"], capsys)
    assert status == 2 and "is not a file" in error_line(err, "glmv chat")


@pytest.mark.usefixtures("no_model_load")
def test_serve_busy_port_and_bad_model_before_loading(
    tiny41_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, err = run(
            ["serve", "--model", str(tiny41_dir), "--host", "127.0.0.1", "--port", str(port)], capsys
        )
    assert status == 2
    assert error_line(err, "glmv serve") == (
        f"glmv serve: error: port {port} on 127.0.0.1 is already in use (another glmv serve?); "
        "stop what listens there or pass --port with a free port"
    )
    status, err = run(["serve", "--model", "/nonexistent", "--port", "0"], capsys)
    assert status == 2 and "--model /nonexistent does not exist" in error_line(err, "glmv serve")


@pytest.mark.usefixtures("no_model_load")
def test_quantize_refusals(tiny41_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    status, err = run(["quantize", "/nope", str(out)], capsys)
    assert status == 2 and error_line(err, "glmv quantize") == (
        "glmv quantize: error: SRC /nope does not exist; pass a checkpoint directory"
    )
    # A group size that fits no layer: nothing would be quantized; said before the model loads.
    status, err = run(["quantize", str(tiny41_dir), str(out), "--group-size", "7", "--quiet"], capsys)
    assert status == 2
    line = error_line(err, "glmv quantize")
    assert "nothing to quantize: group size 7" in line and "widths: 128, 320" in line and "-1" in line
    status, err = run(["quantize", str(tiny41_dir), str(tiny41_dir)], capsys)
    assert status == 2 and "is the source checkpoint" in error_line(err, "glmv quantize")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, err = run(["quantize", str(tiny41_dir), str(out), "--method", "rtn"], capsys)
    assert status == 2 and "already holds files; pass --force" in error_line(err, "glmv quantize")
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written


def test_quantize_force_writes_over_an_old_checkpoint(
    tiny41_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old weights")
    (out / "notes.txt").write_text("mine")
    argv = ["quantize", str(tiny41_dir), str(out), "--method", "rtn", "--group-size", "64", "--device", "cpu"]
    status, err = run([*argv, "--quiet", "--force"], capsys)
    assert status == 0, err
    assert (
        not (out / "model-00001-of-00002.safetensors").exists() and (out / "notes.txt").read_text() == "mine"
    )
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert isinstance(load_model(out, dtype="float32", device="cpu").layers[0].mlp.down_proj, Int4Linear)


def test_create_tiny_model_needs_force_over_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "tiny"
    target.mkdir()  # an empty folder is fine
    status, _ = run(["create-tiny-model", str(target)], capsys)
    assert status == 0
    first = (target / "model.safetensors").read_bytes()
    status, err = run(["create-tiny-model", str(target), "--seed", "1"], capsys)
    assert status == 2
    assert error_line(err, "glmv create-tiny-model") == (
        f"glmv create-tiny-model: error: DIR {target} already holds files; pass --force to write over "
        "them, or choose an empty or new folder"
    )
    assert (target / "model.safetensors").read_bytes() == first  # untouched
    (target / "model-00002-of-00002.safetensors").write_bytes(b"stale")
    status, _ = run(["create-tiny-model", str(target), "--seed", "1", "--force"], capsys)
    assert status == 0
    assert (target / "model.safetensors").read_bytes() != first
    assert not (target / "model-00002-of-00002.safetensors").exists()
    (tmp_path / "file").write_text("x")
    status, err = run(["create-tiny-model", str(tmp_path / "file"), "--force"], capsys)
    assert status == 2 and "exists and is a file" in error_line(err, "glmv create-tiny-model")
