"""A batch extraction run: one JSON Lines record per document, and resuming where a run stopped.

The pieces `glmv extract` and its Ray Data form (`glmv extract --ray`) share, whoever drives
them:

* `parse_schema`: the `--schema` value (a built-in name, a .json file or inline JSON) as a
  (label, JSON Schema) pair; `spec_of` turns that into the `ExtractionSpec` of
  `glmv.tasks.extraction`.
* `extraction_service`: the generation service of an embedded run (the pages are the machine's
  own files: as many as `max_pages`, of any size).
* `extract_record`: the output line of one file: its data, `truncated`, usage and time, or an
  error line (`error_record`); a bad file never stops the run.
* `load_done` / `RecordWriter`: resuming. The output file is read back (a line cut off by a crash
  is dropped, error lines too when they are to be retried) and appended to one complete,
  flushed line per record.

Mistakes in the schema are `ConfigError`s whose message names the flag (`--schema ...`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from glmv.errors import ConfigError, GlmvError
from glmv.tasks.documents import ExtractFileError, display_path, render_document, text_of

__all__ = [
    "RecordWriter",
    "error_record",
    "extract_record",
    "extraction_service",
    "load_done",
    "parse_schema",
    "spec_of",
]


def load_done(out_path: Path, retry_errors: bool = False) -> set[str]:
    """Sources already in the output file. Repairs the file first: a last line without its newline
    (a crash mid-write) is cut off; with `retry_errors`, error lines are removed."""
    if not out_path.exists():
        return set()
    raw = out_path.read_bytes()
    keep_upto = raw.rfind(b"\n") + 1
    lines = raw[:keep_upto].decode("utf-8", errors="replace").splitlines()
    done: set[str] = set()
    kept: list[str] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("source"), str):
            continue
        if retry_errors and "error" in record:
            continue
        done.add(record["source"])
        kept.append(line)
    if keep_upto != len(raw) or len(kept) != len(lines):
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, out_path)
    return done


class RecordWriter:
    """Appends one complete line per record and flushes it at once."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        if text_of(line) != line:  # text without a UTF-8 form (e.g. from an error message): escape it
            line = json.dumps(record)
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def error_record(source: str, schema: str, kind: str, message: str) -> dict[str, Any]:
    """The line of a file that got no data: what kind of error, and its message."""
    return {"source": source, "schema": schema, "error": {"type": kind, "message": message}}


def parse_schema(value: str) -> tuple[str, dict[str, Any]]:
    """(label, JSON Schema) of `--schema`: a built-in name, a .json file or inline JSON; a
    `ConfigError` for anything else."""
    from glmv.tasks.schemas import BUILTIN_SCHEMAS

    if value in BUILTIN_SCHEMAS:
        return value, BUILTIN_SCHEMAS[value].schema
    text = value
    label = "inline"
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(
                f"--schema {value!r} is neither a built-in schema ({', '.join(BUILTIN_SCHEMAS)}) "
                "nor a JSON Schema file; pass one of those names, a .json file or inline JSON"
            )
        text = path.read_text(encoding="utf-8")
        label = str(path)
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--schema {value!r} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ConfigError("--schema must be a JSON object (a JSON Schema)")
    return label, schema


def spec_of(label: str, schema: dict[str, Any], instructions: str | None) -> Any:
    """The `ExtractionSpec` of a `parse_schema` result (a built-in by name, else the schema)."""
    from glmv.tasks.extraction import extraction_spec
    from glmv.tasks.schemas import BUILTIN_SCHEMAS

    return extraction_spec(label if label in BUILTIN_SCHEMAS else schema, instructions)


def extraction_service(
    *,
    model: str,
    dtype: str = "auto",
    max_model_len: int | None = None,
    engine_mode: str | None = None,
    max_pages: int = 8,
    image_workers: int | None = None,
) -> Any:
    """The generation service of an embedded extraction run (`glmv extract`, a Ray Data actor);
    `model` is the checkpoint directory (the caller picks the default one)."""
    from glmv.processing.media import ImageLimits
    from glmv.tasks.config import EngineConfig, ServiceConfig
    from glmv.tasks.service import create_service, is_random_checkpoint

    if is_random_checkpoint(model):
        print("note: this checkpoint has random weights; its answers are random", file=sys.stderr)
    engine: dict[str, Any] = {"dtype": dtype}
    if max_model_len:
        engine["max_model_len"] = max_model_len
    if engine_mode:
        engine["engine_mode"] = engine_mode
    # The pages are this machine's own files: as many as --max-pages, of any size.
    limits = ImageLimits(max_images=max(1, max_pages), max_pixels=2**40, max_total_pixels=2**40)
    config = ServiceConfig(
        EngineConfig(model=model, **engine), image_limits=limits, image_workers=image_workers
    )
    return create_service(config)


async def extract_record(
    service: Any,
    spec: Any,
    path: Path,
    label: str,
    *,
    max_pages: int,
    pdf_dpi: float,
    max_tokens: int | None,
    thinking: bool,
) -> dict[str, Any]:
    """The output line of one file: its data, `truncated`, usage and time, or an error line."""
    from glmv.tasks.extraction import extract
    from glmv.tasks.images import ImageRef

    source = display_path(path)
    start = time.monotonic()
    try:
        doc = await asyncio.to_thread(render_document, path, max_pages=max_pages, dpi=pdf_dpi)
        refs = [ImageRef(image, f"{source}[{i}]") for i, image in enumerate(doc.images)]
        result = await extract(service, spec, refs, max_tokens=max_tokens, thinking=thinking)
        usage = result.usage
        return {
            "source": source,
            "schema": label,
            "pages": len(doc.images),
            "data": result.data,
            "truncated": result.truncated,
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
            "seconds": round(time.monotonic() - start, 3),
        }
    except ExtractFileError as exc:
        return error_record(source, label, exc.kind, exc.message)
    except GlmvError as exc:
        return error_record(source, label, exc.code or exc.error_type, exc.message)
