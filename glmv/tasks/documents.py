"""Documents as images: image files and PDFs found in folders, rendered page by page.

`collect_files` finds the images and PDFs among the paths given (folders are searched
recursively); `render_document` turns one file into the RGB images of its pages (a PDF is
rendered with pypdfium2 at a chosen resolution, up to a page limit). A file that cannot become
images raises `ExtractFileError` with a stable `kind` (`not_found`, `invalid_image`,
`invalid_pdf`, `too_many_pages`, `pdf_support_missing`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_SUFFIXES",
    "PDF_INSTALL",
    "PDF_SUFFIX",
    "Document",
    "ExtractFileError",
    "collect_files",
    "display_path",
    "render_document",
    "resume_key",
    "text_of",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PDF_SUFFIX = ".pdf"
# How to get PDF support (glmv is installed from its checkout, not from a package index).
PDF_INSTALL = "pip install 'pypdfium2>=4.30' (in a glmv checkout: pip install -e '.[pdf]')"


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



def display_path(path: str | Path) -> str:
    """`path` as text that JSON and the terminal can carry: bytes of a file name that are not
    UTF-8 are written as `\\xNN` escapes (the name as typed is kept otherwise)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def resume_key(path: str | Path) -> str:
    """What a file is matched on when a run resumes: its absolute, normalised path, so that
    `imgs/a.png` and `/home/me/imgs/a.png` are the same file."""
    return display_path(os.path.abspath(path))


def text_of(value: str) -> str:
    """`value` with anything that has no UTF-8 form (lone surrogates) escaped."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


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
            "invalid_image", f"{display_path(path)} is not a readable image: {text_of(str(exc))}"
        ) from None


def _render_pdf(path: Path, *, max_pages: int, dpi: float) -> list[Image.Image]:
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise ExtractFileError(
            "pdf_support_missing", f"reading PDFs needs pypdfium2: {PDF_INSTALL}"
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
