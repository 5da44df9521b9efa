"""The pieces under the one-line errors: which status each error gets, how a message becomes one
line, and the checks of `glmv.cli.checks` on their own."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from glmv.cli.checks import check_output_dir, check_port_free, clear_weights, looks_like_hub_id
from glmv.cli.errors import CommandFailure, UsageError, error_line, exit_status, reporting_errors
from glmv.errors import CheckpointError, ConfigError, EngineError, InvalidImageError


@pytest.mark.parametrize(
    ("exc", "status", "line"),
    [
        (UsageError("bad\n  flag"), 2, "glmv x: error: bad flag"),
        (
            ConfigError("--port must be between 0 and 65535"),
            2,
            "glmv x: error: --port must be between 0 and 65535",
        ),
        (
            CheckpointError("/m/config.json: not found"),
            2,
            "glmv x: error: /m/config.json: not found; pass a checkpoint directory "
            "(config.json, the tokenizer files and *.safetensors weights)",
        ),
        (EngineError("the core died"), 1, "glmv x: error: the core died"),
        (InvalidImageError("cannot decode"), 1, "glmv x: error: cannot decode"),
        (CommandFailure("cannot reach the server"), 1, "glmv x: error: cannot reach the server"),
        (
            PermissionError(13, "Permission denied", "/root/out.jsonl"),
            1,
            "glmv x: error: Permission denied: /root/out.jsonl",
        ),
        (KeyboardInterrupt(), 130, "glmv x: error: interrupted"),
    ],
)
def test_status_and_line_of_each_error(exc: BaseException, status: int, line: str) -> None:
    assert exit_status(exc) == status
    assert error_line("glmv x", exc) == line


def test_reporting_errors_prints_one_line_and_leaves_bugs_alone(capsys: pytest.CaptureFixture[str]) -> None:
    @reporting_errors("glmv x")
    def fails(exc: BaseException) -> int:
        raise exc

    assert fails(ConfigError("one\ntwo")) == 2
    assert capsys.readouterr().err == "glmv x: error: one two\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        fails(ZeroDivisionError("x"))
    assert reporting_errors("glmv x")(lambda: None)() == 0


def test_hub_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_like_hub_id("THUDM/GLM-4.1V-9B-Thinking") and looks_like_hub_id("zai-org/glm-4v-9b")
    for path in ("/abs/path", "./rel/path", "a/b/c", "~/models/x", "plain", "models/x"):
        assert not looks_like_hub_id(path), path  # `models` exists here: a path


def test_port_checks() -> None:
    check_port_free("127.0.0.1", 0)  # any free port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)
        with pytest.raises(UsageError, match="is not a known address"):
            check_port_free("no-such-host.invalid", port)


def test_output_dir_and_clear_weights(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new", force=False)
    (tmp_path / "dir").mkdir()
    check_output_dir(tmp_path / "dir", force=False)
    (tmp_path / "dir" / "model.safetensors").write_bytes(b"w")
    (tmp_path / "dir" / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "dir" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds files; pass --force"):
        check_output_dir(tmp_path / "dir", force=False)
    check_output_dir(tmp_path / "dir", force=True)
    assert [p.name for p in clear_weights(tmp_path / "dir")] == [
        "model.safetensors",
        "model.safetensors.index.json",
    ]
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["config.json"]
