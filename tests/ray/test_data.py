"""`glmv extract --ray` (Ray Data): 200 generated images on 2 actors, the driver killed (-9) halfway and
run again; every file ends up with exactly one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ray.conftest import SCHEMA, driver_env, make_documents

pytest.importorskip("ray")


def complete_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def test_extraction_on_two_actors_every_file_once_and_resumable_after_kill(
    ray_cluster: str, ray_model_dir: Path, tmp_path: Path
) -> None:
    docs = make_documents(tmp_path / "docs", 200, seed=7)
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable, "-m", "glmv", "extract", "--ray", str(tmp_path / "docs"),
        "--schema", SCHEMA, "--out", str(out), "--model", str(ray_model_dir), "--max-tokens", "8",
        "--num-actors", "2", "--num-cpus-per-actor", "0.5", "--batch-size", "8",
        "--ray-address", ray_cluster, "--no-progress",
    ]  # fmt: skip
    first_log = tmp_path / "first.log"
    with first_log.open("wb") as log:
        first = subprocess.Popen(cmd, env=driver_env(), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 400
            while complete_lines(out) < 40:
                assert first.poll() is None, f"the driver stopped early:\n{first_log.read_text()}"
                assert time.monotonic() < deadline, f"no progress:\n{first_log.read_text()}"
                time.sleep(0.02)
            os.kill(first.pid, signal.SIGKILL)
        finally:
            if first.poll() is None:
                first.kill()
            first.wait(60)
    assert first.returncode == -signal.SIGKILL
    written = complete_lines(out)
    assert 40 <= written < 200, "the kill should land before the end"
    with out.open("a", encoding="utf-8") as fh:  # as if the crash had cut a line in half
        fh.write('{"source": "' + str(docs[-1]) + '", "sch')

    second = subprocess.run(cmd, env=driver_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert second.returncode in (0, 1), second.stderr  # 1: some files got error lines (random weights)
    assert f"{written} of 200 files already in {out}; {200 - written} to do" in second.stderr

    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    sources = [r["source"] for r in records]
    assert len(sources) == 200 and set(sources) == {str(p) for p in docs}  # every file exactly once
    for record in records:
        assert record["schema"] == "inline"
        assert ("data" in record) != ("error" in record)
        assert record["usage"]["prompt_tokens"] > 0
        if "data" in record:
            assert isinstance(record["data"]["total"], int)
            assert isinstance(record["truncated"], bool)
    # the exit status speaks of this run's files (the lines after those already written)
    assert second.returncode == (1 if any("error" in r for r in records[written:]) else 0)
