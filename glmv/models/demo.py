"""The demo model card: how a checkpoint says it is glmv's small demo model.

glmv ships a small GLM-4.1V-architecture model trained on synthetic documents (see
`glmv/checkpoints/glmv-demo/README.md`). Its `config.json` carries a `glmv_demo_model` object;
`demo_note(path)` returns the one-line description that the start-up log, `/v1/models` and the web
page show, or None for any other checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["DEMO_CARD_KEY", "DEMO_DESCRIPTION", "demo_note"]

DEMO_CARD_KEY = "glmv_demo_model"
DEMO_DESCRIPTION = (
    "demo model: a small GLM-4.1V-architecture model trained on synthetic documents; it reads printed "
    "text on receipts, invoices, cards, tables and chat screenshots and answers questions about them. "
    "It is not a general assistant."
)


def demo_note(path: str | Path) -> str | None:
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    card = data.get(DEMO_CARD_KEY) if isinstance(data, dict) else None
    if not isinstance(card, dict):
        return None
    description = card.get("description")
    return description if isinstance(description, str) and description else DEMO_DESCRIPTION
