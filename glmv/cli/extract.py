"""`glmv extract FILES... --schema invoice`: batch document extraction into a JSON Lines file.

Each input file (folders are searched for images and PDFs) becomes one line of `--out`:

    {"source": "scans/a.pdf", "schema": "invoice", "pages": 2, "data": {...}, "truncated": false, "usage": {...}}
    {"source": "scans/broken.jpg", "schema": "invoice", "error": {"type": "invalid_image", "message": "..."}}

A PDF is rendered page by page (pypdfium2) and its pages go to the model together as the images of
one document (`--max-pages`, default 8). The run works against the embedded engine (`--model DIR`,
default the embedded demo model) or a running server (`--server URL`, POST /v1/extract), with
`--concurrency` documents in flight and a progress bar. It is resumable: files that already have a
line in `--out` are skipped (`--retry-errors` re-runs those whose line is an error), and a line cut
off by a crash is dropped before the run appends. A bad file gets an error line and the run goes on.
`truncated: true` means the token budget ran low and the object was closed early (see
`close_on_budget` in `glmv.engine.structured`). Mistakes are found before the model loads or a file
is sent (paths that do not exist, a bad schema or `--model`, PDFs without pypdfium2, a server that
cannot be reached) and reported as one line. The run ends with a summary on stderr (files done,
skipped and failed, the output file, the first errors). Exit status: 0 when every file has data, 1
when some got error lines or the server cannot be reached, 2 for a usage error. The embedded run
extracts through the same service and extraction task as `POST /v1/extract`
(`glmv.tasks.extraction`); the records, the schema and resuming are `glmv.tasks.batch_extract`'s.
With `--ray` the run goes to Ray Data instead (`glmv.ray.data`: one engine per actor, across a
cluster), with the same checks first, the same records and the same resuming.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from glmv.cli.checks import check_model_dir
from glmv.cli.errors import CommandFailure, UsageError, reporting_errors
from glmv.cli.extract_report import Tally
from glmv.tasks.batch_extract import (
    RecordWriter,
    error_record,
    extract_record,
    extraction_service,
    load_done,
    parse_schema,
    spec_of,
)
from glmv.tasks.documents import (
    IMAGE_SUFFIXES,
    PDF_INSTALL,
    PDF_SUFFIX,
    ExtractFileError,
    collect_files,
    display_path,
    render_document,
    resume_key,
)

__all__ = ["add_extract_arguments", "add_parser", "run_extract"]


# --- the embedded engine ------------------------------------------------------------------------------


def _checked_spec(label: str, schema: dict[str, Any], instructions: str | None) -> Any:
    """`spec_of`, with a schema the grammar cannot enforce as a `UsageError`."""
    from glmv.errors import GlmvError

    try:
        return spec_of(label, schema, instructions)
    except GlmvError as exc:
        raise UsageError(f"--schema: {exc.message}") from None


async def _run_embedded(
    args: argparse.Namespace, todo: list[Path], label: str, spec: Any, writer: RecordWriter, tally: Tally
) -> None:
    from tqdm import tqdm

    from glmv.models.defaults import default_model_dir

    service = extraction_service(
        model=args.model or str(default_model_dir()),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        engine_mode=args.engine_mode,
        max_pages=args.max_pages,
        image_workers=args.image_workers,
    )
    queue: Iterator[Path] = iter(todo)

    async def one(path: Path, bar: Any) -> None:
        record = await extract_record(
            service,
            spec,
            path,
            label,
            max_pages=args.max_pages,
            pdf_dpi=args.pdf_dpi,
            max_tokens=args.max_tokens,
            thinking=args.thinking,
        )
        writer.write(record)
        tally.add(record)
        bar.update(1)

    async def worker(bar: Any) -> None:
        for path in queue:  # the workers share one iterator: files go in order
            await one(path, bar)

    try:
        with tqdm(total=len(todo), desc="extract", unit="file", disable=args.no_progress) as bar:
            await asyncio.gather(*(worker(bar) for _ in range(min(args.concurrency, len(todo)))))
    finally:
        service.shutdown()


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


def _server_url(server: str) -> str:
    """The API base (`.../v1`) of `--server`."""
    url = server.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(
            f"--server {server!r} is not an http(s) URL; pass e.g. --server http://127.0.0.1:8000"
        )
    return url if url.endswith("/v1") else url + "/v1"


def _api_headers(args: argparse.Namespace) -> dict[str, str]:
    key = args.api_key or os.environ.get("GLMV_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _check_server(args: argparse.Namespace) -> None:
    """Reach `--server` once before any file is read: a server that is not there, or that refuses
    the key, is one line instead of an error line per file."""
    import httpx

    url = _server_url(args.server)
    try:
        response = httpx.get(url + "/models", headers=_api_headers(args), timeout=httpx.Timeout(30.0))
    except httpx.TransportError as exc:
        raise CommandFailure(
            f"cannot reach the server at {args.server} ({type(exc).__name__}: {exc or 'no answer'}); "
            "start it (`glmv serve`) or pass the right --server URL"
        ) from None
    if response.status_code in (401, 403):
        raise UsageError(
            f"the server at {args.server} refused the API key (HTTP {response.status_code}); pass "
            "--api-key or set GLMV_API_KEY"
        )


async def _remote(
    args: argparse.Namespace,
    todo: list[Path],
    label: str,
    schema: dict[str, Any],
    writer: RecordWriter,
    tally: Tally,
) -> None:
    import httpx
    from tqdm import tqdm

    from glmv.tasks.schemas import BUILTIN_SCHEMAS

    url = _server_url(args.server)
    headers = _api_headers(args)
    schema_field: str | dict[str, Any] = label if label in BUILTIN_SCHEMAS else schema
    semaphore = asyncio.Semaphore(args.concurrency)

    async def one(client: httpx.AsyncClient, path: Path, bar: Any) -> None:
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
                    record = error_record(
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
                record = error_record(source, label, exc.kind, exc.message)
            except (httpx.HTTPError, ValueError) as exc:
                record = error_record(source, label, "request_failed", f"{type(exc).__name__}: {exc}")
            if "error" not in record:
                record["seconds"] = round(time.monotonic() - start, 3)
            writer.write(record)
            tally.add(record)
            bar.update(1)

    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        with tqdm(total=len(todo), desc="extract", unit="file", disable=args.no_progress) as bar:
            await asyncio.gather(*(one(client, p, bar) for p in todo))


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
        "--out",
        type=Path,
        default=Path("results.jsonl"),
        help="JSON Lines output, appended to; files already in it are skipped (default: %(default)s)",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="documents in flight")
    parser.add_argument("--server", help="base URL of a glmv server (default: run the model here)")
    parser.add_argument("--api-key", help="API key for --server (default: $GLMV_API_KEY or $OPENAI_API_KEY)")
    parser.add_argument("--served-model", help="model name to send to --server (default: its own)")
    parser.add_argument(
        "--model", help="checkpoint directory for the embedded engine (default: the tiny one)"
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--engine-mode",
        default=None,
        choices=["process", "inprocess"],
        help="embedded engine: its core in its own process (default) or in a thread of this one",
    )
    parser.add_argument(
        "--image-workers",
        type=int,
        default=None,
        help="processes that resize the pages (default: half the CPUs, at most 8; 0: a thread)",
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="context cap of the embedded engine")
    parser.add_argument("--instructions", help="extra instructions for the prompt")
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on generated tokens per document")
    parser.add_argument("--max-pages", type=int, default=8, help="most PDF pages read per document")
    parser.add_argument("--pdf-dpi", type=float, default=144.0, help="resolution PDF pages are rendered at")
    parser.add_argument("--thinking", action="store_true", help="let a thinking model reason first (slower)")
    parser.add_argument("--retry-errors", action="store_true", help="re-run files whose line is an error")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request to --server")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_files(paths: list[str]) -> list[Path]:
    """The documents named by `paths` (see `collect_files`); a `UsageError` for a path that does
    not exist or when there is nothing to read."""
    for raw in paths:
        if not Path(raw).exists():
            raise UsageError(f"{display_path(raw)} does not exist; check the path")
    files = collect_files(paths)
    if not files:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES | {PDF_SUFFIX}))
        raise UsageError(
            f"no documents found in {' '.join(map(display_path, paths))}: glmv extract reads {suffixes}"
        )
    return files


def _check_pdf_support(todo: list[Path]) -> None:
    """PDFs need pypdfium2 (the `pdf` extra): without it, one line before any file is read."""
    pdfs = [p for p in todo if p.suffix.lower() == PDF_SUFFIX]
    if not pdfs:
        return
    try:
        import pypdfium2  # noqa: F401
    except ImportError:
        raise UsageError(
            f"{len(pdfs)} of the files are PDFs ({display_path(pdfs[0])}, ...) and reading PDFs needs "
            f"pypdfium2, which is not installed: {PDF_INSTALL} (or leave the PDFs out)"
        ) from None


@reporting_errors("glmv extract")
def run_extract(args: argparse.Namespace) -> int:
    """Exit status: 0 all files extracted, 1 some files got error lines (or the server cannot be
    reached), 2 bad arguments (found before any model loads or any file is sent). Ends with a
    summary on stderr (`Tally.summary`). With `--ray`, the same checks, then the run goes to Ray
    Data (`glmv.ray.data.run_extract_ray`)."""
    on_ray = bool(getattr(args, "ray", False))
    _check_ray_flags(args, on_ray)
    if args.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    label, schema = parse_schema(args.schema)  # a ConfigError: one line, status 2
    spec = None
    if not args.server:
        if args.model:
            check_model_dir(args.model)
        spec = _checked_spec(label, schema, args.instructions)
    files = _check_files(args.files)
    if on_ray:
        return _run_on_ray(args)
    done = load_done(args.out, retry_errors=args.retry_errors)
    done_keys = {resume_key(source) for source in done}
    todo = [p for p in files if resume_key(p) not in done_keys]
    tally = Tally(skipped=len(files) - len(todo))
    if tally.skipped:
        print(
            f"{tally.skipped} of {len(files)} files already in {args.out}; {len(todo)} to do", file=sys.stderr
        )
    if todo:
        _check_pdf_support(todo)
        if args.server:
            _check_server(args)
        writer = RecordWriter(args.out)
        try:
            if args.server:
                asyncio.run(_remote(args, todo, label, schema, writer, tally))
            else:
                asyncio.run(_run_embedded(args, todo, label, spec, writer, tally))
        finally:
            writer.close()
            _print_summary(tally, args.out)  # also after Ctrl-C: what was written is kept
    else:
        _print_summary(tally, args.out)
    return tally.status


def _print_summary(tally: Tally, out: Path) -> None:
    print("\n".join(tally.summary(out)), file=sys.stderr, flush=True)


def _check_ray_flags(args: argparse.Namespace, on_ray: bool) -> None:
    """`--ray` and `--server` exclude each other; the Ray flags do nothing without `--ray`."""
    if on_ray:
        if args.server:
            raise UsageError("--server does not apply with --ray: the actors run the model; leave one of them out")
        return
    from glmv.ray.data import ray_flags_given

    given = ray_flags_given(args)
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise UsageError(f"{', '.join(given)} only {verb} with --ray (the run on Ray Data); add --ray or leave them out")


def _run_on_ray(args: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        from glmv.ray import RAY_MISSING

        raise UsageError(f"--ray: {RAY_MISSING}") from None
    from glmv.ray.data import run_extract_ray

    return run_extract_ray(args)


def add_parser(sub: Any) -> None:
    # glmv.ray.data imports Ray only when it runs, so its flags are known without Ray installed.
    from glmv.ray.data import add_ray_extract_arguments

    p = sub.add_parser("extract", help="extract JSON from document images and PDFs into a JSONL file")
    add_extract_arguments(p)
    p.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Data: one engine per actor, on any number of GPUs and machines (needs glmv[ray]; "
        "the 'ray' flags below apply)",
    )
    add_ray_extract_arguments(p)
    p.set_defaults(func=run_extract)
