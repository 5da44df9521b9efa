"""glmv's HTTP server: an OpenAI-compatible API (`/v1/chat/completions`, `/v1/models`), health,
readiness and Prometheus endpoints, the guardrails and the web chat page.

Start it with `glmv serve` (see `glmv.server.settings`), or build the ASGI app yourself with
`glmv.server.app.create_app(settings, async_engine)`.
"""
