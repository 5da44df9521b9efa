"""Shop and restaurant receipts (English and Chinese) for the `receipt` schema."""

from __future__ import annotations

import math
import random
from typing import Any

from glmv.synth.canvas import Augment, Canvas, ink_colour, paper_colour
from glmv.synth.document import QA, SyntheticDocument
from glmv.synth.fonts import FontSet
from glmv.synth.formats import amount_value, digits, money, random_date
from glmv.synth.questions import ask
from glmv.synth.words import en_item, en_merchant, zh_address, zh_item, zh_merchant

__all__ = ["make_receipt"]

EN_STREETS = ("Market St", "Main St", "High St", "King Rd", "Park Ave", "Queen St", "Bay Rd", "Elm St")
EN_CITIES = ("Springfield", "Riverside", "Portland", "Bristol", "Oakland", "Camden", "Austin", "Leeds")
CURRENCIES_EN = (("$", "USD"), ("$", "USD"), ("$", "USD"), ("€", "EUR"), ("£", "GBP"))
PAY_EN = ("VISA", "Mastercard", "Cash", "Debit Card", "Apple Pay", "AMEX")
PAY_ZH = ("微信支付", "支付宝", "现金", "银行卡", "云闪付")


def _rows(rng: random.Random, lang: str) -> dict[str, Any]:
    """Draw the receipt's content (amounts in cents)."""
    n_items = rng.choices((1, 2, 3, 4, 5, 6), weights=(2, 4, 5, 4, 3, 2))[0]
    items: list[tuple[str, int, int]] = []  # (name, quantity, unit cents)
    names: set[str] = set()
    while len(items) < n_items:
        name, unit = en_item(rng) if lang == "en" else zh_item(rng)
        if name in names:
            continue
        names.add(name)
        qty = rng.choices((1, 2, 3, 4, 5), weights=(10, 4, 2, 1, 1))[0]
        items.append((name, qty, unit))
    subtotal = sum(q * u for _, q, u in items)
    tax_rate = 0
    if lang == "en" and rng.random() < 0.55:
        tax_rate = rng.choice((5, 6, 7, 8, 10, 13))
    elif lang == "zh" and rng.random() < 0.15:
        tax_rate = rng.choice((6, 13))
    tax = round(subtotal * tax_rate / 100)
    return {"items": items, "subtotal": subtotal, "tax_rate": tax_rate, "tax": tax, "total": subtotal + tax}


def make_receipt(
    rng: random.Random, fonts: FontSet, augment: Augment, lang: str | None = None
) -> SyntheticDocument:
    lang = lang or ("zh" if rng.random() < 0.4 else "en")
    face = rng.choice(fonts.for_lang(lang))
    ink = ink_colour(rng)
    paper = paper_colour(rng)
    content = _rows(rng, lang)
    items: list[tuple[str, int, int]] = content["items"]
    merchant = en_merchant(rng) if lang == "en" else zh_merchant(rng)
    date = random_date(rng)
    date_text = date.printed(rng.choice(("iso", "iso", "slash", "dot")))
    hh, mm, ss = rng.randint(7, 22), rng.randint(0, 59), rng.randint(0, 59)
    time_text = f"{hh:02d}:{mm:02d}" + (f":{ss:02d}" if rng.random() < 0.3 else "")
    if lang == "en":
        symbol, currency = rng.choice(CURRENCIES_EN)
        pay = rng.choice(PAY_EN) if rng.random() < 0.85 else None
    else:
        symbol, currency = rng.choice(("¥", "¥", "￥", "元")), "CNY"
        pay = rng.choice(PAY_ZH) if rng.random() < 0.85 else None
    show_subtotal = content["tax"] > 0 or rng.random() < 0.45
    layout = rng.choice(("columns", "columns", "times", "two_line"))

    width = rng.choice((336, 364, 392))
    size = rng.randint(14, 17) if width > 336 else rng.randint(14, 16)
    lh = size * rng.uniform(1.35, 1.55)
    margin = rng.randint(10, 18)
    right = width - margin

    # (kind, payload) rows; their height decides the page height
    rows: list[tuple[str, Any]] = [("title", merchant)]
    if rng.random() < 0.6:
        if lang == "en":
            rows.append(
                ("center", f"{rng.randint(1, 999)} {rng.choice(EN_STREETS)}, {rng.choice(EN_CITIES)}")
            )
        else:
            rows.append(("center", zh_address(rng)))
    if rng.random() < 0.4:
        phone = f"{rng.choice(('010', '021', '0755', '020'))}-{digits(rng, 8)}"
        rows.append(("center", f"Tel: {phone}" if lang == "en" else f"电话：{phone}"))
    rows.append(("sep", None))
    if lang == "en":
        rows.append(
            ("left", rng.choice((f"Date: {date_text}  Time: {time_text}", f"{date_text} {time_text}")))
        )
    else:
        rows.append(
            ("left", rng.choice((f"日期：{date_text} 时间：{time_text}", f"{date_text} {time_text}")))
        )
    number = None
    if rng.random() < 0.6:
        number = digits(rng, rng.choice((4, 6, 8)), first_nonzero=False)
        rows.append(("left", f"Receipt No: {number}" if lang == "en" else f"单号：{number}"))
    rows.append(("sep", None))
    if layout == "columns" and rng.random() < 0.7:
        rows.append(
            (
                "header",
                ("Item", "Qty", "Price", "Amount") if lang == "en" else ("商品", "数量", "单价", "金额"),
            )
        )
    for name, qty, unit in items:
        rows.append(("item", (name, qty, unit)))
        if layout == "two_line":
            rows.append(("item2", (name, qty, unit)))
    rows.append(("sep", None))
    if show_subtotal:
        rows.append(("pair", ("Subtotal" if lang == "en" else "小计", money(content["subtotal"]))))
    if content["tax"]:
        label = f"Tax {content['tax_rate']}%" if lang == "en" else f"税额({content['tax_rate']}%)"
        rows.append(("pair", (label, money(content["tax"]))))
    total_text = f"{money(content['total'])}元" if symbol == "元" else f"{symbol}{money(content['total'])}"
    total_label = (
        rng.choice(("TOTAL", "Total", "Total Due"))
        if lang == "en"
        else rng.choice(("合计", "总计", "实付金额"))
    )
    rows.append(("total", (total_label, total_text)))
    if pay:
        if lang == "en":
            pay_line = f"Paid by: {pay}" + (
                f" ****{digits(rng, 4, False)}" if pay in ("VISA", "Mastercard", "AMEX") else ""
            )
        else:
            pay_line = f"支付方式：{pay}"
        rows.append(("left", pay_line))
    if rng.random() < 0.7:
        rows.append(
            (
                "center",
                rng.choice(("Thank you!", "Thank you for shopping with us", "Please come again"))
                if lang == "en"
                else rng.choice(("谢谢惠顾", "欢迎再次光临", "请保留小票")),
            )
        )

    heights = {"title": size * 1.9, "sep": lh * 0.6, "total": lh * 1.35}
    need = sum(heights.get(kind, lh) for kind, _ in rows) + 2 * margin
    height = min(784, 28 * math.ceil((need + rng.randint(0, 30)) / 28))
    scale = Canvas.pick_scale(rng, augment)
    cv = Canvas(width, height, paper, scale)
    y = margin + rng.uniform(0, max(0.0, height - need) * 0.6)
    lines: list[str] = []
    col_qty, col_price = width * rng.uniform(0.52, 0.56), width * rng.uniform(0.72, 0.75)
    for kind, payload in rows:
        if kind == "title":
            ts = cv.fit_size(payload, face, size + rng.randint(3, 6), width - 2 * margin, bold=True)
            cv.text(width / 2, y, payload, face, ts, ink, anchor="ma", bold=True)
            lines.append(payload)
        elif kind == "center":
            ts = cv.fit_size(payload, face, size - 1, width - 2 * margin)
            cv.text(width / 2, y, payload, face, ts, ink, anchor="ma")
            lines.append(payload)
        elif kind == "left":
            ts = cv.fit_size(payload, face, size, width - 2 * margin)
            cv.text(margin, y, payload, face, ts, ink)
            lines.append(payload)
        elif kind == "sep":
            mid = y + lh * 0.25
            if rng.random() < 0.5:
                cv.dashed(margin, mid, right, ink)
            else:
                cv.line(margin, mid, right, mid, ink)
        elif kind == "header":
            a, b, c, d = payload
            cv.text(margin, y, a, face, size, ink)
            cv.text(col_qty, y, b, face, size, ink, anchor="ra")
            cv.text(col_price, y, c, face, size, ink, anchor="ra")
            cv.text(right, y, d, face, size, ink, anchor="ra")
            lines.append(f"{a} {b} {c} {d}")
        elif kind == "item":
            name, qty, unit = payload
            amount = money(qty * unit)
            if layout == "columns":
                ts = cv.fit_size(name, face, size, col_qty - margin - 26)
                cv.text(margin, y, name, face, ts, ink)
                cv.text(col_qty, y, str(qty), face, size, ink, anchor="ra")
                cv.text(col_price, y, money(unit), face, size, ink, anchor="ra")
                cv.text(right, y, amount, face, size, ink, anchor="ra")
                lines.append(f"{name} {qty} {money(unit)} {amount}")
            elif layout == "times":
                label = f"{qty} x {name}"
                ts = cv.fit_size(label, face, size, width * 0.68)
                cv.text(margin, y, label, face, ts, ink)
                cv.text(right, y, amount, face, size, ink, anchor="ra")
                lines.append(f"{label} {amount}")
            else:
                ts = cv.fit_size(name, face, size, width - 2 * margin)
                cv.text(margin, y, name, face, ts, ink)
                lines.append(name)
        elif kind == "item2":
            name, qty, unit = payload
            detail = f"{qty} x {money(unit)}"
            cv.text(margin + size, y, detail, face, size - 1, ink)
            cv.text(right, y, money(qty * unit), face, size, ink, anchor="ra")
            lines.append(f"{detail} {money(qty * unit)}")
        elif kind == "pair":
            label, value = payload
            cv.text(margin, y, label, face, size, ink)
            cv.text(right, y, value, face, size, ink, anchor="ra")
            lines.append(f"{label} {value}")
        elif kind == "total":
            label, value = payload
            ts = size + rng.randint(1, 3)
            cv.text(margin, y, label, face, ts, ink, bold=True)
            cv.text(right, y, value, face, ts, ink, anchor="ra", bold=True)
            lines.append(f"{label} {value}")
        y += heights.get(kind, lh)
    image = cv.finish(rng, augment)

    unit_printed = layout in ("columns", "two_line")
    data: dict[str, Any] = {
        "merchant": merchant,
        "date": date.iso(),
        "time": time_text,
        "items": [
            {
                "name": name,
                "quantity": qty,
                "unit_price": amount_value(unit) if unit_printed else None,
                "amount": amount_value(qty * unit),
            }
            for name, qty, unit in items
        ],
        "subtotal": amount_value(content["subtotal"]) if show_subtotal else None,
        "tax": amount_value(content["tax"]) if content["tax"] else None,
        "total": amount_value(content["total"]),
        "currency": currency,
        "payment_method": pay,
    }
    qa = [
        ask(rng, "total", money(content["total"]), lang),
        ask(rng, "date", date.iso(), lang),
        ask(rng, "time", time_text, lang),
        ask(rng, "merchant", merchant, lang),
        ask(rng, "item_count", str(len(items)), lang),
    ]
    if show_subtotal:
        qa.append(ask(rng, "subtotal", money(content["subtotal"]), lang))
    if content["tax"]:
        qa.append(ask(rng, "tax", money(content["tax"]), lang))
    if pay:
        qa.append(ask(rng, "payment", pay, lang))
    if number:
        qa.append(ask(rng, "receipt_number", number, lang))
    name, qty, unit = rng.choice(items)
    qa.append(ask(rng, "item_amount", money(qty * unit), lang, item=name))
    return SyntheticDocument(
        "receipt", lang, image, lines, "receipt", data, [q for q in qa if isinstance(q, QA)], glyphs=cv.glyphs
    )
