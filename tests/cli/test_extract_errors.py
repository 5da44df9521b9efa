"""`glmv extract`: a server that is not there, PDFs without pypdfium2, paths that do not exist and
bad schemas are one line on stderr before any file is read or model loaded; a run ends with its
summary (done / skipped / failed, the output file, the first errors); `--help` shows the default
output file."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
from PIL import Image

from glmv.cli import main
from glmv.cli.extract_report import FIRST_ERRORS, Tally

from .conftest import error_line


def docs(root: Path, pdf: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (20, 90, 160)).save(root / "card.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    if pdf:
        Image.new("RGB", (90, 120), (255, 255, 255)).save(root / "scan.pdf")
    return root


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    status = main(["extract", *argv])
    return status, capsys.readouterr().err


@pytest.mark.usefixtures("no_model_load")
def test_server_that_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.jsonl"
    # A port that is bound but not listening refuses connections, for as long as it is held.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}"
        status, err = run(
            [str(docs(tmp_path / "docs")), "--schema", "id_card", "--out", str(out), "--server", url], capsys
        )
    assert status == 1
    line = error_line(err, "glmv extract")
    assert f"cannot reach the server at {url} (ConnectError:" in line
    assert line.endswith("start it (`glmv serve`) or pass the right --server URL")
    assert not out.exists()  # no error line per file: a later run has nothing to retry
    status, err = run([str(tmp_path / "docs"), "--schema", "id_card", "--server", "127.0.0.1:8000"], capsys)
    assert status == 2 and "is not an http(s) URL" in error_line(err, "glmv extract")


@pytest.mark.usefixtures("no_model_load")
def test_pdfs_without_pypdfium2(
    tiny41_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "pypdfium2", None)  # `import pypdfium2` raises ImportError
    out = tmp_path / "out.jsonl"
    folder = docs(tmp_path / "docs", pdf=True)
    status, err = run(
        [str(folder), "--schema", "id_card", "--out", str(out), "--model", str(tiny41_dir)], capsys
    )
    assert status == 2
    line = error_line(err, "glmv extract")
    assert f"1 of the files are PDFs ({folder / 'scan.pdf'}, ...)" in line
    assert "needs pypdfium2, which is not installed: pip install" in line and "leave the PDFs out" in line
    assert not out.exists()


@pytest.mark.usefixtures("no_model_load")
def test_paths_and_schemas_are_checked_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.jsonl"
    status, err = run([str(tmp_path / "nope.png"), "--schema", "id_card", "--out", str(out)], capsys)
    assert status == 2
    assert (
        error_line(err, "glmv extract")
        == f"glmv extract: error: {tmp_path / 'nope.png'} does not exist; check the path"
    )
    (tmp_path / "empty").mkdir()
    status, err = run([str(tmp_path / "empty"), "--schema", "id_card", "--out", str(out)], capsys)
    assert status == 2 and "no documents found in" in error_line(err, "glmv extract")
    folder = docs(tmp_path / "docs")
    status, err = run([str(folder), "--schema", '{"type": ', "--out", str(out)], capsys)
    assert status == 2 and "is not valid JSON" in error_line(err, "glmv extract")
    status, err = run([str(folder), "--schema", "passport", "--out", str(out)], capsys)
    assert status == 2 and "neither a built-in schema" in error_line(err, "glmv extract")
    unenforceable = json.dumps({"type": "object", "properties": {"a": {"not": {}}}})
    status, err = run([str(folder), "--schema", unenforceable, "--out", str(out)], capsys)
    assert status == 2 and error_line(err, "glmv extract").startswith("glmv extract: error: --schema: ")
    status, err = run(
        [str(folder), "--schema", "id_card", "--out", str(out), "--model", "/nonexistent"], capsys
    )
    assert status == 2 and "--model /nonexistent does not exist" in error_line(err, "glmv extract")
    assert not out.exists()


def test_summary_after_a_run_and_a_resumed_run(
    tiny41_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = docs(tmp_path / "docs")
    out = tmp_path / "out.jsonl"
    argv = [str(folder), "--schema", "id_card", "--out", str(out), "--model", str(tiny41_dir),
            "--max-model-len", "1024", "--engine-mode", "inprocess", "--image-workers", "0",
            "--no-progress"]  # fmt: skip
    status, err = run(argv, capsys)
    assert status == 1  # the broken file got an error line
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    assert lines[0] == f"glmv extract: 1 done, 0 skipped (already in the output), 1 failed; results in {out}"
    assert lines[1] == "first errors (1 of 1):"
    assert (
        lines[2].startswith(f"  {folder / 'broken.png'}: invalid_image: ")
        and "not a readable image" in lines[2]
    )
    assert lines[3] == "(run again with --retry-errors to retry the files that failed)"
    assert len(lines) == 4
    assert len(out.read_text().splitlines()) == 2

    status, err = run(argv, capsys)  # nothing left to do
    assert status == 0
    assert err.splitlines() == [
        f"2 of 2 files already in {out}; 0 to do",
        f"glmv extract: 0 done, 2 skipped (already in the output), 0 failed; results in {out}",
    ]


def test_summary_shows_the_first_errors_only() -> None:
    tally = Tally(skipped=1)
    tally.add({"source": "ok.png", "data": {}})
    for i in range(FIRST_ERRORS + 2):
        tally.add(
            {"source": f"bad{i}.png", "error": {"type": "invalid_image", "message": f"line one\nline {i}"}}
        )
    lines = tally.summary(Path("r.jsonl"))
    assert lines[0] == "glmv extract: 1 done, 1 skipped (already in the output), 5 failed; results in r.jsonl"
    assert lines[1] == f"first errors ({FIRST_ERRORS} of 5):"
    assert lines[2:-1] == [f"  bad{i}.png: invalid_image: line one line {i}" for i in range(FIRST_ERRORS)]
    assert tally.status == 1 and Tally().status == 0


def test_help_shows_the_default_output(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["extract", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert "(default: results.jsonl)" in text
