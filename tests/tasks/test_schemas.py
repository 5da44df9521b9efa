"""Built-in extraction schemas: valid JSON Schemas the grammar can enforce, bounded, with
realistic example documents, and prompts in the role + task + constraints form."""

from __future__ import annotations

import jsonschema
import pytest

from glmv.engine.structured import json_schema_output, schema_errors
from glmv.tasks.schemas import BUILTIN_SCHEMAS, example_document, extraction_prompt, schema_outline

NAMES = ["invoice", "receipt", "id_card", "business_license", "table", "chat_screenshot"]


def test_the_six_built_ins() -> None:
    assert list(BUILTIN_SCHEMAS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_schema_is_valid_enforceable_and_example_fits(name: str) -> None:
    preset = BUILTIN_SCHEMAS[name]
    jsonschema.Draft202012Validator.check_schema(preset.schema)
    json_schema_output(preset.schema)  # compiles under the grammar, nothing unsupported
    assert schema_errors(preset.schema, example_document(name)) == []
    assert preset.schema["additionalProperties"] is False


def _unbounded(schema: object, path: str = "") -> list[str]:
    """Places where a generation could run on without end."""
    if not isinstance(schema, dict):
        return []
    out = []
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "string" in kinds and "enum" not in schema and "maxLength" not in schema and "pattern" not in schema:
        out.append(path or "/")
    if "number" in kinds and not ({"maximum", "minimum", "multipleOf"} <= set(schema)):
        out.append(path or "/")
    if "array" in kinds and "maxItems" not in schema:
        out.append(path or "/")
    for key, sub in (schema.get("properties") or {}).items():
        out += _unbounded(sub, f"{path}/{key}")
    if "items" in schema:
        out += _unbounded(schema["items"], f"{path}/[]")
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_field_is_bounded(name: str) -> None:
    assert _unbounded(BUILTIN_SCHEMAS[name].schema) == []


def test_invoice_has_the_vat_fields() -> None:
    schema = BUILTIN_SCHEMAS["invoice"].schema
    props = schema["properties"]
    for key in ("发票代码", "发票号码", "开票日期", "购买方", "销售方", "项目", "金额", "税额", "价税合计"):
        assert key in props
    for party in ("购买方", "销售方"):
        assert set(props[party]["properties"]) == {"名称", "纳税人识别号"}
    item = props["项目"]["items"]["properties"]
    assert {"名称", "数量", "单价", "金额", "税率", "税额"} <= set(item)
    bad = example_document("invoice") | {"开票日期": "15/03/2024"}
    assert schema_errors(schema, bad)
    bad = example_document("invoice") | {"金额": 1.005}
    assert schema_errors(schema, bad)


def test_prompt_is_role_task_constraints_then_format() -> None:
    preset = BUILTIN_SCHEMAS["invoice"]
    prompt = preset.prompt("只看第一页。")
    role, task, extra = prompt.split("\n\n")[:3]
    assert role == preset.role and task == preset.task and extra == "只看第一页。"
    assert all(f"- {c}" in prompt for c in preset.constraints)
    assert prompt.index("输出格式：") > prompt.index(preset.constraints[-1])
    assert '"价税合计": number or null, two decimals' in prompt
    english = BUILTIN_SCHEMAS["receipt"].prompt()
    assert "Output format:" in english and '"currency": string or null, pattern ^[A-Z]{3}$' in english


def test_outline_and_inline_prompt() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "full name"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
            "either": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
    }
    outline = schema_outline(schema)
    assert outline.splitlines() == [
        "{",
        '  "name": string  // full name',
        '  "tags": [  // at most 3',
        '    "a" | "b"',
        "  ]",
        '  "either": {"anyOf":[{"type":"integer"},{"type":"null"}]}',
        "}",
    ]
    prompt = extraction_prompt(schema, "Dates as ISO 8601.")
    assert prompt.startswith("You are a meticulous data-extraction assistant.")
    assert "Dates as ISO 8601." in prompt and outline in prompt
