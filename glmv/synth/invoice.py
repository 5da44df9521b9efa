"""Chinese VAT invoices (增值税专用发票 / 普通发票 / 电子发票) for the `invoice` schema."""

from __future__ import annotations

import random
from typing import Any

from glmv.synth.canvas import Augment, Canvas, paper_colour
from glmv.synth.document import SyntheticDocument
from glmv.synth.fonts import FontSet
from glmv.synth.formats import amount_value, capital_amount, digits, money, random_date, tax_id
from glmv.synth.questions import ask
from glmv.synth.words import company_zh, invoice_item, person_zh

__all__ = ["make_invoice"]

TYPES = ("增值税专用发票", "增值税普通发票", "电子发票（普通发票）")
_SERVICE_WORDS = ("服务", "费", "工程款")
_REMARKS = ("合同号：HT{n}", "项目编号：XM{n}", "订单号：{n}")


def _rate(name: str, rng: random.Random) -> int:
    if any(w in name for w in _SERVICE_WORDS):
        return rng.choice((6, 6, 9, 3))
    return rng.choice((13, 13, 13, 9, 1))


def make_invoice(
    rng: random.Random, fonts: FontSet, augment: Augment, lang: str | None = None
) -> SyntheticDocument:
    face = rng.choice(fonts.cjk)
    paper = paper_colour(rng)
    accent = (rng.randint(120, 170), rng.randint(50, 90), rng.randint(20, 60))  # the brown print of the form
    ink = (rng.randint(0, 40), rng.randint(0, 40), rng.randint(0, 60))
    kind = rng.choices(TYPES, weights=(4, 4, 2))[0]
    electronic = kind.startswith("电子")
    code = None if electronic else digits(rng, rng.choice((10, 12)))
    number = digits(rng, 20) if electronic else digits(rng, 8, first_nonzero=False)
    date = random_date(rng)
    buyer, seller = company_zh(rng), company_zh(rng)
    while seller == buyer:
        seller = company_zh(rng)
    buyer_id, seller_id = tax_id(rng), tax_id(rng)
    n_items = rng.choices((1, 2, 3), weights=(4, 4, 2))[0]
    items: list[dict[str, Any]] = []
    for _ in range(n_items):
        name, model, unit_name, price = invoice_item(rng)
        qty = rng.choices((1, 2, 3, 4, 5, 6, 8, 10, 12, 20), weights=(8, 4, 3, 2, 2, 1, 1, 1, 1, 1))[0]
        rate = _rate(name, rng)
        amount = qty * price
        items.append(
            {
                "name": name,
                "model": model,
                "unit": unit_name,
                "qty": qty,
                "price": price,
                "amount": amount,
                "rate": rate,
                "tax": round(amount * rate / 100),
            }
        )
    net = sum(i["amount"] for i in items)
    tax = sum(i["tax"] for i in items)
    total = net + tax
    remark = rng.choice(_REMARKS).format(n=digits(rng, 6)) if rng.random() < 0.3 else None
    payee, checker, drawer = person_zh(rng), person_zh(rng), person_zh(rng)

    width, height = 672, rng.choice((392, 420))
    scale = Canvas.pick_scale(rng, augment)
    cv = Canvas(width, height, paper, scale)
    fs = rng.choice((12, 13))
    key = fs + rng.choice((1, 2))
    x0, x1 = 16, width - 16
    y = rng.randint(8, 16)
    lines: list[str] = []

    cv.text(width / 2 - 60, y, kind, face, 20, accent, anchor="ma", bold=True)
    lines.append(kind)
    right_x = 452
    top = y
    if code:
        cv.text(right_x, top, "发票代码：", face, key, accent)
        cv.text(right_x + cv.width_of("发票代码：", face, key), top, code, face, key, ink)
        lines.append(f"发票代码：{code}")
        top += key + 6
    cv.text(right_x if not electronic else right_x - 60, top, "发票号码：", face, key, accent)
    nx = (right_x if not electronic else right_x - 60) + cv.width_of("发票号码：", face, key)
    cv.text(nx, top, number, face, key, ink)
    lines.append(f"发票号码：{number}")
    top += key + 6
    date_text = date.printed("zh")
    cv.text(right_x, top, "开票日期：", face, key, accent)
    cv.text(right_x + cv.width_of("开票日期：", face, key), top, date_text, face, key, ink)
    lines.append(f"开票日期：{date_text}")
    y = max(y + 34, top + key + 10)

    def party(y: float, label: str, name: str, pid: str) -> float:
        box_h = 2 * (fs + 9) + 6
        cv.rect(x0, y, x1, y + box_h, outline=accent)
        cv.line(x0 + 24, y, x0 + 24, y + box_h, accent)
        for i, ch in enumerate(label):
            cv.text(x0 + 12, y + 4 + i * (box_h - 8) / len(label), ch, face, fs - 1, accent, anchor="ma")
        lx = x0 + 32
        cv.text(lx, y + 5, "名    称：", face, fs, accent)
        cv.text(lx + cv.width_of("名    称：", face, fs), y + 5, name, face, key, ink)
        cv.text(lx, y + 5 + fs + 9, "纳税人识别号：", face, fs, accent)
        cv.text(lx + cv.width_of("纳税人识别号：", face, fs), y + 5 + fs + 9, pid, face, key, ink)
        lines.extend((f"名称：{name}", f"纳税人识别号：{pid}"))
        return y + box_h

    lines.append("购买方")
    y = party(y, "购买方", buyer, buyer_id) + 4
    cols = (  # (header, x, anchor)
        ("货物或应税劳务、服务名称", x0 + 4, "la"),
        ("规格型号", 222, "la"),
        ("单位", 300, "ma"),
        ("数量", 352, "ra"),
        ("单价", 440, "ra"),
        ("金额", 530, "ra"),
        ("税率", 566, "ma"),
        ("税额", x1 - 4, "ra"),
    )
    row_h = fs + 8
    table_top = y
    for header, x, anchor in cols:
        cv.text(x, y + 3, header, face, fs - 1, accent, anchor=anchor)
    lines.append(" ".join(c[0] for c in cols))
    y += row_h
    for it in items:
        cells = (
            it["name"],
            it["model"] or "",
            it["unit"],
            str(it["qty"]),
            money(it["price"]),
            money(it["amount"]),
            f"{it['rate']}%",
            money(it["tax"]),
        )
        for (_, x, anchor), cell in zip(cols, cells, strict=True):
            size = cv.fit_size(cell, face, fs, 200) if cell is cells[0] else fs
            cv.text(x, y + 3, cell, face, size, ink, anchor=anchor)
        lines.append(" ".join(c for c in cells if c))
        y += row_h
    y += row_h * (3 - n_items) * 0.6
    cv.text(x0 + 40, y + 3, "合    计", face, fs, accent)
    cv.text(530, y + 3, f"¥{money(net)}", face, key, ink, anchor="ra")
    cv.text(x1 - 4, y + 3, f"¥{money(tax)}", face, key, ink, anchor="ra")
    lines.append(f"合计 ¥{money(net)} ¥{money(tax)}")
    y += row_h + 2
    cv.rect(x0, table_top, x1, y, outline=accent)
    cv.line(x0, table_top + row_h, x1, table_top + row_h, accent)
    words = capital_amount(total)
    cv.text(x0 + 6, y + 4, "价税合计（大写）", face, fs, accent)
    cv.text(x0 + 6 + cv.width_of("价税合计（大写）", face, fs) + 8, y + 3, f"⊗{words}", face, key, ink)
    cv.text(470, y + 4, "（小写）", face, fs, accent)
    cv.text(470 + cv.width_of("（小写）", face, fs), y + 2, f"¥{money(total)}", face, key + 1, ink, bold=True)
    lines.append(f"价税合计（大写）⊗{words} （小写）¥{money(total)}")
    y += row_h + 6
    cv.rect(x0, y - 3, x1, y - 3, outline=accent)
    lines.append("销售方")
    y = party(y, "销售方", seller, seller_id) + 4
    if remark:
        cv.text(x0 + 4, y + 2, "备注：", face, fs, accent)
        cv.text(x0 + 4 + cv.width_of("备注：", face, fs), y + 2, remark, face, fs, ink)
        lines.append(f"备注：{remark}")
        y += row_h
    footer = f"收款人：{payee}   复核：{checker}   开票人：{drawer}"
    cv.text(x0 + 4, min(y + 4, height - fs - 6), footer, face, fs - 1, accent)
    lines.append(footer)
    image = cv.finish(rng, augment)

    data: dict[str, Any] = {
        "发票类型": kind,
        "发票代码": code,
        "发票号码": number,
        "开票日期": date.iso(),
        "购买方": {"名称": buyer, "纳税人识别号": buyer_id},
        "销售方": {"名称": seller, "纳税人识别号": seller_id},
        "项目": [
            {
                "名称": it["name"],
                "规格型号": it["model"],
                "单位": it["unit"],
                "数量": it["qty"],
                "单价": amount_value(it["price"]),
                "金额": amount_value(it["amount"]),
                "税率": f"{it['rate']}%",
                "税额": amount_value(it["tax"]),
            }
            for it in items
        ],
        "金额": amount_value(net),
        "税额": amount_value(tax),
        "价税合计": amount_value(total),
        "价税合计大写": words,
        "备注": remark,
    }
    qa = [
        ask(rng, "total", money(total), "zh"),
        ask(rng, "date", date.iso(), "zh"),
        ask(rng, "invoice_number", number, "zh"),
        ask(rng, "seller", seller, "zh"),
        ask(rng, "buyer", buyer, "zh"),
        ask(rng, "tax", money(tax), "zh"),
        ask(rng, "net_amount", money(net), "zh"),
        ask(rng, "invoice_type", kind, "zh"),
    ]
    if code:
        qa.append(ask(rng, "invoice_code", code, "zh"))
    return SyntheticDocument("invoice", "zh", image, lines, "invoice", data, qa, glyphs=cv.glyphs)
