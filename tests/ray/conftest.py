"""Fixtures for the Ray tests: one small local Ray instance for this folder (loopback only).

`ray_cluster` starts it on first use (2 logical CPUs, no dashboard) and stops it after the last
test of this folder (package scope), so it does not idle beside the rest of the suite; the
Serve and Ray Data tests share it. Modules that need Ray skip when it is missing, so
the rest of the suite runs without the `ray` extra.
"""

from __future__ import annotations

import base64
import io
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from glmv.models.tiny import create_tiny_model


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="package")
def ray_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("ray-model") / "glmv-tiny", variant="glm41v", seed=0)


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[str]:
    """A local Ray instance for the Ray tests; yields its address (for drivers in subprocesses)."""
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",  # never a cluster some other process left running
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="package")
def serve_port(ray_cluster: str) -> int:
    """Serve's HTTP proxy on a free loopback port, started once for the Ray tests."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


def png_data_url(seed: int, size: tuple[int, int] = (112, 112)) -> str:
    """A small picture of its own per seed (coloured blocks), as a PNG data URL."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    for _ in range(6):
        x, y = rng.randrange(size[0] - 8), rng.randrange(size[1] - 8)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        image.paste(colour, (x, y, x + rng.randrange(4, 40), y + rng.randrange(4, 40)))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


REPO = Path(__file__).resolve().parents[2]
# A small extraction schema: a short prompt keeps the tiny model's extraction quick.
SCHEMA = '{"type": "object", "properties": {"total": {"type": "integer"}}, "required": ["total"]}'


def make_documents(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` small PNG files of their own colour, named doc000.png, doc001.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        path = folder / f"doc{i:03d}.png"
        Image.new("RGB", (40, 32), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(path)
        paths.append(path)
    return paths


def driver_env() -> dict[str, str]:
    """The environment for a glmv command in a subprocess: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env
