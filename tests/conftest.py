"""Shared fixtures: the tiny checkpoints are created once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmv.models.tiny import create_tiny_model


@pytest.fixture(scope="session")
def tiny41_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny41") / "ckpt", variant="glm41v", seed=0)


@pytest.fixture(scope="session")
def tiny46_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny46") / "ckpt", variant="glm46v", seed=1)
