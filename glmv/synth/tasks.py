"""Training and evaluation conversations built from synthetic documents, in the served format.

Three tasks teach and grade the demo model, each phrased exactly as glmv serves it:

* ``extract``: the user turn is the built-in preset's prompt (`ExtractionPreset.prompt()`, what
  POST /v1/extract and `glmv extract` send) after the image; the answer is the document's JSON
  for that schema, written with the separators the grammar enforces (`", "`, `": "`).
* ``qa``: one or more questions about the same image, each answered with the exact value.
* ``read``: a transcription request; the answer is the printed text, one line per line.

`Example.turns` are (user text, assistant text) pairs; the image belongs to the first user turn.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from glmv.synth.document import SyntheticDocument
from glmv.synth.questions import READ_PROMPTS
from glmv.tasks.schemas import BUILTIN_SCHEMAS

__all__ = [
    "SYSTEM_PROMPTS",
    "TASK_WEIGHTS",
    "Example",
    "dump_json",
    "extraction_example",
    "qa_example",
    "read_example",
    "training_examples",
]

TASK_WEIGHTS: dict[str, float] = {"extract": 0.45, "qa": 0.42, "read": 0.10, "extract_other": 0.03}
SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a helpful assistant that reads documents.",
    "你是一个乐于助人的助手。",
    "Answer briefly.",
)


@dataclass(slots=True)
class Example:
    task: str  # extract, qa, read
    turns: list[tuple[str, str]]
    schema: str | None = None
    keys: tuple[str, ...] = ()  # QA keys of the turns
    system: str | None = None

    def messages(self, upto: int | None = None) -> list[dict[str, Any]]:
        """Chat messages for the first `upto` turns (all by default), the last answer left out when
        `upto` is given, so the list ends with the user turn the model answers next."""
        out: list[dict[str, Any]] = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        n = len(self.turns) if upto is None else upto
        for i, (user, answer) in enumerate(self.turns[:n]):
            if i == 0:
                out.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]})
            else:
                out.append({"role": "user", "content": user})
            if upto is None or i < n - 1:
                out.append({"role": "assistant", "content": answer})
        return out


def dump_json(data: Any) -> str:
    """JSON the way the extraction grammar writes it (compact, `", "` and `": "`, UTF-8 text)."""
    return json.dumps(data, ensure_ascii=False)


def extraction_example(doc: SyntheticDocument, schema: str) -> Example:
    prompt = BUILTIN_SCHEMAS[schema].prompt()
    return Example("extract", [(prompt, dump_json(doc.extraction(schema)))], schema=schema)


def qa_example(doc: SyntheticDocument, rng: random.Random, turns: int = 1) -> Example:
    picked = rng.sample(doc.qa, min(turns, len(doc.qa)))
    return Example("qa", [(q.question, q.answer) for q in picked], keys=tuple(q.key for q in picked))


def read_example(doc: SyntheticDocument, rng: random.Random) -> Example:
    en, zh = READ_PROMPTS
    prompts = zh if (doc.lang == "zh") == (rng.random() < 0.7) else en
    return Example("read", [(rng.choice(prompts), doc.text)])


def training_examples(
    doc: SyntheticDocument,
    rng: random.Random,
    count: int = 2,
    weights: dict[str, float] | None = None,
) -> list[Example]:
    """`count` examples on one document, tasks drawn by `weights` (`TASK_WEIGHTS` by default; QA
    instead of extraction for kinds without a schema)."""
    out: list[Example] = []
    weights = weights or TASK_WEIGHTS
    tasks = tuple(weights)
    for _ in range(count):
        task = rng.choices(tasks, weights=tuple(weights.values()))[0]
        if task.startswith("extract") and doc.schema is None:
            task = "qa"
        if task == "qa" and not doc.qa:
            task = "read"  # text strips (`glmv.synth.lines`) only have their transcription
        if task == "extract":
            ex = extraction_example(doc, doc.schema or "receipt")
        elif task == "extract_other":
            ex = extraction_example(doc, rng.choice([s for s in BUILTIN_SCHEMAS if s != doc.schema]))
        elif task == "qa":
            ex = qa_example(doc, rng, turns=rng.choices((1, 2, 3, 4), weights=(3, 2, 2, 3))[0])
        else:
            ex = read_example(doc, rng)
        if rng.random() < 0.05:
            ex.system = rng.choice(SYSTEM_PROMPTS)
        out.append(ex)
    return out
