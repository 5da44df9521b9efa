"""The closing summary of `glmv extract`: how many files were done, skipped and failed, where the
results are, and the first errors (the rest are error lines in the output file)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmv.cli.errors import one_line

__all__ = ["FIRST_ERRORS", "Tally"]

# Errors the summary shows; a run over a folder of bad files should not flood the terminal.
FIRST_ERRORS = 3


@dataclass(slots=True)
class Tally:
    """What a run did with its files, counted as their records are written."""

    skipped: int = 0  # already in the output file when the run started
    done: int = 0
    failed: int = 0
    first_errors: list[str] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        error = record.get("error")
        if error is None:
            self.done += 1
            return
        self.failed += 1
        if len(self.first_errors) < FIRST_ERRORS:
            kind = error.get("type") if isinstance(error, dict) else None
            message = error.get("message") if isinstance(error, dict) else error
            self.first_errors.append(one_line(f"{record.get('source')}: {kind}: {message}"))

    @property
    def status(self) -> int:
        """0 when every file of this run got its data, 1 when some got error lines."""
        return 1 if self.failed else 0

    def summary(self, out: Path) -> list[str]:
        """The lines printed at the end of a run."""
        lines = [
            f"glmv extract: {self.done} done, {self.skipped} skipped (already in the output), "
            f"{self.failed} failed; results in {out}"
        ]
        if self.failed:
            lines.append(f"first errors ({len(self.first_errors)} of {self.failed}):")
            lines += [f"  {line}" for line in self.first_errors]
            lines.append("(run again with --retry-errors to retry the files that failed)")
        return lines
