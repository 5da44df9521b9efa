"""The web page in a real browser against a scripted fake of the OpenAI API.

A small FastAPI app serves the real page (`install_web`) next to fake `/v1/models` and
`/v1/chat/completions` routes whose SSE answers are scripted by keywords in the last user
message, so each test can hold a stream open, inject hostile Markdown, reject an image or demand
an API key. The fake records every request body the page sent.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from glmv.server.web_routes import CONTENT_SECURITY_POLICY, install_web
from tests.e2e.conftest import ThreadedUvicorn

expect = pytest.importorskip("playwright.sync_api", reason="the web page tests need the playwright package").expect

MODEL = "glm-test-model"
HOSTILE = (
    "Here is <script>window.__pwned = 'script'</script> and "
    "<img src=x onerror=\"window.__pwned = 'img'\"> and [click](javascript:window.__pwned='link').\n\n"
    "| Name | Qty | Price |\n|:-----|:---:|------:|\n| apple | 3 | 1.50 |\n| **pear** | 10 | 0.25 |\n\n"
    "```python\nprint('<b>not bold</b>')\n```\n\n"
    "- one\n- two with `code`\n\nSee https://example.com/docs."
)


@dataclass
class FakeApi:
    """Shared state of the fake API: what the page sent, and knobs the tests turn."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    api_key: str | None = None
    release: threading.Event = field(default_factory=threading.Event)
    disconnects: int = 0
    random_weights: bool = True
    card_extra: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.api_key = None
            self.release.clear()
            self.disconnects = 0
            self.random_weights = True
            self.card_extra = {}

    def chat_requests(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if "messages" in r]


def _error(status: int, message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _chunk(content: str | None = None, reasoning: str | None = None, finish: str | None = None) -> str:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    obj = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(obj)}\n\n"


def _usage(completion: int, prompt: int = 12) -> str:
    obj = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }
    return f"data: {json.dumps(obj)}\n\n"


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return " ".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ""


def _images(body: dict[str, Any]) -> list[str]:
    urls: list[str] = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            urls += [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
    return urls


def build_fake_app(api: FakeApi) -> FastAPI:
    app = FastAPI()
    install_web(app)

    def authorised(request: Request) -> bool:
        return api.api_key is None or request.headers.get("authorization") == f"Bearer {api.api_key}"

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        if not authorised(request):
            return _error(401, "Invalid API key.", "authentication_error", code="invalid_api_key")
        glmv = {"random_weights": True} if api.random_weights else {}
        glmv.update(api.card_extra)
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "glmv", "glmv": glmv}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        if not authorised(request):
            return _error(401, "Invalid API key.", "authentication_error", code="invalid_api_key")
        body = await request.json()
        with api.lock:
            api.requests.append(body)
        text = _last_user_text(body)
        images = _images(body)
        if "reject" in text and images:
            return _error(400, "image is too large: 5000x5000 is 25000000 pixels, the limit is 1000000 pixels per image",
                          "invalid_request_error", param="messages[0].content[0].image_url", code="invalid_image")
        return StreamingResponse(_script(text, images, request), media_type="text/event-stream")

    async def _script(text: str, images: list[str], request: Request) -> AsyncIterator[str]:
        try:
            if "think" in text:
                for piece in ["Let me look ", "at the picture ", "carefully."]:
                    yield _chunk(reasoning=piece)
                    await asyncio.sleep(0.05)
                deadline = time.monotonic() + 20
                while not api.release.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                for piece in ["The answer ", "is **42**."]:
                    yield _chunk(content=piece)
                    await asyncio.sleep(0.02)
                yield _chunk(finish="stop")
                yield _usage(7)
            elif "hostile" in text:
                for k in range(0, len(HOSTILE), 40):
                    yield _chunk(content=HOSTILE[k:k + 40])
                    await asyncio.sleep(0.005)
                yield _usage(60)
            elif "forever" in text:
                n = 0
                while n < 2000:
                    yield _chunk(content=f"word{n} ")
                    n += 1
                    await asyncio.sleep(0.02)
            elif "midstream" in text:
                yield _chunk(content="Partial ")
                yield f"data: {json.dumps({'error': {'message': 'engine failed: out of KV cache', 'type': 'internal_error', 'param': None, 'code': None}})}\n\n"
                return
            else:
                answer = f"You said: {text}" + (f" (with {len(images)} image(s))" if images else "")
                for word in answer.split(" "):
                    yield _chunk(content=word + " ")
                    await asyncio.sleep(0.005)
                yield _chunk(finish="stop")
                yield _usage(len(answer.split(" ")))
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            with api.lock:
                api.disconnects += 1
            raise

    return app


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FakeApi]]:
    api = FakeApi()
    server = ThreadedUvicorn(build_fake_app(api)).start()
    try:
        yield server.url, api
    finally:
        api.release.set()
        server.stop()


@pytest.fixture
def site(fake: tuple[str, FakeApi]) -> Iterator[tuple[str, FakeApi]]:
    url, api = fake
    api.reset()
    yield url, api
    api.release.set()


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 60, 40)) -> bytes:
    image = Image.new("RGB", (width, height), color)
    for x in range(0, width, max(1, width // 8)):
        for y in range(height):
            image.putpixel((x, y), (255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def open_page(new_page: Any, url: str, **kwargs: Any) -> tuple[Any, Any]:
    page, errors = new_page(**kwargs)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='1']")
    return page, errors


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.click("#send-btn")


def last_assistant(page: Any) -> Any:
    return page.locator(".message.assistant").last


def wait_state(page: Any, state: str, timeout: float = 15_000) -> None:
    page.wait_for_selector(f".message.assistant:last-child[data-state='{state}']", timeout=timeout)


def no_script_errors(errors: Any) -> None:
    assert errors.page_errors == []
    # A refused request (401, 400) is reported by Chromium as a failed resource load; anything
    # else on the console is a bug in the page.
    assert [e for e in errors.console_errors if "Failed to load resource" not in e] == []


def decode_data_url(url: str) -> Image.Image:
    header, payload = url.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


# --- tests ---------------------------------------------------------------------------------------


def test_empty_page_headers_and_random_weights_notice(site: tuple[str, FakeApi], new_page: Any, artifacts_dir: Path) -> None:
    url, _ = site
    page, errors = new_page()
    response = page.goto(url + "/")
    assert response is not None and response.status == 200
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#empty-state").is_visible()
    assert page.locator("#empty-state h2").inner_text() == "What can I help with?"
    notice = page.locator(".notice[data-notice='random']")
    assert notice.is_visible()
    assert MODEL in notice.inner_text() and "random weights" in notice.inner_text()
    assert page.locator("#model-label").inner_text() == MODEL
    # The mode switch stays hidden while chat is the only mode.
    assert page.locator("#mode-select").is_hidden()
    page.screenshot(path=str(artifacts_dir / "empty.png"))
    no_script_errors(errors)


def test_thinking_streams_into_its_own_block(site: tuple[str, FakeApi], new_page: Any, artifacts_dir: Path) -> None:
    url, api = site
    page, errors = open_page(new_page, url)
    send(page, "think about this")
    # The stream is held open by the fake after the reasoning chunks: the thinking text must be
    # on screen, in its open block, while the answer is still streaming.
    body = page.locator(".message.assistant .thinking .thinking-body")
    page.wait_for_function(
        "() => (document.querySelector('.message.assistant .thinking-body')?.textContent || '').includes('carefully.')"
    )
    assert body.inner_text() == "Let me look at the picture carefully."
    assert last_assistant(page).get_attribute("data-state") == "streaming"
    assert page.locator(".message.assistant .thinking").evaluate("d => d.open") is True
    assert page.locator(".message.assistant .thinking-label").inner_text() == "Thinking…"
    assert page.locator("#stop-btn").is_visible() and page.locator("#send-btn").is_hidden()
    page.screenshot(path=str(artifacts_dir / "streaming.png"))

    api.release.set()
    wait_state(page, "done")
    answer = last_assistant(page).locator(".answer")
    assert answer.inner_text() == "The answer is 42."
    assert answer.locator("strong").inner_text() == "42"
    assert "Let me look" not in answer.inner_text()
    # Folded once the answer came; the label says how long it thought.
    thinking = page.locator(".message.assistant .thinking")
    assert thinking.evaluate("d => d.open") is False
    assert page.locator(".message.assistant .thinking-label").inner_text().startswith("Thought for ")
    stats = last_assistant(page).locator(".stats").inner_text()
    assert "first token" in stats and "7 tokens" in stats and "tokens/s" in stats

    sent = api.chat_requests()[-1]
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == MODEL
    assert sent["messages"] == [{"role": "user", "content": "think about this"}]
    assert "thinking" not in sent

    page.locator(".message.assistant .thinking > summary").click()
    page.screenshot(path=str(artifacts_dir / "answer-with-thinking.png"))
    no_script_errors(errors)


def test_model_output_cannot_inject_html(site: tuple[str, FakeApi], new_page: Any) -> None:
    url, _ = site
    page, errors = open_page(new_page, url)
    send(page, "hostile markdown please")
    wait_state(page, "done")
    answer = last_assistant(page).locator(".answer")
    text = answer.inner_text()
    assert "<script>window.__pwned = 'script'</script>" in text
    assert "<img src=x onerror=\"window.__pwned = 'img'\">" in text
    assert page.evaluate("() => window.__pwned") is None
    assert answer.locator("script").count() == 0
    assert answer.locator("img").count() == 0
    # The javascript: link is shown as its text, never as a link.
    assert answer.locator("a").evaluate_all("els => els.map(a => a.href)") == ["https://example.com/docs"]
    assert "click" in text
    # Table with alignment, code block, list.
    assert answer.locator("table th").all_inner_texts() == ["Name", "Qty", "Price"]
    assert answer.locator("table tbody tr").count() == 2
    assert answer.locator("table tbody tr").nth(1).locator("td").all_inner_texts() == ["pear", "10", "0.25"]
    assert answer.locator("table tbody tr td strong").inner_text() == "pear"
    assert answer.locator("table tbody tr").first.locator("td").nth(1).evaluate("td => td.style.textAlign") == "center"
    assert answer.locator("table tbody tr").first.locator("td").nth(2).evaluate("td => td.style.textAlign") == "right"
    assert answer.locator("pre code").inner_text() == "print('<b>not bold</b>')"
    assert answer.locator("pre code").get_attribute("class") == "language-python"
    assert answer.locator("pre b").count() == 0
    assert answer.locator("ul > li").all_inner_texts() == ["one", "two with code"]
    no_script_errors(errors)


def test_rejected_image_shows_the_servers_message(site: tuple[str, FakeApi], new_page: Any, artifacts_dir: Path) -> None:
    url, api = site
    page, errors = open_page(new_page, url)
    page.set_input_files("#file-input", files=[{"name": "big.png", "mimeType": "image/png", "buffer": png_bytes(64, 48)}])
    page.wait_for_selector("#attachments .attachment:not(.loading) img")
    send(page, "reject this picture")
    wait_state(page, "error")
    error = last_assistant(page).locator(".message-error")
    assert error.inner_text() == (
        "Error 400: image is too large: 5000x5000 is 25000000 pixels, the limit is 1000000 pixels per image"
    )
    # The user's message (with its image) stays, and the failed turn is not sent as history.
    assert page.locator(".message.user img.message-image").count() == 1
    assert len(_images(api.chat_requests()[-1])) == 1
    page.screenshot(path=str(artifacts_dir / "error.png"))
    no_script_errors(errors)


def test_images_by_picker_paste_and_drop_are_downscaled_and_sent(site: tuple[str, FakeApi], new_page: Any) -> None:
    url, api = site
    page, errors = open_page(new_page, url)
    # 1. file picker: a 3000x2000 image is over the 1920x1920 area limit and is downscaled.
    page.set_input_files("#file-input", files=[{"name": "wide.png", "mimeType": "image/png", "buffer": png_bytes(3000, 2000)}])
    page.wait_for_selector("#attachments .attachment:not(.loading) img")
    # 2. a synthetic paste event carrying an image file.
    small = base64.b64encode(png_bytes(40, 30, (20, 120, 220))).decode()
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'pasted.png', {type: 'image/png'}));
            document.getElementById('input').dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
        }""",
        small,
    )
    # 3. a drop event with an image file.
    page.evaluate(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
            const target = document.getElementById('messages');
            target.dispatchEvent(new DragEvent('dragenter', {dataTransfer: dt, bubbles: true, cancelable: true}));
            target.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        small,
    )
    page.wait_for_function("() => document.querySelectorAll('#attachments .attachment:not(.loading) img').length === 3")
    assert page.locator("#drop-overlay").is_hidden()
    assert "downscaled from 3000×2000" in (page.locator("#attachments .attachment").first.get_attribute("title") or "")
    # A non-image file is refused with a message.
    page.set_input_files("#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
    page.wait_for_selector("#toast:not([hidden])")
    assert page.locator("#toast").inner_text() == "notes.txt is not an image"
    # Remove the dropped one again.
    page.locator("#attachments .attachment").nth(2).locator(".attachment-remove").click()
    assert page.locator("#attachments .attachment").count() == 2

    send(page, "describe these")
    wait_state(page, "done")
    assert page.locator("#attachments").is_hidden()
    assert last_assistant(page).locator(".answer").inner_text() == "You said: describe these (with 2 image(s))"
    sent = api.chat_requests()[-1]
    content = sent["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "image_url", "text"]
    assert content[2]["text"] == "describe these"
    wide = decode_data_url(content[0]["image_url"]["url"])
    assert wide.width * wide.height <= 1920 * 1920
    assert abs(wide.width / wide.height - 1.5) < 0.01
    assert wide.width >= 2340  # downscaled to the limit, not further
    pasted = decode_data_url(content[1]["image_url"]["url"])
    assert pasted.size == (40, 30) and pasted.format == "PNG"  # small images are sent as they are
    assert page.locator(".message.user img.message-image").count() == 2
    no_script_errors(errors)


def test_api_key_is_asked_for_kept_in_session_storage_and_used(site: tuple[str, FakeApi], new_page: Any) -> None:
    url, api = site
    api.api_key = "sekret-key"
    page, errors = new_page()
    page.goto(url + "/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible")
    assert "This server needs an API key." in page.locator("#key-message").inner_text()
    page.fill("#key-input", "wrong-key")
    page.click("#key-submit")
    page.wait_for_function("() => document.getElementById('key-message').textContent.includes('not accepted')")
    assert dialog.is_visible()
    page.fill("#key-input", "sekret-key")
    page.click("#key-submit")
    page.wait_for_selector("body[data-ready='1']")
    assert dialog.is_hidden()
    assert page.locator("#model-label").inner_text() == MODEL
    assert page.evaluate("() => sessionStorage.getItem('glmv.apiKey')") == "sekret-key"
    assert page.evaluate("() => localStorage.getItem('glmv.apiKey')") is None
    send(page, "hello with key")
    wait_state(page, "done")
    assert last_assistant(page).locator(".answer").inner_text() == "You said: hello with key"

    # A key that stops working mid-session is asked for again, and the request is retried.
    api.api_key = "rotated-key"
    send(page, "after rotation")
    dialog.wait_for(state="visible")
    assert "not accepted" in page.locator("#key-message").inner_text()
    page.fill("#key-input", "rotated-key")
    page.click("#key-submit")
    wait_state(page, "done")
    assert last_assistant(page).locator(".answer").inner_text() == "You said: after rotation"
    no_script_errors(errors)


def test_stop_aborts_the_request(site: tuple[str, FakeApi], new_page: Any) -> None:
    url, api = site
    page, errors = open_page(new_page, url)
    send(page, "talk forever")
    page.wait_for_function(
        "() => (document.querySelector('.message.assistant .answer')?.textContent || '').includes('word3')"
    )
    page.click("#stop-btn")
    wait_state(page, "stopped")
    assert page.locator("#send-btn").is_visible() and page.locator("#stop-btn").is_hidden()
    assert last_assistant(page).locator(".badge").inner_text() == "Stopped"
    partial = last_assistant(page).locator(".answer").inner_text()
    assert partial.startswith("word0 word1 word2 word3")
    # The server saw the client go away.
    deadline = time.monotonic() + 10
    while api.disconnects < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.disconnects == 1
    # Nothing more arrives after the stop, and the next message works.
    time.sleep(0.2)
    assert last_assistant(page).locator(".answer").inner_text() == partial
    send(page, "next one")
    wait_state(page, "done")
    assert last_assistant(page).locator(".answer").inner_text() == "You said: next one"
    # The stopped partial answer is part of the history sent next.
    assert [m["role"] for m in api.chat_requests()[-1]["messages"]] == ["user", "assistant", "user"]
    no_script_errors(errors)


def test_conversations_survive_reload_regenerate_new_chat_and_delete(site: tuple[str, FakeApi], new_page: Any) -> None:
    url, api = site
    page, errors = open_page(new_page, url)
    send(page, "first question")
    wait_state(page, "done")
    send(page, "second question")
    wait_state(page, "done")

    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".message.user .message-text").all_inner_texts() == ["first question", "second question"]
    assert page.locator(".message.assistant .answer").all_inner_texts() == [
        "You said: first question", "You said: second question"]
    assert page.locator(".conversation-open").all_inner_texts() == ["first question"]
    assert page.locator("#chat-title").inner_text() == "first question"

    # Regenerate the last answer: the request repeats the history without the old answer.
    before = len(api.chat_requests())
    last_assistant(page).locator("[data-action='regenerate']").click()
    wait_state(page, "done")
    assert len(api.chat_requests()) == before + 1
    assert [m["content"] for m in api.chat_requests()[-1]["messages"]] == [
        "first question", "You said: first question ", "second question"]
    assert page.locator(".message.assistant").count() == 2

    # A new chat, then switch back and forth through the list.
    page.click("#new-chat")
    assert page.locator("#empty-state").is_visible()
    send(page, "another topic")
    wait_state(page, "done")
    assert page.locator(".conversation-open").all_inner_texts() == ["another topic", "first question"]
    page.locator(".conversation-open", has_text="first question").click()
    assert page.locator(".message.user .message-text").all_inner_texts() == ["first question", "second question"]

    # Delete takes two clicks.
    item = page.locator(".conversation", has_text="another topic")
    item.locator(".conversation-delete").click()
    assert item.locator(".conversation-delete").inner_text() == "Delete?"
    item.locator(".conversation-delete").click()
    expect(page.locator(".conversation-open")).to_have_text(["first question"])
    # The page removes the item at once and the stored copy when IndexedDB commits.
    page.wait_for_selector("body[data-pending-writes='0']")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".conversation-open").all_inner_texts() == ["first question"]
    no_script_errors(errors)


def test_settings_and_thinking_switch_reach_the_request(site: tuple[str, FakeApi], new_page: Any) -> None:
    url, api = site
    page, errors = open_page(new_page, url)
    page.click("#open-settings")
    page.fill("#setting-system", "You are terse.")
    page.fill("#setting-temperature", "0.3")
    page.fill("#setting-top-p", "0.9")
    page.fill("#setting-max-tokens", "128")
    page.click("#settings-form button[type='submit']")
    page.locator(".switch").click()  # thinking off
    assert page.locator("#thinking-toggle").is_checked() is False
    send(page, "configured")
    wait_state(page, "done")
    sent = api.chat_requests()[-1]
    assert sent["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "configured"}]
    assert sent["temperature"] == 0.3 and sent["top_p"] == 0.9 and sent["max_tokens"] == 128
    assert sent["thinking"] == {"type": "disabled"}
    # Kept across reloads.
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#thinking-toggle").is_checked() is False
    page.click("#open-settings")
    assert page.input_value("#setting-temperature") == "0.3"
    assert page.input_value("#setting-system") == "You are terse."
    no_script_errors(errors)


def test_error_event_inside_the_stream_is_shown(site: tuple[str, FakeApi], new_page: Any) -> None:
    url, _ = site
    page, errors = open_page(new_page, url)
    send(page, "fail midstream")
    wait_state(page, "error")
    assert last_assistant(page).locator(".answer").inner_text() == "Partial"
    assert last_assistant(page).locator(".message-error").inner_text() == "Error: engine failed: out of KV cache"
    no_script_errors(errors)


def test_chinese_interface_follows_the_browser_and_switches(site: tuple[str, FakeApi], new_page: Any) -> None:
    url, api = site
    api.random_weights = False
    page, errors = open_page(new_page, url, locale="zh-CN")
    assert page.locator("#new-chat").inner_text() == "新对话"
    assert page.locator("#empty-state h2").inner_text() == "有什么可以帮你？"
    assert page.locator(".notice[data-notice='random']").count() == 0
    assert page.evaluate("() => document.documentElement.lang") == "zh-CN"
    send(page, "你好")
    wait_state(page, "done")
    assert "首字" in last_assistant(page).locator(".stats").inner_text()
    page.click("#lang-toggle")
    assert page.locator("#new-chat").inner_text() == "New chat"
    assert "first token" in last_assistant(page).locator(".stats").inner_text()
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#new-chat").inner_text() == "New chat"
    no_script_errors(errors)


def test_phone_width(site: tuple[str, FakeApi], new_page: Any, artifacts_dir: Path) -> None:
    url, _ = site
    page, errors = open_page(new_page, url, width=375, height=740, is_mobile=True, has_touch=True)
    sidebar = page.locator("#sidebar")
    assert sidebar.bounding_box()["x"] + sidebar.bounding_box()["width"] <= 0  # off-canvas
    assert page.locator("#menu-toggle").is_visible()
    send(page, "hostile markdown on a phone")
    wait_state(page, "done")
    # Nothing is wider than the screen; the table scrolls inside its own box.
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    for selector in ("#composer", ".message.assistant", "#send-btn", "#attach-btn"):
        box = page.locator(selector).first.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
    page.screenshot(path=str(artifacts_dir / "phone.png"))
    page.click("#menu-toggle")
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    assert page.locator(".conversation-open").all_inner_texts() == ["hostile markdown on a phone"]
    page.screenshot(path=str(artifacts_dir / "phone-menu.png"))
    page.click("#sidebar-backdrop", position={"x": 360, "y": 400})
    page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().right <= 0")
    no_script_errors(errors)


def test_model_card_limits_images_and_thinking_switch(site: tuple[str, FakeApi], new_page: Any) -> None:
    url, api = site
    api.card_extra = {"supports_thinking_toggle": False, "max_images_per_request": 2}
    page, errors = open_page(new_page, url)
    toggle = page.locator("#thinking-toggle")
    assert toggle.is_disabled() and toggle.is_checked()
    assert page.locator(".switch").get_attribute("title") == "This model always thinks before it answers."
    files = [{"name": f"p{k}.png", "mimeType": "image/png", "buffer": png_bytes(20, 20)} for k in range(3)]
    page.set_input_files("#file-input", files=files)
    page.wait_for_selector("#toast:not([hidden])")
    assert page.locator("#toast").inner_text() == "At most 2 images per message"
    page.wait_for_function("() => document.querySelectorAll('#attachments .attachment:not(.loading) img').length === 2")
    # The random-weights notice can be dismissed for this tab.
    page.locator(".notice[data-notice='random'] .notice-close").click()
    assert page.locator(".notice[data-notice='random']").count() == 0
    send(page, "two pictures")
    wait_state(page, "done")
    sent = api.chat_requests()[-1]
    assert "thinking" not in sent
    assert len(_images(sent)) == 2
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".notice[data-notice='random']").count() == 0
    no_script_errors(errors)


MARKDOWN_PIECES = [
    "<script>window.__pwned='s'</script>", "<img src=x onerror=window.__pwned='i'>", "<a href='javascript:alert(1)'>x</a>",
    "[a](javascript:window.__pwned='l')", "[b](JaVaScRiPt:alert(1))", "[c](data:text/html,<script>alert(1)</script>)",
    "[d]( javascript:alert(1) )", "[e](vbscript:x)", "![f](https://example.com/x.png)", "<https://ok.example/a>",
    "<javascript:alert(1)>", "https://example.com/path?q=1&r=2).", "**bold *nested* text**", "***x***", "_under_score_",
    "~~gone~~", "`<b>code</b>`", "```html\n<script>alert(1)</script>\n```", "```\nunclosed fence <i>", "| a | b |\n|---|:-:|\n| <u>1</u> | 2 |",
    "> quote <b>x</b>", "- item\n  - nested <em>x</em>\n- two", "1. one\n2. two", "# Title <span>", "---", "&lt;script&gt;",
    "\\*not em\\*", "line one\nline two", "<style>body{display:none}</style>", "<iframe src=//evil>", "[x](<javascript:alert(1)>)",
    "[y](https://example.com \"title\")", "\u0000", "<svg onload=alert(1)>", "*", "**", "[", "](", "`", "|", "\n\n",
]

ALLOWED_ATTRS = {"href", "title", "class", "rel", "target", "start", "style", "type", "data-copy"}


def test_markdown_renderer_only_builds_allowed_elements(site: tuple[str, FakeApi], new_page: Any) -> None:
    import random

    url, _ = site
    page, errors = open_page(new_page, url)
    rng = random.Random(1234)
    corpus = list(MARKDOWN_PIECES)
    corpus += ["".join(rng.choice(MARKDOWN_PIECES) + rng.choice(["", " ", "\n", "\n\n", "|", "*"]) for _ in range(rng.randint(2, 8)))
               for _ in range(300)]
    report = page.evaluate(
        """(inputs) => {
            const allowed = new Set([...GlmvMarkdown.ALLOWED_TAGS].map(t => t.toUpperCase()));
            const out = {tags: new Set(), attrs: new Set(), hrefs: [], failures: []};
            for (const text of inputs) {
                let frag;
                try { frag = GlmvMarkdown.render(text); } catch (e) { out.failures.push(text + ' -> ' + e); continue; }
                const box = document.createElement('div');
                box.appendChild(frag);
                document.body.appendChild(box);
                for (const el of box.querySelectorAll('*')) {
                    out.tags.add(el.tagName);
                    if (!allowed.has(el.tagName)) out.failures.push('tag ' + el.tagName + ' from ' + text);
                    for (const a of el.attributes) out.attrs.add(a.name);
                    if (el.tagName === 'A') out.hrefs.push(el.getAttribute('href'));
                }
                box.remove();
            }
            return {tags: [...out.tags].sort(), attrs: [...out.attrs].sort(), hrefs: out.hrefs, failures: out.failures};
        }""",
        corpus,
    )
    assert report["failures"] == []
    assert set(report["attrs"]) <= ALLOWED_ATTRS
    assert report["hrefs"] and all(h.startswith(("https://", "http://", "mailto:")) for h in report["hrefs"])
    assert {"SCRIPT", "IMG", "IFRAME", "STYLE", "SVG", "U", "B", "I"}.isdisjoint(report["tags"])
    assert {"TABLE", "PRE", "STRONG", "EM", "DEL", "BLOCKQUOTE", "UL", "OL", "H1", "HR", "A", "CODE"} <= set(report["tags"])
    assert page.evaluate("() => window.__pwned") is None

    # A few exact renderings.
    def html(text: str) -> str:
        return page.evaluate("(t) => { const d = document.createElement('div'); d.appendChild(GlmvMarkdown.render(t)); return d.innerHTML; }", text)

    assert html("**bold *nested* text**") == "<p><strong>bold <em>nested</em> text</strong></p>"
    assert html("a <b>x</b> & y") == "<p>a &lt;b&gt;x&lt;/b&gt; &amp; y</p>"
    assert html("snake_case_name and 2 * 3 * 4") == "<p>snake_case_name and 2 * 3 * 4</p>"
    assert html("- a\n  - b\n- c") == "<ul><li>a<ul><li>b</li></ul></li><li>c</li></ul>"
    assert html("3. x\n4. y") == '<ol start="3"><li>x</li><li>y</li></ol>'
    assert html("# T\n\n> q\n\n~~d~~") == "<h1>T</h1><blockquote><p>q</p></blockquote><p><del>d</del></p>"
    assert html("see (https://example.com/a_(b)).") == (
        '<p>see (<a href="https://example.com/a_(b)" rel="noopener noreferrer nofollow" target="_blank">'
        "https://example.com/a_(b)</a>).</p>")
    assert html("[x](javascript:alert(1))") == "<p>x</p>"
    assert html("line one\nline two") == "<p>line one<br>line two</p>"
    assert html("```js\nlet a = '<i>';\n```") == (
        '<div class="code-block"><div class="code-bar"><span class="code-lang">js</span>'
        '<button class="code-copy" type="button" data-copy="code"></button></div>'
        "<pre><code class=\"language-js\">let a = '&lt;i&gt;';</code></pre></div>")
    no_script_errors(errors)
