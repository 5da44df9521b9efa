"""Hardening, round 2 (issue 19), against real `glmv serve` processes: slow clients are closed by
the header, body and keep-alive timeouts, connections beyond the cap get a 503, and when the
shutdown timeout runs out a running stream ends with an error event and `[DONE]`.

Waits are on events (a socket reaching EOF, a process exiting) with generous deadlines; no test
measures how long anything took.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import LiveServer, parse_sse

DEADLINE_S = 60.0  # generous: the server's own timeouts in these tests are 1 s


def connect(server: LiveServer) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=DEADLINE_S)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket timeout: DEADLINE_S)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


@pytest.fixture(scope="module")
def strict_server(
    server_model_dir: Path, start_live_server: Callable[..., LiveServer]
) -> Iterator[LiveServer]:
    server = start_live_server(
        server_model_dir,
        "--header-timeout", "1",
        "--body-timeout", "1",
        "--keep-alive-timeout", "1",
        "--max-connections", "6",
    )  # fmt: skip
    yield server
    server.stop()


def test_idle_connection_is_closed(strict_server: LiveServer) -> None:
    with connect(strict_server) as sock:
        assert read_until_closed(sock) == b""  # nothing sent, nothing to answer: closed


def test_half_sent_headers_get_408_and_close(strict_server: LiveServer) -> None:
    with connect(strict_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_stalled_body_gets_408_and_close(strict_server: LiveServer) -> None:
    with connect(strict_server) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"messages": ['
        )
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_body_of_a_route_that_does_not_read_it_cannot_hold_the_connection(strict_server: LiveServer) -> None:
    with connect(strict_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]


def test_idle_keep_alive_connection_is_closed(strict_server: LiveServer) -> None:
    with connect(strict_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_until_closed(sock)  # the answer, then the close once the connection idles
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1") == 1


def test_connections_over_the_cap_get_503(strict_server: LiveServer) -> None:
    held = [connect(strict_server) for _ in range(6)]
    try:
        # Each held connection is known to the server once it answers on it.
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        with connect(strict_server) as extra:
            reply = read_until_closed(extra)
        assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
        assert b"retry-after: 1" in reply.lower()
    finally:
        for sock in held:
            sock.close()
    # The held connections are gone; the server takes requests again.
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(strict_server.base_url + "/health", timeout=DEADLINE_S).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # polling interval only
    else:
        pytest.fail("the server did not accept connections again")


def test_normal_requests_still_served(strict_server: LiveServer) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = httpx.post(strict_server.api_url + "/chat/completions", json=body, timeout=DEADLINE_S)
    assert r.status_code == 200, r.text


def test_shutdown_timeout_ends_streams_with_an_error_event(
    server_model_dir: Path, start_live_server: Callable[..., LiveServer]
) -> None:
    server = start_live_server(server_model_dir, "--shutdown-timeout", "0.2")
    # a random-weight checkpoint says so in the start-up banner
    assert "WARNING: this model has random weights; its answers are random text." in server.log()
    # A stream far longer than the shutdown timeout: 4 choices of nearly the whole context each.
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1900,
        "ignore_eos": True,
        "n": 4,
        "stream": True,
    }
    text = ""
    with httpx.stream("POST", server.api_url + "/chat/completions", json=body, timeout=DEADLINE_S * 3) as r:
        assert r.status_code == 200
        chunks = r.iter_text()
        for chunk in chunks:
            text += chunk
            if "\n\n" in text:  # the first event arrived: the request is running
                break
        server.process.send_signal(signal.SIGTERM)
        for chunk in chunks:
            text += chunk
    assert server.process.wait(DEADLINE_S * 3) == 0
    events, done = parse_sse(text)
    assert done, text[-500:]
    error = events[-1]["error"]
    assert error["code"] == "overloaded" and "shutting down" in error["message"]
    assert not any(e.get("choices") and e["choices"][0].get("finish_reason") for e in events)
    log = server.log()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
