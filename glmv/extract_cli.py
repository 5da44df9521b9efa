"""`glmv extract FILES... --schema invoice`: batch document extraction into a JSON Lines file.

Each input file (folders are searched for images and PDFs) becomes one line of `--out`:

    {"source": "scans/a.pdf", "schema": "invoice", "pages": 2, "data": {...}, "truncated": false, "usage": {...}}
    {"source": "scans/broken.jpg", "schema": "invoice", "error": {"type": "invalid_image", "message": "..."}}

A PDF is rendered page by page (pypdfium2) and its pages go to the model together as the images of
one document (`--max-pages`, default 8). The run works against the embedded engine (`--model DIR`,
default the embedded tiny checkpoint) or a running server (`--server URL`, POST /v1/extract), with
`--concurrency` documents in flight and a progress bar. It is resumable: files that already have a
line in `--out` are skipped (`--retry-errors` re-runs those whose line is an error), and a line cut
off by a crash is dropped before the run appends. A bad file gets an error line and the run goes on.
`truncated: true` means the token budget ran low and the object was closed early (see
`close_on_budget` in `glmv.engine.structured`). Exit status: 0 when every file has data, 1 when
some got error lines.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "Document",
    "add_extract_arguments",
    "collect_files",
    "display_path",
    "load_done",
    "render_document",
    "resume_key",
    "run_extract",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PDF_SUFFIX = ".pdf"


class ExtractFileError(Exception):
    """A file that cannot become images (kind: `invalid_image`, `invalid_pdf`, `too_many_pages`, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(slots=True)
class Document:
    source: str
    images: list[Image.Image] = field(default_factory=list)


# --- inputs and the output file ---------------------------------------------------------------------


def display_path(path: str | Path) -> str:
    """`path` as text that JSON and the terminal can carry: bytes of a file name that are not
    UTF-8 are written as `\\xNN` escapes (the name as typed is kept otherwise)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def resume_key(path: str | Path) -> str:
    """What a file is matched on when a run resumes: its absolute, normalised path, so that
    `imgs/a.png` and `/home/me/imgs/a.png` are the same file."""
    return display_path(os.path.abspath(path))


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and the images and PDFs inside named folders (recursively, sorted)."""
    out: list[Path] = []
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | {PDF_SUFFIX}
            )
        else:
            found = [path]
        for p in found:
            key = resume_key(p)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


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


class _Writer:
    """Appends one complete line per record and flushes it at once."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        if _text(line) != line:  # text without a UTF-8 form (e.g. from an error message): escape it
            line = json.dumps(record)
        self._fh.write(line + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def render_document(path: Path, *, max_pages: int, dpi: float) -> Document:
    """The pages of `path` as RGB images: an image file, or each page of a PDF rendered at `dpi`."""
    if path.suffix.lower() == PDF_SUFFIX:
        return Document(display_path(path), _render_pdf(path, max_pages=max_pages, dpi=dpi))
    try:
        with Image.open(path) as im:
            im.load()
            return Document(display_path(path), [im.convert("RGB")])
    except FileNotFoundError:
        raise ExtractFileError("not_found", f"{display_path(path)} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ExtractFileError(
            "invalid_image", f"{display_path(path)} is not a readable image: {_text(str(exc))}"
        ) from None


def _render_pdf(path: Path, *, max_pages: int, dpi: float) -> list[Image.Image]:
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise ExtractFileError(
            "pdf_support_missing", "reading PDFs needs pypdfium2: pip install 'glmv[pdf]'"
        ) from None
    try:
        pdf = pdfium.PdfDocument(str(path))
    except Exception as exc:  # pdfium raises its own error type for broken files
        raise ExtractFileError("invalid_pdf", f"{path} is not a readable PDF: {exc}") from None
    try:
        count = len(pdf)
        if count == 0:
            raise ExtractFileError("invalid_pdf", f"{path} has no pages")
        if count > max_pages:
            raise ExtractFileError(
                "too_many_pages",
                f"{path} has {count} pages; raise --max-pages (now {max_pages}) to read them all",
            )
        pages = []
        for i in range(count):
            page = pdf[i]
            pages.append(page.render(scale=dpi / 72.0).to_pil().convert("RGB"))
            page.close()
        return pages
    finally:
        pdf.close()


def _text(value: str) -> str:
    """`value` with anything that has no UTF-8 form (lone surrogates) escaped."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _error_record(source: str, schema: str, kind: str, message: str) -> dict[str, Any]:
    return {"source": source, "schema": schema, "error": {"type": kind, "message": message}}


def _schema_arg(value: str) -> tuple[str, dict[str, Any]]:
    """(label, JSON Schema) of `--schema`: a built-in name, a .json file or inline JSON."""
    from glmv.tasks.schemas import BUILTIN_SCHEMAS

    if value in BUILTIN_SCHEMAS:
        return value, BUILTIN_SCHEMAS[value].schema
    text = value
    label = "inline"
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise SystemExit(
                f"error: --schema {value!r} is neither a built-in schema ({', '.join(BUILTIN_SCHEMAS)}) "
                "nor a JSON Schema file"
            )
        text = path.read_text(encoding="utf-8")
        label = str(path)
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"error: --schema {value!r} is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise SystemExit("error: --schema must be a JSON object (a JSON Schema)")
    return label, schema


# --- the embedded engine ------------------------------------------------------------------------------


def _embedded(
    args: argparse.Namespace, todo: list[Path], label: str, schema: dict[str, Any], writer: _Writer
) -> int:
    from tqdm import tqdm

    from glmv.engine.llm import LLM
    from glmv.engine.sampling import SamplingParams
    from glmv.engine.structured import closing_reserve, json_schema_output, schema_errors
    from glmv.errors import GlmvError
    from glmv.models.tiny import is_random_checkpoint
    from glmv.server.defaults import default_model_dir
    from glmv.tasks.schemas import BUILTIN_SCHEMAS, extraction_prompt

    try:
        structured = (
            json_schema_output(schema, param="schema").with_thinking(args.thinking).with_close_on_budget()
        )
    except GlmvError as exc:
        print(f"error: --schema: {exc.message}", file=sys.stderr)
        return 2
    preset = BUILTIN_SCHEMAS.get(label)
    prompt = preset.prompt(args.instructions) if preset else extraction_prompt(schema, args.instructions)
    model = args.model or str(default_model_dir())
    if is_random_checkpoint(model):
        print("note: this checkpoint has random weights; its answers are random", file=sys.stderr)
    engine_kwargs: dict[str, Any] = {"dtype": args.dtype}
    if args.max_model_len:
        engine_kwargs["max_model_len"] = args.max_model_len
    llm = LLM(model, **engine_kwargs)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, structured=structured)
    kwargs = {"enable_thinking": args.thinking} if llm.inputs.chat.supports_thinking_toggle else None
    pending: dict[str, tuple[str, int, list[str], float]] = {}  # request id -> (source, pages, text, start)
    queue: Iterator[Path] = iter(todo)
    failures = 0
    counter = 0

    def submit_next() -> bool:
        nonlocal failures, counter
        for path in queue:
            source = display_path(path)
            try:
                doc = render_document(path, max_pages=args.max_pages, dpi=args.pdf_dpi)
                content: list[dict[str, Any]] = [{"type": "image"} for _ in doc.images]
                content.append({"type": "text", "text": prompt})
                rid = f"extract-{counter}"
                counter += 1
                request = llm.inputs.build(
                    rid,
                    [{"role": "user", "content": content}],
                    llm.inputs.preprocess(doc.images),
                    params,
                    chat_template_kwargs=kwargs,
                )
                engine.add_request(request)
            except ExtractFileError as exc:
                writer.write(_error_record(source, label, exc.kind, exc.message))
                failures += 1
                bar.update(1)
                continue
            except GlmvError as exc:
                writer.write(_error_record(source, label, exc.code or exc.error_type, exc.message))
                failures += 1
                bar.update(1)
                continue
            pending[rid] = (source, len(doc.images), [], time.monotonic())
            return True
        return False

    with tqdm(total=len(todo), desc="extract", unit="file", disable=args.no_progress) as bar:
        while len(pending) < args.concurrency and submit_next():
            pass
        while engine.has_unfinished():
            for out in engine.step():
                entry = pending.get(out.request_id)
                if entry is None:
                    continue
                source, pages, texts, start = entry
                texts.extend(d.text for d in out.deltas)
                if not out.finished:
                    continue
                del pending[out.request_id]
                finish = next((d.finish_reason for d in out.deltas if d.finish_reason), None)
                record = _finish_record(
                    source, label, pages, "".join(texts), finish, out.error, schema, schema_errors
                )
                if "data" in record:
                    budget = engine.max_model_len - out.prompt_tokens
                    if args.max_tokens:
                        budget = min(budget, args.max_tokens)
                    record["truncated"] = out.completion_tokens > budget - closing_reserve(budget)
                record["usage"] = {
                    "prompt_tokens": out.prompt_tokens,
                    "completion_tokens": out.completion_tokens,
                    "total_tokens": out.prompt_tokens + out.completion_tokens,
                }
                record["seconds"] = round(time.monotonic() - start, 3)
                failures += "error" in record
                writer.write(record)
                bar.update(1)
                while len(pending) < args.concurrency and submit_next():
                    pass
    return 1 if failures else 0


def _finish_record(
    source: str,
    label: str,
    pages: int,
    text: str,
    finish: str | None,
    error: Any,
    schema: dict[str, Any],
    validate: Any,
) -> dict[str, Any]:
    from glmv.processing.reasoning import split

    if error is not None:
        return _error_record(source, label, error.code or error.error_type, error.message)
    if finish == "length":
        return _error_record(
            source, label, "incomplete_output", "the answer reached max_tokens before the JSON was complete"
        )
    _, content = split(text)
    try:
        data = json.loads(content)
    except ValueError as exc:
        return _error_record(source, label, "invalid_output", f"the answer is not JSON: {exc}")
    problems = validate(schema, data)
    if problems:
        return _error_record(source, label, "schema_validation_failed", "; ".join(problems[:5]))
    return {"source": source, "schema": label, "pages": pages, "data": data}


# --- a server -----------------------------------------------------------------------------------------


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_url(path: Path) -> str:
    """An image file as it is (the server checks and decodes it); PDFs are rendered first."""
    mime = {
        ".png": "image/png",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".webp": "image/webp",
        ".bmp": "image/bmp",
        ".gif": "image/gif",
        ".tif": "image/tiff",
        ".tiff": "image/tiff",
    }.get(path.suffix.lower(), "application/octet-stream")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ExtractFileError("not_found", f"{path} cannot be read: {exc}") from None
    return f"data:{mime};base64," + base64.b64encode(data).decode()


async def _remote(
    args: argparse.Namespace, todo: list[Path], label: str, schema: dict[str, Any], writer: _Writer
) -> int:
    import httpx
    from tqdm import tqdm

    from glmv.tasks.schemas import BUILTIN_SCHEMAS

    url = args.server.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    key = args.api_key or os.environ.get("GLMV_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    schema_field: str | dict[str, Any] = label if label in BUILTIN_SCHEMAS else schema
    semaphore = asyncio.Semaphore(args.concurrency)
    failures = 0

    async def one(client: httpx.AsyncClient, path: Path, bar: Any) -> None:
        nonlocal failures
        source = display_path(path)
        async with semaphore:
            start = time.monotonic()
            try:
                if path.suffix.lower() == PDF_SUFFIX:
                    doc = await asyncio.to_thread(
                        render_document, path, max_pages=args.max_pages, dpi=args.pdf_dpi
                    )
                    images = [await asyncio.to_thread(_data_url, im) for im in doc.images]
                else:
                    images = [await asyncio.to_thread(_file_url, path)]
                body: dict[str, Any] = {"images": images, "schema": schema_field, "thinking": args.thinking}
                if args.instructions:
                    body["instructions"] = args.instructions
                if args.max_tokens:
                    body["max_tokens"] = args.max_tokens
                if args.served_model:
                    body["model"] = args.served_model
                response = await client.post(url + "/extract", json=body, headers=headers)
                payload = response.json()
                if response.status_code != 200:
                    err = payload.get("error", {}) if isinstance(payload, dict) else {}
                    record = _error_record(
                        source,
                        label,
                        err.get("code") or err.get("type") or f"http_{response.status_code}",
                        err.get("message") or response.text[:500],
                    )
                else:
                    record = {
                        "source": source,
                        "schema": label,
                        "pages": len(images),
                        "data": payload["data"],
                        "truncated": bool(payload.get("truncated")),
                        "usage": payload.get("usage"),
                    }
            except ExtractFileError as exc:
                record = _error_record(source, label, exc.kind, exc.message)
            except (httpx.HTTPError, ValueError) as exc:
                record = _error_record(source, label, "request_failed", f"{type(exc).__name__}: {exc}")
            if "error" not in record:
                record["seconds"] = round(time.monotonic() - start, 3)
            failures += "error" in record
            writer.write(record)
            bar.update(1)

    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        with tqdm(total=len(todo), desc="extract", unit="file", disable=args.no_progress) as bar:
            await asyncio.gather(*(one(client, p, bar) for p in todo))
    return 1 if failures else 0


# --- the command ----------------------------------------------------------------------------------


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="image or PDF files, or folders to search for them")
    parser.add_argument(
        "--schema",
        required=True,
        help="built-in schema (invoice, receipt, id_card, business_license, table, chat_screenshot), "
        "a JSON Schema file, or inline JSON",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results.jsonl"), help="JSON Lines output (appended)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="documents in flight")
    parser.add_argument("--server", help="base URL of a glmv server (default: run the model here)")
    parser.add_argument("--api-key", help="API key for --server (default: $GLMV_API_KEY or $OPENAI_API_KEY)")
    parser.add_argument("--served-model", help="model name to send to --server (default: its own)")
    parser.add_argument(
        "--model", help="checkpoint directory for the embedded engine (default: the tiny one)"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-model-len", type=int, default=None, help="context cap of the embedded engine")
    parser.add_argument("--instructions", help="extra instructions for the prompt")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on generated tokens per document")
    parser.add_argument("--max-pages", type=int, default=8, help="most PDF pages read per document")
    parser.add_argument("--pdf-dpi", type=float, default=144.0, help="resolution PDF pages are rendered at")
    parser.add_argument("--thinking", action="store_true", help="let a thinking model reason first (slower)")
    parser.add_argument("--retry-errors", action="store_true", help="re-run files whose line is an error")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request to --server")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_extract(args: argparse.Namespace) -> int:
    """Exit status: 0 all files extracted, 1 some files got error lines, 2 bad arguments."""
    if args.concurrency < 1:
        print("error: --concurrency must be >= 1", file=sys.stderr)
        return 2
    label, schema = _schema_arg(args.schema)
    files = collect_files(args.files)
    done = load_done(args.out, retry_errors=args.retry_errors)
    done_keys = {resume_key(source) for source in done}
    todo = [p for p in files if resume_key(p) not in done_keys]
    skipped = len(files) - len(todo)
    if skipped:
        print(f"{skipped} of {len(files)} files already in {args.out}; {len(todo)} to do", file=sys.stderr)
    if not todo:
        return 0
    writer = _Writer(args.out)
    try:
        if args.server:
            return asyncio.run(_remote(args, todo, label, schema, writer))
        return _embedded(args, todo, label, schema, writer)
    finally:
        writer.close()
