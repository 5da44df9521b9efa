"""glmv on Ray Serve: two engine replicas of the tiny model behind the relaying front, on the
session's local Ray instance, over loopback HTTP.

The module deploys one application and runs, in order: the official `openai` client (streaming
and not, the same answers as `glmv serve` in process), 20 two-turn conversations (the second turn
finds its prefix cached), rate limits shared through Redis, and last, because it breaks a
replica on purpose, a replica killed during 16 streams.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ray.conftest import free_port, png_data_url

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from ray import serve  # noqa: E402

from glmv.ray.serve import REPLICA_HEADER, RayServeOptions, build_application  # noqa: E402
from glmv.server.guard import GuardSettings  # noqa: E402
from glmv.server.settings import Settings  # noqa: E402

MODEL = "glmv-tiny"
APP = "glmv"
OPEN_KEY = "sk-ray-open"
LIMITED_KEY = "sk-ray-limited"
LIMITED_RPM = 3
ENGINE = {"max_model_len": 2048, "kv_cache_gb": 0.05, "max_num_seqs": 32}


@dataclass
class Deployed:
    base_url: str
    shared_limits: bool  # rate limits live in Redis (False: redis-server missing, memory storage)

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def headers(self, key: str = OPEN_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    redis = pytest.importorskip("redis")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("redis")), "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert proc.poll() is None, "redis-server exited at start-up"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def deployed(
    serve_port: int, ray_model_dir: Path, redis_url: str | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(
        json.dumps(
            [
                {"name": "open", "key_sha256": _sha256(OPEN_KEY)},
                {"name": "limited", "key_sha256": _sha256(LIMITED_KEY), "requests_per_minute": LIMITED_RPM},
            ]
        )
    )
    settings = Settings(model=str(ray_model_dir), served_model_name=[MODEL], **ENGINE)  # type: ignore[arg-type]
    settings.guard = GuardSettings(
        api_keys_file=str(keys_file),
        rate_limit_storage=redis_url or "memory://",
        # the client's own address reaches the replica's guard through the proxy and the front
        allowed_ips=["127.0.0.0/8"],
        access_log=False,
    )
    settings.validate()
    options = RayServeOptions(
        replicas=2, num_cpus_per_replica=0.5, ingress_num_cpus=0.25, max_ongoing_requests=32, app_name=APP
    )
    serve.run(build_application(settings, options), name=APP, route_prefix="/", blocking=False)
    try:
        yield Deployed(f"http://127.0.0.1:{serve_port}", shared_limits=redis_url is not None)
    finally:
        _delete_app(APP)


def _delete_app(name: str, deadline_s: float = 600.0) -> None:
    """Delete the application and wait until Serve has reaped it. `serve.delete` itself gives up
    after a fixed 60 s, which a replica killed by a test can outlast on a loaded machine."""
    serve.delete(name, _blocking=False)
    end = time.monotonic() + deadline_s
    while name in serve.status().applications:
        if time.monotonic() > end:
            raise TimeoutError(f"Ray Serve did not delete application {name!r} within {deadline_s:.0f} s")
        time.sleep(0.5)


def image_message(text: str, image: str) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}],
    }


# --- the openai client ------------------------------------------------------------------------------


def test_openai_client_streaming_and_not_same_answers_as_glmv_serve(
    deployed: Deployed, ray_model_dir: Path
) -> None:
    from fastapi.testclient import TestClient

    from glmv.server.app import create_app

    client = openai.OpenAI(base_url=deployed.api_url, api_key=OPEN_KEY, max_retries=0, timeout=120)
    messages = [image_message("What is in this picture?", png_data_url(1000))]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert whole.object == "chat.completion" and whole.model == MODEL
    [choice] = whole.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.prompt_tokens > 16
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # The same request to `glmv serve`'s app in this process gets the same answer.
    settings = Settings(model=str(ray_model_dir), served_model_name=[MODEL], **ENGINE)  # type: ignore[arg-type]
    settings.guard = GuardSettings(access_log=False)
    with TestClient(create_app(settings)) as direct:
        body = {"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0}
        reference = direct.post("/v1/chat/completions", json=body).json()
    assert reference["choices"][0]["message"]["content"] == choice.message.content
    assert reference["usage"]["prompt_tokens"] == whole.usage.prompt_tokens

    # Errors keep glmv's shape and status through the front.
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)  # type: ignore[arg-type]
    assert missing.value.status_code == 404
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert bad.value.body["param"] == "messages"  # type: ignore[index]
    wrong_key = openai.OpenAI(base_url=deployed.api_url, api_key="sk-wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(deployed.base_url + "/health", timeout=60).json() == {"status": "ok"}


# --- cache-aware routing ----------------------------------------------------------------------------


def _conversation(deployed: Deployed, i: int) -> tuple[str, str, int]:
    """Two turns of conversation `i`: (replica of turn 1, replica of turn 2, cached tokens of turn 2)."""
    client = openai.OpenAI(base_url=deployed.api_url, api_key=OPEN_KEY, max_retries=0, timeout=120)
    messages: list[dict[str, Any]] = [
        image_message(f"Conversation {i}: what does this show?", png_data_url(i))
    ]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,
        max_tokens=4,
        temperature=0,  # type: ignore[arg-type]
    )
    first = raw.parse()
    messages.append({"role": "assistant", "content": first.choices[0].message.content or ""})
    messages.append({"role": "user", "content": "And what colour is it mostly?"})
    raw2 = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,
        max_tokens=4,
        temperature=0,  # type: ignore[arg-type]
    )
    second = raw2.parse()
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    return (
        raw.headers[REPLICA_HEADER],
        raw2.headers[REPLICA_HEADER],
        second.usage.prompt_tokens_details.cached_tokens or 0,
    )


def test_second_turns_find_their_prefix_cached(deployed: Deployed) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: _conversation(deployed, i), range(20)))
    cached = sum(1 for _, _, tokens in results if tokens > 0)
    same_replica = sum(1 for a, b, _ in results if a == b)
    assert cached >= 19, results  # >= 95 % (random placement would give about half)
    assert same_replica >= 19, results
    assert len({a for a, _, _ in results}) == 2  # both replicas took conversations


# --- rate limits shared by the replicas ---------------------------------------------------------------


def test_rate_limit_is_shared_by_the_replicas(deployed: Deployed) -> None:
    if not deployed.shared_limits:
        pytest.skip("redis-server is not installed: the limits are per replica")
    statuses: list[int] = []
    replicas: set[str] = set()
    with httpx.Client(base_url=deployed.api_url, timeout=120) as client:
        for i in range(20):  # distinct conversations: both replicas see some of them
            body = {
                "model": MODEL,
                "max_tokens": 1,
                "messages": [{"role": "user", "content": f"limited {i}"}],
            }
            r = client.post("/chat/completions", json=body, headers=deployed.headers(LIMITED_KEY))
            statuses.append(r.status_code)
            replicas.add(r.headers[REPLICA_HEADER])
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
                assert int(r.headers["retry-after"]) >= 1
    assert len(replicas) == 2
    # One budget for the key across both replicas (memory storage would allow 3 on each).
    assert statuses.count(200) == LIMITED_RPM
    assert statuses.count(429) == 20 - LIMITED_RPM


# --- a replica dies during streams ----------------------------------------------------------------------


@dataclass
class StreamLog:
    index: int
    replica: str = ""
    status: int = 0
    chunks: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False  # saw data: [DONE]
    finish_reason: str | None = None
    limit: int | None = None  # stop reading after this many chunks (set by the test)
    started: asyncio.Event = field(default_factory=asyncio.Event)


async def _stream(client: httpx.AsyncClient, log: StreamLog, headers: dict[str, str]) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Stream number {log.index}, tell a long story."}],
        "max_tokens": 1900,
        "ignore_eos": True,  # runs until the token budget: still running when the replica dies
        "stream": True,
    }
    try:
        async with client.stream("POST", "/chat/completions", json=body, headers=headers) as r:
            log.status = r.status_code
            log.replica = r.headers.get(REPLICA_HEADER, "")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    log.done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    log.errors.append(event["error"])
                    continue
                log.chunks += 1
                for choice in event.get("choices", []):
                    log.finish_reason = choice.get("finish_reason") or log.finish_reason
                    if choice.get("delta", {}).get("content"):
                        log.started.set()
                if log.limit is not None and log.chunks >= log.limit:
                    break
    finally:
        log.started.set()  # never leave the test waiting on a stream that ended early


def _replica_pid(replica_id: str) -> int:
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#GlmvServer#{replica_id}", namespace="serve")
    return int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60))


def _server_replica_ids() -> set[str]:
    prefix = f"SERVE_REPLICA::{APP}#GlmvServer#"
    return {
        a["name"].removeprefix(prefix)
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    }


async def _wait_until(predicate: Any, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        await asyncio.sleep(0.5)


def _running_server_replicas() -> int:
    status = serve.status().applications[APP].deployments["GlmvServer"]
    return int(status.replica_states.get("RUNNING", 0))


async def test_killed_replica_ends_only_its_streams_and_comes_back(deployed: Deployed) -> None:
    before = _server_replica_ids()
    assert len(before) == 2
    pids = {rid: _replica_pid(rid) for rid in before}
    logs = [StreamLog(i) for i in range(16)]
    async with httpx.AsyncClient(base_url=deployed.api_url, timeout=httpx.Timeout(300, connect=60)) as client:
        tasks = [asyncio.create_task(_stream(client, log, deployed.headers())) for log in logs]
        await asyncio.wait_for(asyncio.gather(*(log.started.wait() for log in logs)), 300)
        assert all(log.status == 200 and not log.errors and log.finish_reason is None for log in logs), logs
        assert {log.replica for log in logs} == before  # both replicas serve some of the streams
        victim = logs[0].replica
        os.kill(pids[victim], signal.SIGKILL)

        doomed = [log for log in logs if log.replica == victim]
        others = [log for log in logs if log.replica != victim]
        await asyncio.wait_for(asyncio.gather(*(tasks[log.index] for log in doomed)), 300)
        for log in others:  # read a little more of each surviving stream, then let it go
            log.limit = log.chunks + 10
        await asyncio.wait_for(asyncio.gather(*tasks), 300)

        for log in doomed:  # each in-flight stream of the dead replica ends with an error event
            assert [e["code"] for e in log.errors] == ["replica_failed"], log
            assert log.done and log.finish_reason is None
        for log in others:  # the other replica's streams go on untouched
            assert log.errors == [], log
            assert log.chunks >= log.limit or log.finish_reason == "length", log  # type: ignore[operator]

        # New requests succeed at once (a request sent to the dead replica is sent again).
        for i in range(6):
            body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": f"after {i}"}]}
            r = await client.post("/chat/completions", json=body, headers=deployed.headers())
            assert r.status_code == 200, r.text
            assert r.headers[REPLICA_HEADER] != victim

        # Ray replaces the replica, and the new one serves.
        await _wait_until(
            lambda: _running_server_replicas() == 2 and len(_server_replica_ids() - {victim}) == 2,
            "Serve to replace the killed replica",
        )
        replacement = (_server_replica_ids() - before).pop()
        # The front learns of the new replica a moment later (Serve's long poll): until then new
        # conversations all go to the survivor.
        served_by: set[str] = set()
        deadline = time.monotonic() + 240
        i = 0
        while replacement not in served_by:
            assert time.monotonic() < deadline, f"the replacement {replacement} never answered: {served_by}"
            body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": f"again {i}"}]}
            r = await client.post("/chat/completions", json=body, headers=deployed.headers())
            assert r.status_code == 200, r.text
            served_by.add(r.headers[REPLICA_HEADER])
            i += 1
