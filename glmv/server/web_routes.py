"""The built-in web chat page: serves `/` and `/static/...` from the `glmv/server/web` folder.

`install_web(app)` adds two routes to the FastAPI app. The page is plain HTML, CSS and
JavaScript shipped inside the package (no CDN, so it works offline) and talks only to the
OpenAI-compatible API of the same origin, using relative URLs so it also works behind a proxy
that mounts glmv under a sub-path.

The page response carries a strict Content-Security-Policy (scripts and styles only from this
origin, no inline script, images only from this origin, `data:` and `blob:`), so even a bug in the
page's Markdown renderer could not run script that a model wrote. `index.html` names its assets
with a content hash (`?v=...`) so browsers never mix an old script with a new page after an upgrade.
The API reference at `/docs` is installed with the page (`glmv.server.docs_assets.install_docs`):
FastAPI's own one loads Swagger UI from a CDN.
"""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from glmv.errors import NotFoundError
from glmv.server.docs_assets import install_docs

WEB_DIR = Path(__file__).resolve().parent / "web"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

_ASSET_VERSION_TOKEN = "__ASSET_VERSION__"

# Content types of the files the folder holds; anything else is not served.
_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}


def _asset_version(web_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(web_dir.rglob("*")):
        if path.is_file() and path.suffix in _TYPES:
            digest.update(path.relative_to(web_dir).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _static_file(web_dir: Path, relative: str) -> Path | None:
    """The file `relative` names inside `web_dir`, or None (missing, hidden, outside, or not served)."""
    if not relative or "\\" in relative or "\x00" in relative:
        return None
    parts = relative.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    path = (web_dir / relative).resolve()
    try:
        path.relative_to(web_dir)
    except ValueError:
        return None
    if not path.is_file() or path.suffix not in _TYPES or path.name == "index.html":
        return None
    return path


def install_web(app: FastAPI, web_dir: Path | None = None) -> None:
    """Serve the chat page at `/` (and `/index.html`), its assets at `/static/<file>` and the
    offline API reference at `/docs`."""
    root = (web_dir or WEB_DIR).resolve()
    version = _asset_version(root)
    page = (root / "index.html").read_text(encoding="utf-8").replace(_ASSET_VERSION_TOKEN, version)

    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    async def static(path: str) -> Response:
        file = _static_file(root, path)
        if file is None:
            return JSONResponse(NotFoundError(f"No such file: /static/{path}").to_dict(), status_code=404)
        media_type = _TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        return Response(
            file.read_bytes(),
            media_type=media_type,
            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
        )

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route("/index.html", index, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route("/static/{path:path}", static, methods=["GET"], include_in_schema=False)
    install_docs(app)


__all__ = ["CONTENT_SECURITY_POLICY", "WEB_DIR", "install_web"]
