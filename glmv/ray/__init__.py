"""glmv beyond one machine: a Ray Serve application and Ray Data batch extraction.

Ray is an optional extra (`pip install 'glmv[ray]'`). Only the command line imports this package
(`glmv serve --ray`, `glmv extract --ray`; their flags are plain argparse), it imports no command
line code, and its modules import Ray only where they need it, so `glmv` works without Ray:

* `glmv.ray.affinity`: which replica should serve a request (pure Python, no Ray).
* `glmv.ray.router`: the Ray Serve request router that applies that policy.
* `glmv.ray.relay`: the thin HTTP front that forwards requests to the engine replicas.
* `glmv.ray.serve`: the deployments, the `serve run` builder and `python -m glmv.ray.serve`.
* `glmv.ray.extract_worker` / `glmv.ray.data`: `glmv extract --ray`, on Ray Data (one engine per
  actor).
"""

from __future__ import annotations

RAY_MISSING = "glmv on Ray needs Ray: pip install 'glmv[ray]' (ray[serve,data])"


def require_ray() -> None:
    """Raise a clear error when Ray is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the test environment has Ray
        raise SystemExit(f"error: {RAY_MISSING}") from exc
