"""The demo model card: how a checkpoint says it is glmv's small demo model.

glmv ships a small GLM-4.1V-architecture model trained on synthetic documents (see
`glmv/checkpoints/glmv-demo/README.md`). `training.demo_checkpoint` writes a `glmv_demo_model`
object with this description into its `config.json`; `glmv.tasks.service.demo_note` reads it back
for the start-up log, `/v1/models` and the web page.
"""

from __future__ import annotations

__all__ = ["DEMO_CARD_KEY", "DEMO_DESCRIPTION"]

DEMO_CARD_KEY = "glmv_demo_model"
DEMO_DESCRIPTION = (
    "demo model: a small GLM-4.1V-architecture model trained on synthetic documents; it reads printed "
    "text on receipts, invoices, cards, tables and chat screenshots and answers questions about them. "
    "It is not a general assistant."
)
