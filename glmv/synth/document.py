"""What the generator returns for one synthetic document.

A `SyntheticDocument` is the rendered image plus everything needed to teach and grade a model on
it: the printed text in reading order (reading), question/answer pairs (QA) and the JSON of the
built-in extraction schema that fits the document (extraction). `extraction(name)` answers any
built-in schema: the document's own JSON, or an object of nulls and empty lists when the schema
does not fit (nothing of that kind is shown).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from glmv.synth.canvas import Glyph
from glmv.tasks.schemas import BUILTIN_SCHEMAS

__all__ = ["QA", "SyntheticDocument", "empty_document"]


@dataclass(frozen=True, slots=True)
class QA:
    """A question about the document, its exact answer, and what it asks for (`key`, e.g. "total")."""

    question: str
    answer: str
    key: str


@dataclass(slots=True)
class SyntheticDocument:
    kind: str  # receipt, invoice, id_card, business_license, business_card, table, chat_screenshot
    lang: str  # "en" or "zh": the document's main language
    image: Image.Image
    lines: list[str]  # the printed text, in reading order
    schema: str | None  # the built-in extraction schema that fits, if any
    data: dict[str, Any] | None  # its JSON
    qa: list[QA] = field(default_factory=list)
    glyphs: list[Glyph] = field(default_factory=list)  # each printed character's centre (Canvas)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def extraction(self, schema_name: str) -> dict[str, Any]:
        """The JSON answer for built-in schema `schema_name` on this image."""
        if schema_name == self.schema and self.data is not None:
            return json.loads(json.dumps(self.data, ensure_ascii=False))
        return empty_document(BUILTIN_SCHEMAS[schema_name].schema)

    def answer(self, key: str) -> str | None:
        """The answer of the first QA pair with this key."""
        return next((qa.answer for qa in self.qa if qa.key == key), None)


def empty_document(schema: dict[str, Any]) -> dict[str, Any]:
    """An object for `schema` that claims nothing: null where allowed, [] for lists, 0 / "" / false
    where a value is required."""
    out = _empty(schema)
    assert isinstance(out, dict)
    return out


def _empty(schema: dict[str, Any]) -> Any:
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "enum" in schema:
        return None if None in schema["enum"] else schema["enum"][0]
    if "object" in kinds:
        return {k: _empty(v) for k, v in schema.get("properties", {}).items()}
    if "array" in kinds:
        return []
    if "null" in kinds:
        return None
    if "number" in kinds or "integer" in kinds:
        return 0
    if "boolean" in kinds:
        return False
    return ""
