"""The streaming path's cheaper mechanisms keep the old behaviour.

* `Deadline` (one timer per request): the deadline still fires while a wait is in progress and
  when it passed between waits, `interrupt` ends a wait early, someone else's cancellation passes
  through, and one timer serves every wait of a request.
* `cancel_on_disconnect` waits for the client's disconnect in `receive()` instead of polling, and
  still cancels the request (and falls back to polling after an unexpected message).
* Streamed bodies skip the middleware (`glmv.server.body_send`) and the events of one engine
  output go out in one send: the client gets the same events byte for byte, the guard still
  counts every byte and the end of the response, and the response counter still counts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from glmv.server import runs
from glmv.server.app import create_app
from glmv.server.chat import ChunkEvents, _sse
from glmv.server.deadline import TIMEOUT, Deadline, Interrupted
from glmv.server.guard import GuardSettings
from glmv.server.runs import cancel_on_disconnect
from tests.server.conftest import asgi_client, make_settings
from tests.tasks.scripted import ScriptedClient

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "hi"}]
LONG = 60.0  # a deadline no test reaches


# --- Deadline ------------------------------------------------------------------------------------


async def test_the_deadline_ends_a_wait_in_progress() -> None:
    deadline = Deadline(time.monotonic() + 0.05)
    never = asyncio.get_running_loop().create_future()
    with pytest.raises(Interrupted) as caught:
        await asyncio.wait_for(deadline.wait(never), LONG)  # the outer bound only guards the test
    assert caught.value.reason == TIMEOUT
    assert never.cancelled()
    with pytest.raises(Interrupted):  # and every later wait, at once
        await deadline.wait(asyncio.sleep(0))


async def test_one_timer_serves_every_wait_of_a_request() -> None:
    deadline = Deadline(time.monotonic() + LONG)
    assert not deadline.armed
    assert await deadline.wait(asyncio.sleep(0, "a")) == "a"
    timer = deadline._timer
    assert timer is not None
    for i in range(50):
        assert await deadline.wait(asyncio.sleep(0, i)) == i
    assert deadline._timer is timer and not timer.cancelled()
    deadline.cancel()
    assert not deadline.armed and timer.cancelled()


async def test_a_deadline_that_passed_between_waits_ends_the_next_one_without_running_it() -> None:
    deadline = Deadline(time.monotonic() + LONG)
    await deadline.wait(asyncio.sleep(0))
    deadline._expire()  # the timer fires while nothing waits (the stream was writing, say)
    ran = False

    async def work() -> None:
        nonlocal ran
        ran = True

    with pytest.raises(Interrupted) as caught:
        await deadline.wait(work())
    assert caught.value.reason == TIMEOUT and not ran
    past = Deadline(time.monotonic() - 1.0)  # already over before the first wait: no timer
    with pytest.raises(Interrupted):
        await past.wait(work())
    assert not ran and not past.armed


async def test_interrupt_ends_the_wait_in_progress_and_the_later_ones() -> None:
    deadline = Deadline(None)  # no timeout, but a server stop still ends the wait
    started = asyncio.Event()

    async def blocked() -> None:
        started.set()
        await asyncio.Event().wait()

    waiter = asyncio.ensure_future(deadline.wait(blocked()))
    await asyncio.wait_for(started.wait(), LONG)
    deadline.interrupt("stopped")
    with pytest.raises(Interrupted) as caught:
        await asyncio.wait_for(waiter, LONG)
    assert caught.value.reason == "stopped"
    with pytest.raises(Interrupted):
        await deadline.wait(asyncio.sleep(0))


async def test_someone_elses_cancellation_passes_through() -> None:
    deadline = Deadline(time.monotonic() + LONG)
    started = asyncio.Event()

    async def blocked() -> None:
        started.set()
        await asyncio.Event().wait()

    waiter = asyncio.ensure_future(deadline.wait(blocked()))
    await asyncio.wait_for(started.wait(), LONG)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # Both at once (the client left as the deadline passed): the outside cancellation wins.
    both = asyncio.ensure_future(deadline.wait(blocked()))
    started.clear()
    await asyncio.wait_for(started.wait(), LONG)
    deadline.interrupt(TIMEOUT)
    both.cancel()
    with pytest.raises(asyncio.CancelledError):
        await both
    deadline.cancel()


async def test_the_deadline_times_out_a_served_stream(tmp_path: Path, server_model_dir: Path) -> None:
    never = asyncio.Event()
    client = ScriptedClient(server_model_dir, [("Hello", [1], None), never, ("x", [2], None)])
    # The first chunk is ready at once; the timeout must only end the wait that never finishes.
    app = create_app(make_settings(server_model_dir, request_timeout=1.0), client)
    async with asgi_client(app) as c:
        r = await c.post(CHAT, json={"messages": ASK, "stream": True})
        await client.wait_closed(1)  # the engine's iterator was closed: the request is aborted
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "timeout"
    assert r.text.endswith("data: [DONE]\n\n")
    assert len(client.closed) == 1


# --- waiting for the first token: disconnect -------------------------------------------------------


def http_scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": CHAT, "headers": [], "query_string": b""}


async def test_a_disconnect_while_waiting_cancels_without_polling() -> None:
    calls = 0
    leave = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await leave.wait()
        return {"type": "http.disconnect"}

    started = asyncio.Event()
    cancelled = False

    async def first_token() -> str:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled = True
            raise
        return "never"

    waiting = asyncio.ensure_future(cancel_on_disconnect(Request(http_scope(), receive), first_token()))
    await asyncio.wait_for(started.wait(), LONG)
    leave.set()
    assert await asyncio.wait_for(waiting, LONG) is None
    assert cancelled and calls == 1


async def test_an_answer_before_a_disconnect_stops_the_watch() -> None:
    pending_receive: asyncio.Future[Any] | None = None

    async def receive() -> dict[str, Any]:
        nonlocal pending_receive
        pending_receive = asyncio.get_running_loop().create_future()
        return await pending_receive  # type: ignore[no-any-return]

    async def first_token() -> str:
        await asyncio.sleep(0)
        return "token"

    assert await cancel_on_disconnect(Request(http_scope(), receive), first_token()) == "token"
    await asyncio.sleep(0)
    assert pending_receive is not None and pending_receive.cancelled()


async def test_an_unexpected_message_falls_back_to_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "_DISCONNECT_POLL_S", 0.0)
    replies = [
        {"type": "http.request", "body": b"", "more_body": False},
        {"type": "http.request", "body": b"", "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return replies.pop(0) if replies else {"type": "http.disconnect"}

    result = await asyncio.wait_for(
        cancel_on_disconnect(Request(http_scope(), receive), asyncio.Event().wait()), LONG
    )
    assert result is None and not replies


# --- streamed bodies -------------------------------------------------------------------------------


def asgi_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # uvicorn's: the response listens for disconnects
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }


async def raw_stream(app: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The ASGI messages the server gets for one request."""
    sent: list[dict[str, Any]] = []
    requested = False
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    scope = asgi_scope()
    await asyncio.wait_for(app(scope, receive, send), 120)
    return sent


async def test_streamed_events_are_unchanged_and_one_output_is_one_send(
    server_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="glmv.access")
    script = [("Hel", [1], None), ("lo", [2], None), (' 发票 "x"', [3], None)]
    app = create_app(
        make_settings(server_model_dir, guard=GuardSettings()), ScriptedClient(server_model_dir, script)
    )
    body = {"messages": ASK, "stream": True, "stream_options": {"include_usage": True}}
    sent = await raw_stream(app, body)
    start, *bodies = sent
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = dict(start["headers"])
    assert b"x-request-id" in headers  # the guard still adds its header to the start
    # One send per engine output (role + first text, second text, last text + finish + usage +
    # [DONE]), then the empty end of the body.
    assert [m["more_body"] for m in bodies] == [True, True, True, False]
    assert bodies[-1]["body"] == b""
    text = b"".join(m["body"] for m in bodies).decode()

    # The events, byte for byte as writing each one on its own makes them.
    first = json.loads(text.split("\n\n")[0][6:])
    base = {k: first[k] for k in ("id", "object", "created", "model", "system_fingerprint")}
    base["usage"] = None
    events = ChunkEvents(base)
    last_event = text.split("\n\n")[-3]
    usage = json.loads(last_event[6:])["usage"]
    expected = "".join(
        [
            events.event(0, {"role": "assistant", "content": ""}),
            events.text(0, "", "Hel"),
            events.text(0, "", "lo"),
            events.text(0, "", ' 发票 "x"'),
            events.event(0, {}, None, "stop", None),
            _sse({**base, "choices": [], "usage": usage}),
            "data: [DONE]\n\n",
        ]
    )
    assert text == expected
    assert usage["completion_tokens"] == 3

    # The guard counted every byte and saw the end; the response counter counted the stream.
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "glmv.access"]
    assert (line["status"], line["error"], line["bytes_out"]) == (200, None, len(text.encode()))
    metrics = app.state.glmv.metrics.render().decode()
    assert 'glmv_http_responses_total{method="POST",route="/v1/chat/completions",status="200"} 1.0' in metrics


async def test_a_stream_that_leaves_early_is_logged_with_the_bytes_it_got(
    server_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="glmv.access")
    never = asyncio.Event()
    client = ScriptedClient(server_model_dir, [("Hello", [1], None), never, ("x", [2], None)])
    app = create_app(make_settings(server_model_dir, guard=GuardSettings()), client)
    sent: list[dict[str, Any]] = []
    got = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps({"messages": ASK, "stream": True}).encode()}
        await got.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            got.set()

    scope = asgi_scope()
    await asyncio.wait_for(app(scope, receive, send), 120)
    streamed = sum(len(m.get("body", b"")) for m in sent if m["type"] == "http.response.body")
    assert streamed > 0 and not any(
        m["type"] == "http.response.body" and not m.get("more_body") for m in sent
    )
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "glmv.access"]
    assert (line["status"], line["error"], line["bytes_out"]) == (200, "aborted", streamed)
    assert client.closed == [client.requests[0].request_id] * len(client.closed) and client.closed
