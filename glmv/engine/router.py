"""Which engine core takes a request, when several run behind one client (data parallel).

A core can only reuse the KV blocks it computed itself, so a conversation's later turns should go
to the core that served its earlier ones. The router keeps, per core, a bounded LRU of the hashes
of the full prompt blocks it sent there: `block_size` tokens each, chained (a block's hash covers
everything before it) and with the content hash of any image overlapping the block folded in,
like the cores' own prefix cache keys. A request goes to the core whose LRU holds the longest run
of its leading block hashes, unless that core is much busier than the least-loaded one (more
than `imbalance_abs` requests more *and* more than `imbalance_rel` times as many); without a match,
or when the match is too busy, it goes to the least-loaded core (ties in turn).

The hashes are Python's own tuple hashes: they only have to agree within this process, and a rare
collision only costs one routing choice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glmv.engine.request import EngineRequest


def prompt_block_hashes(request: EngineRequest, block_size: int) -> list[int]:
    """Chained hashes of the full blocks of the request's prompt, image content folded in."""
    tokens = request.prompt_token_ids
    images = sorted((im.offset, im.offset + im.length, im.content_hash) for im in request.images)
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        end = start + block_size
        parts = tuple(
            (h, max(lo, start) - lo, min(hi, end) - lo) for lo, hi, h in images if lo < end and hi > start
        )
        parent = hash((parent, tuple(tokens[start:end]), parts))
        hashes.append(parent)
    return hashes


class PrefixRouter:
    """Prefix-affinity and load-balancing choice of a core; see the module docstring."""

    def __init__(
        self,
        num_cores: int,
        block_size: int,
        *,
        capacity: int = 65536,
        imbalance_abs: int = 8,
        imbalance_rel: float = 1.5,
    ) -> None:
        self.block_size = block_size
        self.capacity = capacity  # block hashes remembered per core
        self.imbalance_abs = imbalance_abs
        self.imbalance_rel = imbalance_rel
        self._blocks: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_cores)]
        self._turn = 0
        self.prefix_routed = 0  # requests sent to a core for its cached prefix
        self.load_routed = 0  # requests sent to the least-loaded core
        self.routed = [0] * num_cores  # requests sent to each core

    def match(self, core: int, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` were sent to `core` (and are still remembered)."""
        seen = self._blocks[core]
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def choose(self, hashes: Sequence[int], loads: Sequence[int | None]) -> int:
        """The core for a request with prompt block `hashes`; `loads[i]` is core i's number of
        requests in flight, None for a core that cannot take requests now (at least one can)."""
        alive = [i for i, load in enumerate(loads) if load is not None]
        if not alive:
            raise ValueError("no core can take the request")
        least = min(loads[i] for i in alive)  # type: ignore[type-var]
        best, best_len = -1, 0
        if hashes:
            for i in alive:
                n = self.match(i, hashes)
                if n > best_len or (n == best_len and n > 0 and loads[i] < loads[best]):  # type: ignore[operator]
                    best, best_len = i, n
        if best >= 0:
            load = loads[best]
            assert load is not None
            if not (load - least > self.imbalance_abs and load > least * self.imbalance_rel):
                self.prefix_routed += 1
                return best
        candidates = [i for i in alive if loads[i] == least]
        self._turn += 1
        self.load_routed += 1
        return candidates[self._turn % len(candidates)]

    def record(self, core: int, hashes: Sequence[int]) -> None:
        """Remember that `core` now holds these blocks (most recently used last)."""
        self.routed[core] += 1
        seen = self._blocks[core]
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.capacity:
            seen.popitem(last=False)

    def forget(self, core: int) -> None:
        """`core` restarted with an empty cache."""
        self._blocks[core].clear()
