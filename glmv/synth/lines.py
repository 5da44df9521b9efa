"""Short strips of printed text (one to four lines) for teaching the demo model to read.

A document page spends most of its image tokens on paper and layout, and its answers name only a
few of its characters. A strip is a few lines of the same vocabulary the documents print
(amounts, dates, codes, times, names, items, addresses, labelled values), in the documents'
fonts, sizes and damage, on an image of a few dozen patches; its only task is to transcribe it.
Many strips fit in one batch, so every step sees thousands of characters next to the pixels that
show them: the part of reading that the document tasks teach slowly.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from glmv.synth.canvas import Augment, Canvas, ink_colour, paper_colour
from glmv.synth.document import SyntheticDocument
from glmv.synth.fonts import FontSet
from glmv.synth.formats import digits, money, random_date, tax_id
from glmv.synth.words import company_zh, en_item, en_merchant, person_zh, zh_address, zh_item, zh_merchant

__all__ = ["TEXT_LINES_KIND", "make_text_lines"]

TEXT_LINES_KIND = "text_lines"
PATCH = 28  # one merged image token covers 28 x 28 pixels: sizes are multiples of it


def _amount(rng: random.Random) -> str:
    cents = rng.choice((rng.randint(1, 9_999), rng.randint(100, 999_999), rng.randint(10_000, 99_999_999)))
    text = money(cents, thousands=rng.random() < 0.2)
    return rng.choice(("", "", "$", "¥", "￥", "€")) + text


def _date(rng: random.Random, lang: str) -> str:
    styles = ("iso", "slash", "dot") if lang == "en" else ("iso", "dot", "zh", "zh_short")
    return random_date(rng).printed(rng.choice(styles))


def _time(rng: random.Random) -> str:
    hh, mm = rng.randint(0, 23), rng.randint(0, 59)
    return f"{hh:02d}:{mm:02d}" + (f":{rng.randint(0, 59):02d}" if rng.random() < 0.4 else "")


EN_LABELS = ("Total", "Subtotal", "Tax", "Amount", "Date", "No.", "Invoice No.", "Tel", "Order", "Paid")
ZH_LABELS = ("合计", "总计", "金额", "税额", "日期", "发票号码", "发票代码", "电话", "单号", "价税合计")


def _piece(rng: random.Random, lang: str) -> str:
    """One field's worth of text."""
    kind = rng.choices(
        ("amount", "date", "time", "code", "tax_id", "name", "item", "place", "labelled"),
        weights=(5, 3, 1, 3, 1, 2, 2, 1, 5),
    )[0]
    if kind == "amount":
        return _amount(rng)
    if kind == "date":
        return _date(rng, lang)
    if kind == "time":
        return _time(rng)
    if kind == "code":
        return digits(rng, rng.randint(4, 12))
    if kind == "tax_id":
        return tax_id(rng)
    if kind == "name":
        return (en_merchant if lang == "en" else rng.choice((zh_merchant, company_zh, person_zh)))(rng)
    if kind == "item":
        return (en_item if lang == "en" else zh_item)(rng)[0]
    if kind == "place":
        return zh_address(rng) if lang == "zh" else f"{rng.randint(1, 999)} {en_merchant(rng).split()[0]} St"
    labels = EN_LABELS if lang == "en" else ZH_LABELS
    value: Callable[[], str] = rng.choice(
        (lambda: _amount(rng), lambda: _date(rng, lang), lambda: digits(rng, 8))
    )
    sep = rng.choice((": ", " ", "：")) if lang == "zh" else rng.choice((": ", " "))
    return f"{rng.choice(labels)}{sep}{value()}"


def make_text_lines(
    rng: random.Random, fonts: FontSet, augment: Augment, lang: str | None = None
) -> SyntheticDocument:
    """A strip of one to four printed lines; `lines` is the transcription (no schema, no QA)."""
    lang = lang or ("zh" if rng.random() < 0.45 else "en")
    face = rng.choice(fonts.for_lang(lang))
    ink, paper = ink_colour(rng), paper_colour(rng)
    n_lines = rng.choices((1, 2, 3, 4), weights=(3, 3, 2, 2))[0]
    size = rng.randint(13, 20)
    lh = size * rng.uniform(1.3, 1.7)
    width = PATCH * rng.randint(6, 16)
    margin = rng.randint(4, 12)
    scale = Canvas.pick_scale(rng, augment)
    probe = Canvas(width, PATCH, paper, scale)
    lines: list[str] = []
    for _ in range(n_lines):
        text = _piece(rng, lang)
        if rng.random() < 0.35:
            text += "  " + _piece(rng, lang)
        while len(text) > 1 and probe.width_of(text, face, size) > width - 2 * margin:
            text = text[:-1].rstrip()
        lines.append(text)
    height = PATCH * max(1, -(-round(2 * margin + n_lines * lh) // PATCH))
    canvas = Canvas(width, height, paper, scale)
    align = rng.choice(("left", "left", "centre", "right"))
    top = (height - n_lines * lh) / 2
    for i, text in enumerate(lines):
        y = top + i * lh + lh / 2
        if align == "left":
            canvas.text(margin, y, text, face, size, ink, anchor="lm")
        elif align == "right":
            canvas.text(width - margin, y, text, face, size, ink, anchor="rm")
        else:
            canvas.text(width / 2, y, text, face, size, ink, anchor="mm")
    image = canvas.finish(rng, augment)
    return SyntheticDocument(TEXT_LINES_KIND, lang, image, lines, None, None, [], glyphs=canvas.glyphs)
