"""Built-in extraction schemas and their prompt presets (role + task + constraints).

`BUILTIN_SCHEMAS` maps a name (`invoice`, `receipt`, `id_card`, `business_license`, `table`,
`chat_screenshot`) to an `ExtractionPreset`: the JSON Schema the output is constrained to, and
the prompt that asks for it. Every field is bounded (string lengths and patterns, amounts with two
decimals, list lengths), so a constrained generation always ends in a complete document, and a
field the image does not show is `null` rather than a guess.

`extraction_prompt(schema, instructions)` builds the prompt for an inline schema the same way.
`example_document(name)` is a valid, realistic document per schema (documentation, benchmarks,
tests).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BUILTIN_SCHEMAS",
    "ExtractionPreset",
    "example_document",
    "extraction_prompt",
    "schema_outline",
]


def _s(
    max_length: int, description: str, *, nullable: bool = True, pattern: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"type": ["string", "null"] if nullable else "string", "description": description}
    if pattern is not None:
        out["pattern"] = pattern
    else:
        out["maxLength"] = max_length
    return out


def _amount(description: str, *, nullable: bool = True, minimum: float = -1e12) -> dict[str, Any]:
    return {
        "type": ["number", "null"] if nullable else "number",
        "multipleOf": 0.01,
        "minimum": minimum,
        "maximum": 1e12,
        "description": description,
    }


def _obj(properties: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    if description:
        out["description"] = description
    return out


_DATE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
_TIME = r"^[0-9]{2}:[0-9]{2}(:[0-9]{2})?$"

_PARTY = _obj(
    {
        "名称": _s(80, "单位或个人名称"),
        "纳税人识别号": _s(
            0, "统一社会信用代码/纳税人识别号，15-20 位数字或大写字母", pattern=r"^[0-9A-Z]{15,20}$"
        ),
    }
)

INVOICE_SCHEMA = _obj(
    {
        "发票类型": _s(30, "如 增值税专用发票、增值税普通发票、电子发票（普通发票）"),
        "发票代码": _s(0, "10 或 12 位数字；数电发票没有发票代码，填 null", pattern=r"^[0-9]{10,12}$"),
        "发票号码": _s(0, "8 位（或数电发票 20 位）数字", pattern=r"^[0-9]{8,20}$"),
        "开票日期": _s(0, "YYYY-MM-DD", pattern=_DATE),
        "购买方": _PARTY,
        "销售方": _PARTY,
        "项目": {
            "type": "array",
            "maxItems": 30,
            "description": "货物或应税劳务、服务明细，每行一项",
            "items": _obj(
                {
                    "名称": _s(60, "货物或应税劳务、服务名称，如 *餐饮服务*餐费"),
                    "规格型号": _s(30, "规格型号"),
                    "单位": _s(8, "单位"),
                    "数量": {"type": ["number", "null"], "minimum": 0, "maximum": 1e9, "multipleOf": 0.0001},
                    "单价": _amount("不含税单价"),
                    "金额": _amount("不含税金额"),
                    "税率": _s(0, "如 13%、6%、免税", pattern=r"^([0-9]{1,2}(\.[0-9])?%|免税|不征税)$"),
                    "税额": _amount("税额"),
                }
            ),
        },
        "金额": _amount("合计金额（不含税）"),
        "税额": _amount("合计税额"),
        "价税合计": _amount("价税合计（小写）"),
        "价税合计大写": _s(40, "如 壹仟壹佰叁拾圆整"),
        "备注": _s(120, "备注栏"),
    },
    "中华人民共和国增值税发票（专票、普票、电子发票、数电发票）",
)

RECEIPT_SCHEMA = _obj(
    {
        "merchant": _s(80, "store or merchant name"),
        "date": _s(0, "YYYY-MM-DD", pattern=_DATE),
        "time": _s(0, "HH:MM or HH:MM:SS", pattern=_TIME),
        "items": {
            "type": "array",
            "maxItems": 40,
            "items": _obj(
                {
                    "name": _s(60, "item as printed", nullable=False),
                    "quantity": {
                        "type": ["number", "null"],
                        "minimum": 0,
                        "maximum": 1e6,
                        "multipleOf": 0.001,
                    },
                    "unit_price": _amount("price of one unit"),
                    "amount": _amount("line total", nullable=False),
                }
            ),
        },
        "subtotal": _amount("before tax and tip"),
        "tax": _amount("tax"),
        "total": _amount("amount paid", nullable=False),
        "currency": _s(0, "ISO 4217 code such as CNY, USD", pattern=r"^[A-Z]{3}$"),
        "payment_method": _s(30, "cash, card, WeChat Pay, Alipay, ..."),
    },
    "A shop, restaurant or taxi receipt",
)

ID_CARD_SCHEMA = _obj(
    {
        "姓名": _s(30, "姓名"),
        "性别": {"type": ["string", "null"], "enum": ["男", "女", None]},
        "民族": _s(12, "民族，如 汉"),
        "出生日期": _s(0, "YYYY-MM-DD", pattern=_DATE),
        "住址": _s(100, "住址"),
        "公民身份号码": _s(0, "18 位，末位可为 X", pattern=r"^[0-9]{17}[0-9X]$"),
        "签发机关": _s(40, "背面：签发机关"),
        "有效期限": _s(30, "背面：如 2015.03.01-2035.03.01 或 长期"),
    },
    "中华人民共和国居民身份证（正面或背面；看不到的一面填 null）",
)

BUSINESS_LICENSE_SCHEMA = _obj(
    {
        "统一社会信用代码": _s(0, "18 位数字或大写字母", pattern=r"^[0-9A-Z]{18}$"),
        "名称": _s(80, "企业名称"),
        "类型": _s(40, "如 有限责任公司（自然人投资或控股）"),
        "法定代表人": _s(30, "法定代表人或负责人、经营者"),
        "注册资本": _s(40, "如 壹佰万元整"),
        "成立日期": _s(0, "YYYY-MM-DD", pattern=_DATE),
        "营业期限": _s(40, "如 2018-05-10 至 长期"),
        "住所": _s(100, "住所或经营场所"),
        "经营范围": _s(400, "经营范围全文"),
        "登记机关": _s(40, "登记机关"),
    },
    "中华人民共和国营业执照",
)

TABLE_SCHEMA = _obj(
    {
        "title": _s(80, "the table's caption or title"),
        "columns": {
            "type": "array",
            "maxItems": 20,
            "items": _s(40, "column header; null for an empty header cell"),
        },
        "rows": {
            "type": "array",
            "maxItems": 100,
            "items": {"type": "array", "maxItems": 20, "items": _s(80, "cell text as shown")},
        },
    },
    "A table: its header row and body rows, cells as text in column order",
)

CHAT_SCREENSHOT_SCHEMA = _obj(
    {
        "app": _s(20, "WeChat, QQ, DingTalk, WhatsApp, Telegram, ..."),
        "title": _s(60, "conversation or group name at the top"),
        "messages": {
            "type": "array",
            "maxItems": 60,
            "items": _obj(
                {
                    "sender": _s(40, "display name; null for your own messages when no name is shown"),
                    "is_self": {"type": "boolean", "description": "true for messages on the right-hand side"},
                    "time": _s(30, "time shown next to or above the message"),
                    "text": _s(500, "message text; null for an image, sticker or voice message"),
                    "kind": {
                        "type": "string",
                        "enum": ["text", "image", "sticker", "voice", "file", "link", "other"],
                    },
                }
            ),
        },
    },
    "A screenshot of a chat conversation, messages in reading order",
)


@dataclass(frozen=True, slots=True)
class ExtractionPreset:
    """A built-in schema and how to ask for it."""

    name: str
    description: str
    schema: dict[str, Any]
    role: str
    task: str
    constraints: tuple[str, ...]

    def prompt(self, instructions: str | None = None) -> str:
        label = "输出格式：" if any("\u4e00" <= ch <= "\u9fff" for ch in self.role) else "Output format:"
        return _render(self.role, self.task, self.constraints, self.schema, instructions, label)


_COMMON_ZH = (
    "只输出一个 JSON 对象，格式如下，不要输出解释或 Markdown。",
    "图片上看不到或无法辨认的字段填 null，不要猜测或编造。",
    "照原样抄写文字和数字，不要翻译或改写。",
)
_COMMON_EN = (
    "Output one JSON object in the format below, and nothing else (no prose, no Markdown).",
    "Use null for a field the image does not show or that cannot be read; never guess.",
    "Copy text and numbers exactly as printed; do not translate or rephrase.",
)

BUILTIN_SCHEMAS: dict[str, ExtractionPreset] = {
    p.name: p
    for p in (
        ExtractionPreset(
            "invoice",
            "Chinese VAT invoice (增值税发票): codes, date, buyer and seller, line items, amounts",
            INVOICE_SCHEMA,
            "你是一名严谨的财务票据录入员，熟悉中国增值税发票的版式。",
            "从图片中的增值税发票上抽取发票信息：发票代码、发票号码、开票日期、购买方和销售方的名称与纳税人识别号、"
            "每一行项目明细，以及金额、税额、价税合计。",
            (
                *_COMMON_ZH,
                "金额、税额、单价写成数字，最多两位小数，不带货币符号和千分位逗号。",
                "日期写成 YYYY-MM-DD。",
            ),
        ),
        ExtractionPreset(
            "receipt",
            "Shop, restaurant or taxi receipt: merchant, date, items, totals",
            RECEIPT_SCHEMA,
            "You are a meticulous bookkeeping assistant who reads receipts from any country.",
            "Extract the merchant, the date and time, every purchased item with its quantity and price, and "
            "the subtotal, tax, total, currency and payment method from the receipt in the image.",
            (
                *_COMMON_EN,
                "Amounts are plain numbers with at most two decimals, no currency symbols.",
                "Dates are YYYY-MM-DD.",
            ),
        ),
        ExtractionPreset(
            "id_card",
            "Chinese resident identity card (居民身份证), front and/or back",
            ID_CARD_SCHEMA,
            "你是一名证件信息录入员，负责准确录入居民身份证信息。",
            "从图片中的居民身份证上抽取姓名、性别、民族、出生日期、住址、公民身份号码；如有背面，抽取签发机关和有效期限。",
            (*_COMMON_ZH, "出生日期写成 YYYY-MM-DD。"),
        ),
        ExtractionPreset(
            "business_license",
            "Chinese business license (营业执照)",
            BUSINESS_LICENSE_SCHEMA,
            "你是一名企业资质审核员，熟悉营业执照的版式。",
            "从图片中的营业执照上抽取统一社会信用代码、名称、类型、法定代表人、注册资本、成立日期、营业期限、住所、"
            "经营范围和登记机关。",
            (*_COMMON_ZH, "成立日期写成 YYYY-MM-DD。"),
        ),
        ExtractionPreset(
            "table",
            "Any table: header and rows as text",
            TABLE_SCHEMA,
            "You are a precise data-entry assistant who transcribes tables.",
            "Transcribe the table in the image: its title, the column headers, and every body row as a list of "
            "cell texts in column order.",
            (
                *_COMMON_EN,
                "Every row has one cell per column; an empty cell is null.",
                "Merged cells repeat their text in each column they span.",
            ),
        ),
        ExtractionPreset(
            "chat_screenshot",
            "Chat screenshot (WeChat, QQ, DingTalk, ...): messages with sender, time and text",
            CHAT_SCREENSHOT_SCHEMA,
            "You are an assistant who transcribes chat screenshots faithfully.",
            "List every message in the chat screenshot in reading order, with its sender, whether it is the "
            "screenshot owner's own message (right-hand side), the time shown, and its text.",
            (
                *_COMMON_EN,
                "Messages without a visible time get null; a time shown above a group of "
                "messages applies to the first message after it.",
            ),
        ),
    )
}


def schema_outline(schema: Mapping[str, Any]) -> str:
    """The schema as a short, readable outline for the prompt (keys, types, notes), e.g.

        {
          "发票号码": string or null, pattern ^[0-9]{8,20}$  // 8 位（或数电发票 20 位）数字
          "项目": [  // at most 30
            { ... }
          ]
        }

    Parts it does not know how to outline (anyOf, $ref, ...) appear as compact JSON."""
    return "\n".join(_outline(schema, 0, None))


_OUTLINED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "description",
        "pattern",
        "format",
        "maxLength",
        "minLength",
        "maxItems",
        "minItems",
        "minimum",
        "maximum",
        "multipleOf",
        "title",
    }
)


def _note(schema: Mapping[str, Any], extra: list[str]) -> str:
    notes = list(extra)
    if isinstance(schema.get("description"), str):
        notes.append(schema["description"])
    return ("  // " + "; ".join(notes)) if notes else ""


def _scalar(schema: Mapping[str, Any]) -> tuple[str, list[str]]:
    if "enum" in schema:
        return " | ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"]), []
    if "const" in schema:
        return json.dumps(schema["const"], ensure_ascii=False), []
    kinds = schema.get("type", "any")
    text = " or ".join(kinds) if isinstance(kinds, list) else str(kinds)
    bits = []
    if "pattern" in schema:
        bits.append(f"pattern {schema['pattern']}")
    if "format" in schema:
        bits.append(f"format {schema['format']}")
    if "maxLength" in schema:
        bits.append(f"at most {schema['maxLength']} characters")
    if schema.get("multipleOf") == 0.01:
        bits.append("two decimals")
    if bits:
        text += ", " + ", ".join(bits)
    return text, []


def _outline(schema: Any, depth: int, key: str | None) -> list[str]:
    pad = "  " * depth
    head = f"{pad}{json.dumps(key, ensure_ascii=False)}: " if key is not None else pad
    if not isinstance(schema, Mapping) or set(schema) - _OUTLINED:
        return [head + json.dumps(schema, ensure_ascii=False, separators=(",", ":"))]
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if "object" in kinds and isinstance(schema.get("properties"), Mapping):
        lines = [head + "{" + _note(schema, [])]
        for name, sub in schema["properties"].items():
            lines += _outline(sub, depth + 1, name)
        return [*lines, pad + "}"]
    if "array" in kinds and isinstance(schema.get("items"), Mapping):
        extra = [f"at most {schema['maxItems']}"] if "maxItems" in schema else []
        lines = [head + "[" + _note(schema, extra)]
        lines += _outline(schema["items"], depth + 1, None)
        return [*lines, pad + "]"]
    text, extra = _scalar(schema)
    return [head + text + _note(schema, extra)]


def _render(
    role: str,
    task: str,
    constraints: tuple[str, ...],
    schema: Mapping[str, Any],
    instructions: str | None,
    label: str = "Output format:",
) -> str:
    lines = [role, "", task]
    if instructions:
        lines += ["", instructions.strip()]
    lines += ["", *(f"- {c}" for c in constraints), "", label, schema_outline(schema)]
    return "\n".join(lines)


def extraction_prompt(schema: Mapping[str, Any], instructions: str | None = None) -> str:
    """The prompt for an inline schema: a generic role and task, the same constraints."""
    return _render(
        "You are a meticulous data-extraction assistant.",
        "Read the image(s) and extract the information the format below describes.",
        _COMMON_EN,
        schema,
        instructions,
    )


_EXAMPLES: dict[str, dict[str, Any]] = {
    "invoice": {
        "发票类型": "增值税专用发票",
        "发票代码": "3100204130",
        "发票号码": "04879632",
        "开票日期": "2024-03-15",
        "购买方": {"名称": "上海明远科技有限公司", "纳税人识别号": "91310115MA1H7XK2X3"},
        "销售方": {"名称": "杭州云启信息技术有限公司", "纳税人识别号": "91330106MA2B1C4D5E"},
        "项目": [
            {
                "名称": "*信息技术服务*软件维护费",
                "规格型号": None,
                "单位": "年",
                "数量": 1,
                "单价": 10000.0,
                "金额": 10000.0,
                "税率": "6%",
                "税额": 600.0,
            },
            {
                "名称": "*计算机外部设备*扫描仪",
                "规格型号": "DS-530II",
                "单位": "台",
                "数量": 2,
                "单价": 1150.44,
                "金额": 2300.88,
                "税率": "13%",
                "税额": 299.12,
            },
        ],
        "金额": 12300.88,
        "税额": 899.12,
        "价税合计": 13200.0,
        "价税合计大写": "壹万叁仟贰佰圆整",
        "备注": None,
    },
    "receipt": {
        "merchant": "Blue Bottle Coffee",
        "date": "2024-05-02",
        "time": "08:41",
        "items": [
            {"name": "Latte 12oz", "quantity": 1, "unit_price": 5.75, "amount": 5.75},
            {"name": "Croissant", "quantity": 2, "unit_price": 4.25, "amount": 8.5},
        ],
        "subtotal": 14.25,
        "tax": 1.23,
        "total": 15.48,
        "currency": "USD",
        "payment_method": "card",
    },
    "id_card": {
        "姓名": "张三",
        "性别": "男",
        "民族": "汉",
        "出生日期": "1990-01-01",
        "住址": "北京市东城区示例路1号",
        "公民身份号码": "11010119900101001X",
        "签发机关": None,
        "有效期限": None,
    },
    "business_license": {
        "统一社会信用代码": "91110108MA01ABCD2E",
        "名称": "北京示例科技有限公司",
        "类型": "有限责任公司（自然人投资或控股）",
        "法定代表人": "李四",
        "注册资本": "壹佰万元整",
        "成立日期": "2018-05-10",
        "营业期限": "2018-05-10 至 长期",
        "住所": "北京市海淀区示例大街2号",
        "经营范围": "技术开发、技术咨询、技术服务；软件开发。",
        "登记机关": "北京市海淀区市场监督管理局",
    },
    "table": {
        "title": "2023 年分季度营收",
        "columns": ["季度", "营收（万元）", "同比"],
        "rows": [["Q1", "1,204", "+8%"], ["Q2", "1,388", "+11%"], ["Q3", None, None]],
    },
    "chat_screenshot": {
        "app": "WeChat",
        "title": "项目组",
        "messages": [
            {
                "sender": "王经理",
                "is_self": False,
                "time": "10:02",
                "text": "下午三点开会，大家准时参加",
                "kind": "text",
            },
            {"sender": None, "is_self": True, "time": None, "text": "收到", "kind": "text"},
            {"sender": "王经理", "is_self": False, "time": None, "text": None, "kind": "sticker"},
        ],
    },
}


def example_document(name: str) -> dict[str, Any]:
    """A realistic document that validates against built-in schema `name`."""
    return json.loads(json.dumps(_EXAMPLES[name], ensure_ascii=False))
