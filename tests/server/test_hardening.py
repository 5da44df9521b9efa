"""Hardening, round 2 (issue 19), through HTTP against the in-process app.

Every text field of every endpoint with a lone surrogate or a body that is not UTF-8 is a 400
naming the field; a prompt that cannot fit the context is a 400 before it is tokenised (chat,
moderations, extract); `/metrics` labels stay in closed sets whatever the method, and the
guard's own refusals are counted; `n` beyond `--max-waiting` and out-of-vocabulary
`stop_token_ids` are 400; `content: []` is 400; HEAD is answered like GET; `/v1/models` does not
show the server's paths. A bounded fuzz of adversarial JSON over every POST endpoint gets no 5xx.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmv.server.app import create_app
from glmv.server.guard import GuardSettings

from .conftest import asgi_client, build_engine, make_settings

CHAT = "/v1/chat/completions"
MODERATIONS = "/v1/moderations"
EXTRACT = "/v1/extract"
SURROGATE = "\ud800"
# A surrogate escape exactly as a client puts it on the wire (json.dumps would write it the same).
ESC = "\\ud800"


async def post_raw(client: httpx.AsyncClient, path: str, body: bytes) -> httpx.Response:
    return await client.post(path, content=body, headers={"content-type": "application/json"})


def assert_error(
    r: httpx.Response, status: int, param: str | None, code: str | None = None
) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# --- 2. invalid Unicode: every text field of every endpoint ------------------------------------------

PNG_URL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"

# (path, body with ESC where the surrogate goes, the param the 400 must name)
SURROGATE_CASES = [
    (CHAT, f'{{"messages":[{{"role":"user","content":"a{ESC}b"}}]}}', "messages[0].content"),
    (
        CHAT,
        f'{{"messages":[{{"role":"system","content":"{ESC}"}},{{"role":"user","content":"hi"}}]}}',
        "messages[0].content",
    ),
    (
        CHAT,
        f'{{"messages":[{{"role":"user","content":[{{"type":"text","text":"{ESC}"}}]}}]}}',
        "messages[0].content[0].text",
    ),
    (CHAT, f'{{"model":"{ESC}","messages":[{{"role":"user","content":"hi"}}]}}', "model"),
    (CHAT, f'{{"user":"{ESC}","messages":[{{"role":"user","content":"hi"}}]}}', "user"),
    (CHAT, f'{{"stop":["{ESC}"],"messages":[{{"role":"user","content":"hi"}}]}}', "stop[0]"),
    (CHAT, f'{{"messages":[{{"role":"user","name":"{ESC}","content":"hi"}}]}}', "messages[0].name"),
    (
        CHAT,
        f'{{"messages":[{{"role":"user","content":"hi"}},{{"role":"assistant","content":"x",'
        f'"reasoning_content":"{ESC}"}},{{"role":"user","content":"hi"}}]}}',
        "messages[1].reasoning_content",
    ),
    (
        CHAT,
        f'{{"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{ESC}"}}}}]}}]}}',
        "messages[0].content[0].image_url.url",
    ),
    (
        CHAT,
        f'{{"chat_template_kwargs":{{"{ESC}":1}},"messages":[{{"role":"user","content":"hi"}}]}}',
        "chat_template_kwargs",
    ),
    (
        CHAT,
        f'{{"response_format":{{"type":"json_schema","json_schema":{{"name":"{ESC}","schema":{{}}}}}},'
        f'"messages":[{{"role":"user","content":"hi"}}]}}',
        "response_format.json_schema.name",
    ),
    (CHAT, '{"messages":[{"role":"user","content":"a\\udc00"}]}', "messages[0].content"),
    (MODERATIONS, f'{{"input":"{ESC}"}}', "input"),
    (MODERATIONS, f'{{"input":["ok","{ESC}"]}}', "input[1]"),
    (MODERATIONS, f'{{"input":[{{"type":"text","text":"{ESC}"}}]}}', "input[0].text"),
    (MODERATIONS, f'{{"model":"{ESC}","input":"hi"}}', "model"),
    (EXTRACT, f'{{"images":["{PNG_URL}"],"schema":"{ESC}"}}', "schema"),
    (EXTRACT, f'{{"images":["{PNG_URL}"],"schema":"invoice","model":"{ESC}"}}', "model"),
    (EXTRACT, f'{{"images":["{PNG_URL}"],"schema":"invoice","instructions":"{ESC}"}}', "instructions"),
    (EXTRACT, f'{{"images":["{ESC}"],"schema":"invoice"}}', "images[0]"),
    (
        EXTRACT,
        f'{{"images":["{PNG_URL}"],"schema":{{"type":"object","properties":{{"{ESC}":{{}}}}}}}}',
        "schema.properties",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATE_CASES)
async def test_lone_surrogate_in_any_text_field_is_400(
    client: httpx.AsyncClient, path: str, body: str, param: str
) -> None:
    r = await post_raw(client, path, body.encode())
    error = assert_error(r, 400, param, "invalid_unicode")
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", [CHAT, MODERATIONS, EXTRACT])
async def test_body_that_is_not_utf8_is_400(client: httpx.AsyncClient, path: str) -> None:
    # Latin-1 text, and the raw UTF-8-style bytes of a surrogate (which a lenient decoder would keep).
    for raw in (
        b'{"input":"caf\xe9","messages":[{"role":"user","content":"caf\xe9"}]}',
        b'{"input":"\xed\xa0\x80","messages":[{"role":"user","content":"\xed\xa0\x80"}]}',
    ):
        r = await post_raw(client, path, raw)
        assert_error(r, 400, None, "invalid_encoding")


async def test_valid_unicode_and_escaped_pairs_still_work(client: httpx.AsyncClient) -> None:
    # A surrogate *pair* escape is one valid character; an escaped backslash before "ud800" is text.
    body = '{"max_tokens":2,"messages":[{"role":"user","content":"\\ud83d\\ude00 \\\\ud800 你好"}]}'
    r = await post_raw(client, CHAT, body.encode())
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


async def test_unknown_model_error_with_odd_text_is_written(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models/%ED%A0%80")  # undecodable path bytes
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


# --- 1. a prompt that cannot fit is refused before tokenisation ---------------------------------------


def _big(n: int) -> str:
    return ("hello world " * (n // 12 + 1))[:n]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": [{"role": "user", "content": _big(4_000_000)}]}, "messages"),
        (
            CHAT,
            {"messages": [{"role": "system", "content": _big(1_000_000)}, {"role": "user", "content": "hi"}]},
            "messages",
        ),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": _big(1_000_000)}]}]},
            "messages",
        ),
        (MODERATIONS, {"input": _big(2_000_000)}, "input"),
        (MODERATIONS, {"input": ["fine", _big(2_000_000)]}, "input[1]"),
    ],
)
async def test_huge_text_is_refused_by_its_length(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    r = await client.post(path, json=body)
    error = assert_error(r, 400, param, "context_length_exceeded")
    assert "at least" in error["message"]


async def test_text_between_the_bounds_is_counted_then_refused(client: httpx.AsyncClient) -> None:
    # 30 kB of text: more bytes than the context has tokens, fewer than the byte proof needs (the
    # tiny vocabulary's longest token is about 20 bytes), so tokens are counted, with a stop.
    r = await client.post(CHAT, json={"messages": [{"role": "user", "content": _big(30_000)}]})
    error = assert_error(r, 400, "messages", "context_length_exceeded")
    assert "at least" in error["message"]


async def test_long_assistant_history_is_refused_before_tokenisation(client: httpx.AsyncClient) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": _big(2_000_000)},
        {"role": "user", "content": "again"},
    ]
    r = await client.post(CHAT, json={"messages": messages})
    assert_error(r, 400, "messages", "context_length_exceeded")


async def test_extract_instructions_are_bounded(client: httpx.AsyncClient) -> None:
    r = await client.post(
        EXTRACT, json={"images": [PNG_URL], "schema": "invoice", "instructions": _big(9000)}
    )
    assert_error(r, 400, "instructions")


# --- 3 and 9. metrics: closed label sets, guard refusals counted --------------------------------------


def http_series(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("glmv_http_responses_total{")]


@pytest.mark.parametrize("with_key", [False, True])
async def test_random_methods_do_not_add_series(make_app: Callable[..., Any], with_key: bool) -> None:
    guard = GuardSettings(access_log=False, api_keys=["sk-test"] if with_key else [])
    async with asgi_client(make_app(guard=guard)) as c:
        headers = {"authorization": "Bearer sk-test"}
        await c.get("/health")
        before = http_series((await c.get("/metrics", headers=headers)).text)
        for i in range(200):
            await c.request(f"M{i:04d}X", "/health")
            await c.request(f"Q{i:04d}", f"/nowhere/{i}")
        after = http_series((await c.get("/metrics", headers=headers)).text)
    assert len(after) - len(before) <= 4, after
    assert not any("M0" in line or "nowhere" in line for line in after)
    assert any('method="other"' in line for line in after)


async def test_guard_refusals_are_counted(
    make_app: Callable[..., Any], metric: Callable[..., float | None]
) -> None:
    guard = GuardSettings(access_log=False, api_keys=["sk-test"], max_body_bytes=1000, requests_per_minute=1)
    async with asgi_client(make_app(guard=guard)) as c:
        key = {"authorization": "Bearer sk-test"}
        assert (await c.post(CHAT, json={"messages": []})).status_code == 401
        big = {"messages": [{"role": "user", "content": "x" * 2000}]}
        assert (await c.post(CHAT, json=big, headers=key)).status_code == 413
        first = await c.post(CHAT, json={"messages": []}, headers=key)
        assert first.status_code in (400, 429)
        assert (await c.post(CHAT, json={"messages": []}, headers=key)).status_code == 429
        text = (await c.get("/metrics", headers=key)).text
    for status in ("401", "413", "429"):
        labels = {"method": "POST", "route": CHAT, "status": status}
        assert (metric(text, "glmv_http_responses_total", labels) or 0) >= 1, (status, http_series(text))


# --- 5. n beyond what the queue can ever hold ------------------------------------------------------------


async def test_n_larger_than_max_waiting_is_400(server_model_dir: Path) -> None:
    settings = make_settings(server_model_dir, max_waiting=2)
    engine = build_engine(settings)
    try:
        async with asgi_client(create_app(settings, engine)) as c:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            r = await c.post(CHAT, json={**body, "n": 3})
            error = assert_error(r, 400, "n")
            assert "max-waiting" in error["message"]
            assert "retry-after" not in r.headers
            ok = await c.post(CHAT, json={**body, "n": 2})
            assert ok.status_code == 200, ok.text
            assert len(ok.json()["choices"]) == 2
    finally:
        engine.shutdown()


# --- 8. empty content, stop token ids outside the vocabulary ------------------------------------------


@pytest.mark.parametrize("role", ["user", "system", "assistant"])
async def test_empty_content_list_is_400(client: httpx.AsyncClient, role: str) -> None:
    messages = [{"role": role, "content": []}]
    if role != "user":
        messages.append({"role": "user", "content": "hi"})
    r = await client.post(CHAT, json={"messages": messages, "max_tokens": 2})
    assert_error(r, 400, "messages[0].content")


@pytest.mark.parametrize("token_id", [10**30, 2**63, 10**6])
async def test_stop_token_ids_outside_the_vocabulary_are_400(
    client: httpx.AsyncClient, token_id: int
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop_token_ids": [1, token_id]}
    r = await client.post(CHAT, json=body)
    error = assert_error(r, 400, "stop_token_ids[1]")
    assert "vocabulary" in error["message"]


async def test_stop_token_id_inside_the_vocabulary_is_accepted(client: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop_token_ids": [5]}
    assert (await client.post(CHAT, json=body)).status_code == 200


# --- 9. HEAD, /v1/models root --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/health", "/ready", "/v1/models", "/metrics"])
async def test_head_is_answered_like_get(client: httpx.AsyncClient, path: str) -> None:
    r = await client.head(path)
    assert r.status_code == 200
    assert r.headers["content-type"] == (await client.get(path)).headers["content-type"]


async def test_models_do_not_show_server_paths(client: httpx.AsyncClient, server_model_dir: Path) -> None:
    listed = (await client.get("/v1/models")).json()["data"]
    one = (await client.get(f"/v1/models/{listed[0]['id']}")).json()
    for card in (*listed, one):
        assert card["root"] == server_model_dir.name
        assert str(server_model_dir.parent) not in json.dumps(card)


# --- bounded fuzz over every POST endpoint -------------------------------------------------------------

_ODD_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\ud800", "\udfff", "a\udc80b", "\x00", "<|user|>", "<|image|>", "\u202e", "💥" * 50]),
    st.just("word " * 3000),
)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), _ODD_TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_ODD_TEXT, inner, max_size=4)),
    max_leaves=12,
)


def _message() -> st.SearchStrategy[dict[str, Any]]:
    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": _ODD_TEXT}),
        st.fixed_dictionaries(
            {"type": st.just("image_url"), "image_url": st.one_of(_ODD_TEXT, st.just(PNG_URL))}
        ),
        _JSON,
    )
    return st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"])},
        optional={"content": st.one_of(_ODD_TEXT, st.lists(part, max_size=3), _JSON), "name": _ODD_TEXT},
    )


_BODIES = {
    CHAT: st.fixed_dictionaries(
        {"messages": st.lists(_message(), max_size=3), "max_tokens": st.integers(1, 4)},
        optional={
            "model": _ODD_TEXT,
            "stop": st.one_of(_ODD_TEXT, st.lists(_ODD_TEXT, max_size=3)),
            "n": st.integers(-1, 40),
            "stop_token_ids": st.lists(st.integers(-5, 10**20), max_size=3),
            "response_format": _JSON,
            "chat_template_kwargs": _JSON,
            "stream": st.booleans(),
        },
    ),
    MODERATIONS: st.fixed_dictionaries(
        {"input": st.one_of(_ODD_TEXT, st.lists(_ODD_TEXT, max_size=3), st.lists(_JSON, max_size=3))},
        optional={"model": _ODD_TEXT},
    ),
    EXTRACT: st.fixed_dictionaries(
        {
            "images": st.lists(st.one_of(_ODD_TEXT, st.just(PNG_URL)), max_size=2),
            "schema": st.one_of(st.sampled_from(["invoice", "receipt"]), _ODD_TEXT, _JSON),
        },
        optional={"instructions": _ODD_TEXT, "model": _ODD_TEXT, "max_tokens": st.integers(-1, 8)},
    ),
}


@pytest.mark.parametrize("path", list(_BODIES))
def test_fuzzed_bodies_never_get_a_server_error(make_app: Callable[..., Any], path: str) -> None:
    import asyncio

    # A generous timeout: a 504 here would only say that this machine was busy.
    app = make_app(max_model_len=2048, request_timeout=600.0)
    seen: list[int] = []

    async def send(body: Any) -> httpx.Response:
        async with asgi_client(app) as c:
            raw = json.dumps(body).encode()  # ASCII escapes: lone surrogates travel as \ud800
            return await post_raw(c, path, raw)

    # Each moderation input is a grammar-constrained answer with logprobs: fewer bodies there.
    examples = 12 if path == MODERATIONS else 30

    @given(body=_BODIES[path])
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(body: Any) -> None:
        r = asyncio.run(send(body))
        seen.append(r.status_code)
        assert r.status_code < 500, (r.status_code, r.text[:500], json.dumps(body)[:500])
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert len(seen) == examples
