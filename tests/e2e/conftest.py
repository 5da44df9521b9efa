"""Browser fixtures for the web page tests: Debian's Chromium driven by Playwright (Python).

The browser is the system's `chromium` (Playwright's own browser download is never used); the
tests are skipped, with the reason, when it or the `playwright` package is missing. Each test gets
a fresh browser context (empty localStorage, sessionStorage and IndexedDB). Screenshots go to
`tests/artifacts/web/` (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "web"

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_executable() -> str | None:
    """The system Chromium, or None. `GLMV_CHROMIUM` overrides where it is looked for."""
    for candidate in (os.environ.get("GLMV_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = chromium_executable()
    if path is None:
        pytest.skip("the web page tests need Debian's chromium (apt-get install chromium; `make test` installs it)")
    return path


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    # Module scope: Playwright's sync API keeps an event loop running in this thread while it is
    # open, which would break every later test that calls asyncio.run in the same session.
    sync_api = pytest.importorskip("playwright.sync_api", reason="the web page tests need the playwright package")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


class BrowserErrors:
    """JavaScript errors and console errors a page reported (a test asserts there were none)."""

    def __init__(self) -> None:
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []

    def attach(self, page: Any) -> None:
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("console", lambda msg: self.console_errors.append(msg.text) if msg.type == "error" else None)


@pytest.fixture
def new_page(browser: Any) -> Iterator[Any]:
    """`new_page(width=1280, height=860, locale="en-US")` -> (page, errors) in a fresh context."""
    contexts: list[Any] = []

    def make(width: int = 1280, height: int = 860, locale: str = "en-US", **kwargs: Any) -> tuple[Any, BrowserErrors]:
        context = browser.new_context(viewport={"width": width, "height": height}, locale=locale,
                                      color_scheme="light", **kwargs)
        context.set_default_timeout(15_000)
        contexts.append(context)
        page = context.new_page()
        errors = BrowserErrors()
        errors.attach(page)
        return page, errors

    yield make
    for context in contexts:
        context.close()


class ThreadedUvicorn:
    """A uvicorn server for an ASGI app, on a thread, bound to 127.0.0.1 on a free port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="web-test-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadedUvicorn:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test web server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class GlmvServeProcess:
    """`python -m glmv serve --model DIR` on 127.0.0.1 and a free port, as a child process."""

    def __init__(self, model_dir: Path, log_path: Path, *extra: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        repo = Path(__file__).resolve().parents[2]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_")}
        env["GLMV_CACHE_DIR"] = str(log_path.parent / "cache")
        if os.environ.get("GLMV_ENGINE_MODE"):  # where the engine core runs, as for the other tests
            env["GLMV_ENGINE_MODE"] = os.environ["GLMV_ENGINE_MODE"]
        env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "glmv", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--max-model-len", "4096", "--kv-cache-gb", "0.1",
               "--log-level", "warning", *extra]
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=repo)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> GlmvServeProcess:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"glmv serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"glmv serve did not become ready:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture(scope="session")
def live_glmv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlmvServeProcess]:
    """One `glmv serve` on the embedded default model, as `make serve` starts it (the demo model,
    served as `glmv-demo`), shared by the README, notebook and /docs tests."""
    from glmv.models.defaults import default_model_dir

    root = tmp_path_factory.mktemp("live-glmv")
    server = GlmvServeProcess(default_model_dir(), root / "serve.log")
    try:
        yield server.wait_ready(timeout=300)
    finally:
        server.stop()
