"""Shared fixtures: the tiny checkpoints are created once per test session.

`--engine-mode process|inprocess` (or the `GLMV_ENGINE_MODE` environment variable, which the
option sets) chooses how every engine the tests start through `start_engine` runs: the default of
`EngineConfig.engine_mode` reads it. The `engine_mode` fixture says which mode is in force.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from glmv.engine.config import ENGINE_MODE_ENV, ENGINE_MODES, default_engine_mode
from glmv.models.tiny import create_tiny_model


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--engine-mode",
        choices=ENGINE_MODES,
        default=None,
        help=f"run the engines of the suite in this mode (sets {ENGINE_MODE_ENV}; default: process)",
    )


def pytest_configure(config: pytest.Config) -> None:
    mode = config.getoption("--engine-mode")
    if mode:
        os.environ[ENGINE_MODE_ENV] = mode


def pytest_report_header(config: pytest.Config) -> str:
    return f"glmv engine mode: {default_engine_mode()}"


@pytest.fixture(autouse=True)
def _seeded_random() -> None:
    """Every test starts from the same random state (Python, NumPy, torch), whatever ran before it:
    a test that draws numbers draws the same ones in every run and in any order."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def engine_mode() -> str:
    """The mode `EngineConfig` defaults to in this run ("process" or "inprocess")."""
    return default_engine_mode()


@pytest.fixture(scope="session")
def tiny41_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny41") / "ckpt", variant="glm41v", seed=0)


@pytest.fixture(scope="session")
def tiny46_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny46") / "ckpt", variant="glm46v", seed=1)
