"""`glmv extract`: a folder of images and PDFs (one corrupt) into JSON Lines, killed mid-run and
restarted, ends with exactly one line per file; inline schema files and --retry-errors; the
output file's repair rules; PDF rendering and file errors. (Against a server:
tests/server/test_extract_cli_server.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from glmv.cli import main
from glmv.engine.structured import schema_errors
from glmv.tasks.batch_extract import load_done
from glmv.tasks.documents import ExtractFileError, collect_files, render_document
from glmv.tasks.schemas import BUILTIN_SCHEMAS

REPO = Path(__file__).resolve().parents[1]
SCHEMA = BUILTIN_SCHEMAS["id_card"].schema


def make_folder(root: Path, images: int = 6) -> list[Path]:
    """`images` small PNG/JPEG files, a corrupt .png, a two-page PDF and an unrelated .txt."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    files = []
    for i in range(images):
        path = root / ("sub" if i % 2 else ".") / f"card{i}.{'png' if i % 3 else 'jpg'}"
        Image.new("RGB", (56 + 8 * i, 40), (40 * i % 256, 120, 200)).save(path)
        files.append(path.resolve())
    bad = root / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    pdf = root / "scan.pdf"
    pages = [Image.new("RGB", (90, 120), (255, 255, 255)), Image.new("RGB", (90, 120), (230, 230, 230))]
    pages[0].save(pdf, save_all=True, append_images=pages[1:])
    (root / "notes.txt").write_text("not a document")
    return [*files, bad.resolve(), pdf.resolve()]


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_results(records: list[dict[str, Any]], files: list[Path]) -> None:
    sources = [Path(r["source"]).resolve() for r in records]
    assert sorted(sources) == sorted(files)  # exactly one line per file
    by_source = dict(zip(sources, records, strict=True))
    for f in files:
        record = by_source[f]
        assert record["schema"] == "id_card"
        if f.name == "broken.png":
            assert record["error"]["type"] == "invalid_image"
            assert "data" not in record
            continue
        assert "error" not in record, record
        assert schema_errors(SCHEMA, record["data"]) == []
        assert record["pages"] == (2 if f.suffix == ".pdf" else 1)
        assert isinstance(record["truncated"], bool)


def run_cli(args: list[str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-m", "glmv", "extract", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )


def test_killed_and_restarted_run_ends_with_one_line_per_file(tmp_path: Path, tiny41_dir: Path) -> None:
    files = make_folder(tmp_path / "docs")
    out = tmp_path / "out" / "results.jsonl"
    args = [
        str(tmp_path / "docs"),
        "--schema",
        "id_card",
        "--out",
        str(out),
        "--model",
        str(tiny41_dir),
        "--max-model-len",
        "2048",
        "--concurrency",
        "1",
        "--no-progress",
    ]
    first = run_cli(args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    assert first.poll() is None, first.communicate()[1].decode()[-2000:]
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    done_before = out.read_bytes().count(b"\n")
    assert 2 <= done_before < len(files)  # it really was interrupted
    # Sorted order: broken.png is among the first files, so its error line came before the kill.
    assert any(r["source"].endswith("broken.png") for r in read_lines(out))
    with out.open("ab") as fh:  # as if it had died in the middle of a line
        fh.write(b'{"source": "' + str(files[-1]).encode()[:10])

    second = run_cli(args)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err.decode()[-2000:]  # every file of this run got its data
    assert f"{done_before} of {len(files)} files already in" in err.decode()
    check_results(read_lines(out), files)

    third = run_cli(args)  # nothing left to do
    _, err = third.communicate(timeout=120)
    assert third.returncode == 0 and f"{len(files)} of {len(files)} files already in" in err.decode()
    assert len(read_lines(out)) == len(files)


def test_inline_schema_file_and_retry_errors(tmp_path: Path, tiny41_dir: Path) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    Image.new("RGB", (64, 48), (0, 0, 0)).save(root / "a.png")
    schema_path = tmp_path / "schema.json"
    schema = {"type": "object", "properties": {"total": {"type": "integer", "minimum": 0, "maximum": 999}}}
    schema_path.write_text(json.dumps(schema))
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"source": str(root / "a.png"), "error": {"type": "x", "message": "y"}}) + "\n")
    args = ["extract", str(root / "a.png"), "--schema", str(schema_path), "--out", str(out)]
    args += ["--model", str(tiny41_dir), "--max-model-len", "1024", "--no-progress"]
    assert main(args) == 0  # the error line counts as done
    assert len(read_lines(out)) == 1 and "error" in read_lines(out)[0]
    assert main([*args, "--retry-errors"]) == 0
    [record] = read_lines(out)
    assert record["schema"] == str(schema_path) and set(record["data"]) <= {"total"}


def test_load_done_repairs_the_file(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    assert load_done(out) == set()
    good = [{"source": "a", "data": {}}, {"source": "b", "error": {"type": "t", "message": "m"}}]
    out.write_text("".join(json.dumps(r) + "\n" for r in good) + "not json\n" + '{"source": "c", "da')
    assert load_done(out) == {"a", "b"}
    assert out.read_text() == "".join(json.dumps(r) + "\n" for r in good)  # garbage and partial line gone
    assert load_done(out, retry_errors=True) == {"a"}
    assert read_lines(out) == good[:1]


def test_collect_files_and_render(tmp_path: Path) -> None:
    files = make_folder(tmp_path / "docs", images=3)
    found = collect_files([tmp_path / "docs", tmp_path / "docs" / "scan.pdf"])
    assert sorted(p.resolve() for p in found) == sorted(files)  # no .txt, no duplicate PDF
    pdf = render_document(tmp_path / "docs" / "scan.pdf", max_pages=8, dpi=72)
    assert [im.size for im in pdf.images] == [(90, 120), (90, 120)]
    assert render_document(tmp_path / "docs" / "scan.pdf", max_pages=8, dpi=144).images[0].size == (180, 240)
    with pytest.raises(ExtractFileError) as info:
        render_document(tmp_path / "docs" / "scan.pdf", max_pages=1, dpi=72)
    assert info.value.kind == "too_many_pages"
    with pytest.raises(ExtractFileError) as info:
        render_document(tmp_path / "docs" / "broken.png", max_pages=8, dpi=72)
    assert info.value.kind == "invalid_image"
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 nonsense")
    with pytest.raises(ExtractFileError) as info:
        render_document(tmp_path / "bad.pdf", max_pages=8, dpi=72)
    assert info.value.kind == "invalid_pdf"
