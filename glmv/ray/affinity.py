"""Cache-aware replica choice: which engine replica should serve a request (pure Python, no Ray).

A replica's engine keeps the KV cache of prompt prefixes it has seen and the embeddings of images
it has encoded. A second turn of a conversation repeats the first turn's messages, so it is cheap
only on the replica that served the first turn. Two keys are taken from a request body:

* `conversation`: a hash of the leading messages (every message up to and including the first
  user message). All turns of one conversation share it.
* `images`: a hash of the images among those leading messages. Another question about the same
  screenshot shares it (the image embedding, and the prompt up to the image, are cached).

`AffinityTable` remembers which replica last served each key (bounded, least recently used
first out). A key it has not seen goes to the replica ranked first by rendezvous hashing of the
key over the live replica ids, so independent routers (one per HTTP front replica) agree without
sharing state, and adding a replica moves only its share of new keys. When the preferred replica
is busy (more ongoing requests than the least loaded one by `imbalance_threshold`) the request
goes to the least loaded replica instead, and the table follows it there.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["AffinityKeys", "AffinityTable", "affinity_keys", "rendezvous_order"]


@dataclass(frozen=True, slots=True)
class AffinityKeys:
    """The routing keys of one request (None where the body has none)."""

    conversation: str | None = None
    images: str | None = None

    def __bool__(self) -> bool:
        return self.conversation is not None or self.images is not None

    def present(self) -> tuple[str, ...]:
        return tuple(k for k in (self.conversation, self.images) if k is not None)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _image_ref(part: Mapping[str, Any]) -> str | None:
    """The URL (usually a data: URL) of an image content part, in either OpenAI or glmv spelling."""
    value = part.get("image_url", part.get("image"))
    if isinstance(value, Mapping):
        value = value.get("url")
    return value if isinstance(value, str) else None


def _leading_messages(messages: Sequence[Any]) -> list[Any]:
    """Every message up to and including the first user message (the part all turns repeat)."""
    out: list[Any] = []
    for message in messages:
        out.append(message)
        if isinstance(message, Mapping) and message.get("role") == "user":
            break
    return out


def _images_of(messages: Iterable[Any]) -> list[str]:
    refs: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, Mapping) and part.get("type") in ("image_url", "image"):
                ref = _image_ref(part)
                if ref is not None:
                    refs.append(ref)
    return refs


def _images_key(refs: Sequence[str]) -> str | None:
    if not refs:
        return None
    return _digest(b"\0".join(_digest(r.encode("utf-8", "surrogatepass")).encode() for r in refs))


def affinity_keys(body: Any) -> AffinityKeys:
    """The routing keys of a request body (a parsed JSON object); empty for anything else.

    Chat completions (`messages`) get both keys; `/v1/extract`-style bodies (`images`) get the
    image key only (each document is asked about once)."""
    if not isinstance(body, Mapping):
        return AffinityKeys()
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        leading = _leading_messages(messages)
        try:
            canonical = json.dumps(leading, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError):
            return AffinityKeys()
        return AffinityKeys(
            conversation=_digest(canonical.encode("utf-8", "surrogatepass")),
            images=_images_key(_images_of(leading)),
        )
    images = body.get("images")
    if isinstance(images, list):
        return AffinityKeys(images=_images_key([i for i in images if isinstance(i, str)]))
    return AffinityKeys()


def rendezvous_order(key: str, replica_ids: Iterable[str]) -> list[str]:
    """`replica_ids` ranked for `key` by highest random weight (the same order in every process)."""

    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class AffinityTable:
    """Which replica holds which key (bounded LRU), and the choice for a new request."""

    def __init__(self, capacity: int = 100_000, imbalance_threshold: int = 8) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if imbalance_threshold < 0:
            raise ValueError("imbalance_threshold must be >= 0")
        self.capacity = capacity
        self.imbalance_threshold = imbalance_threshold
        self._owner: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def owner(self, key: str) -> str | None:
        return self._owner.get(key)

    def preferred(self, keys: AffinityKeys, replica_ids: Sequence[str]) -> str | None:
        """The replica that probably holds this request's prefix or images (ignoring load)."""
        if not keys or not replica_ids:
            return None
        live = set(replica_ids)
        for key in keys.present():
            owner = self._owner.get(key)
            if owner in live:
                return owner
        # A new conversation: place it by its images when it has some (a later question about
        # the same image lands with it), else by the conversation.
        first = keys.images or keys.conversation
        assert first is not None
        return rendezvous_order(first, replica_ids)[0]

    def choose(
        self, keys: AffinityKeys, replica_ids: Sequence[str], loads: Mapping[str, int | None]
    ) -> str | None:
        """The preferred replica, or None when there is none or it is busy (then: least loaded).

        `loads` maps replica ids to their ongoing requests where known; an unknown load counts
        as not busy (the router probes it anyway)."""
        choice = self.preferred(keys, replica_ids)
        if choice is None:
            return None
        load = loads.get(choice)
        known = [v for r in replica_ids if (v := loads.get(r)) is not None]
        if load is not None and known and load > min(known) + self.imbalance_threshold:
            return None
        return choice

    def record(self, keys: AffinityKeys, replica_id: str) -> None:
        """The request with `keys` was sent to `replica_id`: its prefix and images now live there."""
        for key in keys.present():
            self._owner[key] = replica_id
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, replica_id: str) -> int:
        """Drop every key held by a replica that is gone; returns how many."""
        gone = [k for k, r in self._owner.items() if r == replica_id]
        for key in gone:
            del self._owner[key]
        return len(gone)
