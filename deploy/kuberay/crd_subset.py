"""Write `rayservice.crd-subset.json`: the part of KubeRay's RayService CRD schema glmv's manifest uses.

KubeRay's CRD (`ray-operator/config/crd/bases/ray.io_rayservices.yaml` in ray-project/kuberay,
Apache-2.0) is about 1 MB, mostly Kubernetes pod-spec schemas, and no Python package ships it.
This keeps its structure: every property name at every level down to the containers, the full
schema of the fields a glmv RayService sets (serveConfigV2, the head and worker groups, their
rayStartParams, containers, resources, ports, env, nodeSelector, tolerations), and for every other
property only its type. Regenerate after a KubeRay upgrade:

    python deploy/kuberay/crd_subset.py path/to/ray.io_rayservices.yaml "kuberay <commit>"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

FULL = True
_TEMPLATE: dict[str, Any] = {
    "metadata": FULL,
    "spec": {
        "containers": FULL,
        "nodeSelector": FULL,
        "tolerations": FULL,
        "serviceAccountName": FULL,
        "restartPolicy": FULL,
        "volumes": {},  # names and types of each volume source
    },
}
_GROUP_COMMON: dict[str, Any] = {
    "rayStartParams": FULL,
    "resources": FULL,
    "labels": FULL,
    "template": _TEMPLATE,
}
KEEP: dict[str, Any] = {
    "apiVersion": FULL,
    "kind": FULL,
    "metadata": FULL,
    "spec": {
        "serveConfigV2": FULL,
        "deploymentUnhealthySecondThreshold": FULL,
        "serviceUnhealthySecondThreshold": FULL,
        "excludeHeadPodFromServeSvc": FULL,
        "rayClusterDeletionDelaySeconds": FULL,
        "upgradeStrategy": FULL,
        "suspend": FULL,
        "rayClusterConfig": {
            "rayVersion": FULL,
            "enableInTreeAutoscaling": FULL,
            "autoscalerOptions": {"idleTimeoutSeconds": FULL, "upscalingMode": FULL, "resources": FULL},
            "headGroupSpec": {**_GROUP_COMMON, "serviceType": FULL, "enableIngress": FULL},
            "workerGroupSpecs": {
                **_GROUP_COMMON,
                "groupName": FULL,
                "replicas": FULL,
                "minReplicas": FULL,
                "maxReplicas": FULL,
                "numOfHosts": FULL,
                "idleTimeoutSeconds": FULL,
                "suspend": FULL,
            },
        },
    },
}
_STUB_KEYS = ("type", "format", "enum", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")


def _clean(node: Any) -> Any:
    """The schema without prose and CEL rules (which a JSON Schema validator cannot use)."""
    if isinstance(node, dict):
        return {k: _clean(v) for k, v in node.items() if k not in ("description", "x-kubernetes-validations")}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def _stub(node: dict[str, Any]) -> dict[str, Any]:
    out = {k: node[k] for k in _STUB_KEYS if k in node}
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        out["items"] = _stub(node["items"])
    return out


def prune(node: dict[str, Any], keep: Any) -> dict[str, Any]:
    if keep is FULL:
        return _clean(node)
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        return {**_stub(node), "items": prune(node["items"], keep)}
    props = node.get("properties")
    if not isinstance(props, dict):
        return _stub(node)
    out = _stub(node)
    out["properties"] = {
        name: prune(child, keep[name]) if name in keep else _stub(child) for name, child in props.items()
    }
    if "required" in node:
        out["required"] = node["required"]
    return out


def main(argv: list[str]) -> int:
    crd_path, source = Path(argv[0]), argv[1]
    crd = yaml.safe_load(crd_path.read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = prune(version["schema"]["openAPIV3Schema"], KEEP)
    schema = {
        "$comment": f"Subset of the RayService v1 CRD schema of {source} (Apache-2.0), made by crd_subset.py",
        **schema,
    }
    out = Path(__file__).with_name("rayservice.crd-subset.json")
    out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
