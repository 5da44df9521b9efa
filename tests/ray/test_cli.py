"""`python -m glmv.ray.serve` (the command behind `glmv serve --ray`) against the session's Ray
instance: it deploys, answers under its route prefix, and removes its application on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.ray.conftest import driver_env

ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402

from glmv.ray.serve import RayServeOptions, main  # noqa: E402


def test_bad_flags_exit_2_without_starting_ray(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err
    assert main(["--min-replicas", "3", "--max-replicas", "2"]) == 2
    env = os.environ.pop("RAY_ADDRESS", None)
    try:
        assert main(["--detach"]) == 2
    finally:
        if env is not None:
            os.environ["RAY_ADDRESS"] = env
    assert "--detach needs --ray-address" in capsys.readouterr().err
    assert main(["--max-num-seqs", "0"]) == 2  # glmv serve's own settings are checked too


def test_glmv_serve_ray_takes_the_ray_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from glmv.cli import build_parser
    from glmv.cli import main as glmv_main

    args = build_parser().parse_args(["serve", "--ray", "--replicas", "3", "--max-ongoing-requests", "7"])
    assert args.ray is True
    assert RayServeOptions.from_mapping(vars(args)).replicas == 3
    assert RayServeOptions.from_mapping(vars(args)).max_ongoing_requests == 7
    assert build_parser().parse_args(["serve"]).ray is False
    assert glmv_main(["serve", "--ray", "--replicas", "0"]) == 2  # checked before Ray starts
    assert "--replicas must be >= 1" in capsys.readouterr().err


def test_glmv_serve_ray_without_ray_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from glmv.cli import main as glmv_main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert glmv_main(["serve", "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["glmv serve: --ray: glmv on Ray needs Ray: pip install 'glmv[ray]' (ray[serve,data])"]


def test_autoscaling_options() -> None:
    fixed = RayServeOptions(replicas=3)
    assert not fixed.autoscaling and fixed.autoscaling_config() is None
    auto = RayServeOptions(min_replicas=1, max_replicas=6, target_ongoing_requests=12, upscale_delay_s=5)
    assert auto.autoscaling_config() == {
        "min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 12, "upscale_delay_s": 5,
    }  # fmt: skip
    only_max = RayServeOptions(max_replicas=4)
    assert only_max.autoscaling_config() == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 16.0,
    }
    assert RayServeOptions.from_mapping(
        {"replicas": 2, "model": "x", "max_replicas": None}
    ) == RayServeOptions(replicas=2)


def test_one_command_deploys_serves_and_stops(serve_port: int, ray_cluster: str, ray_model_dir: Path) -> None:
    cmd = [
        sys.executable, "-m", "glmv.ray.serve", "--model", str(ray_model_dir), "--served-model-name", "cli-tiny",
        "--max-model-len", "1024", "--kv-cache-gb", "0.02", "--replicas", "1",
        "--ray-address", ray_cluster, "--host", "127.0.0.1", "--port", str(serve_port),
        "--app-name", "glmv-cli", "--route-prefix", "/cli",
        "--num-cpus-per-replica", "0.25", "--ingress-num-cpus", "0.1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=driver_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "API: " in line:  # the last line printed once the application runs
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(400) and proc.poll() is None, "".join(lines)
        base = f"http://127.0.0.1:{serve_port}/cli"
        assert f"API: {base}/v1" in "".join(lines)
        with httpx.Client(base_url=base, timeout=120) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["cli-tiny"]
            body = {"model": "cli-tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hello"}]}
            answer = client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        reader.join(30)
    deadline = time.monotonic() + 120
    while "glmv-cli" in serve.status().applications:  # deleted on the way out
        assert time.monotonic() < deadline, "the application was not removed"
        time.sleep(0.5)


def test_application_wiring() -> None:
    """What `build_application` hands to Serve (read from the bound application, before any deploy)."""
    from glmv.ray.serve import build_application
    from glmv.server.guard import GuardSettings
    from glmv.server.settings import Settings

    settings = Settings(model="/models/x")
    settings.guard = GuardSettings(max_body_bytes=1234)
    options = RayServeOptions(
        min_replicas=1, max_replicas=3, target_ongoing_requests=5, num_gpus_per_replica=1,
        num_cpus_per_replica=2, max_ongoing_requests=40, imbalance_threshold=3, max_attempts=2,
    )  # fmt: skip
    front = build_application(settings, options)._bound_deployment
    server = front.init_args[0]._bound_deployment
    assert front.name == "GlmvIngress" and front.init_args[1:] == (1234, 2)
    assert server.name == "GlmvServer" and server.init_args[0] is settings
    assert server.ray_actor_options == {"num_cpus": 2, "num_gpus": 1}
    assert server.max_ongoing_requests == 40
    config = server._deployment_config
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (1, 3)
    assert config.autoscaling_config.target_ongoing_requests == 5
    router = config.request_router_config
    assert router.request_router_class == "glmv.ray.router.ConversationAffinityRouter"
    assert router.request_router_kwargs == {"imbalance_threshold": 3}
    # without GPUs in the (absent) cluster, replicas take none
    cpu_only = build_application(settings, RayServeOptions(replicas=2))._bound_deployment.init_args[0]
    assert cpu_only._bound_deployment.ray_actor_options["num_gpus"] == 0
    assert cpu_only._bound_deployment.num_replicas == 2
