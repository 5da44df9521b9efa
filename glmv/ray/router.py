"""`ConversationAffinityRouter`: Ray Serve's request-router extension point, applied to glmv.

Ray Serve asks a deployment's request router, in every process that holds a handle to the
deployment, which replicas to try for each request (`choose_replicas` returns ranks of
replicas; Serve probes each rank's queue lengths and takes the least loaded replica that
accepts). This router ranks, for a request that carries `AffinityKeys` (the HTTP front passes
them as the `affinity` keyword), the replica that holds its conversation first (see
`glmv.ray.affinity`), then the least loaded others. Requests without keys (or whose replica is
busy) go to the least loaded replicas. After a request is routed, the table records where its
keys now live; a replica that dies is forgotten.

Configure it on the engine deployment:

    RequestRouterConfig(request_router_class="glmv.ray.router:ConversationAffinityRouter",
                        request_router_kwargs={"imbalance_threshold": 8})
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from glmv.ray.affinity import AffinityKeys, AffinityTable

__all__ = ["AFFINITY_KWARG", "ConversationAffinityRouter", "keys_of"]

log = logging.getLogger("glmv.ray")

AFFINITY_KWARG = "affinity"  # the keyword of the forwarded call that carries the keys


def keys_of(pending_request: PendingRequest | None) -> AffinityKeys:
    """The affinity keys a request was sent with (empty when it has none, e.g. plain HTTP)."""
    if pending_request is None:
        return AffinityKeys()
    value = pending_request.kwargs.get(AFFINITY_KWARG) if pending_request.kwargs else None
    if isinstance(value, AffinityKeys):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        conv, images = value
        return AffinityKeys(
            conv if isinstance(conv, str) else None, images if isinstance(images, str) else None
        )
    return AffinityKeys()


class ConversationAffinityRouter(RequestRouter):
    """Conversation affinity first, least loaded otherwise (see the module docstring)."""

    def initialize_state(
        self, imbalance_threshold: int = 8, capacity: int = 100_000, fallback_candidates: int = 4, **_: Any
    ) -> None:
        self._table = AffinityTable(capacity=capacity, imbalance_threshold=imbalance_threshold)
        self._fallback_candidates = max(1, int(fallback_candidates))

    def _table_or_default(self) -> AffinityTable:
        # initialize_state runs when Serve builds the router; a router built without it
        # (never in Serve itself) still works with the defaults.
        if not hasattr(self, "_table"):
            self.initialize_state()
        return self._table

    def _load(self, replica: RunningReplica) -> int | None:
        return self.replica_queue_len_cache.get(replica.replica_id)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        table = self._table_or_default()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {rid: self._load(r) for rid, r in by_id.items()}
        keys = keys_of(pending_request)
        choice = table.choose(keys, list(by_id), loads) if keys else None
        ranks: list[list[RunningReplica]] = []
        if choice is not None:
            ranks.append([by_id[choice]])
        # Least loaded among the rest: the lowest cached loads are probed (unknown counts as idle).
        others = [r for rid, r in by_id.items() if rid != choice]
        others.sort(key=lambda r: loads[r.replica_id.unique_id] or 0)
        if others:
            ranks.append(others[: self._fallback_candidates])
        if pending_request is not None:
            # Every replica has been offered: if none accepts, Serve should back off before
            # asking again (without this flag it would ask again at once, in a busy loop).
            pending_request.routing_context.should_backoff = True
        return ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        keys = keys_of(pending_request)
        if not keys:
            return
        self._table_or_default().record(keys, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        dropped = self._table_or_default().forget(replica_id.unique_id)
        log.info("replica %s died; %d conversation keys will be placed again", replica_id.unique_id, dropped)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = {r.unique_id for r in self._replica_id_set}
        super().update_replicas(replicas)
        after = {r.unique_id for r in self._replica_id_set}
        table = self._table_or_default()
        for gone in before - after:
            table.forget(gone)
