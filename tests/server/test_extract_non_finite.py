"""`/v1/extract` when the model writes a number that parses to infinity (`1e999` is valid JSON
grammar): a 422 in OpenAI's error shape naming the field, never a 500 from the response encoder."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from glmv.server.app import create_app
from tests.tasks.scripted import ScriptedClient

from .conftest import asgi_client, make_settings

SCHEMA = {
    "type": "object",
    "properties": {"total": {"type": "number"}, "items": {"type": "array", "items": {"type": "number"}}},
    "required": ["total"],
}


def png_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def extract(model_dir: Path, answer: str) -> tuple[int, dict[str, object]]:
    client = ScriptedClient(model_dir, [(answer, [1, 2, 3], None)])
    app = create_app(make_settings(model_dir), client)
    async with asgi_client(app) as c:
        r = await c.post("/v1/extract", json={"images": [png_url()], "schema": SCHEMA})
    return r.status_code, r.json()


async def test_infinite_number_is_a_422_naming_the_field(server_model_dir: Path) -> None:
    status, body = await extract(server_model_dir, '{"total": 1e999, "items": [1.5, -1e400]}')
    assert status == 422
    error = body["error"]
    assert isinstance(error, dict)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "schema",
        "non_finite_number",
    )
    assert "$.total" in error["message"] and "$.items[1]" in error["message"]


async def test_finite_numbers_are_answered(server_model_dir: Path) -> None:
    status, body = await extract(server_model_dir, '{"total": 1e300, "items": [1.5]}')
    assert status == 200, body
    assert body["data"] == {"total": 1e300, "items": [1.5]}
