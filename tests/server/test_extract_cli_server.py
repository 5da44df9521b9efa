"""`glmv extract --server URL` against a real `glmv serve` process: one line per file, the corrupt
file reported by the server's image check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmv.cli import main
from tests.test_extract_cli import check_results, make_folder, read_lines


def test_against_a_running_server(tmp_path: Path, live_server: Any) -> None:
    files = make_folder(tmp_path / "docs", images=2)
    out = tmp_path / "results.jsonl"
    status = main(
        [
            "extract",
            str(tmp_path / "docs"),
            "--schema",
            "id_card",
            "--out",
            str(out),
            "--server",
            live_server.base_url,
            "--concurrency",
            "3",
            "--no-progress",
        ]
    )
    assert status == 1
    records = read_lines(out)
    check_results(records, files)
    assert all("usage" in r for r in records if "data" in r)
