"""The KubeRay RayService manifest and the `serve run` config in the repository are valid: the
manifest against KubeRay's RayService schema (a subset vendored in deploy/kuberay, with unknown
fields refused as `kubectl apply`'s strict field validation does), their Serve configs against
Ray's own `ServeDeploySchema`, and their applications build from `glmv.ray.serve:build_app`."""

from __future__ import annotations

import copy
import importlib
import json
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
CRD_SUBSET = REPO / "deploy" / "kuberay" / "rayservice.crd-subset.json"
SERVE_CONFIG = REPO / "deploy" / "ray" / "serve.yaml"


def strict(schema: Any) -> Any:
    """Refuse unknown fields where the CRD lists the fields (as the API server does in strict mode)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def validator() -> Any:
    schema = strict(json.loads(CRD_SUBSET.read_text()))
    return jsonschema.Draft7Validator(schema)


def manifest() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def test_manifest_matches_the_rayservice_schema() -> None:
    doc = manifest()
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    errors = sorted(validator().iter_errors(doc), key=str)
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["spec"]["rayClusterConfig"].update(workerGroupSpec=[]),  # misspelt field
        lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"),  # required
        lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="two"),  # type
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            imagePullPolicy=3
        ),
        lambda d: d["spec"].update(serveConfigV2={"applications": []}),  # a string in the CRD
    ],
)
def test_schema_check_catches_mistakes(breakage: Any) -> None:
    doc = copy.deepcopy(manifest())
    breakage(doc)
    assert list(validator().iter_errors(doc))


def _check_serve_config(config: dict[str, Any]) -> None:
    pytest.importorskip("ray")
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    from glmv.ray.serve import build_app

    assert builder is build_app
    assert isinstance(builder(app.get("args", {})), Application)  # builds without a cluster or the model


def test_manifest_serve_config_builds_the_glmv_application() -> None:
    config = yaml.safe_load(manifest()["spec"]["serveConfigV2"])
    _check_serve_config(config)
    args = config["applications"][0]["args"]
    from glmv.ray.serve import RayServeOptions, _settings_from

    options = RayServeOptions.from_mapping(args)
    assert options.autoscaling_config() == {
        "min_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 24,
    }
    settings = _settings_from(args)
    assert settings.guard.rate_limit_storage.startswith("redis://")
    assert settings.guard.requests_per_minute == 600


def test_serve_run_config_builds_the_glmv_application() -> None:
    _check_serve_config(yaml.safe_load(SERVE_CONFIG.read_text()))
