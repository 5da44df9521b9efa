"""The pieces of a batch extraction run: the `--schema` value, the spec it makes, the error line
and the output file (written whole, line by line, and read back for resuming)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmv.errors import ConfigError
from glmv.tasks.batch_extract import RecordWriter, error_record, load_done, parse_schema, spec_of
from glmv.tasks.schemas import BUILTIN_SCHEMAS

SCHEMA = {"type": "object", "properties": {"total": {"type": "integer"}}, "required": ["total"]}


def test_parse_schema_reads_a_name_a_file_or_inline_json(tmp_path: Path) -> None:
    assert parse_schema("invoice") == ("invoice", BUILTIN_SCHEMAS["invoice"].schema)
    assert parse_schema(json.dumps(SCHEMA)) == ("inline", SCHEMA)
    path = tmp_path / "total.json"
    path.write_text(json.dumps(SCHEMA), encoding="utf-8")
    assert parse_schema(str(path)) == (str(path), SCHEMA)


def test_parse_schema_errors_name_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_schema("passport")
    assert info.value.message.startswith("--schema 'passport' is neither a built-in schema (invoice, ")
    assert info.value.message.endswith("pass one of those names, a .json file or inline JSON")
    with pytest.raises(ConfigError) as info:
        parse_schema("{not json")
    assert info.value.message.startswith("--schema '{not json' is not valid JSON: ")
    path = tmp_path / "list.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        parse_schema(str(path))
    assert info.value.message == "--schema must be a JSON object (a JSON Schema)"


def test_spec_of_takes_a_built_in_by_name_and_anything_else_by_its_schema() -> None:
    receipt = spec_of(*parse_schema("receipt"), None)
    assert receipt.name == "receipt" and receipt.schema == BUILTIN_SCHEMAS["receipt"].schema
    inline = spec_of(*parse_schema(json.dumps(SCHEMA)), "Only the total.")
    assert inline.name is None and inline.schema == SCHEMA and "Only the total." in inline.prompt


def test_records_are_written_whole_and_read_back(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.jsonl"
    writer = RecordWriter(out)
    writer.write({"source": "a.png", "schema": "invoice", "data": {"total": 3}})
    writer.write(error_record("b.png", "invoice", "invalid_image", "not an image \udcff"))
    writer.close()
    lines = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[1]) == {
        "source": "b.png",
        "schema": "invoice",
        "error": {"type": "invalid_image", "message": "not an image \udcff"},
    }
    assert load_done(out) == {"a.png", "b.png"}
    assert load_done(out, retry_errors=True) == {"a.png"}
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1  # the error line is gone
