"""One generated sequence (one choice of a request) as the scheduler and block manager see it.

A request with `n > 1` becomes `n` sequences sharing a `request_id`. A sequence holds its prompt and
output token ids in one list, the spans of image placeholder tokens in the prompt (with the image's
content hash, because all placeholder tokens of an image share one token id), and the scheduling
state: how many tokens have KV computed, the block table, the finish reason.

With asynchronous scheduling the next step is scheduled while the previous one still runs, so a
sequence also counts the tokens of steps not yet applied (`num_inflight_tokens`) and the tokens
those steps will sample (`num_placeholders`): their KV slots are allocated, their ids are still
on the device. `num_scheduled_tokens` and `num_unscheduled_tokens` are the scheduler's view of
where the next chunk starts and how much is left; with nothing in flight they equal
`num_computed_tokens` and `num_uncomputed_tokens`.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from glmv.engine.sampling import SamplingParams
from glmv.errors import InvalidRequestError

_seq_ids = itertools.count()
_arrivals = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True, frozen=True)
class ImageSpan:
    """The placeholder tokens of one image: prompt positions [offset, offset + length)."""

    offset: int
    length: int
    content_hash: str

    @property
    def end(self) -> int:
        return self.offset + self.length


# (content_hash, start_within_image, end_within_image) of an image's part inside a token range.
ImagePart = tuple[str, int, int]
# The content of one full KV block: its token ids and the image parts it overlaps.
BlockKey = tuple[tuple[int, ...], tuple[ImagePart, ...]]


class Sequence:
    """Prompt + generated tokens of one choice, plus its scheduling state.

    `num_computed_tokens` counts the leading tokens whose KV is in the cache; the tokens after it
    still have to go through the model. After a step that computed the last token, the sampled token
    is appended, so a decoding sequence always has exactly one uncomputed token.
    """

    __slots__ = (
        "arrival",
        "block_hashes",
        "block_keys",
        "block_table",
        "eos_token_ids",
        "finish_reason",
        "images",
        "index",
        "num_cached_tokens",
        "num_committed_blocks",
        "num_computed_tokens",
        "num_inflight_tokens",
        "num_placeholders",
        "num_preemptions",
        "num_prompt_tokens",
        "params",
        "request_id",
        "seq_id",
        "status",
        "stop_reason",
        "token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        params: SamplingParams | None = None,
        *,
        index: int = 0,
        images: Iterable[ImageSpan] = (),
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.seq_id: int = next(_seq_ids)
        self.arrival: int = next(_arrivals)
        self.request_id = request_id
        self.index = index
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        if self.num_prompt_tokens == 0:
            raise InvalidRequestError("The prompt must contain at least one token.", param="prompt")
        self.images: list[ImageSpan] = sorted(images, key=lambda span: span.offset)
        for span in self.images:
            if span.length <= 0 or span.offset < 0 or span.end > self.num_prompt_tokens:
                raise InvalidRequestError(
                    f"Image span [{span.offset}, {span.end}) does not lie inside the prompt of "
                    f"{self.num_prompt_tokens} tokens."
                )
        for a, b in itertools.pairwise(self.images):
            if b.offset < a.end:
                raise InvalidRequestError("Image spans of a prompt must not overlap.")
        self.params = params if params is not None else SamplingParams()
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        # Tokens of scheduled steps whose results are not applied yet, and the tokens those steps
        # sample (known on the device only): the asynchronous scheduler's placeholders.
        self.num_inflight_tokens = 0
        self.num_placeholders = 0
        # Prompt tokens served from the prefix cache at first admission (reported as cached_tokens).
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        # Keys and hash chain of this sequence's full blocks, filled by the block manager (caches:
        # the content of a full block never changes).
        self.block_keys: list[BlockKey] = []
        self.block_hashes: list[bytes] = []
        # Leading full blocks of block_table already registered in the prefix cache.
        self.num_committed_blocks = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, index={self.index}, "
            f"status={self.status.name}, tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
            f"computed={self.num_computed_tokens})"
        )

    # --- token views --------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens whose KV is computed or being computed by a step in flight: where the next
        chunk starts."""
        return self.num_computed_tokens + self.num_inflight_tokens

    @property
    def num_unscheduled_tokens(self) -> int:
        """Tokens (known or placeholders) that no step has been scheduled to compute yet."""
        return len(self.token_ids) + self.num_placeholders - self.num_scheduled_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        """True while more than one token lacks KV (a prompt, or a re-prefill after preemption)."""
        return len(self.token_ids) - self.num_computed_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    # --- images and block content ---------------------------------------------------------------

    def images_in_range(self, start: int, end: int) -> list[tuple[ImageSpan, int, int]]:
        """Images overlapping token positions [start, end), each with the overlapping part
        [start_within_image, end_within_image) of its placeholder tokens."""
        parts: list[tuple[ImageSpan, int, int]] = []
        for span in self.images:
            if span.offset >= end:
                break
            lo = max(start, span.offset)
            hi = min(end, span.end)
            if lo < hi:
                parts.append((span, lo - span.offset, hi - span.offset))
        return parts

    def block_key(self, i: int, block_size: int = 16) -> BlockKey:
        """The content that determines the KV of full block `i`: its token ids and, for every image
        overlapping it, (content_hash, start_within_image, end_within_image)."""
        start = i * block_size
        end = start + block_size
        if end > len(self.token_ids):
            raise ValueError(f"block {i} of {self!r} is not full (block size {block_size})")
        tokens = tuple(self.token_ids[start:end])
        parts = tuple((span.content_hash, lo, hi) for span, lo, hi in self.images_in_range(start, end))
        return tokens, parts
