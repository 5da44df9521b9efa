"""Helpers of the command-line tests: a guard that fails a test when a model starts loading, and
the one-line error check."""

from __future__ import annotations

from typing import Any

import pytest


class ModelLoaded(AssertionError):
    """A command began loading a model although its inputs were wrong."""


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way a command loads a model raises `ModelLoaded` (not an error the CLI reports)."""
    import glmv.cli.extract
    import glmv.models.quant.quantize
    import glmv.tasks.llm
    import glmv.tasks.service

    def loading(*args: Any, **kwargs: Any) -> Any:
        raise ModelLoaded("a model was loaded")

    monkeypatch.setattr(glmv.tasks.llm, "LLM", loading)
    monkeypatch.setattr(glmv.tasks.service, "create_service", loading)
    monkeypatch.setattr(glmv.cli.extract, "extraction_service", loading)
    monkeypatch.setattr(glmv.models.quant.quantize, "load_model", loading)


def error_line(err: str, prog: str) -> str:
    """The single line of `err`, checked to be `prog: error: ...` with no traceback."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    return lines[0]
