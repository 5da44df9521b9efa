"""The Ray Data actor's extractor writes the very records `glmv extract` writes (no Ray needed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glmv.cli.extract import add_extract_arguments, run_extract
from glmv.ray.extract_worker import DocumentExtractor, ExtractJob
from tests.ray.conftest import SCHEMA, make_documents


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_extract_arguments(parser)
    return parser.parse_args(argv)


def test_document_extractor_matches_glmv_extract(ray_model_dir: Path, tmp_path: Path) -> None:
    docs = make_documents(tmp_path / "docs", 3)
    broken = tmp_path / "docs" / "zz-broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out.jsonl"
    argv = [str(tmp_path / "docs"), "--schema", SCHEMA, "--out", str(out), "--model", str(ray_model_dir),
            "--max-tokens", "12", "--no-progress"]  # fmt: skip
    assert run_extract(parse(argv)) == 1  # the broken file gets an error line
    expected = {r["source"]: r for r in map(json.loads, out.read_text().splitlines())}

    job = ExtractJob.from_args(parse(argv))
    assert job.label == "inline" and job.schema["required"] == ["total"]
    extractor = DocumentExtractor(job)
    try:
        sources = [str(p) for p in [*docs, broken]]
        records = extractor.extract(sources)
        assert [r["source"] for r in records] == sources
        again = extractor.extract(sources[:1])  # the same service serves the next batch
        assert again[0]["data"] == records[0]["data"]
    finally:
        extractor.close()
    got = {r["source"]: r for r in records}
    assert set(got) == set(expected) == {str(p) for p in [*docs, broken]}
    for source, record in got.items():
        record.pop("seconds", None)
        expected[source].pop("seconds", None)
        assert record == expected[source]
    assert got[str(broken)]["error"]["type"] == "invalid_image"
