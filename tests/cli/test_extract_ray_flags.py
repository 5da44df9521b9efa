"""`glmv extract --ray`: the Ray Data flags belong to `glmv extract`, are checked with its own
arguments before Ray starts (one line, status 2), and a good run is handed to
`glmv.ray.data.run_extract_ray`. None of this needs Ray: the tests stand a stub in for it."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from glmv.cli import build_parser, main

from .conftest import error_line

REPO = Path(__file__).resolve().parents[2]


def a_document(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (20, 90, 160)).save(root / "card.png")
    return root


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    status = main(["extract", *argv])
    return status, capsys.readouterr().err


@pytest.fixture
def ray_runs(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """The runs handed to Ray Data (none starts: a stub stands in for Ray and for the run)."""
    import glmv.ray.data

    handed: list[argparse.Namespace] = []

    def run_extract_ray(args: argparse.Namespace) -> int:
        handed.append(args)
        return 0

    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    monkeypatch.setattr(glmv.ray.data, "run_extract_ray", run_extract_ray)
    return handed


def test_the_ray_flags_parse_with_glmv_extract() -> None:
    args = build_parser().parse_args(
        ["extract", "docs", "--schema", "invoice", "--ray", "--num-actors", "3", "--batch-size", "4",
         "--num-cpus-per-actor", "0.5", "--ray-address", "auto"]
    )  # fmt: skip
    assert (args.ray, args.num_actors, args.batch_size, args.num_cpus_per_actor) == (True, 3, 4, 0.5)
    assert args.ray_address == "auto" and args.num_gpus_per_actor is None and args.ray_num_cpus is None
    plain = build_parser().parse_args(["extract", "docs", "--schema", "invoice"])
    assert plain.ray is False and plain.num_actors is None and plain.batch_size is None


@pytest.mark.usefixtures("no_model_load")
def test_ray_flags_without_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_runs: list[argparse.Namespace]
) -> None:
    folder = str(a_document(tmp_path / "docs"))
    status, err = run([folder, "--schema", "invoice", "--num-actors", "2"], capsys)
    assert status == 2
    assert error_line(err, "glmv extract") == (
        "glmv extract: error: --num-actors only applies with --ray (the run on Ray Data); add --ray or leave them out"
    )
    status, err = run([folder, "--schema", "invoice", "--batch-size", "8", "--ray-address", "auto"], capsys)
    assert status == 2
    assert "--ray-address, --batch-size only apply with --ray" in error_line(err, "glmv extract")
    assert ray_runs == []


@pytest.mark.usefixtures("no_model_load")
def test_ray_arguments_are_checked_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_runs: list[argparse.Namespace]
) -> None:
    folder = str(a_document(tmp_path / "docs"))
    status, err = run([folder, "--schema", "invoice", "--ray", "--server", "http://127.0.0.1:8000"], capsys)
    assert status == 2
    assert error_line(err, "glmv extract") == (
        "glmv extract: error: --server does not apply with --ray: the actors run the model; leave one of them out"
    )
    # The same line as without --ray, for a bad schema, a path that is not there, a bad --model.
    for argv in (
        [folder, "--schema", "passport"],
        [folder, "--schema", json.dumps({"type": "object", "properties": {"a": {"not": {}}}})],
        [str(tmp_path / "nope.png"), "--schema", "invoice"],
        [folder, "--schema", "invoice", "--model", str(tmp_path / "no-model")],
    ):
        plain_status, plain_err = run(argv, capsys)
        status, err = run([*argv, "--ray"], capsys)
        assert status == plain_status == 2
        assert error_line(err, "glmv extract") == error_line(plain_err, "glmv extract")
    assert ray_runs == []


@pytest.mark.usefixtures("no_model_load")
def test_a_good_ray_run_goes_to_ray_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ray_runs: list[argparse.Namespace]
) -> None:
    folder = str(a_document(tmp_path / "docs"))
    out = tmp_path / "out.jsonl"
    status, _ = run([folder, "--schema", "invoice", "--out", str(out), "--ray", "--num-actors", "2"], capsys)
    assert status == 0
    [args] = ray_runs
    assert args.files == [folder] and args.out == out and args.num_actors == 2 and args.schema == "invoice"


@pytest.mark.usefixtures("no_model_load")
def test_run_extract_ray_checks_its_own_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))  # found, never started
    folder = str(a_document(tmp_path / "docs"))
    for flag in ("--batch-size", "--num-actors"):
        status, err = run([folder, "--schema", "invoice", "--ray", flag, "0"], capsys)
        assert status == 2
        assert error_line(err, "glmv extract") == (
            "glmv extract: error: --batch-size and --num-actors must be >= 1"
        )


def test_ray_missing_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    status, err = run([str(a_document(tmp_path / "docs")), "--schema", "invoice", "--ray"], capsys)
    assert status == 2
    assert error_line(err, "glmv extract") == (
        "glmv extract: error: --ray: glmv on Ray needs Ray: pip install 'glmv[ray]' (ray[serve,data])"
    )


def test_the_old_module_entry_point_points_to_glmv_extract_ray(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delitem(sys.modules, "glmv.ray.data", raising=False)  # run as `python -m` would
    with pytest.raises(SystemExit) as info:
        runpy.run_module("glmv.ray.data", run_name="__main__")
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m glmv.ray.data: error: run `glmv extract --ray ...` instead (the same flags)"
    ]


def test_help_needs_no_ray() -> None:
    code = (
        "import sys\n"
        "from glmv.cli import build_parser\n"
        "text = build_parser()._subparsers._group_actions[0].choices['extract'].format_help()\n"
        "assert '--num-actors' in text and '--ray' in text, text\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
