"""The web page in a real browser against a live `glmv serve` on the tiny random-weight checkpoint.

One server runs open (with a low `--max-image-pixels` so that a rejected image is easy to make),
another with `--api-key`. The answers are random text; the tests check that the page streams
them, sends images picked and pasted, shows the server's rejection of an image, stops a
generation (the server counts it as aborted), keeps the conversation over a reload and asks for
the API key.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import GlmvServeProcess

if importlib.util.find_spec("glmv.server.settings") is None or importlib.util.find_spec("glmv.server.app") is None:
    pytest.skip("`glmv serve` is not available yet (glmv.server.settings / glmv.server.app missing)", allow_module_level=True)

expect = pytest.importorskip("playwright.sync_api", reason="the web page tests need the playwright package").expect

# The open server refuses images over this many pixels; the page only downscales above
# 1920x1920, so a 64x64 image reaches the server and is rejected there, and 24x24 ones pass.
MAX_IMAGE_PIXELS = 1000
API_KEY = "web-test-key"


def png_bytes(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def servers(chromium_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, GlmvServeProcess]]:
    from glmv.models.tiny import create_tiny_model

    root = tmp_path_factory.mktemp("web-live")
    model_dir = create_tiny_model(root / "tiny-glm41v", variant="glm41v", seed=0)
    # Both start at once; each loads the tiny model in a few seconds.
    started = {
        "open": GlmvServeProcess(model_dir, root / "open.log", "--max-image-pixels", str(MAX_IMAGE_PIXELS)),
        "keyed": GlmvServeProcess(model_dir, root / "keyed.log", "--api-key", API_KEY),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def open_page(new_page: Any, url: str) -> tuple[Any, Any]:
    page, errors = new_page()
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']")
    return page, errors


def set_max_tokens(page: Any, n: int) -> None:
    page.click("#open-settings")
    page.fill("#setting-max-tokens", str(n))
    page.click("#settings-form button[type='submit']")


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.click("#send-btn")


def last_assistant(page: Any) -> Any:
    return page.locator(".message.assistant").last


def wait_state(page: Any, state: str, timeout: float = 60_000) -> None:
    page.wait_for_selector(f".message.assistant:last-child[data-state='{state}']", timeout=timeout)


def answer_text(page: Any) -> str:
    node = last_assistant(page)
    thinking = node.locator(".thinking-body")
    return node.locator(".answer").inner_text() + (thinking.inner_text() if thinking.count() else "")


def chat_bodies(page: Any) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []

    def on_request(request: Any) -> None:
        if request.url.endswith("/v1/chat/completions") and request.method == "POST":
            bodies.append(json.loads(request.post_data or "{}"))

    page.on("request", on_request)
    return bodies


def aborted_count(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    m = re.search(r'^glmv_requests_finished_total\{[^}]*outcome="aborted"[^}]*\} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def no_script_errors(errors: Any) -> None:
    assert errors.page_errors == []
    assert [e for e in errors.console_errors if "Failed to load resource" not in e] == []


def test_text_message_streams_an_answer_and_survives_reload(servers: dict[str, GlmvServeProcess], new_page: Any,
                                                           artifacts_dir: Path) -> None:
    url = servers["open"].url
    page, errors = open_page(new_page, url)
    notice = page.locator(".notice[data-notice='random']")
    assert "random weights" in notice.inner_text()
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    assert page.locator("#model-label").inner_text() == model
    set_max_tokens(page, 24)
    bodies = chat_bodies(page)
    send(page, "Hello, what can you see?")
    wait_state(page, "done")
    assert answer_text(page).strip() != ""
    stats = last_assistant(page).locator(".stats").inner_text()
    tokens = int(re.search(r"(\d+) tokens$", stats).group(1))
    assert stats.startswith("first token ") and 1 <= tokens <= 24
    assert bodies[-1]["max_tokens"] == 24 and bodies[-1]["stream"] is True
    page.screenshot(path=str(artifacts_dir / "live-answer.png"))

    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".conversation-open").all_inner_texts() == ["Hello, what can you see?"]
    assert page.locator(".message.user .message-text").all_inner_texts() == ["Hello, what can you see?"]
    assert last_assistant(page).get_attribute("data-state") == "done"
    assert answer_text(page).strip() != ""
    no_script_errors(errors)


def test_images_from_the_picker_and_a_paste_are_sent(servers: dict[str, GlmvServeProcess], new_page: Any) -> None:
    page, errors = open_page(new_page, servers["open"].url)
    set_max_tokens(page, 8)
    page.set_input_files("#file-input", files=[{"name": "red.png", "mimeType": "image/png", "buffer": png_bytes(24, 24, (220, 30, 30))}])
    pasted = base64.b64encode(png_bytes(24, 20, (30, 30, 220))).decode()
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'pasted.png', {type: 'image/png'}));
            document.getElementById('input').dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
        }""",
        pasted,
    )
    page.wait_for_function("() => document.querySelectorAll('#attachments .attachment:not(.loading) img').length === 2")
    bodies = chat_bodies(page)
    send(page, "Describe both pictures.")
    wait_state(page, "done")
    assert last_assistant(page).locator(".message-error").count() == 0
    parts = bodies[-1]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    sizes = [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))).size for p in parts[:2]]
    assert sizes == [(24, 24), (24, 20)]
    assert page.locator(".message.user img.message-image").count() == 2
    no_script_errors(errors)


def test_a_rejected_image_shows_the_servers_error(servers: dict[str, GlmvServeProcess], new_page: Any,
                                                  artifacts_dir: Path) -> None:
    page, errors = open_page(new_page, servers["open"].url)
    page.set_input_files("#file-input", files=[{"name": "big.png", "mimeType": "image/png", "buffer": png_bytes(64, 64, (10, 160, 60))}])
    page.wait_for_selector("#attachments .attachment:not(.loading) img")
    send(page, "What is in this image?")
    wait_state(page, "error")
    error = last_assistant(page).locator(".message-error").inner_text()
    assert error.startswith("Error 400: ")
    assert "64x64" in error and str(MAX_IMAGE_PIXELS) in error
    page.screenshot(path=str(artifacts_dir / "live-error.png"))
    no_script_errors(errors)


def test_stop_aborts_the_generation_on_the_server(servers: dict[str, GlmvServeProcess], new_page: Any) -> None:
    url = servers["open"].url
    page, errors = open_page(new_page, url)
    set_max_tokens(page, 3000)
    before = aborted_count(url)

    # Keep the random model from ending early: the first request also asks to ignore EOS.
    def long_answer(route: Any) -> None:
        body = json.loads(route.request.post_data or "{}")
        body["ignore_eos"] = True
        route.continue_(post_data=json.dumps(body))

    page.route("**/v1/chat/completions", long_answer)
    send(page, "Write a very long story.")
    page.wait_for_function(
        "() => (document.querySelector('.message.assistant:last-child .answer')?.textContent || '').length > 20"
        " || (document.querySelector('.message.assistant:last-child .thinking-body')?.textContent || '').length > 20"
    )
    assert last_assistant(page).get_attribute("data-state") == "streaming"
    page.click("#stop-btn")
    wait_state(page, "stopped", timeout=10_000)
    page.unroute("**/v1/chat/completions")
    assert last_assistant(page).locator(".badge").inner_text() == "Stopped"
    deadline = time.monotonic() + 15
    while aborted_count(url) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert aborted_count(url) == before + 1
    # The server is free for the next message.
    set_max_tokens(page, 6)
    send(page, "Now a short one.")
    wait_state(page, "done")
    assert last_assistant(page).locator(".message-error").count() == 0
    no_script_errors(errors)


def test_the_page_asks_for_the_api_key_and_then_works(servers: dict[str, GlmvServeProcess], new_page: Any) -> None:
    url = servers["keyed"].url
    assert httpx.get(url + "/v1/models").status_code == 401
    page, errors = new_page()
    page.goto(url + "/")
    page.locator("#key-dialog").wait_for(state="visible")
    page.fill("#key-input", API_KEY)
    page.click("#key-submit")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#key-dialog").is_hidden()
    assert page.locator(".notice[data-notice='server']").count() == 0
    set_max_tokens(page, 8)
    send(page, "Hello with a key")
    wait_state(page, "done")
    assert last_assistant(page).locator(".message-error").count() == 0
    assert page.evaluate("() => sessionStorage.getItem('glmv.apiKey')") == API_KEY
    no_script_errors(errors)
