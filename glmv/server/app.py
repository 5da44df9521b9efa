"""The FastAPI application of `glmv serve`.

`create_app(settings, engine=None)` wires everything together: the chat-completions route,
extraction and moderation, `/v1/models`, `/health` (the process lives), `/ready` (the engine runs
and the server is not draining), `/metrics` (Prometheus, one registry per app), FastAPI's `/docs`
and `/openapi.json`, OpenAI-shaped error handlers, the guard middleware (`glmv.server.guard`)
and the web chat page (`glmv.server.web_routes.install_web`) at `/`. Every route generates
through one `GenerationService` (`glmv.tasks`), made by its factory from `settings`; pass a
started `EngineClient` as `engine` to serve it (tests do), or the service starts the engine
named by `settings.model` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import glmv
from glmv.errors import ModelNotFoundError
from glmv.server.body_send import install as install_body_send
from glmv.server.chat import ChatHandler
from glmv.server.errors import install_error_handlers, internal_error_response
from glmv.server.extract import install_extract_routes
from glmv.server.http_limits import BodyReadMiddleware
from glmv.server.json_body import JsonRoute
from glmv.server.metrics import CONTENT_TYPE, EngineSource, ServerMetrics
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
from glmv.server.state import ServerState
from glmv.tasks.service import EngineClient, GenerationService, create_service
from glmv.timeline import timeline, watch_loop_lag

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


class _ServerMiddleware:
    """Answers an exception that escaped the app with the generic OpenAI-shaped 500, so that
    middleware outside it (the guard's access log, the response counter) sees a normal response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception as exc:
            if started:  # the response had started: nothing more can be said to the client
                raise
            log.error("unhandled error in %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            await internal_error_response()(scope, receive, watching_send)


class _HeadAsGet:
    """Serves HEAD like GET (the server drops the body), as HTTP asks of every GET resource."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return
        inner = {**scope, "method": "GET"}  # a copy: the server must still see HEAD
        try:
            await self.app(inner, receive, send)
        finally:
            if "route" in inner:
                scope["route"] = inner["route"]


class _CountingMiddleware:
    """Counts every response by method, route template and status (streams count when they
    start), outermost, so that the guard's 401/403/413/429 are counted too. Labels come from
    closed sets: the route is the matched template, else the template the path would match, else
    "unmatched"; `ServerMetrics.http_response` folds unknown methods."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: list[Any]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        probe = {**scope, "method": "GET"}
        for route in self.routes:
            try:
                match, _ = route.matches(probe)
            except Exception:  # a route that cannot judge this scope does not match it
                continue
            if match is not Match.NONE and isinstance(getattr(route, "path", None), str):
                return str(route.path)
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        install_body_send(scope, send)  # outermost of ours: streamed bodies skip the layers inside
        status: list[int] = []

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http_response(scope.get("method", ""), self._route(scope), status[0] if status else 499)


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


def create_app(
    settings: Settings | None = None,
    engine: EngineClient | None = None,
    *,
    service: GenerationService | None = None,
) -> FastAPI:
    """The app for `settings`, generating through `service` (made from `settings`, on `engine`
    when one is given; the app then shuts down only what it started)."""
    settings = settings if settings is not None else Settings()
    owns_service = service is None
    if service is None:
        model_dir = engine.info.model_dir if engine is not None else settings.model
        service = create_service(settings.service_config(model_dir), client=engine)
    model_dir = service.model_dir
    names = list(settings.served_model_name) or [Path(model_dir).name or "glmv"]
    metrics = ServerMetrics(
        EngineSource(service.stats, service.core_stats, lambda: service.running), names[0]
    )
    state = ServerState(
        settings=settings, service=service, metrics=metrics, model_names=names, owns_service=owns_service
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        trace = timeline()
        watcher = asyncio.ensure_future(watch_loop_lag(trace)) if trace is not None else None
        yield
        if watcher is not None:
            watcher.cancel()
        if state.owns_service:
            service.shutdown()

    app = FastAPI(
        title="glmv",
        summary="OpenAI-compatible API for the GLM vision-language models",
        version=getattr(glmv, "__version__", "0"),
        lifespan=lifespan,
    )
    app.router.route_class = JsonRoute  # large JSON bodies parsed with msgspec (json_body.py)
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

    # Document extraction and moderation: their own tasks, generated through the same service.
    install_extract_routes(app, state, _ERRORS)
    install_moderation_routes(app, state, _ERRORS)

    def model_card(name: str) -> ModelCard:
        info = service.info
        return ModelCard(
            id=name,
            created=state.created,
            root=Path(model_dir).name or name,  # the folder's name: the server's paths stay private
            max_model_len=info.max_model_len,
            glmv={
                "random_weights": service.random_weights,
                "demo_model": service.demo_note is not None,
                "note": "random weights: answers are random text" if service.random_weights else service.demo_note,
                "model_type": info.model_type or None,
                "supports_thinking_toggle": service.supports_thinking_toggle,
                "max_images_per_request": service.images.limits.max_images,
                "max_history_images": state.settings.max_history_images,
                "supports_tools": service.supports_tools,
                "remote_images": service.images.remote.enabled,
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
        if not service.running:
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
                    "random_weights": service.random_weights,
                    "demo_model": service.demo_note is not None,
                }
            )

    # Outermost last: counting → guard → body read and text screen → HEAD → 500s → routes.
    # A streamed response's body messages go from the route straight to the counting layer's
    # `send` (glmv.server.body_send): a layer here that needs them must register a tap.
    app.add_middleware(_ServerMiddleware)
    app.add_middleware(_HeadAsGet)
    app.add_middleware(BodyReadMiddleware, body_timeout=settings.body_timeout)
    install = getattr(_guard_module, "install_guards", None)
    if install is not None and settings.guard is not None:
        install(app, settings.guard)
    app.add_middleware(_CountingMiddleware, metrics=metrics, routes=app.router.routes)
    return app


__all__ = ["ServerState", "create_app"]
