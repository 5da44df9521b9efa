"""glmv behind a real Open WebUI, driven by Chromium: `make test-openwebui` (not part of `make test`).

What it does, end to end:

1. starts `glmv serve` on a tiny random-weight GLM-4.6V-template checkpoint (created in the work
   directory with a 32k context, so that Open WebUI's ~36 built-in tool definitions fit even
   with the tiny checkpoint's small vocabulary), unless `--glmv-url` points at a running glmv;
2. starts a recording proxy (`tests.openwebui.proxy`) in front of it, and Open WebUI from its own
   virtual environment (`--venv`), offline, connected to the proxy, in default settings (native
   function calling: its built-in tools go with every chat request);
3. drives Open WebUI with Playwright and Debian's Chromium:
   * a text message: the answer streams back (SSE content deltas, `[DONE]`) and shows in the page;
   * a new chat with an image message: the answer streams back;
   * a second turn about the image: glmv's `/metrics` show cached prompt tokens, and the image
     is not encoded again;
   * a third message, stopped with Open WebUI's Stop button while it streams: glmv counts an
     aborted request and its KV cache usage returns to zero;
   and waits for Open WebUI's background tasks (title, tags, follow-up suggestions);
4. prints one line per check and exits non-zero if any failed. `--capture DIR` writes every chat
   request Open WebUI sent as a JSON fixture (the replay test `tests/server/test_openwebui_replay.py`
   reads them from `tests/fixtures/openwebui/`).

    python -m tests.openwebui.run --venv ~/.cache/glmv/openwebui-venv [--capture tests/fixtures/openwebui]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
SERVED_NAME = "glmv-tiny46"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
TEXT_MESSAGE = "Hello! What does an invoice usually show?"
IMAGE_MESSAGE = "What is in this picture?"
IMAGE_FOLLOW_UP = "What colour is the square in the picture?"
STOP_MESSAGE = "Please write a very long story about this picture."


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy; raise `TimeoutError` naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (httpx.HTTPError, OSError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in its own process group, stopped (SIGTERM, then SIGKILL) on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def tiny_checkpoint(work: Path) -> Path:
    """A tiny GLM-4.6V-template checkpoint with a 32k context (the tool definitions need room)."""
    from glmv.models.tiny import create_tiny_model

    directory = create_tiny_model(work / "tiny46", variant="glm46v", seed=1)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    for section in (config, config.get("text_config", {})):
        if "max_position_embeddings" in section:
            section["max_position_embeddings"] = 32768
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return directory


# --- the recording proxy's log -----------------------------------------------------------------------


@dataclass
class Capture:
    path: Path

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]

    def chats(self) -> list[dict[str, Any]]:
        """Chat-completions requests in the order they arrived (records are written as they end)."""
        chats = [
            r
            for r in self.records()
            if r["method"] == "POST"
            and r["path"].endswith("/chat/completions")
            and isinstance(r["body"], dict)
        ]
        return sorted(chats, key=lambda r: r["time"])


def request_kind(body: dict[str, Any]) -> str:
    """chat, title, tags, follow_ups (Open WebUI's background tasks), or other."""
    text = json.dumps(body.get("messages", []), ensure_ascii=False)
    if "### Task:" in text:
        if "concise" in text and "title" in text:
            return "title"
        if "tags" in text:
            return "tags"
        if "follow-up" in text.lower() or "Predict" in text or "Suggest" in text:
            return "follow_ups"
        return "task"
    return "chat"


def last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages", [])):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def sse_events(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body (JSON decoded, `[DONE]` kept as the string)."""
    events: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def streamed_content(record: dict[str, Any]) -> str:
    parts = []
    for event in sse_events(record.get("response", "")):
        if isinstance(event, dict):
            for choice in event.get("choices", []):
                delta = choice.get("delta") or {}
                parts.append((delta.get("content") or "") + (delta.get("reasoning_content") or ""))
    return "".join(parts)


# --- glmv metrics --------------------------------------------------------------------------------------


def metrics(base_url: str) -> dict[str, float]:
    """glmv's Prometheus samples, keyed by name plus labels other than model_name."""
    out: dict[str, float] = {}
    text = httpx.get(base_url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not match:
            continue
        name, labels, value = match.groups()
        extra = ",".join(
            part for part in (labels or "{}")[1:-1].split(",") if part and not part.startswith("model_name=")
        )
        out[name + (f"{{{extra}}}" if extra else "")] = float(value)
    return out


# --- checks ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    results: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok, detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail else ""), flush=True)
        return ok

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.results) and bool(self.results)


def test_image(path: Path) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 160), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([20, 20, 120, 100], fill="red")
    draw.text((130, 60), "TOTAL 42", fill="black")
    image.save(path)
    return path


class Browser:
    """Open WebUI's chat page in Chromium."""

    def __init__(self, page: Any, url: str, shots: Path) -> None:
        self.page = page
        self.url = url
        self.shots = shots

    def open_new_chat(self) -> None:
        self.page.goto(self.url, timeout=120_000)
        self.page.wait_for_selector("#chat-input", timeout=120_000)
        # The release-notes dialog shows once per user.
        with contextlib.suppress(Exception):
            self.page.get_by_text("Okay, Let's Go!").click(timeout=5_000)

    def send(self, text: str, image: Path | None = None) -> None:
        if image is not None:
            self.page.set_input_files('input[type="file"][multiple]', str(image))
            self.page.wait_for_selector(
                '[aria-label="Show image preview"], img[src^="data:image"]', timeout=60_000
            )
        self.page.locator("#chat-input").click()
        self.page.keyboard.type(text)
        self.page.keyboard.press("Enter")

    def stop(self) -> None:
        self.page.locator('button[aria-label="Stop"]').first.click(timeout=60_000)

    def stop_visible(self) -> bool:
        return self.page.locator('button[aria-label="Stop"]').count() > 0

    def last_answer(self) -> str:
        answers = self.page.locator("#response-content-container")
        return answers.last.inner_text() if answers.count() else ""

    def shot(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.page.screenshot(path=str(self.shots / f"{name}.png"))


def wait_chat(capture: Capture, text: str, after: int, timeout: float) -> dict[str, Any]:
    """The recorded chat request (finished) whose last user message is `text`."""

    def find() -> dict[str, Any] | None:
        for record in capture.chats()[after:]:
            if request_kind(record["body"]) == "chat" and last_user_text(record["body"]).strip().endswith(
                text
            ):
                return record
        return None

    return wait_until(f"the chat request {text!r}", find, timeout)


def wait_idle(glmv: str, timeout: float) -> None:
    def idle() -> bool:
        m = metrics(glmv)
        return m.get("glmv_requests_running", 1) == 0 and m.get("glmv_requests_waiting", 1) == 0

    wait_until("glmv to be idle", idle, timeout)


def wait_tasks(capture: Capture, after: int, kinds: set[str], timeout: float) -> set[str]:
    """Wait (up to `timeout`) for Open WebUI's background tasks of these kinds; the kinds seen."""
    seen: set[str] = set()

    def done() -> bool:
        seen.clear()
        seen.update(request_kind(r["body"]) for r in capture.chats()[after:])
        return kinds <= seen

    with contextlib.suppress(TimeoutError):
        wait_until(f"Open WebUI's tasks {sorted(kinds)}", done, timeout)
    return seen & kinds


def check_stream(report: Report, name: str, record: dict[str, Any]) -> None:
    events = sse_events(record.get("response", ""))
    chunks = [e for e in events if isinstance(e, dict)]
    report.check(
        f"{name}: streamed answer",
        record.get("status") == 200
        and record["body"].get("stream") is True
        and bool(events)
        and events[-1] == "[DONE]"
        and not any("error" in e for e in chunks)
        and len(streamed_content(record)) > 0,
        f"status {record.get('status')}, {len(chunks)} chunks, {len(streamed_content(record))} characters",
    )


def drive(
    args: argparse.Namespace, glmv: str, owui: str, capture: Capture, work: Path, report: Report
) -> None:
    from playwright.sync_api import sync_playwright

    shots = work / "screenshots"
    shots.mkdir(exist_ok=True)
    image = test_image(work / "picture.png")
    timeout = args.timeout
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            ui = Browser(page, owui, shots)

            # 1. A text message.
            ui.open_new_chat()
            before = len(capture.chats())
            ui.send(TEXT_MESSAGE)
            record = wait_chat(capture, TEXT_MESSAGE, before, timeout)
            check_stream(report, "text message", record)
            report.check(
                "text message: native function calling sends Open WebUI's tools",
                len(record["body"].get("tools") or []) > 0,
                f"{len(record['body'].get('tools') or [])} tools, tool_choice={record['body'].get('tool_choice')!r}",
            )
            answer = wait_until("the answer on the page", ui.last_answer, timeout)
            report.check(
                "text message: answer shown on the page", bool(answer.strip()), f"{len(answer)} characters"
            )
            seen = wait_tasks(capture, before, {"title", "tags", "follow_ups"}, timeout)
            report.check(
                "text message: title, tags and follow-up tasks answered",
                seen == {"title", "tags", "follow_ups"},
                f"seen {sorted(seen)}",
            )
            ui.shot("1-text")
            wait_idle(glmv, timeout)

            # 2. A new chat with an image message.
            ui.open_new_chat()
            before = len(capture.chats())
            ui.send(IMAGE_MESSAGE, image=image)
            record = wait_chat(capture, IMAGE_MESSAGE, before, timeout)
            check_stream(report, "image message", record)
            has_image = any(
                isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
                for m in record["body"]["messages"]
            )
            report.check("image message: the image went to glmv as an image_url part", has_image)
            wait_tasks(capture, before, {"title", "tags", "follow_ups"}, timeout)
            ui.shot("2-image")
            wait_idle(glmv, timeout)

            # 3. A second turn about the image: its prefix (image included) comes from the cache.
            start = metrics(glmv)
            before = len(capture.chats())
            ui.send(IMAGE_FOLLOW_UP)
            record = wait_chat(capture, IMAGE_FOLLOW_UP, before, timeout)
            end = metrics(glmv)
            check_stream(report, "second turn about the image", record)
            cached = end.get("glmv_cached_prompt_tokens_total", 0) - start.get(
                "glmv_cached_prompt_tokens_total", 0
            )
            encoded = end.get("glmv_images_encoded_total", 0) - start.get("glmv_images_encoded_total", 0)
            hits = end.get("glmv_encoder_cache_hits_total", 0) - start.get("glmv_encoder_cache_hits_total", 0)
            # The image is not encoded again: its tokens come from the prefix cache (and a block the
            # new turn shares only in part takes the image's embedding from the embedding cache).
            report.check(
                "second turn: cached prompt tokens in /metrics, the image not encoded again",
                cached > 0 and encoded == 0,
                f"+{cached:.0f} cached prompt tokens, {encoded:.0f} images encoded, {hits:.0f} embedding cache hits",
            )
            wait_tasks(capture, before, {"follow_ups"}, timeout)
            ui.shot("3-second-turn")
            wait_idle(glmv, timeout)

            # 4. Stop while the answer streams: the request is aborted and its KV cache freed.
            start = metrics(glmv)
            before = len(capture.chats())
            ui.send(STOP_MESSAGE)
            wait_until(
                "the answer to start streaming",
                lambda: ui.stop_visible() and ui.last_answer().strip(),
                timeout,
            )
            running = metrics(glmv)
            ui.stop()
            ui.shot("4-stopped")
            aborted_key = 'glmv_requests_finished_total{outcome="aborted"}'
            wait_until(
                "glmv to count the aborted request",
                lambda: metrics(glmv).get(aborted_key, 0) > start.get(aborted_key, 0),
                timeout,
            )
            wait_idle(glmv, timeout)
            freed = wait_until(
                "the KV cache to be free",
                lambda: metrics(glmv).get("glmv_kv_cache_usage_ratio", 1.0) == 0.0 or None,
                timeout,
            )
            report.check(
                "Stop: glmv aborted the request and freed its KV cache",
                bool(freed) and running.get("glmv_kv_cache_usage_ratio", 0) > 0,
                f"KV usage {running.get('glmv_kv_cache_usage_ratio', 0):.4f} while streaming, 0 after Stop",
            )
            stopped = [
                r
                for r in capture.chats()[before:]
                if last_user_text(r["body"]).strip().endswith(STOP_MESSAGE)
            ]
            report.check(
                "Stop: the stream was cut by the client",
                bool(stopped) and stopped[0].get("completed") is False,
                f"{len(stopped)} request(s) recorded",
            )
            wait_tasks(capture, before, {"follow_ups"}, 30)
            wait_idle(glmv, timeout)
        finally:
            browser.close()


def write_fixtures(capture: Capture, directory: Path) -> int:
    """One JSON file per chat-completions request Open WebUI sent (in order), images included."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.json"):
        old.unlink()
    counts: dict[str, int] = {}
    for index, record in enumerate(capture.chats()):
        body = record["body"]
        kind = request_kind(body)
        counts[kind] = counts.get(kind, 0) + 1
        fixture = {
            "kind": kind,
            "stream": bool(body.get("stream")),
            "status_seen": record.get("status"),
            "completed": record.get("completed"),
            "request": body,
        }
        path = directory / f"{index:02d}_{kind}.json"
        path.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    models = [r for r in capture.records() if r["path"].endswith("/models")]
    if models:
        (directory / "models_response.json").write_text(
            json.dumps(json.loads(models[0]["response"]), indent=1) + "\n", encoding="utf-8"
        )
    return sum(counts.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="glmv behind a real Open WebUI (see the module docstring).")
    parser.add_argument("--venv", type=Path, required=True, help="Open WebUI's virtual environment")
    parser.add_argument("--glmv-url", help="use this running glmv instead of starting one")
    parser.add_argument(
        "--model", type=Path, help="checkpoint for glmv (default: a tiny GLM-4.6V-template one)"
    )
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed)")
    parser.add_argument("--capture", type=Path, help="write the requests Open WebUI sent here as fixtures")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each step may take")
    args = parser.parse_args(argv)

    open_webui = args.venv / "bin" / "open-webui"
    if not open_webui.is_file():
        print(
            f"Open WebUI is not installed in {args.venv} (make test-openwebui installs it)", file=sys.stderr
        )
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="glmv-openwebui-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLMV_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    with contextlib.ExitStack() as stack:
        if args.glmv_url:
            glmv = args.glmv_url.rstrip("/")
        else:
            model = args.model or tiny_checkpoint(work)
            port = free_port()
            glmv = f"http://127.0.0.1:{port}"
            # One prefill step for the ~15k-token prompts of Open WebUI's tool definitions.
            cmd = [sys.executable, "-m", "glmv", "serve", "--model", str(model), "--port", str(port),
                   "--dtype", "float32", "--served-model-name", SERVED_NAME,
                   "--max-num-batched-tokens", "16384"]  # fmt: skip
            server = stack.enter_context(process(cmd, work / "glmv.log", env, REPO))
            wait_until("glmv to be ready", lambda: server.poll() is None
                       and httpx.get(glmv + "/ready", timeout=2).status_code == 200, 300)  # fmt: skip
        proxy_port = free_port()
        capture = Capture(work / "requests.jsonl")
        proxy_cmd = [sys.executable, "-m", "tests.openwebui.proxy", "--upstream", glmv,
                     "--port", str(proxy_port), "--log", str(capture.path)]  # fmt: skip
        stack.enter_context(process(proxy_cmd, work / "proxy.log", env, REPO))
        owui_port = free_port()
        owui_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("GLMV_", "PYTHON"))},
            "OPENAI_API_BASE_URL": f"http://127.0.0.1:{proxy_port}/v1",
            "OPENAI_API_KEY": "glmv",
            "ENABLE_OLLAMA_API": "false",
            "WEBUI_AUTH": "false",
            "DATA_DIR": str(work / "open-webui-data"),
            "HOST": "127.0.0.1",
            "PORT": str(owui_port),
            "OFFLINE_MODE": "true",
            "HF_HUB_OFFLINE": "1",
            "ENABLE_VERSION_UPDATE_CHECK": "false",
        }
        (work / "open-webui-data").mkdir(exist_ok=True)
        owui_cmd = [str(open_webui), "serve", "--host", "127.0.0.1", "--port", str(owui_port)]
        owui_proc = stack.enter_context(process(owui_cmd, work / "open-webui.log", owui_env, work))
        owui = f"http://127.0.0.1:{owui_port}/"
        wait_until("Open WebUI to answer", lambda: owui_proc.poll() is None
                   and httpx.get(owui + "api/config", timeout=5).status_code == 200, 600, interval=2)  # fmt: skip
        try:
            drive(args, glmv, owui, capture, work, report)
        except Exception as exc:  # a step that timed out or a page that changed: report it as a failure
            report.check("the run finished", False, f"{type(exc).__name__}: {exc}")
        if args.capture:
            count = write_fixtures(capture, args.capture)
            print(f"wrote {count} request fixture(s) to {args.capture}")
    print(f"work directory: {work} (logs, screenshots, requests.jsonl)")
    print("Open WebUI check:", "PASSED" if report.ok else "FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
