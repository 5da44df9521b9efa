"""glmv as a Ray Serve application: engine replicas behind a cache-aware HTTP front.

Two deployments make one application:

* `GlmvServer`: each replica owns one glmv engine (one GPU when the cluster has GPUs, CPU
  otherwise) and runs the whole glmv HTTP app, `glmv.server.app.create_app(settings)`: the same
  routes, guards, errors and streaming as `glmv serve`. `forward` runs one raw HTTP request
  (ASGI scope + body) through that app and streams back what it sends.
* `GlmvIngress`: the application's HTTP ingress (`serve.ingress`, app `glmv.ray.relay.RelayApp`).
  It reads each request, takes its conversation keys and forwards it to `GlmvServer` through a
  handle whose request router is `glmv.ray.router.ConversationAffinityRouter`; replica failures
  are retried or end the stream with an error event. (Serve allows one ingress per application,
  and its HTTP proxy shows an ingress only the headers, hence the two deployments.)

Start it with one command against a new local Ray instance or an existing cluster:

    python -m glmv.ray.serve --model DIR --replicas 2 [--ray-address auto] [glmv serve flags]
    python -m glmv.ray.serve --model DIR --min-replicas 1 --max-replicas 8 --target-ongoing-requests 16

or with Ray's own CLI and the config file in the repository (`serve run deploy/ray/serve.yaml`),
whose `import_path` is `glmv.ray.serve:build_app`. Every `glmv serve` flag works (the same
`Settings`, from flags, `GLMV_*` variables and `--config` TOML); rate limits are shared by all
replicas when `--rate-limit-storage redis://HOST:PORT/DB` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from glmv.ray import require_ray

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle

    from glmv.ray.affinity import AffinityKeys
    from glmv.server.settings import Settings

__all__ = [
    "GlmvIngress",
    "GlmvServer",
    "RayServeOptions",
    "add_ray_serve_arguments",
    "build_app",
    "build_application",
    "main",
    "run_ray_serve",
]

REPLICA_HEADER = "x-glmv-replica"  # which engine replica answered (a replica id, for operators and tests)


@dataclass(slots=True)
class RayServeOptions:
    """How glmv runs on Ray Serve (everything else is the ordinary `glmv serve` Settings)."""

    replicas: int = 1  # fixed number of engine replicas (ignored when autoscaling)
    min_replicas: int | None = None  # autoscaling: set min and/or max replicas
    max_replicas: int | None = None
    initial_replicas: int | None = None
    target_ongoing_requests: float = 16.0  # autoscaling target per replica
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    max_ongoing_requests: int = 64  # requests one replica takes at once (its engine batches them)
    max_queued_requests: int = -1  # per front replica, waiting for a replica; -1: no bound
    num_gpus_per_replica: float | None = None  # default: 1 when the cluster has GPUs, else 0
    num_cpus_per_replica: float = 1.0
    ingress_replicas: int = 1
    ingress_num_cpus: float = 1.0
    ingress_max_ongoing_requests: int = 1024
    imbalance_threshold: int = 8  # ongoing requests above the least loaded replica that count as busy
    max_attempts: int = 3  # sends of a request whose replica failed before answering
    ray_access_log: bool = False  # Serve's own access log lines (glmv's guard writes one per request)
    app_name: str = "glmv"
    route_prefix: str = "/"
    ray_address: str | None = (
        None  # None: $RAY_ADDRESS, else a new local instance; "auto": the running cluster
    )
    num_cpus: float | None = None  # CPUs of a local Ray instance started here (default: Ray's)

    def validate(self) -> None:
        from glmv.errors import ConfigError

        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ConfigError(what, param="ray")

        need(self.replicas >= 1, "--replicas must be >= 1")
        need(self.min_replicas is None or self.min_replicas >= 0, "--min-replicas must be >= 0")
        need(self.max_replicas is None or self.max_replicas >= 1, "--max-replicas must be >= 1")
        if self.min_replicas is not None and self.max_replicas is not None:
            need(self.min_replicas <= self.max_replicas, "--min-replicas must be <= --max-replicas")
        need(self.target_ongoing_requests > 0, "--target-ongoing-requests must be > 0")
        need(self.max_ongoing_requests >= 1, "--max-ongoing-requests must be >= 1")
        need(self.ingress_replicas >= 1, "--ingress-replicas must be >= 1")
        need(self.max_attempts >= 1, "--max-attempts must be >= 1")
        need(self.imbalance_threshold >= 0, "--imbalance-threshold must be >= 0")
        need(self.route_prefix.startswith("/"), "--route-prefix must start with /")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def autoscaling_config(self) -> dict[str, Any] | None:
        if not self.autoscaling:
            return None
        low = self.min_replicas if self.min_replicas is not None else 1
        config: dict[str, Any] = {
            "min_replicas": low,
            "max_replicas": self.max_replicas if self.max_replicas is not None else max(low, self.replicas),
            "target_ongoing_requests": self.target_ongoing_requests,
        }
        if self.initial_replicas is not None:
            config["initial_replicas"] = self.initial_replicas
        if self.upscale_delay_s is not None:
            config["upscale_delay_s"] = self.upscale_delay_s
        if self.downscale_delay_s is not None:
            config["downscale_delay_s"] = self.downscale_delay_s
        return config

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RayServeOptions:
        """The fields of `values` that are options of this class (others are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})


# --- the engine replicas ----------------------------------------------------------------------------


class GlmvServer:
    """One engine and the whole glmv app, which this replica calls directly (`forward`)."""

    async def __init__(self, settings: Settings) -> None:
        from ray import serve

        from glmv.ray.relay import AppLifespan
        from glmv.server.app import create_app

        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (tests building the class directly)
            self.replica_id = f"local-{os.getpid()}"
        self._replica_header = [(REPLICA_HEADER.encode(), self.replica_id.encode())]
        if not settings.model:
            # The embedded tiny checkpoint, made in this node's own cache (not the driver's).
            from glmv.models.defaults import default_model_dir

            settings.model = str(default_model_dir())  # this replica's own copy of the settings
        # Built here, on the replica, so the engine lives in this process (and on its GPU).
        self.app = create_app(settings)
        self._lifespan = AppLifespan(self.app)
        await self._lifespan.startup()

    async def forward(
        self, scope: dict[str, Any], body: bytes, affinity: tuple[str | None, str | None] | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Run one HTTP request (forwarded by `GlmvIngress`) through the app; `affinity` is read
        by the request router only."""
        from glmv.ray.relay import call_asgi

        async for batch in call_asgi(self.app, scope, body, extra_headers=self._replica_header):
            yield batch

    def check_health(self) -> None:
        """Serve replaces a replica whose engine died (this raises)."""
        dead = self.app.state.glmv.service.dead
        if dead is not None:
            raise RuntimeError(f"the engine of replica {self.replica_id} died: {dead}")

    async def __del__(self) -> None:
        await self._lifespan.shutdown()


# --- the HTTP front ---------------------------------------------------------------------------------


def _is_replica_failure(exc: BaseException) -> bool:
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    failures: tuple[type[BaseException], ...] = (
        rex.RayActorError,  # ActorDiedError, ActorUnavailableError
        rex.WorkerCrashedError,
        rex.NodeDiedError,
        rex.ObjectLostError,
        sex.ReplicaUnavailableError,
    )
    return isinstance(exc, failures)


def _is_overload(exc: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return isinstance(exc, (BackPressureError, DeploymentUnavailableError))


class GlmvIngress:
    """The HTTP entry point: `RelayApp` over a streaming handle to `GlmvServer.forward`."""

    def __init__(self, server: DeploymentHandle, max_body_bytes: int, max_attempts: int) -> None:
        self._server = server.options(stream=True, method_name="forward")
        self._max_body_bytes = max_body_bytes
        self._max_attempts = max_attempts

    def __serve_build_asgi_app__(self) -> Any:
        from glmv.ray.relay import RelayApp

        return RelayApp(
            self._forward,
            is_replica_failure=_is_replica_failure,
            is_overload=_is_overload,
            max_body_bytes=self._max_body_bytes,
            max_attempts=self._max_attempts,
            drop_response_headers=(b"x-request-id",),  # Serve's proxy sets the same id itself
        )

    async def _forward(
        self, scope: dict[str, Any], body: bytes, keys: AffinityKeys
    ) -> AsyncIterator[list[dict[str, Any]]]:
        from glmv.ray.router import AFFINITY_KWARG

        response = self._server.remote(scope, body, **{AFFINITY_KWARG: (keys.conversation, keys.images)})
        async for batch in response:
            yield batch


# --- building the application -------------------------------------------------------------------------


def _cluster_has_gpus() -> bool:
    import ray

    return bool(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0)


def build_application(settings: Settings, options: RayServeOptions) -> Application:
    """The Serve application (not yet running): `serve.run(build_application(...))`."""
    require_ray()
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from glmv.ray.router import ConversationAffinityRouter

    options.validate()
    gpus = options.num_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if _cluster_has_gpus() else 0.0
    server_options: dict[str, Any] = {
        "name": "GlmvServer",
        "max_ongoing_requests": options.max_ongoing_requests,
        "max_queued_requests": options.max_queued_requests,
        "ray_actor_options": {"num_cpus": options.num_cpus_per_replica, "num_gpus": gpus},
        "logging_config": {"enable_access_log": options.ray_access_log},
        "request_router_config": RequestRouterConfig(
            request_router_class=ConversationAffinityRouter,
            request_router_kwargs={"imbalance_threshold": options.imbalance_threshold},
        ),
    }
    autoscaling = options.autoscaling_config()
    if autoscaling is not None:
        server_options["autoscaling_config"] = autoscaling
    else:
        server_options["num_replicas"] = options.replicas
    server = serve.deployment(GlmvServer, **server_options)
    guard = getattr(settings, "guard", None)
    max_body = int(getattr(guard, "max_body_bytes", 32 * 1024 * 1024))
    front = serve.deployment(
        serve.ingress()(GlmvIngress),
        name="GlmvIngress",
        num_replicas=options.ingress_replicas,
        max_ongoing_requests=options.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": options.ingress_num_cpus},
        logging_config={"enable_access_log": options.ray_access_log},
    )
    return front.bind(server.bind(settings), max_body, options.max_attempts)


def _settings_from(values: Mapping[str, Any]) -> Settings:
    from glmv.server.settings import Settings

    return Settings.from_sources(dict(values))


def build_app(args: dict[str, Any]) -> Application:
    """The application builder of `serve run` / a RayService (`import_path: glmv.ray.serve:build_app`).

    `args` holds `glmv serve` settings by field name (`model`, `max_num_seqs`, `config`,
    `rate_limit_storage`, `api_key`, ...; `GLMV_*` variables apply too) and `RayServeOptions`
    fields (`replicas`, `min_replicas`, `max_replicas`, `target_ongoing_requests`, ...)."""
    values = {k: v for k, v in (args or {}).items() if v is not None}  # null in YAML: the default
    options = RayServeOptions.from_mapping(values)
    settings = _settings_from(values)
    return build_application(settings, options)


# --- the command ------------------------------------------------------------------------------------


def add_ray_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The Ray flags (the `glmv serve` flags are added by `add_serve_arguments`)."""
    group = parser.add_argument_group("ray", "with --ray (glmv serve) or python -m glmv.ray.serve")
    d = RayServeOptions()
    group.add_argument(
        "--ray-address",
        help="Ray cluster to use: 'auto' or HOST:PORT (default: $RAY_ADDRESS, else a new local instance)",
    )
    group.add_argument(
        "--ray-num-cpus", dest="num_cpus", type=float, help="CPUs of a Ray instance started here"
    )
    group.add_argument("--replicas", type=int, default=d.replicas, help="engine replicas (fixed count)")
    group.add_argument("--min-replicas", type=int, help="autoscaling: fewest engine replicas")
    group.add_argument("--max-replicas", type=int, help="autoscaling: most engine replicas")
    group.add_argument("--initial-replicas", type=int, help="autoscaling: replicas at start")
    group.add_argument(
        "--target-ongoing-requests", type=float, default=d.target_ongoing_requests,
        help="autoscaling: ongoing requests per replica to aim for",
    )  # fmt: skip
    group.add_argument("--upscale-delay-s", type=float, help="autoscaling: seconds of load before adding")
    group.add_argument(
        "--downscale-delay-s", type=float, help="autoscaling: seconds of idleness before removing"
    )
    group.add_argument(
        "--max-ongoing-requests", type=int, default=d.max_ongoing_requests,
        help="requests one replica takes at once",
    )  # fmt: skip
    group.add_argument(
        "--max-queued-requests", type=int, default=d.max_queued_requests,
        help="requests a front replica holds while all replicas are full (-1: no bound); beyond: 503",
    )  # fmt: skip
    group.add_argument(
        "--num-gpus-per-replica", type=float, help="default: 1 when the cluster has GPUs, else 0"
    )
    group.add_argument("--num-cpus-per-replica", type=float, default=d.num_cpus_per_replica)
    group.add_argument("--ingress-replicas", type=int, default=d.ingress_replicas, help="HTTP front replicas")
    group.add_argument("--ingress-num-cpus", type=float, default=d.ingress_num_cpus)
    group.add_argument(
        "--imbalance-threshold", type=int, default=d.imbalance_threshold,
        help="ongoing requests above the least loaded replica at which a conversation's replica counts as busy",
    )  # fmt: skip
    group.add_argument(
        "--max-attempts", type=int, default=d.max_attempts, help="sends of a request whose replica failed"
    )
    group.add_argument(
        "--ray-access-log",
        action="store_true",
        help="also write Serve's own access log (glmv's guard writes one)",
    )
    group.add_argument("--app-name", default=d.app_name, help="Serve application name")
    group.add_argument("--route-prefix", default=d.route_prefix)
    group.add_argument(
        "--detach", action="store_true",
        help="deploy and exit, leaving the application running on the cluster (with --ray-address)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from glmv.server.settings import add_serve_arguments

    parser = argparse.ArgumentParser(
        prog="glmv-ray-serve", description="Serve glmv on a Ray cluster (Ray Serve) with cache-aware routing."
    )
    add_serve_arguments(parser)
    add_ray_serve_arguments(parser)
    return parser


def _wait_for_signal() -> None:
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m glmv.ray.serve [glmv serve flags] [Ray flags]`: see `run_ray_serve`."""
    require_ray()
    return run_ray_serve(build_parser().parse_args(argv))


def run_ray_serve(args: argparse.Namespace) -> int:
    """Deploy and serve until SIGTERM / Ctrl-C. `args` is parsed by a parser given both
    `add_serve_arguments` and `add_ray_serve_arguments` (so `glmv serve --ray` can reuse it).
    Exit status: 0 after a clean stop, 1 when the application failed to start, 2 for bad flags."""
    require_ray()
    from glmv.errors import GlmvError
    from glmv.server.settings import Settings

    try:
        settings = Settings.from_sources(args)
        options = RayServeOptions.from_mapping(vars(args))
        options.validate()
    except GlmvError as exc:
        print(f"glmv: {exc.message}", file=sys.stderr)
        return 2
    if args.detach and not (options.ray_address or os.environ.get("RAY_ADDRESS")):
        print("glmv: --detach needs --ray-address (a cluster that outlives this command)", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    # No address: RAY_ADDRESS when set, else a new local instance (never a stray cluster found on disk).
    address = options.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    started_here = address == "local"
    init_kwargs: dict[str, Any] = {"address": address, "include_dashboard": False}
    if started_here and options.num_cpus is not None:
        init_kwargs["num_cpus"] = options.num_cpus
    ray.init(**init_kwargs)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        app = build_application(settings, options)
        print(
            f"glmv: deploying {options.app_name!r} on Ray (model: {settings.model or 'embedded tiny'}) ...",
            flush=True,
        )
        try:
            serve.run(app, name=options.app_name, route_prefix=options.route_prefix, blocking=False)
        except Exception as exc:  # a replica failed to start (bad checkpoint, no GPU ...)
            print(f"glmv: the application failed to start: {exc}", file=sys.stderr)
            return 1
        base = f"http://{settings.host}:{settings.port}{options.route_prefix.rstrip('/')}"
        scale = (
            f"autoscaling {options.autoscaling_config()}"
            if options.autoscaling
            else f"{options.replicas} replica(s)"
        )
        print(f"glmv: serving on Ray Serve with {scale}\n  API: {base}/v1   (OpenAI-compatible)", flush=True)
        if args.detach:
            return 0
        _wait_for_signal()
        print("glmv: stopping ...", flush=True)
        serve.delete(options.app_name)
        return 0
    finally:
        if started_here:
            serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
