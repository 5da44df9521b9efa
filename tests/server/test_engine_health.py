"""What the server shows of its engine: one set of gauges per engine core in /metrics,
`glmv_engine_up`, /ready and new requests when the engine has stopped, and `glmv serve`
exiting with status 1 when its engine dies (so that a supervisor starts it again)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from glmv.cli import build_parser
from glmv.cli.serve import run_serve
from glmv.server.app import create_app
from tests.tasks.scripted import ScriptedClient

from .conftest import asgi_client, make_settings, metric_value


async def test_metrics_per_core_and_readiness(server_model_dir: Path) -> None:
    client = ScriptedClient(server_model_dir, [("Hi", [1], None)])
    app = create_app(make_settings(server_model_dir), client)
    async with asgi_client(app) as c:
        text = (await c.get("/metrics")).text
        for core in ("0", "1"):  # the scripted client reports two cores
            labels = {"model_name": "tiny-glm41v", "core": core}
            assert metric_value(text, "glmv_core_requests_running", labels) == 0.0
            assert metric_value(text, "glmv_core_kv_cache_usage_ratio", labels) == 0.0
            assert metric_value(text, "glmv_core_prefix_cache_queries_total", labels) == 0.0
        assert metric_value(text, "glmv_core_requests_running", {"core": "2"}) is None
        assert metric_value(text, "glmv_engine_up", {"model_name": "tiny-glm41v"}) == 1.0
        assert (await c.get("/ready")).status_code == 200

        client.dead = RuntimeError("the core process ended")
        assert (await c.get("/ready")).json() == {"status": "engine_not_running"}
        assert metric_value((await c.get("/metrics")).text, "glmv_engine_up") == 0.0
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
        r = await c.post("/v1/extract", json={"images": ["data:image/png;base64,AAAA"], "schema": "receipt"})
        assert r.status_code == 503
        assert (await c.get("/health")).status_code == 200


def test_serve_exits_1_when_its_engine_dies(
    server_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import glmv.tasks.service as service_module

    real = service_module.create_service

    def dying(config: Any, *, client: Any = None) -> Any:
        scripted = ScriptedClient(server_model_dir, [("Hi", [1], None)])
        service = real(config, client=scripted)
        scripted.dead = RuntimeError("the core process was killed")
        return service

    monkeypatch.setattr(service_module, "create_service", dying)
    args = build_parser().parse_args(
        ["serve", "--model", str(server_model_dir), "--port", "0", "--image-workers", "0", "--no-access-log"]
    )
    assert run_serve(args) == 1
    err = capsys.readouterr().err
    assert "the engine stopped (the core process was killed)" in err
