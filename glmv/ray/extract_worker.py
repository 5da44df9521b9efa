"""One engine extracting documents in batches: the work of one Ray Data actor (no Ray here).

`DocumentExtractor(job)` loads the checkpoint once; `extract(sources)` runs a batch of files
through the engine (all of them in flight together, the engine batches them) and returns one
record per file, exactly the records `glmv extract` writes: the same prompt, constrained JSON
output, `truncated` flag, usage and error lines (`glmv.extract_cli` builds the records).
`ExtractJob` is the picklable description the driver ships to every actor.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmv.extract_cli import (
    ExtractFileError,
    _error_record,
    _finish_record,
    _schema_arg,
    render_document,
)

__all__ = ["DocumentExtractor", "ExtractJob"]


@dataclass(slots=True)
class ExtractJob:
    """What every actor needs to know (the `glmv extract` flags that concern the engine)."""

    label: str
    schema: dict[str, Any]
    model: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    instructions: str | None = None
    max_tokens: int | None = None
    max_pages: int = 8
    pdf_dpi: float = 144.0
    thinking: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExtractJob:
        label, schema = _schema_arg(args.schema)
        return cls(
            label=label,
            schema=schema,
            model=args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            instructions=args.instructions,
            max_tokens=args.max_tokens,
            max_pages=args.max_pages,
            pdf_dpi=args.pdf_dpi,
            thinking=args.thinking,
        )


class DocumentExtractor:
    """The engine of one actor and the fixed parts of every request (prompt, schema, sampling)."""

    def __init__(self, job: ExtractJob) -> None:
        from glmv.engine.llm import LLM
        from glmv.engine.sampling import SamplingParams
        from glmv.engine.structured import json_schema_output
        from glmv.server.defaults import default_model_dir
        from glmv.tasks.schemas import BUILTIN_SCHEMAS, extraction_prompt

        self.job = job
        structured = (
            json_schema_output(job.schema, param="schema").with_thinking(job.thinking).with_close_on_budget()
        )
        preset = BUILTIN_SCHEMAS.get(job.label)
        self.prompt = (
            preset.prompt(job.instructions) if preset else extraction_prompt(job.schema, job.instructions)
        )
        engine_kwargs: dict[str, Any] = {"dtype": job.dtype}
        if job.max_model_len:
            engine_kwargs["max_model_len"] = job.max_model_len
        self.llm = LLM(job.model or str(default_model_dir()), **engine_kwargs)
        self.params = SamplingParams(temperature=0.0, max_tokens=job.max_tokens, structured=structured)
        chat = self.llm.inputs.chat
        self.template_kwargs = {"enable_thinking": job.thinking} if chat.supports_thinking_toggle else None
        self._counter = 0

    def extract(self, sources: Sequence[str]) -> list[dict[str, Any]]:
        """One record per source (in the order they finish)."""
        from glmv.engine.structured import closing_reserve, schema_errors
        from glmv.errors import GlmvError

        job, llm = self.job, self.llm
        engine = llm.engine
        records: list[dict[str, Any]] = []
        pending: dict[
            str, tuple[str, int, list[str], float]
        ] = {}  # request id -> (source, pages, text, start)
        for source in sources:
            try:
                doc = render_document(Path(source), max_pages=job.max_pages, dpi=job.pdf_dpi)
                content: list[dict[str, Any]] = [{"type": "image"} for _ in doc.images]
                content.append({"type": "text", "text": self.prompt})
                rid = f"extract-{self._counter}"
                self._counter += 1
                request = llm.inputs.build(
                    rid,
                    [{"role": "user", "content": content}],
                    llm.inputs.preprocess(doc.images),
                    self.params,
                    chat_template_kwargs=self.template_kwargs,
                )
                engine.add_request(request)
            except ExtractFileError as exc:
                records.append(_error_record(source, job.label, exc.kind, exc.message))
                continue
            except GlmvError as exc:
                records.append(_error_record(source, job.label, exc.code or exc.error_type, exc.message))
                continue
            pending[rid] = (source, len(doc.images), [], time.monotonic())
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
                    source, job.label, pages, "".join(texts), finish, out.error, job.schema, schema_errors
                )
                if "data" in record:
                    budget = engine.max_model_len - out.prompt_tokens
                    if job.max_tokens:
                        budget = min(budget, job.max_tokens)
                    record["truncated"] = out.completion_tokens > budget - closing_reserve(budget)
                record["usage"] = {
                    "prompt_tokens": out.prompt_tokens,
                    "completion_tokens": out.completion_tokens,
                    "total_tokens": out.prompt_tokens + out.completion_tokens,
                }
                record["seconds"] = round(time.monotonic() - start, 3)
                records.append(record)
        return records
