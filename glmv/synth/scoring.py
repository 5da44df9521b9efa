"""Grading answers on synthetic documents: reading, question answering, extraction.

* `char_accuracy(pred, ref)`: 1 - edit distance / reference length (floored at 0).
* `qa_exact(pred, ref)`: the answer, stripped, equals the reference.
* `field_matches(pred, ref)`: per-field exact match of an extracted object, fields flattened to
  dotted paths (`购买方.名称`); lists are compared whole; numbers by value, so 14.0 == 14.
* `KEY_FIELDS`: the amount, date and number fields of `invoice` and `receipt` that the demo model's
  targets are stated on.
`Tally` sums results per group and prints a table.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KEY_FIELDS", "Tally", "char_accuracy", "edit_distance", "field_matches", "flatten", "qa_exact"]

KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "invoice": ("发票代码", "发票号码", "开票日期", "金额", "税额", "价税合计"),
    "receipt": ("date", "subtotal", "tax", "total"),
}


def edit_distance(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def char_accuracy(pred: str, ref: str) -> float:
    if not ref:
        return 1.0 if not pred else 0.0
    return max(0.0, 1.0 - edit_distance(pred.strip(), ref.strip()) / len(ref.strip()))


def qa_exact(pred: str, ref: str) -> bool:
    return pred.strip() == ref.strip()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) < 1e-9
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def field_matches(pred: Any, ref: dict[str, Any]) -> dict[str, bool]:
    """Field path -> exact match, for every field of `ref` (all False when `pred` is not an object)."""
    flat_ref = flatten(ref)
    flat_pred = flatten(pred) if isinstance(pred, dict) else {}
    return {k: k in flat_pred and _same(flat_pred[k], v) for k, v in flat_ref.items()}


@dataclass(slots=True)
class Tally:
    """Sums of scores per group (e.g. "qa/total", "extract/invoice")."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, group: str, score: float) -> None:
        self.sums[group] += float(score)
        self.counts[group] += 1

    def mean(self, group: str) -> float:
        return self.sums[group] / self.counts[group] if self.counts[group] else float("nan")

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {g: {"score": round(self.mean(g), 4), "n": self.counts[g]} for g in sorted(self.counts)}

    def table(self) -> str:
        rows = [f"{'group':<40} {'score':>7} {'n':>6}"]
        rows += [f"{g:<40} {100 * self.mean(g):>6.1f}% {self.counts[g]:>6}" for g in sorted(self.counts)]
        return "\n".join(rows)
