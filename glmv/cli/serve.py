"""`glmv serve`: load the model, serve the API and web page with uvicorn, drain on SIGTERM.

`run_serve` builds the settings (flags, `GLMV_*` variables, TOML), checks the checkpoint folder and
binds the port once (a mistake is one line and status 2 before any model loads), makes the
generation service (which starts the engine: its own process per core, or a thread with
`--engine-mode inprocess`), prints where the web page and the API are, warns when the weights are
random, and serves with uvicorn (one worker). On SIGTERM or Ctrl-C it stops admitting work (new
requests get 503 with `Retry-After`, `/ready` turns 503), lets running requests finish for up to
`shutdown_timeout` seconds, ends those still running with a 503 (streams: an error event and
`[DONE]`), then exits 0. When the engine dies (a core process killed, a crash in its loop), the
requests in flight get their errors at once and `glmv serve` exits with status 1, so that a
supervisor (systemd, Kubernetes) starts it again.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from glmv.cli.checks import check_model_dir, check_port_free
from glmv.cli.errors import reporting_errors
from glmv.server.settings import Settings, add_serve_arguments

if TYPE_CHECKING:
    import uvicorn

    from glmv.server.state import ServerState

log = logging.getLogger("glmv.server")

# Seconds stopped requests get to send their last event once the shutdown timeout ran out.
_STOP_GRACE_S = 2.0

__all__ = ["add_parser", "resolve_model", "run_serve"]


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _make_server(config: uvicorn.Config, state: ServerState, banner: Callable[[int], None]) -> uvicorn.Server:
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server with a draining shutdown: 503 for new work, running requests finish."""

        def __init__(self) -> None:
            super().__init__(config)
            self._drain_deadline: float | None = None
            self._stop_deadline: float | None = None
            self._signals = 0
            self.engine_died: BaseException | None = None

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                port = config.port
                for server in self.servers:
                    for sock in server.sockets or ():
                        port = sock.getsockname()[1]
                        break
                banner(port)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # The signal is not re-raised after shutdown (uvicorn would, making the exit status
            # 128 + signal); a clean drain exits 0.
            self._signals += 1
            if self._signals == 1:
                state.draining = True
                self._drain_deadline = time.monotonic() + state.settings.shutdown_timeout
                print(
                    f"glmv: shutting down; waiting up to {state.settings.shutdown_timeout:g} s for "
                    f"{state.inflight} running request(s)"
                    + (" (Ctrl-C again to stop now)" if sig == signal.SIGINT else ""),
                    file=sys.stderr,
                    flush=True,
                )
            else:
                self.should_exit = True
                self.force_exit = sig == signal.SIGINT

        async def on_tick(self, counter: int) -> bool:
            dead = state.service.dead
            if dead is not None and self.engine_died is None and not self.should_exit:
                # In-flight requests have their errors already; a supervisor restarts the server.
                self.engine_died = dead
                state.draining = True
                print(f"glmv: the engine stopped ({dead}); exiting", file=sys.stderr, flush=True)
                self.should_exit = True
            if self._drain_deadline is not None and not self.should_exit:
                now = time.monotonic()
                if state.inflight == 0:
                    self.should_exit = True
                elif self._stop_deadline is None and now >= self._drain_deadline:
                    # Running requests are ended properly (an error event and [DONE] for a stream,
                    # a 503 otherwise) rather than cut off mid-body when the server closes.
                    stopped = state.stop_running()
                    log.warning("shutdown timeout reached: stopping %d running request(s)", stopped)
                    self._stop_deadline = now + _STOP_GRACE_S
                elif self._stop_deadline is not None and now >= self._stop_deadline:
                    log.warning("%d request(s) did not end after being stopped", state.inflight)
                    self.should_exit = True
            return await super().on_tick(counter)

    return _Server()


@reporting_errors("glmv serve")
def run_serve(args: argparse.Namespace) -> int:
    """`glmv serve`: load the model, serve until SIGTERM/Ctrl-C, return the exit status (0 after a
    clean drain, 1 when start-up failed or the engine died, 2 for a bad setting, a checkpoint
    folder that is not one or a port that is taken, found before the model loads). With `--ray`,
    the same app runs as engine replicas on Ray Serve (`glmv.ray.serve.run_ray_serve`)."""
    if getattr(args, "ray", False):
        return _run_on_ray(args)
    settings = Settings.from_sources(args)  # a bad setting: status 2 (reporting_errors)
    # What can be checked is checked before the model loads: the checkpoint folder and the port.
    if settings.model:
        check_model_dir(settings.model)
    check_port_free(settings.host, settings.port)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    import uvicorn

    from glmv.server.app import create_app
    from glmv.server.http_limits import limited_protocol, raise_open_file_limit
    from glmv.tasks.service import create_service

    model_dir, embedded = resolve_model(settings.model)
    settings.model = str(model_dir)
    print(
        f"glmv: loading {_embedded_name(model_dir) if embedded else 'model'} from {model_dir} ...",
        flush=True,
    )
    loading = time.perf_counter()
    service = create_service(settings.service_config())  # its errors: one line (reporting_errors)
    loaded_in = time.perf_counter() - loading
    try:
        app = create_app(settings, service=service)
    except BaseException:
        service.shutdown()
        raise
    state: ServerState = app.state.glmv
    info = service.info

    def banner(port: int) -> None:
        base = f"http://{_display_host(settings.host)}:{port}"
        cores = f", {settings.data_parallel_size} engine cores" if settings.data_parallel_size > 1 else ""
        lines = [
            f"glmv: serving {state.model_names[0]!r} ({info.device}, context {info.max_model_len} tokens{cores})",
            f"  web page: {base}/",
            f"  API:      {base}/v1   (OpenAI-compatible; docs at {base}/docs)",
        ]
        if info.memory is not None:
            lines.append(f"  {info.memory}")
        lines.append(f"  model ready in {loaded_in:.1f} s" + (f"; {info.startup}" if info.startup else ""))
        if service.demo_note:
            lines.append(f"  NOTE: {service.demo_note}")
        if service.random_weights:
            lines.append(
                "  WARNING: this model has random weights; its answers are random text. "
                "Pass --model DIR to serve a real checkpoint."
            )
        guard = settings.guard
        keys = guard is not None and (
            getattr(guard, "api_keys", None) or getattr(guard, "api_keys_file", None)
        )
        if not _is_loopback(settings.host) and not keys:
            lines.append(
                f"  WARNING: listening on {settings.host} without an API key: anyone who can reach this port "
                "may use the model. Pass --api-key (or --api-keys-file) or bind to 127.0.0.1."
            )
        print("\n".join(lines), flush=True)

    limits = settings.http_limits()
    raise_open_file_limit(limits.max_connections + 256)
    uv_config = uvicorn.Config(
        app,
        http=limited_protocol(limits),
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  # float works
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        workers=1,
        timeout_graceful_shutdown=5,
        server_header=False,
        proxy_headers=False,  # the guard decides the client address (X-Forwarded-For from trusted proxies only)
    )
    server = _make_server(uv_config, state, banner)
    try:
        server.run()
    finally:
        service.shutdown()
    if not server.started:
        return 1
    if getattr(server, "engine_died", None) is not None:
        print("glmv: stopped (engine failure)", file=sys.stderr, flush=True)
        return 1
    print("glmv: stopped", flush=True)
    # Everything is closed (server, engine, logs below): skip the interpreter's teardown of torch
    # and tokenizers, which takes seconds, so that the process ends when the shutdown timeout
    # says it does.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _embedded_name(model_dir: Path) -> str:
    from glmv.tasks.service import demo_note

    return "the embedded demo model" if demo_note(model_dir) else "the embedded tiny model"


def resolve_model(model: str | None) -> tuple[Path, bool]:
    """The checkpoint directory to serve and whether it is the embedded tiny default."""
    if model:
        return Path(model), False
    from glmv.models.defaults import default_model_dir

    return default_model_dir(), True


def _run_on_ray(args: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        from glmv.ray import RAY_MISSING

        print(f"glmv serve: --ray: {RAY_MISSING}", file=sys.stderr)
        return 2
    from glmv.ray.serve import run_ray_serve

    return run_ray_serve(args)


def add_parser(sub: Any) -> None:
    # glmv.ray.serve imports Ray only when it runs, so its flags are known without Ray installed.
    from glmv.ray.serve import add_ray_serve_arguments

    p = sub.add_parser("serve", help="start the OpenAI-compatible server and web page")
    add_serve_arguments(p)
    p.add_argument(
        "--ray",
        action="store_true",
        help="serve on Ray Serve: engine replicas behind a cache-aware front (needs glmv[ray]; "
        "the 'ray' flags below apply)",
    )
    add_ray_serve_arguments(p)
    p.set_defaults(func=run_serve)
