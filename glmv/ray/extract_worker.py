"""One generation service extracting documents in batches: the work of one Ray Data actor (no Ray here).

`DocumentExtractor(job)` starts the service (and its engine) once and keeps it across batches;
`extract(sources)` runs a batch of files through it (all of them in flight together, the engine
batches them) and returns one record per file, exactly the records `glmv extract` writes
(`glmv.tasks.batch_extract.extract_record`: the extraction task of `glmv.tasks.extraction`).
`ExtractJob` is the picklable description the driver ships to every actor.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DocumentExtractor", "ExtractJob"]


@dataclass(slots=True)
class ExtractJob:
    """What every actor needs to know (the `glmv extract` flags that concern the engine)."""

    label: str
    schema: dict[str, Any]
    model: str | None = None  # None: the embedded default, resolved on each actor's own node
    dtype: str = "auto"
    max_model_len: int | None = None
    engine_mode: str | None = None
    image_workers: int | None = None
    instructions: str | None = None
    max_tokens: int | None = None
    max_pages: int = 8
    pdf_dpi: float = 144.0
    thinking: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExtractJob:
        from glmv.tasks.batch_extract import parse_schema

        label, schema = parse_schema(args.schema)
        return cls(
            label=label,
            schema=schema,
            model=args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            engine_mode=getattr(args, "engine_mode", None),
            image_workers=getattr(args, "image_workers", None),
            instructions=args.instructions,
            max_tokens=args.max_tokens,
            max_pages=args.max_pages,
            pdf_dpi=args.pdf_dpi,
            thinking=args.thinking,
        )


class DocumentExtractor:
    """The service of one actor and the extraction it runs (schema and prompt)."""

    def __init__(self, job: ExtractJob) -> None:
        from glmv.models.defaults import default_model_dir
        from glmv.tasks.batch_extract import extraction_service, spec_of

        self.job = job
        self.spec = spec_of(job.label, job.schema, job.instructions)
        self.service = extraction_service(
            # The embedded tiny checkpoint is made in this node's own cache (not the driver's).
            model=job.model or str(default_model_dir()),
            dtype=job.dtype,
            max_model_len=job.max_model_len,
            engine_mode=job.engine_mode,
            max_pages=job.max_pages,
            image_workers=job.image_workers,
        )

    def extract(self, sources: Sequence[str]) -> list[dict[str, Any]]:
        """One record per source, in the order of `sources`."""
        # Each batch runs in a loop of its own; the service outlives them (as the offline LLM's does).
        return asyncio.run(self._extract(sources))

    async def _extract(self, sources: Sequence[str]) -> list[dict[str, Any]]:
        from glmv.tasks.batch_extract import extract_record

        job = self.job
        return list(
            await asyncio.gather(
                *(
                    extract_record(
                        self.service,
                        self.spec,
                        Path(source),
                        job.label,
                        max_pages=job.max_pages,
                        pdf_dpi=job.pdf_dpi,
                        max_tokens=job.max_tokens,
                        thinking=job.thinking,
                    )
                    for source in sources
                )
            )
        )

    def close(self) -> None:
        """Stop the service and its engine."""
        self.service.shutdown()
