"""What the routes of one app share (`app.state.glmv`), and the checks every generating route makes.

`ServerState` holds the settings, the generation service, the metrics and the served model
names; `draining` is set on SIGTERM (new requests get 503, `/ready` turns 503), and
`stop_running()` ends the generations still running when the shutdown timeout runs out. `inflight` counts
the requests the service has admitted and not yet finished, whichever route sent them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import glmv
from glmv.errors import ModelNotFoundError, OverloadedError
from glmv.server.metrics import ServerMetrics
from glmv.server.settings import Settings
from glmv.tasks.service import GenerationService

__all__ = ["ServerState"]


@dataclass(slots=True)
class ServerState:
    settings: Settings
    service: GenerationService
    metrics: ServerMetrics
    model_names: list[str]
    owns_service: bool
    created: int = field(default_factory=lambda: int(time.time()))
    system_fingerprint: str = f"glmv-{glmv.__version__}"
    draining: bool = False  # set on SIGTERM: new requests get 503, /ready turns 503
    stopping: bool = False  # set when the shutdown timeout ran out: running requests are stopped
    runs: set[Any] = field(default_factory=set)  # the generations in progress (`ServedRequest`)

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered (streams: until their end)."""
        return self.service.num_inflight

    def stop_running(self) -> int:
        """Stop every generation in progress with a 503 error (streams end with the error event
        and `[DONE]`); later ones stop at once. Returns how many were running."""
        self.stopping = True
        runs = list(self.runs)
        for run in runs:
            run.stop()
        return len(runs)

    def check_model(self, model: str | None) -> str:
        """The served name a request asked for (the first one when it named none), else 404."""
        names = self.model_names
        if model is None or model == "":
            return names[0]
        if model not in names:
            raise ModelNotFoundError(
                f"The model '{model}' does not exist on this server; it serves '{names[0]}' (see GET /v1/models).",
                param="model",
            )
        return model

    def check_draining(self) -> None:
        """503 once the server is shutting down."""
        if self.draining:
            raise OverloadedError("The server is shutting down; retry on another replica.", retry_after=5)
