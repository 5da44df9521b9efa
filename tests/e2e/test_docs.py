"""`/docs` renders glmv's API reference offline, in Debian's Chromium, under the page's CSP.

Every request the page makes that does not go to the server is refused (and recorded): the page
must load Swagger UI from the server itself, list every operation of `/openapi.json` and report
no errors (a CSP violation is a console error).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from glmv.server.docs_assets import DOCS_CONTENT_SECURITY_POLICY
from tests.e2e.conftest import GlmvServeProcess


def test_docs_page_headers_and_assets(live_glmv: GlmvServeProcess) -> None:
    r = httpx.get(live_glmv.url + "/docs", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == DOCS_CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "cdn" not in r.text.lower() and "<script>" not in r.text  # no CDN, no inline script
    asset = httpx.get(live_glmv.url + "/docs/assets/swagger-ui-bundle.js", timeout=30)
    assert asset.status_code == 200 and asset.headers["content-type"].startswith("text/javascript")
    missing = httpx.get(live_glmv.url + "/docs/assets/../../app.py", timeout=30)
    assert missing.status_code == 404
    assert httpx.get(live_glmv.url + "/docs/assets/index.html", timeout=30).status_code == 404
    assert httpx.get(live_glmv.url + "/docs/oauth2-redirect", timeout=30).status_code == 404


def test_docs_render_every_operation_offline(live_glmv: GlmvServeProcess, new_page: Any) -> None:
    spec = httpx.get(live_glmv.url + "/openapi.json", timeout=30).json()
    operations = [(m.upper(), p) for p, item in spec["paths"].items() for m in item]
    page, errors = new_page()
    outside: list[str] = []
    server_host = urlsplit(live_glmv.url).netloc

    def only_the_server(route: Any) -> None:
        if urlsplit(route.request.url).netloc == server_host:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.context.route("**/*", only_the_server)
    # Generous: on a loaded CI box, parsing the 1.7 MB Swagger UI bundle alone can take many seconds.
    page.set_default_timeout(180_000)
    page.set_default_navigation_timeout(180_000)
    page.goto(live_glmv.url + "/docs", wait_until="domcontentloaded")
    page.wait_for_selector(".opblock")
    page.wait_for_function(f"document.querySelectorAll('.opblock').length >= {len(operations)}")
    shown = page.eval_on_selector_all(
        ".opblock",
        "els => els.map(e => [e.querySelector('.opblock-summary-method').textContent.trim(),"
        " e.querySelector('.opblock-summary-path').getAttribute('data-path')])",
    )
    assert sorted(map(tuple, shown)) == sorted(operations)
    assert page.locator(".info .title").inner_text().startswith("glmv")
    # Expanding an operation shows its request schema (the page is live, not only painted).
    page.locator(".opblock-summary-path[data-path='/v1/chat/completions']").click()
    page.wait_for_selector(".opblock.is-open .opblock-section-request-body")
    assert outside == []
    assert errors.page_errors == [] and errors.console_errors == []
