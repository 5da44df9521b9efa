"""Request bodies parse with msgspec where it can, and give exactly `json.loads`'s values and errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from glmv.server.json_body import JsonRoute, decode_json

BODIES = [
    b'{"a": 1, "a": 2}',
    b'{"n": 18446744073709551616, "m": -123456789012345678901234567890}',
    b"[0.1, -0.0, 1.7976931348623157e308, 5e-324, 1e400]",
    b'{"x": NaN, "y": Infinity, "z": -Infinity}',
    b'"\\ud800 lone surrogate"',
    b'"\\u0000 \\u00e9 \\ud83d\\udca5"',
    '{"中文": "发票号码", "emoji": "💥"}'.encode(),
    b"\xef\xbb\xbf{}",
    b"  [1, 2 ]  ",
]


@pytest.mark.parametrize("body", BODIES)
def test_values_equal_the_standard_parser(body: bytes) -> None:
    got, want = decode_json(body), json.loads(body)
    assert json.dumps(got) == json.dumps(want)  # NaN compares unequal; its text does not
    assert type(got) is type(want)


@pytest.mark.parametrize("body", [b'{"a": 1} trailing', b'{"a": }', b"", b"\xff\xfe"])
def test_errors_are_the_standard_parser_s(body: bytes) -> None:
    with pytest.raises(ValueError) as got:
        decode_json(body)
    with pytest.raises(ValueError) as want:
        json.loads(body)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)


async def test_the_app_routes_parse_through_it(make_app: Callable[..., Any], make_client: Any) -> None:
    app = make_app()
    posts = [r for r in app.routes if "POST" in getattr(r, "methods", ())]
    assert posts and all(isinstance(r, JsonRoute) for r in posts)
    async with make_client(app) as client:
        r = await client.post("/v1/chat/completions", content=b'{"messages": [], "model": NaN}')
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
