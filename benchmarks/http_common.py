"""Shared by the HTTP robustness benchmarks: a `glmv serve` subprocess on loopback, its memory.

`serve(*flags)` starts the server on the tiny checkpoint (created in a temp dir; `model=` another
one) on a free 127.0.0.1 port and waits for `/ready`; `rss_mb(pid)` / `peak_rss_mb(pid)` read /proc.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    base_url: str
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path  # the server's stdout and stderr (its start-up banner first)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    return _status_kb(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux: write 5 to clear_refs)."""
    with suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextmanager
def serve(*flags: str, model: Path | None = None, start_timeout: float = 180.0) -> Iterator[Server]:
    from glmv.models.tiny import create_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            model = create_tiny_model(Path(tmp) / "tiny-glm41v", variant="glm41v", seed=0)
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_")}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115 - closed below
        cmd = [sys.executable, "-m", "glmv", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--no-access-log", *flags]  # fmt: skip
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        server = Server(f"http://127.0.0.1:{port}", "127.0.0.1", port, process, Path(tmp) / "serve.log")
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((Path(tmp) / "serve.log").read_text(errors="replace")[-3000:])
                try:
                    if httpx.get(server.base_url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            yield server
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            log.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
