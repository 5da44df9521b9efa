"""glmv's HTTP server: an OpenAI-compatible API (`/v1/chat/completions`, `/v1/models`, extraction,
moderation), health, readiness and Prometheus endpoints, the guardrails and the web chat page.

The routes are thin adapters: protocol validation, then the generation service of `glmv.tasks`,
then JSON or SSE. Start it with `glmv serve` (the command line; settings in
`glmv.server.settings`), or build the ASGI app yourself with
`glmv.server.app.create_app(settings)` (optionally over a started `EngineClient`).
"""
