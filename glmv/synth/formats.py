"""How amounts, dates and codes are printed on documents and written in answers.

Amounts are drawn in cents so every sum is exact; `money(cents)` prints them with two decimals and
`amount_value(cents)` is the JSON number. `capital_amount` writes the upper-case Chinese amount of a
VAT invoice (价税合计大写, e.g. 壹仟捌佰玖拾伍圆叁角肆分).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

__all__ = [
    "Date",
    "amount_value",
    "capital_amount",
    "digits",
    "money",
    "random_date",
    "tax_id",
]


def money(cents: int, thousands: bool = False) -> str:
    """1234567 -> "12345.67" (or "12,345.67")."""
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents), 100)
    head = f"{whole:,}" if thousands else str(whole)
    return f"{sign}{head}.{frac:02d}"


def amount_value(cents: int) -> float:
    """The JSON number of an amount (at most two decimals)."""
    return round(cents / 100, 2)


def digits(rng: random.Random, n: int, first_nonzero: bool = True) -> str:
    out = [rng.choice(string.digits[1:] if first_nonzero else string.digits)]
    out += [rng.choice(string.digits) for _ in range(n - 1)]
    return "".join(out)


def tax_id(rng: random.Random) -> str:
    """An 18-character 统一社会信用代码 (digits and upper-case letters, no I/O/S/V/Z)."""
    letters = "0123456789ABCDEFGHJKLMNPQRTUWXY"
    return (
        "91"
        + "".join(rng.choice("0123456789") for _ in range(6))
        + "".join(rng.choice(letters) for _ in range(10))
    )


@dataclass(frozen=True, slots=True)
class Date:
    year: int
    month: int
    day: int

    def iso(self) -> str:
        return f"{self.year:04d}-{self.month:02d}-{self.day:02d}"

    def printed(self, style: str) -> str:
        y, m, d = self.year, self.month, self.day
        return {
            "iso": f"{y:04d}-{m:02d}-{d:02d}",
            "slash": f"{y:04d}/{m:02d}/{d:02d}",
            "dot": f"{y:04d}.{m:02d}.{d:02d}",
            "zh": f"{y:04d}年{m:02d}月{d:02d}日",
            "zh_short": f"{y}年{m}月{d}日",
        }[style]


def random_date(rng: random.Random, first_year: int = 2019, last_year: int = 2026) -> Date:
    month = rng.randint(1, 12)
    days = 31 if month in (1, 3, 5, 7, 8, 10, 12) else 30 if month != 2 else 28
    return Date(rng.randint(first_year, last_year), month, rng.randint(1, days))


_DIGITS_ZH = "零壹贰叁肆伍陆柒捌玖"
_UNITS_SMALL = ("", "拾", "佰", "仟")
_UNITS_BIG = ("", "万", "亿")


def _four(group: int) -> str:
    """A group of up to four digits in capitals, with 零 for inner gaps."""
    out = ""
    zero = False
    for pos in range(3, -1, -1):
        d = group // 10**pos % 10
        if d == 0:
            zero = bool(out)
            continue
        if zero:
            out += "零"
            zero = False
        out += _DIGITS_ZH[d] + _UNITS_SMALL[pos]
    return out


def capital_amount(cents: int) -> str:
    """Upper-case Chinese amount: 1320000 -> 壹万叁仟贰佰圆整, 189534 -> 壹仟捌佰玖拾伍圆叁角肆分."""
    if cents < 0:
        return "负" + capital_amount(-cents)
    yuan, frac = divmod(cents, 100)
    jiao, fen = divmod(frac, 10)
    head = ""
    if yuan:
        groups = []
        n = yuan
        while n:
            groups.append(n % 10000)
            n //= 10000
        pending_zero = False
        for i in range(len(groups) - 1, -1, -1):
            g = groups[i]
            if g == 0:
                pending_zero = bool(head)
                continue
            if head and (pending_zero or g < 1000):
                head += "零"
            head += _four(g) + _UNITS_BIG[i]
            pending_zero = False
        head += "圆"
    if not jiao and not fen:
        return (head or "零圆") + "整"
    tail = ""
    if jiao:
        tail += _DIGITS_ZH[jiao] + "角"
    elif head:
        tail += "零"
    if fen:
        tail += _DIGITS_ZH[fen] + "分"
    return head + tail
