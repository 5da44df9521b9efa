"""The pieces between the API process and the engine cores: messages, error classes, shared-memory
images and the data-parallel router (no processes started here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from glmv import errors
from glmv.engine.messages import (
    AddRequest,
    CoreOutputs,
    client_decoder,
    core_decoder,
    encoder,
    error_info,
    to_error,
)
from glmv.engine.request import EngineRequest, ImageInput
from glmv.engine.router import PrefixRouter, prompt_block_hashes
from glmv.engine.sampling import SamplingParams
from glmv.engine.shm import SEGMENT_PREFIX, pack_images, release, unpack_images
from glmv.engine.stats import EngineStats, sum_stats
from glmv.engine.structured import json_schema_output

SHM = Path("/dev/shm")


def all_error_classes() -> list[type[errors.GlmvError]]:
    found, todo = [], [errors.GlmvError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_crosses_as_itself(cls: type[errors.GlmvError]) -> None:
    exc = cls.__new__(cls)
    errors.GlmvError.__init__(exc, "what went wrong", param="messages[0]", code="some_code")
    if cls in (errors.OverloadedError, errors.RateLimitError):
        exc.retry_after = 7.0  # type: ignore[attr-defined]
    back = to_error(error_info(exc))
    assert type(back) is cls
    assert back.to_dict() == exc.to_dict()
    assert getattr(back, "retry_after", None) == getattr(exc, "retry_after", None)


def test_other_exceptions_cross_as_engine_errors() -> None:
    back = to_error(error_info(RuntimeError("CUDA error: out of memory")))
    assert isinstance(back, errors.EngineError) and "RuntimeError: CUDA error: out of memory" in back.message


def test_messages_round_trip_with_structured_output() -> None:
    schema = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}
    params = SamplingParams(n=2, max_tokens=9, stop=["\n"], logprobs=3, structured=json_schema_output(schema))
    msg = AddRequest("r1", [1, 2, 3], params, 12.5)
    back = core_decoder().decode(encoder().encode(msg))
    assert isinstance(back, AddRequest) and back.params.structured["schema"] == schema
    assert (back.params.n, back.params.stop, back.params.logprobs) == (2, ["\n"], 3)
    stats = EngineStats(1, 2, 0.5, 10, 3, 4, 5, 6, 7, 8)
    outs = client_decoder().decode(encoder().encode(CoreOutputs([], stats, ["r1"])))
    assert isinstance(outs, CoreOutputs) and outs.stats == stats and outs.consumed == ["r1"]


def segments() -> set[str]:
    return {p.name for p in SHM.glob(f"{SEGMENT_PREFIX}*")} if SHM.is_dir() else set()


def test_images_travel_through_shared_memory_and_leave_nothing_behind() -> None:
    before = segments()
    pixels = np.random.default_rng(0).integers(0, 256, (28, 56, 3), dtype=np.uint8)
    rows = torch.randn(8, 1176)
    bf16 = torch.randn(4, 6).to(torch.bfloat16)
    images = [
        ImageInput(0, 2, "h0", (1, 2, 4), None, pixels),
        ImageInput(5, 2, "h1", (1, 2, 4), rows),
        ImageInput(9, 1, "h2", (1, 2, 2), bf16),
        ImageInput(12, 1, "h3", (1, 2, 2), None, None),  # nothing to send (embedding cached)
    ]
    shm, metas = pack_images(images)
    assert shm is not None
    got = unpack_images(shm.name, metas)
    release(shm)
    assert segments() == before
    assert np.array_equal(got[0].pixels, pixels) and got[0].pixel_values is None
    assert torch.equal(got[1].pixel_values, rows)
    assert got[2].pixel_values is not None and got[2].pixel_values.dtype == torch.bfloat16
    assert torch.equal(got[2].pixel_values, bf16)
    assert got[3].pixels is None and got[3].pixel_values is None
    assert [(g.offset, g.length, g.content_hash, g.grid_thw) for g in got] == [
        (im.offset, im.length, im.content_hash, im.grid_thw) for im in images
    ]


def test_stats_sum() -> None:
    a = EngineStats(1, 0, 0.5, 100, 10, 5, 1, 2, 3, 40)
    b = EngineStats(2, 3, 0.0, 300, 20, 0, 0, 1, 1, 60)
    total = sum_stats([a, b])
    assert (total.num_running, total.num_waiting, total.num_blocks) == (3, 3, 400)
    assert total.kv_usage == pytest.approx(50 / 400)
    assert (total.prefix_cache_queries, total.num_generated_tokens) == (30, 100)


# --- routing -------------------------------------------------------------------------------------------


def req(tokens: list[int], images: list[tuple[int, int, str]] = ()) -> EngineRequest:  # type: ignore[assignment]
    return EngineRequest("r", tokens, images=[ImageInput(o, n, h, (1, 1, 1), None) for o, n, h in images])


def test_block_hashes_are_chained_and_fold_in_images() -> None:
    base = list(range(40))
    h = prompt_block_hashes(req(base), 16)
    assert len(h) == 2  # full blocks only
    assert prompt_block_hashes(req([*base, 99, 98]), 16) == h  # same prefix, same leading hashes
    changed = prompt_block_hashes(req([0, *base[1:]]), 16)
    assert changed[0] == h[0] and changed[1] == h[1]  # (token 0 was already 0)
    early = prompt_block_hashes(req([7, *base[1:]]), 16)
    assert early[0] != h[0] and early[1] != h[1]  # a change in block 0 changes every later hash
    img_a = prompt_block_hashes(req(base, [(18, 10, "cat")]), 16)
    img_b = prompt_block_hashes(req(base, [(18, 10, "dog")]), 16)
    assert img_a[0] == img_b[0] == h[0] and img_a[1] != img_b[1]  # same ids, other picture


def test_router_prefers_the_core_with_the_prefix_unless_it_is_much_busier() -> None:
    r = PrefixRouter(2, 16, imbalance_abs=4, imbalance_rel=1.5)
    conv = prompt_block_hashes(req(list(range(64))), 16)
    other = prompt_block_hashes(req(list(range(100, 164))), 16)
    first = r.choose(conv, [0, 0])
    second = 1 - first
    r.record(first, conv)
    assert r.match(first, conv) == 4 and r.match(second, conv) == 0

    def loads(mine: int | None, theirs: int | None) -> list[int | None]:
        return [mine, theirs] if first == 0 else [theirs, mine]

    assert r.choose(conv[:2], loads(3, 0)) == first  # affinity beats a small imbalance
    assert r.choose(conv, loads(10, 2)) == second  # ... but not a large one
    assert r.choose(other, loads(5, 2)) == second  # no prefix anywhere: least loaded
    assert r.choose(conv, loads(None, 7)) == second  # the core with the prefix is down
    r.forget(first)
    assert r.match(first, conv) == 0


def test_router_spreads_ties_in_turn_and_bounds_its_memory() -> None:
    r = PrefixRouter(2, 4, capacity=8)
    picks = [r.choose([], [0, 0]) for _ in range(6)]
    assert sorted(picks) == [0, 0, 0, 1, 1, 1]
    hashes = prompt_block_hashes(req(list(range(64))), 4)
    r.record(0, hashes)
    assert r.match(0, hashes) == 0  # the oldest (leading) blocks were forgotten first
    assert r.match(0, hashes[8:]) == 8
