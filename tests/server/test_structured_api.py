"""Structured outputs over HTTP on the tiny model: `response_format` in chat completions
(streaming and not), POST /v1/extract with every built-in schema and inline schemas, and
POST /v1/moderations through the official `openai` client (text, lists, images, policies)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import httpx2
import jsonschema
import openai
import pytest

from glmv.engine.structured import schema_errors
from glmv.server.moderation import value_scores
from glmv.tasks.moderation import OPENAI_CATEGORIES, ModerationPolicy
from glmv.tasks.schemas import BUILTIN_SCHEMAS
from glmv.tasks.types import LogprobEntry, TopLogprob

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
        "paid": {"type": "boolean"},
    },
    "required": ["title", "count", "tags", "paid"],
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "doc", "schema": SCHEMA, "strict": True}}
OFF = {"type": "disabled"}


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "Fill it in."}],
        "temperature": 0,
        "thinking": OFF,
        **extra,
    }


async def test_json_schema_non_streaming_and_streaming_agree(client: httpx.AsyncClient, sse: Any) -> None:
    whole = await client.post("/v1/chat/completions", json=chat_body(response_format=JSON_SCHEMA_FORMAT))
    assert whole.status_code == 200, whole.text
    choice = whole.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    value = json.loads(choice["message"]["content"])
    jsonschema.validate(value, SCHEMA)

    streamed = await client.post(
        "/v1/chat/completions", json=chat_body(response_format=JSON_SCHEMA_FORMAT, stream=True)
    )
    events, done = sse(streamed.text)
    assert done
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == choice["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def test_json_object_answers_start_as_objects(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions",
        json=chat_body(
            response_format={"type": "json_object"}, temperature=1, seed=100, n=16, max_tokens=256
        ),
    )
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert all(c["message"]["content"].startswith("{") for c in choices)
    finished = [c for c in choices if c["finish_reason"] == "stop"]
    assert finished  # random weights: some choices close their strings within max_tokens
    for c in finished:
        assert isinstance(json.loads(c["message"]["content"]), dict)


# --- /v1/extract ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILTIN_SCHEMAS))
async def test_extract_with_each_built_in_schema(
    client: httpx.AsyncClient, image_url: Callable[..., str], name: str
) -> None:
    # A budget keeps the random model's answer short; the grammar closes the object within it.
    body = {"images": [image_url()], "schema": name, "max_tokens": 600}
    response = await client.post("/v1/extract", json=body)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "id",
        "object",
        "created",
        "model",
        "schema_name",
        "data",
        "reasoning",
        "truncated",
        "finish_reason",
        "usage",
    }
    assert (body["object"], body["schema_name"], body["finish_reason"]) == ("extraction", name, "stop")
    assert schema_errors(BUILTIN_SCHEMAS[name].schema, body["data"]) == []
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


async def test_extract_with_an_inline_schema_and_two_images(
    client: httpx.AsyncClient, image_url: Callable[..., str]
) -> None:
    response = await client.post(
        "/v1/extract",
        json={
            "images": [image_url(), {"url": image_url(40, 40, (0, 0, 200))}],
            "schema": SCHEMA,
            "instructions": "Only the first page matters.",
            "max_tokens": 200,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["schema_name"] is None
    jsonschema.validate(body["data"], SCHEMA)


@pytest.mark.parametrize(
    ("patch", "status", "param", "code"),
    [
        (
            {"schema": {"type": "object", "properties": {"a": {"not": {}}}}},
            400,
            "schema",
            "unsupported_schema",
        ),
        ({"schema": {"type": "objekt"}}, 400, "schema", "invalid_value"),
        ({"schema": "passport"}, 400, "schema", "invalid_value"),
        ({"images": []}, 400, "images", None),
        ({"images": ["data:image/png;base64,AAAA"]}, 400, "images[0]", "invalid_image"),
        ({"max_tokens": 3}, 422, "max_tokens", "incomplete_output"),
        ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
    ],
)
async def test_extract_errors(
    client: httpx.AsyncClient,
    image_url: Callable[..., str],
    patch: dict[str, Any],
    status: int,
    param: str,
    code: str | None,
) -> None:
    body = {"images": [image_url()], "schema": "receipt", **patch}
    response = await client.post("/v1/extract", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if code == "unsupported_schema":
        assert "not" in error["message"]


async def test_extract_schemas_and_openapi(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/v1/extract/schemas")).json()
    assert [s["name"] for s in listed["data"]] == list(BUILTIN_SCHEMAS)
    assert listed["data"][0]["schema"] == BUILTIN_SCHEMAS["invoice"].schema
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert {"/v1/extract", "/v1/extract/schemas", "/v1/moderations"} <= set(paths)
    assert "422" in paths["/v1/extract"]["post"]["responses"]


# --- /v1/moderations ---------------------------------------------------------------------------------


def asgi_openai(app: Any) -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://testserver")
    return openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http)


RESULT_KEYS = {"flagged", "categories", "category_scores", "category_applied_input_types"}


def check_result(
    raw: dict[str, Any], applied: dict[str, list[str]], names: list[str], ordered: bool = False
) -> None:
    assert set(raw) == RESULT_KEYS
    assert sorted(raw["categories"]) == sorted(raw["category_scores"]) == sorted(names)
    if ordered:  # the server's own JSON lists the categories in the policy's order
        assert list(raw["categories"]) == list(raw["category_scores"]) == names
    assert raw["category_applied_input_types"] == applied
    for name in names:
        score = raw["category_scores"][name]
        assert isinstance(score, float) and 0.0 <= score <= 1.0
        assert isinstance(raw["categories"][name], bool)
    assert raw["flagged"] == any(raw["categories"].values())


async def test_moderations_with_the_openai_client(
    make_app: Callable[..., Any], image_url: Callable[..., str]
) -> None:
    app = make_app()
    oai = asgi_openai(app)
    names = list(OPENAI_CATEGORIES)
    model = (await oai.models.list()).data[0].id

    one = await oai.moderations.create(model=model, input="I will find you.")
    assert one.id.startswith("modr-") and one.model == model and len(one.results) == 1
    result = one.results[0]
    assert result.categories.harassment_threatening in (True, False)
    check_result(result.model_dump(by_alias=True), {n: ["text"] for n in names}, names)

    many = await oai.moderations.create(model=model, input=["hello", "goodbye", "你好"])
    assert len(many.results) == 3
    for r in many.results:
        check_result(r.model_dump(by_alias=True), {n: ["text"] for n in names}, names)

    mixed = await oai.moderations.create(
        model=model,
        input=[{"type": "text", "text": "a photo"}, {"type": "image_url", "image_url": {"url": image_url()}}],
    )
    assert len(mixed.results) == 1
    applied = {
        n: ["text", "image"]
        if n
        in {
            "self-harm",
            "self-harm/intent",
            "self-harm/instructions",
            "sexual",
            "violence",
            "violence/graphic",
        }
        else ["text"]
        for n in names
    }
    check_result(mixed.results[0].model_dump(by_alias=True), applied, names)

    image_only = await oai.moderations.create(
        model=model, input=[{"type": "image_url", "image_url": {"url": image_url()}}]
    )
    raw = image_only.results[0].model_dump(by_alias=True)
    assert raw["category_applied_input_types"]["hate"] == [] and raw["category_scores"]["hate"] == 0.0
    assert raw["category_applied_input_types"]["violence"] == ["image"]

    # The raw JSON has exactly OpenAI's keys.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        body = (await c.post("/v1/moderations", json={"input": "hi"})).json()
    assert set(body) == {"id", "model", "results"}
    check_result(body["results"][0], {n: ["text"] for n in names}, names, ordered=True)


async def test_moderation_policy_thresholds_and_custom_categories(make_app: Callable[..., Any]) -> None:
    policy = ModerationPolicy.from_table(
        {
            "threshold": 1.0,
            "thresholds": {"violence": 0.0},
            "categories": [{"name": "gambling", "description": "Promotes betting or casinos."}],
        }
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=make_app(moderation=policy)), base_url="http://t"
    ) as c:
        body = (await c.post("/v1/moderations", json={"input": "Place your bets!"})).json()
    result = body["results"][0]
    assert list(result["categories"]) == [*OPENAI_CATEGORIES, "gambling"]
    # Threshold 0 flags whatever the score; threshold 1 flags nothing short of certainty.
    assert result["categories"]["violence"] is True and result["flagged"] is True
    assert result["categories"]["gambling"] == (result["category_scores"]["gambling"] >= 1.0)


async def test_moderation_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/moderations", json={"input": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = await client.post("/v1/moderations", json={"input": ["x"] * 33})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = await client.post(
        "/v1/moderations",
        json={"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].image_url"
    r = await client.post("/v1/moderations", json={"input": "x", "model": "omni-moderation-latest"})
    assert r.status_code == 404


def test_value_scores_from_logprobs() -> None:
    def entry(token: str, logprob: float, top: list[tuple[str, float]]) -> LogprobEntry:
        return LogprobEntry(
            token_id=0,
            token=token,
            logprob=logprob,
            bytes=list(token.encode()),
            top=[TopLogprob(0, t, lp, list(t.encode())) for t, lp in top],
        )

    # {"hate": false, "violence": true} with the value tokens spanning the separator space.
    logprobs = [
        entry('{"', 0.0, [('{"', 0.0)]),
        entry("hate", 0.0, [("hate", 0.0)]),
        entry('":', 0.0, [('":', 0.0)]),
        entry(
            " false",
            math.log(0.8),
            [(" false", math.log(0.8)), (" f", math.log(0.05)), (" true", math.log(0.15))],
        ),
        entry(', "', 0.0, [(', "', 0.0)]),
        entry("violence", 0.0, [("violence", 0.0)]),
        entry('": ', 0.0, [('": ', 0.0)]),
        entry("tr", math.log(0.6), [("tr", math.log(0.6)), ("fa", math.log(0.2))]),
        entry("ue", 0.0, [("ue", 0.0)]),
        entry("}", 0.0, [("}", 0.0)]),
    ]
    scores = value_scores(logprobs, ["hate", "violence", "missing"])
    assert scores["hate"] == pytest.approx(0.15)
    assert scores["violence"] == pytest.approx(0.75)
    assert scores["missing"] is None
