"""The API reference page at `/docs`, served from the package (works offline).

FastAPI's own `/docs` page loads Swagger UI from a CDN and starts it with an inline script, so it
is blank on a machine without internet access and cannot run under a strict Content-Security-
Policy. `install_docs(app)` replaces it: the page (`web/docs/index.html`), glmv's start-up script
and the vendored Swagger UI bundle (`web/docs/`, see its README) are served by the app itself,
under a CSP that allows scripts, styles and connections only to this origin. The OpenAPI document
stays at `/openapi.json`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from glmv.errors import NotFoundError

DOCS_DIR = Path(__file__).resolve().parent / "web" / "docs"

# As the chat page's policy, plus `data:` images (Swagger UI's icons are data-URL SVGs in its CSS).
DOCS_CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

_PAGE_HEADERS = {
    "Content-Security-Policy": DOCS_CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

# The only files served under /docs/assets/ (nothing else in the folder is reachable).
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "init.js": "text/javascript; charset=utf-8",
    "LICENSE.txt": "text/plain; charset=utf-8",
    "NOTICE.txt": "text/plain; charset=utf-8",
    "swagger-ui-bundle.js.LICENSE.txt": "text/plain; charset=utf-8",
}

_VERSION_TOKEN = "__ASSET_VERSION__"


def _is_fastapi_docs_route(route: BaseRoute) -> bool:
    """FastAPI's CDN-backed `/docs` page and its OAuth2 redirect helper (glmv has no OAuth2)."""
    return isinstance(route, Route) and route.path in ("/docs", "/docs/oauth2-redirect")


def install_docs(app: FastAPI, docs_dir: Path | None = None) -> None:
    """Serve the offline Swagger UI at `/docs` (replacing FastAPI's page) and its files at `/docs/assets/`."""
    root = (docs_dir or DOCS_DIR).resolve()
    digest = hashlib.sha256()
    for name in sorted(_ASSETS):
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    page = (root / "index.html").read_text(encoding="utf-8").replace(_VERSION_TOKEN, digest.hexdigest()[:12])
    app.router.routes[:] = [r for r in app.router.routes if not _is_fastapi_docs_route(r)]

    async def docs_page() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    async def docs_asset(name: str) -> Response:
        media_type = _ASSETS.get(name)
        if media_type is None:
            return JSONResponse(
                NotFoundError(f"No such file: /docs/assets/{name}").to_dict(), status_code=404
            )
        return Response(
            (root / name).read_bytes(),
            media_type=media_type,
            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
        )

    app.add_api_route(
        "/docs", docs_page, methods=["GET"], include_in_schema=False, response_class=HTMLResponse
    )
    app.add_api_route("/docs/assets/{name}", docs_asset, methods=["GET"], include_in_schema=False)


__all__ = ["DOCS_CONTENT_SECURITY_POLICY", "DOCS_DIR", "install_docs"]
