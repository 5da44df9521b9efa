"""`glmv extract` and file names: a name that is not valid UTF-8 is extracted and written (its
undecodable bytes as `\\xNN`), and a resumed run matches files by their absolute path, whether
they were named relative or absolute, with or without `./`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from glmv.cli import main


def _args(files: list[str], out: Path, model: Path) -> list[str]:
    return ["extract", *files, "--schema", "id_card", "--out", str(out), "--model", str(model),
            "--max-model-len", "1024", "--no-progress"]  # fmt: skip


def test_file_name_that_is_not_utf8(
    tmp_path: Path, tiny41_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    odd = root / os.fsdecode(b"caf\xe9-\xff.png")
    Image.new("RGB", (64, 48), (10, 20, 30)).save(odd)
    Image.new("RGB", (64, 48), (30, 20, 10)).save(root / "plain.png")
    out = tmp_path / "out.jsonl"
    assert main(_args([str(root)], out, tiny41_dir)) == 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["source"] for r in records) == sorted(
        [str(root / "caf\\xe9-\\xff.png"), str(root / "plain.png")]
    )
    assert all("data" in r for r in records), records
    capsys.readouterr()
    assert main(_args([str(root)], out, tiny41_dir)) == 0  # resumed: nothing left to do
    assert "2 of 2 files already in" in capsys.readouterr().err
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2


def test_resume_matches_relative_and_absolute_paths(
    tmp_path: Path, tiny41_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 48), (40 * i, 90, 90)).save(imgs / f"p{i}.png")
    out = tmp_path / "out.jsonl"
    monkeypatch.chdir(tmp_path)
    assert main(_args(["imgs"], out, tiny41_dir)) == 0
    capsys.readouterr()
    for spelling in (str(imgs), "./imgs", str(imgs / "p0.png"), "imgs/../imgs/p1.png"):
        assert main(_args([spelling], out, tiny41_dir)) == 0
        assert "files already in" in capsys.readouterr().err, spelling
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
