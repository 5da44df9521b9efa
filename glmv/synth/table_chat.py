"""Small tables and chat screenshots."""

from __future__ import annotations

import math
import random
from typing import Any

from glmv.synth.canvas import Augment, Canvas, ink_colour, paper_colour
from glmv.synth.document import SyntheticDocument
from glmv.synth.fonts import FontSet
from glmv.synth.questions import ask
from glmv.synth.words import EN_FIRST, ZH_CITIES, person_zh

__all__ = ["make_chat", "make_table"]


def _theme(rng: random.Random, lang: str) -> tuple[str, list[str], list[list[str]]]:
    theme = rng.randrange(4)
    n = rng.randint(2, 5)
    if theme == 0:
        year = rng.randint(2019, 2026)
        title = f"{year} Quarterly Revenue" if lang == "en" else f"{year}年各季度销售额"
        cols = ["Quarter", "Revenue ($k)", "Growth"] if lang == "en" else ["季度", "销售额（万元）", "同比"]
        rows = [
            [f"Q{i + 1}", f"{rng.randint(80, 3000):,}", f"{rng.choice('+-')}{rng.randint(1, 40)}%"]
            for i in range(min(n, 4))
        ]
    elif theme == 1:
        title = "Inventory" if lang == "en" else "库存清单"
        cols = ["Product", "Stock", "Price"] if lang == "en" else ["产品", "库存", "单价"]
        goods = (
            ("Pens", "Paper", "Stapler", "Folder", "Tape", "Marker")
            if lang == "en"
            else ("签字笔", "打印纸", "订书机", "文件夹", "胶带", "马克笔")
        )
        rows = [
            [g, str(rng.randint(0, 500)), f"{rng.randint(1, 99)}.{rng.randint(0, 99):02d}"]
            for g in rng.sample(goods, n)
        ]
    elif theme == 2:
        title = "City Temperatures" if lang == "en" else "城市气温"
        cols = ["City", "High", "Low"] if lang == "en" else ["城市", "最高气温", "最低气温"]
        cities = (
            ("Beijing", "Shanghai", "Guangzhou", "Shenzhen", "Hangzhou", "Chengdu")
            if lang == "en"
            else ZH_CITIES
        )
        rows = []
        for c in rng.sample(cities, n):
            hi = rng.randint(-5, 38)
            rows.append([c, f"{hi}°C", f"{hi - rng.randint(3, 12)}°C"])
    else:
        title = "Exam Scores" if lang == "en" else "考试成绩"
        cols = ["Name", "Math", "English", "Science"] if lang == "en" else ["姓名", "数学", "语文", "英语"]
        names = rng.sample(EN_FIRST, n) if lang == "en" else [person_zh(rng) for _ in range(n)]
        rows = [[nm, *(str(rng.randint(40, 100)) for _ in range(3))] for nm in names]
    return title, cols, rows


def make_table(
    rng: random.Random, fonts: FontSet, augment: Augment, lang: str | None = None
) -> SyntheticDocument:
    lang = lang or ("zh" if rng.random() < 0.5 else "en")
    face = rng.choice(fonts.for_lang(lang))
    title, cols, rows = _theme(rng, lang)
    show_title = rng.random() < 0.75
    fs = rng.choice((14, 15, 16))
    row_h = fs + rng.randint(10, 14)
    width = rng.choice((392, 448, 504))
    n_lines = len(rows) + 1 + (1.6 if show_title else 0)
    height = 28 * math.ceil((n_lines * row_h + 40) / 28)
    paper = paper_colour(rng)
    ink = ink_colour(rng)
    head_bg = (rng.randint(200, 235), rng.randint(210, 240), rng.randint(220, 250))
    scale = Canvas.pick_scale(rng, augment)
    cv = Canvas(width, height, paper, scale)
    lines: list[str] = []
    y = 16
    if show_title:
        cv.text(width / 2, y, title, face, fs + 3, ink, anchor="ma", bold=True)
        lines.append(title)
        y += row_h * 1.6
    x0, x1 = 16, width - 16
    cw = (x1 - x0) / len(cols)
    grid = rng.random() < 0.6
    cv.rect(x0, y, x1, y + row_h, fill=head_bg)
    for r, row in enumerate([cols, *rows]):
        if not grid and r > 0 and r % 2 == 0:
            cv.rect(x0, y, x1, y + row_h, fill=(paper[0] - 10, paper[1] - 8, paper[2] - 6))
        for c, cell in enumerate(row):
            size = cv.fit_size(cell, face, fs, cw - 10, bold=r == 0)
            cv.text(x0 + c * cw + 6, y + (row_h - size) / 2 - 1, cell, face, size, ink, bold=r == 0)
        lines.append(" ".join(row))
        y += row_h
    top = y - row_h * (len(rows) + 1)
    if grid:
        for r in range(len(rows) + 2):
            cv.line(x0, top + r * row_h, x1, top + r * row_h, ink)
        for c in range(len(cols) + 1):
            cv.line(x0 + c * cw, top, x0 + c * cw, y, ink)
    else:
        cv.line(x0, top, x1, top, ink)
        cv.line(x0, top + row_h, x1, top + row_h, ink)
        cv.line(x0, y, x1, y, ink)
    data: dict[str, Any] = {"title": title if show_title else None, "columns": cols, "rows": rows}
    r = rng.randrange(len(rows))
    c = rng.randrange(1, len(cols))
    qa = [
        ask(rng, "row_count", str(len(rows)), lang),
        ask(rng, "cell", rows[r][c], lang, row=rows[r][0], column=cols[c]),
    ]
    if show_title:
        qa.append(ask(rng, "table_title", title, lang))
    return SyntheticDocument(
        "table", lang, cv.finish(rng, augment), lines, "table", data, qa, glyphs=cv.glyphs
    )


APPS: dict[str, dict[str, tuple[int, int, int]]] = {
    "WeChat": {
        "bg": (237, 237, 237),
        "self": (149, 236, 105),
        "other": (255, 255, 255),
        "bar": (237, 237, 237),
        "self_text": (20, 20, 20),
    },
    "QQ": {
        "bg": (245, 246, 250),
        "self": (18, 183, 245),
        "other": (255, 255, 255),
        "bar": (18, 150, 219),
        "self_text": (255, 255, 255),
    },
    "DingTalk": {
        "bg": (255, 255, 255),
        "self": (205, 228, 255),
        "other": (242, 243, 245),
        "bar": (50, 150, 250),
        "self_text": (20, 20, 20),
    },
    "WhatsApp": {
        "bg": (236, 229, 221),
        "self": (220, 248, 198),
        "other": (255, 255, 255),
        "bar": (7, 94, 84),
        "self_text": (20, 20, 20),
    },
    "Telegram": {
        "bg": (187, 210, 160),
        "self": (239, 253, 222),
        "other": (255, 255, 255),
        "bar": (82, 136, 193),
        "self_text": (20, 20, 20),
    },
}
ZH_MSGS = (
    "好的",
    "收到",
    "下午三点开会",
    "明天见",
    "我到了",
    "今天加班吗？",
    "文件已经发你了",
    "谢谢！",
    "晚上一起吃饭吧",
    "没问题",
    "稍等一下",
    "路上堵车了",
    "报告改好了",
    "周五前交",
    "辛苦了",
    "在吗？",
    "几点出发？",
    "马上到",
)
EN_MSGS = (
    "OK",
    "Got it",
    "Meeting at 3pm",
    "See you tomorrow",
    "I'm here",
    "Thanks!",
    "Sent you the file",
    "Running late",
    "Sounds good",
    "Lunch at noon?",
    "Call me later",
    "Done",
    "On my way",
    "Any update?",
    "Let's meet at 6",
    "No problem",
)
ZH_GROUPS = ("项目组", "家人群", "周末羽毛球", "市场部", "同学群", "技术交流")
EN_GROUPS = ("Project Team", "Family", "Weekend Hiking", "Marketing", "Book Club", "Dev Chat")


def make_chat(
    rng: random.Random, fonts: FontSet, augment: Augment, lang: str | None = None
) -> SyntheticDocument:
    lang = lang or ("zh" if rng.random() < 0.6 else "en")
    face = rng.choice(fonts.for_lang(lang))
    app = rng.choice(tuple(APPS))
    colours = APPS[app]
    group = rng.random() < 0.5
    others = [person_zh(rng) for _ in range(3)] if lang == "zh" else rng.sample(EN_FIRST, 3)
    title = rng.choice(ZH_GROUPS if lang == "zh" else EN_GROUPS) if group else others[0]
    n = rng.randint(2, 5)
    fs = rng.choice((14, 15))
    width = 336
    msgs: list[dict[str, Any]] = []
    for i in range(n):
        self_ = rng.random() < 0.45
        sender = None if self_ else (rng.choice(others) if group else others[0])
        show_time = i == 0 or rng.random() < 0.2
        time_text = f"{rng.randint(7, 23):02d}:{rng.randint(0, 59):02d}" if show_time else None
        kind = "text" if rng.random() < 0.88 else rng.choice(("image", "sticker"))
        text = rng.choice(ZH_MSGS if lang == "zh" else EN_MSGS) if kind == "text" else None
        msgs.append({"sender": sender, "is_self": self_, "time": time_text, "text": text, "kind": kind})
    need = 56 + sum(
        (fs + 30 if m["time"] else 0)
        + (fs + 4 if m["sender"] and group else 0)
        + (70 if m["kind"] != "text" else fs + 26)
        for m in msgs
    )
    height = min(700, 28 * math.ceil((need + 20) / 28))
    scale = Canvas.pick_scale(rng, augment)
    cv = Canvas(width, height, colours["bg"], scale)
    bar_text = (255, 255, 255) if colours["bar"] != colours["bg"] else (20, 20, 20)
    cv.rect(0, 0, width, 44, fill=colours["bar"])
    cv.text(width / 2, 13, title, face, fs + 2, bar_text, anchor="ma", bold=True)
    lines = [title]
    y = 56.0
    dark = (20, 20, 20)
    drawn = 0
    for m in msgs:
        if y + (fs + 30 if m["time"] else 0) + (fs + 4 if m["sender"] and group else 0) + 70 > height:
            break  # no room left: the JSON holds only the messages shown
        drawn += 1
        if m["time"]:
            cv.text(width / 2, y, m["time"], face, fs - 3, (140, 140, 140), anchor="ma")
            lines.append(m["time"])
            y += fs + 12
        avatar = (rng.randint(80, 200), rng.randint(80, 200), rng.randint(80, 200))
        if m["is_self"]:
            cv.rect(width - 44, y, width - 10, y + 34, fill=avatar, radius=4)
        else:
            cv.rect(10, y, 44, y + 34, fill=avatar, radius=4)
        if m["sender"] and group:
            cv.text(54, y, m["sender"], face, fs - 3, (120, 120, 120))
            lines.append(m["sender"])
            y += fs + 2
        if m["kind"] == "text":
            tw = cv.width_of(m["text"], face, fs)
            bw = tw + 20
            if m["is_self"]:
                bx = width - 52 - bw
                cv.rect(bx, y, width - 52, y + fs + 16, fill=colours["self"], radius=6)
                cv.text(bx + 10, y + 7, m["text"], face, fs, colours["self_text"])
            else:
                cv.rect(52, y, 52 + bw, y + fs + 16, fill=colours["other"], radius=6)
                cv.text(62, y + 7, m["text"], face, fs, dark)
            lines.append(m["text"])
            y += fs + 26
        else:
            bx = width - 52 - 80 if m["is_self"] else 52
            if m["kind"] == "image":
                cv.rect(bx, y, bx + 80, y + 60, fill=(180, 190, 200))
            else:
                cv.ellipse(bx + 10, y, bx + 70, y + 60, fill=(250, 200, 60))
            y += 70
    msgs = msgs[:drawn]
    data: dict[str, Any] = {"app": app, "title": title, "messages": msgs}
    texts = [m["text"] for m in msgs if m["text"]]
    qa = [ask(rng, "chat_title", title, lang), ask(rng, "message_count", str(len(msgs)), lang)]
    if texts and msgs and msgs[-1]["text"]:
        qa.append(ask(rng, "last_message", msgs[-1]["text"], lang))
    return SyntheticDocument(
        "chat_screenshot", lang, cv.finish(rng, augment), lines, "chat_screenshot", data, qa, glyphs=cv.glyphs
    )
