"""Fixtures for the server tests: a tiny checkpoint, in-process apps and a real `glmv serve` process.

* `server_model_dir` / `server_model46_dir`: tiny random-weight checkpoints, built once per session.
* `shared_engine`: one started engine (`start_engine`, an `EngineClient`) on the GLM-4.1V tiny
  model for the in-process apps; `GLMV_ENGINE_MODE` (process / inprocess) picks where its core
  runs, for these and for the `glmv serve` processes below.
* `make_app(**settings)`: `create_app` over the shared engine (images decoded in a thread, not a
  process pool); `make_client(app)`: an `httpx.AsyncClient` talking to it through ASGI (no sockets).
* `live_server`: `python -m glmv serve --model DIR --port <free port>` on 127.0.0.1, waited for
  until `/ready` answers 200, stopped with SIGTERM at the end of the session.
* Helpers as fixtures: `image_url(...)` makes data URLs, `parse_sse(text)` checks and parses a stream.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from glmv.engine.client import EngineClient, start_engine
from glmv.models.tiny import create_tiny_model
from glmv.server.app import create_app
from glmv.server.guard import GuardSettings
from glmv.server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
# Small engine settings: a short context keeps unbounded generations short on CPU.
ENGINE_ARGS = {"max_model_len": 2048, "kv_cache_gb": 0.05, "max_num_seqs": 32}
# Where the engine cores of the tests run (the default of EngineConfig when unset).
ENGINE_MODE = os.environ.get("GLMV_ENGINE_MODE") or None


# --- checkpoints and in-process apps --------------------------------------------------------------


@pytest.fixture(scope="session")
def server_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("server41") / "tiny-glm41v", variant="glm41v", seed=0)


@pytest.fixture(scope="session")
def server_model46_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("server46") / "tiny-glm46v", variant="glm46v", seed=1)


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    guard = overrides.pop("guard", None) or GuardSettings(access_log=False)
    values = {"model": str(model_dir), "image_workers": 0, **ENGINE_ARGS, **overrides}
    if ENGINE_MODE is not None:
        values.setdefault("engine_mode", ENGINE_MODE)
    settings = Settings(**values)
    settings.guard = guard
    settings.validate()
    return settings


def build_engine(settings: Settings) -> EngineClient:
    """A started engine for `settings` (through `start_engine`, as the service starts its own)."""
    assert settings.model is not None
    return start_engine(settings.engine_config(settings.model))


@pytest.fixture(scope="session")
def shared_engine(server_model_dir: Path) -> Iterator[EngineClient]:
    engine = build_engine(make_settings(server_model_dir))
    yield engine
    engine.shutdown()


@pytest.fixture
def make_app(shared_engine: EngineClient, server_model_dir: Path) -> Callable[..., Any]:
    def factory(engine: EngineClient | None = None, **overrides: Any) -> Any:
        return create_app(make_settings(server_model_dir, **overrides), engine or shared_engine)

    return factory


def asgi_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://testserver",
        timeout=60,
    )


@pytest.fixture
def make_client() -> Callable[[Any], httpx.AsyncClient]:
    return asgi_client


@pytest.fixture
async def client(make_app: Callable[..., Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(make_app()) as c:
        yield c


# --- a real server process --------------------------------------------------------------------------


@dataclass
class LiveServer:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    model_dir: Path | None, log_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> LiveServer:
    """Start `glmv serve` (on the embedded tiny model when `model_dir` is None) and wait until ready."""
    port = free_port()
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_")}
    clean_env["GLMV_CACHE_DIR"] = str(log_dir / "cache")
    if ENGINE_MODE is not None:
        clean_env["GLMV_ENGINE_MODE"] = ENGINE_MODE
    clean_env["PYTHONPATH"] = str(REPO) + os.pathsep + clean_env.get("PYTHONPATH", "")
    clean_env.update(env or {})
    cmd = [
        sys.executable, "-m", "glmv", "serve",
        *(["--model", str(model_dir)] if model_dir is not None else []),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(ENGINE_ARGS["max_model_len"]),
        "--kv-cache-gb", "0.1",
        "--log-level", "warning",
        "--no-access-log",
        *extra,
    ]  # fmt: skip
    log_path = log_dir / f"serve-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=clean_env, cwd=REPO)
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"glmv serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.base_url + "/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"glmv serve did not become ready:\n{server.log()}")


@pytest.fixture(scope="session")
def live_server(server_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(server_model_dir, tmp_path_factory.mktemp("live"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def start_live_server(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., LiveServer]:
    def start(model_dir: Path | None, *extra: str, env: dict[str, str] | None = None) -> LiveServer:
        return start_server(model_dir, tmp_path_factory.mktemp("live-extra"), *extra, env=env)

    return start


# --- helpers ---------------------------------------------------------------------------------------------


def encode_image(image: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def image_url() -> Callable[..., str]:
    """`image_url(w, h, colour)`: a PNG data URL of a plain image with a small pattern."""

    def make(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (200, 30, 30)) -> str:
        image = Image.new("RGB", (width, height), colour)
        for x in range(0, width, 8):
            image.putpixel((x, x % height), (0, 0, 0))
        return data_url(encode_image(image))

    return make


def parse_sse(text: str) -> tuple[list[dict[str, Any]], bool]:
    """The JSON events of an SSE body and whether it ended with `data: [DONE]`.

    Asserts the framing: every event is one `data: ...` line followed by a blank line, and nothing
    follows `[DONE]`.
    """
    events: list[dict[str, Any]] = []
    done = False
    assert text.endswith("\n\n"), text[-200:]
    for block in text.split("\n\n")[:-1]:
        assert not done, "data after [DONE]"
        assert block.startswith("data: "), block[:200]
        assert "\n" not in block, block[:200]
        payload = block[len("data: ") :]
        if payload == "[DONE]":
            done = True
            continue
        events.append(json.loads(payload))
    return events, done


@pytest.fixture
def sse() -> Callable[[str], tuple[list[dict[str, Any]], bool]]:
    return parse_sse


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample of a Prometheus text exposition (labels must match exactly those given)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        found = dict(
            (k, v.strip('"'))
            for k, v in (item.split("=", 1) for item in label_text.rstrip("}").split(",") if item)
        )
        if labels is None or all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


@pytest.fixture
def metric() -> Callable[..., float | None]:
    return metric_value
