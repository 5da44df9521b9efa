"""How `MPEngineClient`'s I/O thread hands a core message's outputs to the event loop: one
wake-up per loop for the whole message (not one per request), each request's items in order,
errors of refused requests before the outputs, finished requests forgotten.

The client is not started: a fake loop records the callbacks, and core messages are fed to
`_handle` directly, as the I/O thread would."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glmv.engine.config import EngineConfig
from glmv.engine.messages import AddFailed, CoreOutput, CoreOutputs, ErrorInfo, SeqOutput
from glmv.engine.mp_client import MPEngineClient, _Entry
from glmv.engine.request import EngineRequest, RequestOutput
from glmv.engine.sampling import SamplingParams
from glmv.engine.stats import EngineStats
from glmv.errors import GlmvError, InvalidRequestError
from glmv.processing.loader import load_tokenizer


class FakeLoop:
    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        self.calls.append((callback, args))

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for callback, args in calls:
            callback(*args)


class Sink:
    def __init__(self) -> None:
        self.items: list[RequestOutput | GlmvError] = []

    def put_nowait(self, item: RequestOutput | GlmvError) -> None:
        self.items.append(item)


def client_with(tiny41_dir: Path, rids: list[str]) -> tuple[MPEngineClient, FakeLoop, dict[str, Sink]]:
    client = MPEngineClient(EngineConfig(model=str(tiny41_dir)), tokenizer=load_tokenizer(tiny41_dir))
    loop = FakeLoop()
    sinks: dict[str, Sink] = {}
    core = client._cores[0]
    core.alive = True
    for rid in rids:
        sinks[rid] = Sink()
        client._entries[rid] = _Entry(0, sinks[rid], loop)  # type: ignore[arg-type]
        core.requests.add(rid)
        client._processor.add(EngineRequest(rid, [5, 6, 7], SamplingParams(max_tokens=4)))
    return client, loop, sinks


def output(rid: str, tokens: list[int], finish: str | None = None) -> CoreOutput:
    return CoreOutput(rid, [SeqOutput(0, tokens, finish_reason=finish)], 3, 0, finish is not None)


def test_one_wake_up_per_message(tiny41_dir: Path) -> None:
    rids = [f"r{i}" for i in range(64)]
    client, loop, sinks = client_with(tiny41_dir, rids)
    core = client._cores[0]
    client._handle(core, CoreOutputs([output(rid, [10]) for rid in rids], EngineStats.empty()))
    assert len(loop.calls) == 1
    assert all(s.items == [] for s in sinks.values())
    loop.run()
    for rid in rids:
        (item,) = sinks[rid].items
        assert isinstance(item, RequestOutput)
        assert item.request_id == rid and item.deltas[0].token_ids == [10] and not item.finished

    # The next message: two more steps of a few requests, the last one finishing r1.
    client._handle(core, CoreOutputs([output("r0", [11]), output("r1", [11])], EngineStats.empty()))
    client._handle(core, CoreOutputs([output("r1", [12], "length")], EngineStats.empty()))
    assert len(loop.calls) == 2
    loop.run()
    assert [o.deltas[0].token_ids for o in sinks["r1"].items] == [[10], [11], [12]]  # type: ignore[union-attr]
    assert sinks["r1"].items[-1].finished  # type: ignore[union-attr]
    assert "r1" not in client._entries and "r1" not in core.requests
    assert "r0" in client._entries


def test_refused_requests_get_their_error_in_the_same_wake_up(tiny41_dir: Path) -> None:
    client, loop, sinks = client_with(tiny41_dir, ["ok", "bad"])
    core = client._cores[0]
    refused = AddFailed("bad", ErrorInfo("InvalidRequestError", "no", "messages"))
    client._handle(core, CoreOutputs([output("ok", [10])], EngineStats.empty(), [], [refused]))
    assert len(loop.calls) == 1
    loop.run()
    (error,) = sinks["bad"].items
    assert isinstance(error, InvalidRequestError) and error.param == "messages"
    assert "bad" not in client._entries
    assert len(sinks["ok"].items) == 1


def test_a_message_with_nothing_to_deliver_wakes_no_loop(tiny41_dir: Path) -> None:
    client, loop, _ = client_with(tiny41_dir, ["r0"])
    client._handle(client._cores[0], CoreOutputs([], EngineStats.empty(), ["r0"]))
    client._handle(client._cores[0], CoreOutputs([output("gone", [1])], EngineStats.empty()))
    assert loop.calls == []


def test_requests_on_two_loops_wake_each_once(tiny41_dir: Path) -> None:
    client, loop, sinks = client_with(tiny41_dir, ["a", "b", "c"])
    other = FakeLoop()
    client._entries["c"] = _Entry(0, sinks["c"], other)  # type: ignore[arg-type]
    client._handle(client._cores[0], CoreOutputs([output(r, [9]) for r in "abc"], EngineStats.empty()))
    assert len(loop.calls) == 1 and len(other.calls) == 1
    loop.run()
    other.run()
    assert all(len(sinks[r].items) == 1 for r in "abc")


def test_real_loop_receives_the_batch(tiny41_dir: Path) -> None:
    """With an asyncio loop and queues, as `generate` uses them."""

    async def main() -> list[int]:
        client, _, _ = client_with(tiny41_dir, [])
        loop = asyncio.get_running_loop()
        queues: dict[str, asyncio.Queue[Any]] = {}
        for rid in ("x", "y"):
            queues[rid] = asyncio.Queue()
            client._entries[rid] = _Entry(0, queues[rid], loop)
            client._processor.add(EngineRequest(rid, [5, 6, 7], SamplingParams(max_tokens=4)))
        client._handle(
            client._cores[0], CoreOutputs([output("x", [3]), output("y", [4])], EngineStats.empty())
        )
        x = await asyncio.wait_for(queues["x"].get(), 60)
        y = await asyncio.wait_for(queues["y"].get(), 60)
        return [*x.deltas[0].token_ids, *y.deltas[0].token_ids]

    assert asyncio.run(main()) == [3, 4]
