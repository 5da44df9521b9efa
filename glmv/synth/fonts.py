"""Fonts the document generator draws with: Debian's CJK and Latin TrueType fonts.

`find_fonts()` looks in `GLMV_FONT_DIR` (when set) and the usual system folders for a CJK font
(WenQuanYi Micro Hei or Noto Sans CJK, which also hold Latin glyphs) and a few Latin families
(DejaVu, Liberation). Chinese text is always drawn with a CJK font; English text with any of them.
`FontSet.get(path, size)` caches the loaded `ImageFont` objects per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

__all__ = ["CJK_FONT_FILES", "LATIN_FONT_FILES", "FontSet", "FontsMissingError", "find_fonts"]

# (file name, index inside a .ttc) — the first one found of each name is used.
CJK_FONT_FILES: tuple[tuple[str, int], ...] = (
    ("wqy-microhei.ttc", 0),
    ("NotoSansCJK-Regular.ttc", 2),  # index 2: the Simplified Chinese face
)
LATIN_FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSerif.ttf",
    "LiberationSans-Regular.ttf",
    "LiberationSerif-Regular.ttf",
    "LiberationMono-Regular.ttf",
)
_BOLD_FILES: dict[str, str] = {
    "DejaVuSans.ttf": "DejaVuSans-Bold.ttf",
    "DejaVuSansMono.ttf": "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf": "DejaVuSerif-Bold.ttf",
    "LiberationSans-Regular.ttf": "LiberationSans-Bold.ttf",
    "LiberationSerif-Regular.ttf": "LiberationSerif-Bold.ttf",
    "LiberationMono-Regular.ttf": "LiberationMono-Bold.ttf",
}
_SEARCH_DIRS: tuple[str, ...] = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.fonts",
    "~/.local/share/fonts",
)


class FontsMissingError(RuntimeError):
    """No CJK font, or no font at all, was found (install fonts-wqy-microhei and fonts-dejavu-core)."""


@dataclass(frozen=True, slots=True)
class FontFace:
    """One font file (and face index for .ttc collections); `bold` is its bold sibling if any."""

    path: str
    index: int = 0
    bold: str | None = None
    cjk: bool = False


@dataclass(slots=True)
class FontSet:
    """The faces found: `cjk` (draws Chinese and Latin) and `latin` (Latin only)."""

    cjk: list[FontFace] = field(default_factory=list)
    latin: list[FontFace] = field(default_factory=list)

    def for_lang(self, lang: str) -> list[FontFace]:
        """Faces that can draw text of `lang` ("zh" or "en")."""
        return list(self.cjk) if lang == "zh" else [*self.latin, *self.cjk]

    @staticmethod
    def get(face: FontFace, size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
        path = face.bold if bold and face.bold else face.path
        return _load(path, face.index if path == face.path else 0, max(6, int(size)))


@lru_cache(maxsize=512)
def _load(path: str, index: int, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size=size, index=index)


def _index_files(dirs: list[Path]) -> dict[str, str]:
    found: dict[str, str] = {}
    for base in dirs:
        if not base.is_dir():
            continue
        for root, _, files in os.walk(base):
            for name in files:
                found.setdefault(name, os.path.join(root, name))
    return found


@lru_cache(maxsize=4)
def _find(extra: str | None) -> FontSet:
    dirs = [Path(extra)] if extra else []
    dirs += [Path(d).expanduser() for d in _SEARCH_DIRS]
    files = _index_files(dirs)
    fonts = FontSet()
    for name, index in CJK_FONT_FILES:
        if name in files:
            fonts.cjk.append(FontFace(files[name], index, None, cjk=True))
            break
    for name in LATIN_FONT_FILES:
        if name in files:
            bold = files.get(_BOLD_FILES.get(name, ""))
            fonts.latin.append(FontFace(files[name], 0, bold))
    return fonts


def find_fonts(require_cjk: bool = True) -> FontSet:
    """The fonts on this machine (`GLMV_FONT_DIR` first). Raises `FontsMissingError` without a CJK
    font (when `require_cjk`) or without any font."""
    fonts = _find(os.environ.get("GLMV_FONT_DIR") or None)
    if require_cjk and not fonts.cjk:
        raise FontsMissingError(
            "no CJK font found (looked for " + ", ".join(n for n, _ in CJK_FONT_FILES) + "); install "
            "fonts-wqy-microhei (Debian) or point GLMV_FONT_DIR at a folder that holds one"
        )
    if not fonts.cjk and not fonts.latin:
        raise FontsMissingError("no usable font found; install fonts-dejavu-core and fonts-wqy-microhei")
    return fonts
