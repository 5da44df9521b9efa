"""The FastAPI application of `glmv serve`.

`create_app(settings, async_engine=None)` wires everything together: the chat-completions route,
`/v1/models`, `/health` (the process lives), `/ready` (the engine runs and the server is not
draining), `/metrics` (Prometheus, one registry per app), FastAPI's `/docs` and `/openapi.json`,
OpenAI-shaped error handlers, the guard middleware (`glmv.server.guard`) and the web chat page
(`glmv.server.web_routes.install_web`) at `/`. Pass an `AsyncEngine` to serve it (tests do, with a tiny model in
process); without one the app loads the model named by `settings` itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import glmv
from glmv.engine.async_engine import AsyncEngine
from glmv.engine.engine import EngineConfig, LLMEngine
from glmv.engine.inputs import InputBuilder, load_processors
from glmv.errors import ModelNotFoundError
from glmv.models.demo import demo_note
from glmv.models.tiny import is_random_checkpoint
from glmv.processing.chat import ChatProcessor
from glmv.processing.media import ImageLimits, RemoteImagePolicy
from glmv.server.chat import ChatHandler, TokenBytes
from glmv.server.errors import install_error_handlers, internal_error_response
from glmv.server.extract import install_extract_routes, warm_up_structured_output
from glmv.server.metrics import CONTENT_TYPE, ServerMetrics
from glmv.server.moderation import install_moderation_routes
from glmv.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from glmv.server.settings import Settings

try:
    from glmv.server import guard as _guard_module
except ImportError:  # without the guard module the server runs unguarded
    _guard_module = None  # type: ignore[assignment]

log = logging.getLogger("glmv.server")


def _web_installer() -> Callable[[FastAPI], Any] | None:
    """`glmv.server.web_routes.install_web` (the chat page at `/`), if that module is present."""
    try:
        from glmv.server.web_routes import install_web
    except ImportError:
        return None
    return install_web  # type: ignore[no-any-return]


@dataclass(slots=True)
class ServerState:
    """What the routes of one app share (`app.state.glmv`)."""

    settings: Settings
    engine: AsyncEngine
    builder: InputBuilder
    metrics: ServerMetrics
    model_names: list[str]
    model_dir: str
    random_weights: bool
    image_limits: ImageLimits
    remote_policy: RemoteImagePolicy
    token_bytes: TokenBytes
    owns_engine: bool
    created: int = field(default_factory=lambda: int(time.time()))
    system_fingerprint: str = f"glmv-{glmv.__version__}" if hasattr(glmv, "__version__") else "glmv"
    inflight: int = 0  # chat requests admitted and not yet answered (streams: until their end)
    draining: bool = False  # set on SIGTERM: new chat requests get 503, /ready turns 503
    demo_note: str | None = None  # set when serving glmv's demo model (glmv.models.demo)


def resolve_model(settings: Settings) -> tuple[Path, bool]:
    """The checkpoint directory to serve and whether it is the embedded tiny default."""
    if settings.model:
        return Path(settings.model), False
    from glmv.server.defaults import default_model_dir

    return default_model_dir(), True


def build_engine(settings: Settings) -> AsyncEngine:
    """Load the model named by `settings` into a started `AsyncEngine` (may raise CheckpointError)."""
    model_dir, _ = resolve_model(settings)
    config = EngineConfig(
        model=str(model_dir),
        dtype=settings.dtype,
        device=settings.device,
        block_size=settings.block_size,
        kv_cache_gb=settings.kv_cache_gb,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        gpu_memory_gb=settings.gpu_memory_gb,
        enable_cuda_graphs=settings.enable_cuda_graphs,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=settings.max_model_len,
        max_waiting=settings.max_waiting,
        enable_prefix_caching=settings.enable_prefix_caching,
        encoder_cache_mb=settings.encoder_cache_mb,
        seed=settings.seed,
    )
    # The tokenizer of the checkpoint's architecture (GLM-4v-9b ships no tokenizer.json).
    tokenizer, _ = load_processors(model_dir)
    engine = AsyncEngine(LLMEngine(config, tokenizer=tokenizer))
    engine.start()
    return engine


class _ServerMiddleware:
    """Counts responses by method, route template and status (streams count when they start),
    and answers an exception that escaped the app with the generic OpenAI-shaped 500, so that
    middleware outside it (the guard's access log) sees a normal response."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception as exc:
            if status:  # the response had started: nothing more can be said to the client
                raise
            log.error("unhandled error in %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            await internal_error_response()(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None)
            if path is None:
                path = "unmatched"
            self.metrics.http_response(scope.get("method", ""), path, status[0] if status else 499)


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Invalid request (`param` names the offending field)"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Rate limit exceeded (`Retry-After`)"),
        (500, "Server error"),
        (503, "Overloaded or shutting down (`Retry-After`)"),
        (504, "The request timed out"),
    )
}


def create_app(settings: Settings | None = None, async_engine: AsyncEngine | None = None) -> FastAPI:
    """The app for `settings`, serving `async_engine` (loaded from `settings.model` when None)."""
    settings = settings if settings is not None else Settings()
    owns_engine = async_engine is None
    engine = async_engine if async_engine is not None else build_engine(settings)
    if not engine.running and engine.dead is None:
        engine.start()
    core = engine.engine
    model_dir = str(core.config.model)
    _, builder = load_processors(model_dir)  # the input rules of the checkpoint's architecture
    if settings.chat_template is not None:
        if isinstance(builder.chat, ChatProcessor):
            builder = InputBuilder(
                ChatProcessor(core.tokenizer, settings.chat_template), builder.image_processor
            )
        else:
            log.warning("--chat-template is ignored: this model's prompt format is built in")
    names = list(settings.served_model_name) or [Path(model_dir).name or "glmv"]
    metrics = ServerMetrics(engine.stats, names[0])
    state = ServerState(
        settings=settings,
        engine=engine,
        builder=builder,
        metrics=metrics,
        model_names=names,
        model_dir=model_dir,
        random_weights=is_random_checkpoint(model_dir),
        demo_note=demo_note(model_dir),
        image_limits=settings.image_limits(),
        remote_policy=settings.remote_image_policy(),
        token_bytes=TokenBytes(core.tokenizer),
        owns_engine=owns_engine,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if state.owns_engine:
            engine.shutdown()

    app = FastAPI(
        title="glmv",
        summary="OpenAI-compatible API for the GLM vision-language models",
        version=getattr(glmv, "__version__", "0"),
        lifespan=lifespan,
    )
    app.state.glmv = state
    install_error_handlers(app)
    chat = ChatHandler(state)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={
            200: {
                "description": "A chat completion, or with `stream: true` an SSE stream of `ChatCompletionChunk` events ending with `data: [DONE]`.",
                "content": {
                    "text/event-stream": {
                        "schema": ChatCompletionChunk.model_json_schema(
                            ref_template="#/components/schemas/{model}"
                        )
                    }
                },
            },
            **_ERRORS,
        },
        tags=["OpenAI"],
        summary="Create a chat completion (text and images)",
    )
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await chat(request, body)

    # Document extraction and moderation: served as constrained chat completions.
    install_extract_routes(app, chat, _ERRORS)
    install_moderation_routes(app, chat, _ERRORS)
    warm_up_structured_output(core)

    def model_card(name: str) -> ModelCard:
        cfg = core.model.config
        return ModelCard(
            id=name,
            created=state.created,
            root=model_dir,
            max_model_len=core.max_model_len,
            glmv={
                "random_weights": state.random_weights,
                "demo_model": state.demo_note is not None,
                "note": "random weights: answers are random text" if state.random_weights else state.demo_note,
                "model_type": getattr(cfg, "model_type", None),
                "supports_thinking_toggle": builder.chat.supports_thinking_toggle,
                "max_images_per_request": state.image_limits.max_images,
                "remote_images": state.remote_policy.enabled,
            },
        )

    @app.get("/v1/models", response_model=ModelList, tags=["OpenAI"], summary="List the served model")
    async def list_models() -> ModelList:
        return ModelList(data=[model_card(n) for n in names])

    @app.get(
        "/v1/models/{model_id:path}",
        response_model=ModelCard,
        responses={404: _ERRORS[404]},
        tags=["OpenAI"],
        summary="Describe the served model",
    )
    async def get_model(model_id: str) -> ModelCard:
        if model_id not in names:
            raise ModelNotFoundError(f"The model '{model_id}' does not exist on this server.", param="model")
        return model_card(model_id)

    @app.get("/health", tags=["Operations"], summary="Liveness: 200 while the process runs")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        tags=["Operations"],
        summary="Readiness: 200 when the engine runs and the server takes requests",
        responses={503: {"description": "Not ready (starting, engine stopped, or draining)"}},
    )
    async def ready() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "5"})
        if not engine.running:
            return JSONResponse(
                {"status": "engine_not_running"}, status_code=503, headers={"Retry-After": "5"}
            )
        return JSONResponse({"status": "ready"})

    @app.get(
        "/metrics",
        tags=["Operations"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    install_web = _web_installer()
    if install_web is not None:
        install_web(app)
    else:

        @app.get("/", include_in_schema=False)
        async def root() -> JSONResponse:
            return JSONResponse(
                {
                    "name": "glmv",
                    "api": "/v1",
                    "docs": "/docs",
                    "models": names,
                    "random_weights": state.random_weights,
                }
            )

    app.add_middleware(_ServerMiddleware, metrics=metrics)
    install = getattr(_guard_module, "install_guards", None)
    if install is not None and settings.guard is not None:
        install(app, settings.guard)
    return app


__all__ = ["ServerState", "build_engine", "create_app", "resolve_model"]
