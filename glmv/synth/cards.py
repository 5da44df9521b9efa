"""ID-card-like cards, business licenses and business cards."""

from __future__ import annotations

import random
from typing import Any

from glmv.synth.canvas import Augment, Canvas, ink_colour, paper_colour
from glmv.synth.document import SyntheticDocument
from glmv.synth.fonts import FontSet
from glmv.synth.formats import Date, capital_amount, digits, random_date, tax_id
from glmv.synth.questions import ask
from glmv.synth.words import (
    EN_FIRST,
    EN_LAST,
    ZH_CITIES,
    ZH_DISTRICTS,
    company_zh,
    person_zh,
    zh_address,
)

__all__ = ["make_business_card", "make_business_license", "make_id_card"]

ETHNIC = ("汉", "汉", "汉", "汉", "汉", "汉", "回", "满", "壮", "苗", "蒙古", "藏", "土家", "彝")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def id_number(rng: random.Random, birth: Date, male: bool) -> str:
    """An 18-digit number with a valid ISO 7064 check character."""
    seq = rng.randint(0, 49) * 2 + (1 if male else 0)
    body = f"{rng.randint(110000, 659000)}{birth.year:04d}{birth.month:02d}{birth.day:02d}{rng.randint(0, 9)}{seq % 10}{rng.randint(0, 9)}"
    body = body[:16] + str(seq % 10)
    total = sum(int(c) * w for c, w in zip(body, _ID_WEIGHTS, strict=True))
    return body + _ID_CHECK[total % 11]


def _wrap(cv: Canvas, text: str, face: Any, size: float, width: float) -> list[str]:
    out, line = [], ""
    for ch in text:
        if line and cv.width_of(line + ch, face, size) > width:
            out.append(line)
            line = ""
        line += ch
    return [*out, line] if line else out


def make_id_card(
    rng: random.Random, fonts: FontSet, augment: Augment, lang: str | None = None
) -> SyntheticDocument:
    face = rng.choice(fonts.cjk)
    width, height = 476, 308
    bg = (rng.randint(225, 245), rng.randint(232, 248), rng.randint(240, 255))
    label_c = (rng.randint(40, 80), rng.randint(90, 130), rng.randint(150, 190))
    ink = (rng.randint(0, 30),) * 3
    scale = Canvas.pick_scale(rng, augment)
    cv = Canvas(width, height, bg, scale)
    cv.rect(4, 4, width - 4, height - 4, outline=(200, 210, 225), width=2, radius=14)
    lines: list[str] = []
    back = rng.random() < 0.25
    fs = rng.choice((15, 16, 17))
    if back:
        city = rng.choice(ZH_CITIES)
        authority = f"{city}市公安局{rng.choice(ZH_DISTRICTS)}分局"
        start = random_date(rng, 2008, 2024)
        years = rng.choice((10, 20, 0))
        end = "长期" if years == 0 else f"{start.year + years:04d}.{start.month:02d}.{start.day:02d}"
        period = f"{start.year:04d}.{start.month:02d}.{start.day:02d}-{end}"
        cv.ellipse(30, 30, 100, 100, outline=(200, 60, 60))
        cv.text(width / 2 + 30, 60, "中华人民共和国", face, 24, ink, anchor="ma", bold=True)
        cv.text(width / 2 + 30, 105, "居民身份证", face, 30, ink, anchor="ma", bold=True)
        lines += ["中华人民共和国", "居民身份证"]
        y = 200
        for label, value in (("签发机关", authority), ("有效期限", period)):
            cv.text(70, y, label, face, fs - 1, label_c)
            cv.text(70 + cv.width_of(label, face, fs - 1) + 14, y, value, face, fs, ink)
            lines.append(f"{label} {value}")
            y += fs + 16
        data: dict[str, Any] = {
            "姓名": None,
            "性别": None,
            "民族": None,
            "出生日期": None,
            "住址": None,
            "公民身份号码": None,
            "签发机关": authority,
            "有效期限": period,
        }
        qa = [ask(rng, "authority", authority, "zh"), ask(rng, "valid_period", period, "zh")]
        return SyntheticDocument(
            "id_card", "zh", cv.finish(rng, augment), lines, "id_card", data, qa, glyphs=cv.glyphs
        )

    name = person_zh(rng)
    male = rng.random() < 0.5
    sex = "男" if male else "女"
    nation = rng.choice(ETHNIC)
    birth = random_date(rng, 1950, 2005)
    address = zh_address(rng)
    number = id_number(rng, birth, male)
    lx, vx = 28, 28 + fs * 3 + 6
    y = 26
    cv.text(lx, y, "姓名", face, fs - 1, label_c)
    cv.text(vx, y - 1, name, face, fs + 3, ink, bold=True)
    lines.append(f"姓名 {name}")
    y += fs + 22
    cv.text(lx, y, "性别", face, fs - 1, label_c)
    cv.text(vx, y, sex, face, fs, ink)
    cv.text(vx + 60, y, "民族", face, fs - 1, label_c)
    cv.text(vx + 60 + fs * 2 + 10, y, nation, face, fs, ink)
    lines.append(f"性别 {sex} 民族 {nation}")
    y += fs + 20
    cv.text(lx, y, "出生", face, fs - 1, label_c)
    birth_text = f"{birth.year} 年 {birth.month} 月 {birth.day} 日"
    cv.text(vx, y, birth_text, face, fs, ink)
    lines.append(f"出生 {birth_text}")
    y += fs + 20
    cv.text(lx, y, "住址", face, fs - 1, label_c)
    wrapped = _wrap(cv, address, face, fs, 270 - vx + lx + 60)
    for i, part in enumerate(wrapped):
        cv.text(vx, y + i * (fs + 6), part, face, fs, ink)
    lines.append(f"住址 {''.join(wrapped)}")
    y = height - 52
    cv.text(lx, y, "公民身份号码", face, fs - 1, label_c)
    cv.text(lx + cv.width_of("公民身份号码", face, fs - 1) + 20, y - 1, number, face, fs + 3, ink, bold=True)
    lines.append(f"公民身份号码 {number}")
    px0, py0 = width - 150, 36
    cv.rect(px0, py0, px0 + 112, py0 + 140, fill=(bg[0] - 12, bg[1] - 10, bg[2] - 8))
    cv.ellipse(px0 + 34, py0 + 22, px0 + 78, py0 + 72, fill=(150, 150, 160))
    cv.ellipse(px0 + 16, py0 + 78, px0 + 96, py0 + 160, fill=(150, 150, 160))
    cv.rect(px0, py0 + 140, px0 + 112, py0 + 160, fill=bg)
    data = {
        "姓名": name,
        "性别": sex,
        "民族": nation,
        "出生日期": birth.iso(),
        "住址": address,
        "公民身份号码": number,
        "签发机关": None,
        "有效期限": None,
    }
    qa = [
        ask(rng, "name", name, "zh"),
        ask(rng, "id_number", number, "zh"),
        ask(rng, "birth_date", birth.iso(), "zh"),
        ask(rng, "sex", sex, "zh"),
        ask(rng, "ethnicity", nation, "zh"),
        ask(rng, "address", address, "zh"),
    ]
    return SyntheticDocument(
        "id_card", "zh", cv.finish(rng, augment), lines, "id_card", data, qa, glyphs=cv.glyphs
    )


COMPANY_TYPES = (
    "有限责任公司（自然人投资或控股）",
    "有限责任公司（法人独资）",
    "股份有限公司（非上市）",
    "其他有限责任公司",
)
SCOPES = (
    "技术开发、技术咨询、技术服务",
    "软件开发",
    "销售电子产品",
    "货物进出口",
    "会议服务",
    "企业管理咨询",
    "餐饮服务",
    "道路货物运输",
    "销售食品",
    "建筑工程施工",
    "广告设计、制作",
    "计算机系统服务",
)


def make_business_license(
    rng: random.Random, fonts: FontSet, augment: Augment, lang: str | None = None
) -> SyntheticDocument:
    face = rng.choice(fonts.cjk)
    width, height = 448, 588
    paper = paper_colour(rng)
    frame = (rng.randint(150, 190), rng.randint(110, 140), rng.randint(40, 80))
    ink = ink_colour(rng)
    scale = Canvas.pick_scale(rng, augment)
    cv = Canvas(width, height, paper, scale)
    cv.rect(10, 10, width - 10, height - 10, outline=frame, width=4)
    cv.rect(18, 18, width - 18, height - 18, outline=frame, width=1)
    code = tax_id(rng)
    name = company_zh(rng)
    ctype = rng.choice(COMPANY_TYPES)
    rep = person_zh(rng)
    capital = capital_amount(rng.choice((10, 50, 100, 200, 300, 500, 1000, 2000, 5000)) * 1000000).replace(
        "圆整", "元整"
    )
    founded = random_date(rng, 2000, 2024)
    term = (
        f"{founded.iso()} 至 长期"
        if rng.random() < 0.6
        else f"{founded.iso()} 至 {founded.year + 20:04d}-{founded.month:02d}-{founded.day:02d}"
    )
    city = rng.choice(ZH_CITIES)
    address = zh_address(rng, city)
    scope = "；".join(rng.sample(SCOPES, rng.randint(1, 3))) + "。"
    authority = f"{city}市{rng.choice(ZH_DISTRICTS)}市场监督管理局"
    lines: list[str] = []
    cv.text(width / 2, 34, "营业执照", face, 34, (170, 30, 30), anchor="ma", bold=True)
    lines.append("营业执照")
    fs = rng.choice((13, 14))
    cv.text(36, 92, "统一社会信用代码", face, fs, ink)
    cv.text(36 + cv.width_of("统一社会信用代码", face, fs) + 10, 91, code, face, fs + 2, ink, bold=True)
    lines.append(f"统一社会信用代码 {code}")
    y = 130
    fields = (
        ("名称", name),
        ("类型", ctype),
        ("法定代表人", rep),
        ("注册资本", capital),
        ("成立日期", founded.printed("zh")),
        ("营业期限", term.replace(" 至 ", "至")),
        ("住所", address),
        ("经营范围", scope),
    )
    lab_w = cv.width_of("法定代表人", face, fs) + 14
    for label, value in fields:
        cv.text(36, y, label, face, fs, ink)
        wrapped = _wrap(cv, value, face, fs, width - 36 - lab_w - 40)
        for i, part in enumerate(wrapped):
            cv.text(36 + lab_w, y + i * (fs + 6), part, face, fs, ink)
        lines.append(f"{label} {''.join(wrapped)}")
        y += max(1, len(wrapped)) * (fs + 6) + 12
    cv.text(width - 40, height - 70, "登记机关", face, fs, ink, anchor="ra")
    cv.text(width - 40, height - 50, authority, face, fs - 1, ink, anchor="ra")
    lines += ["登记机关", authority]
    cv.ellipse(width - 150, height - 130, width - 50, height - 30, outline=(200, 40, 40))
    data: dict[str, Any] = {
        "统一社会信用代码": code,
        "名称": name,
        "类型": ctype,
        "法定代表人": rep,
        "注册资本": capital,
        "成立日期": founded.iso(),
        "营业期限": term,
        "住所": address,
        "经营范围": scope,
        "登记机关": authority,
    }
    qa = [
        ask(rng, "credit_code", code, "zh"),
        ask(rng, "company", name, "zh"),
        ask(rng, "legal_rep", rep, "zh"),
        ask(rng, "capital", capital, "zh"),
        ask(rng, "founded", founded.iso(), "zh"),
        ask(rng, "address", address, "zh"),
    ]
    return SyntheticDocument(
        "business_license",
        "zh",
        cv.finish(rng, augment),
        lines,
        "business_license",
        data,
        qa,
        glyphs=cv.glyphs,
    )


EN_TITLES = (
    "Sales Manager",
    "Software Engineer",
    "Product Designer",
    "Marketing Director",
    "Account Executive",
    "Chief Financial Officer",
    "Project Manager",
    "Consultant",
    "Data Analyst",
    "Operations Lead",
)
ZH_TITLES = (
    "销售经理",
    "软件工程师",
    "产品经理",
    "市场总监",
    "财务总监",
    "项目经理",
    "总经理",
    "技术总监",
    "行政主管",
)
EN_DOMAINS = ("example.com", "mail.com", "corp.net", "company.cn", "studio.io")


def make_business_card(
    rng: random.Random, fonts: FontSet, augment: Augment, lang: str | None = None
) -> SyntheticDocument:
    lang = lang or ("zh" if rng.random() < 0.5 else "en")
    face = rng.choice(fonts.for_lang(lang))
    width, height = 448, 252
    paper = paper_colour(rng)
    ink = ink_colour(rng)
    accent = (rng.randint(0, 200), rng.randint(0, 150), rng.randint(60, 200))
    scale = Canvas.pick_scale(rng, augment)
    cv = Canvas(width, height, paper, scale)
    if lang == "en":
        first, last = rng.choice(EN_FIRST), rng.choice(EN_LAST)
        name = f"{first} {last}"
        title = rng.choice(EN_TITLES)
        company = (
            f"{rng.choice(('Northwind', 'Contoso', 'Fabrikam', 'Globex', 'Initech', 'Umbrella', 'Stark'))} "
            f"{rng.choice(('Trading', 'Labs', 'Systems', 'Group', 'Partners', 'Logistics'))}"
        )
        email = f"{first.lower()}.{last.lower()}@{rng.choice(EN_DOMAINS)}"
    else:
        name = person_zh(rng)
        title = rng.choice(ZH_TITLES)
        company = company_zh(rng)
        email = f"{rng.choice(('zhang', 'li', 'wang', 'liu', 'chen', 'zhao'))}{rng.randint(1, 99)}@{rng.choice(EN_DOMAINS)}"
    phone = (
        f"{rng.choice(('138', '139', '186', '135', '150'))} {digits(rng, 4, False)} {digits(rng, 4, False)}"
    )
    address = (
        zh_address(rng)
        if lang == "zh"
        else f"{rng.randint(1, 999)} {rng.choice(('Harbour Road', 'Market Street', 'Park Avenue', 'King Street'))}"
    )
    lines = [company, name, title]
    cv.rect(0, 0, width, 10, fill=accent)
    cs = cv.fit_size(company, face, 15, width - 60)
    cv.text(30, 28, company, face, cs, accent, bold=True)
    cv.text(30, 70, name, face, 26, ink, bold=True)
    cv.text(30, 108, title, face, 15, ink)
    y = 150
    contact = (
        ((("Tel", "Mobile")[rng.random() < 0.5], phone), ("Email", email), ("Add", address))
        if lang == "en"
        else (("电话", phone), ("邮箱", email), ("地址", address))
    )
    for label, value in contact:
        line = f"{label}: {value}" if lang == "en" else f"{label}：{value}"
        cv.text(30, y, line, face, cv.fit_size(line, face, 14, width - 60), ink)
        lines.append(line)
        y += 26
    qa = [
        ask(rng, "name", name, lang),
        ask(rng, "phone", phone, lang),
        ask(rng, "email", email, lang),
        ask(rng, "title", title, lang),
        ask(rng, "company", company, lang),
        ask(rng, "address", address, lang),
    ]
    return SyntheticDocument(
        "business_card", lang, cv.finish(rng, augment), lines, None, None, qa, glyphs=cv.glyphs
    )
