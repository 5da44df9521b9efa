"""The front end's output processing: token ids from a core → text, stop strings, usage, logprobs.

A character tokenizer (token id = code point) makes every expected text obvious. The core's
messages are written by hand, including what only the multi-process engine produces: tokens of a
choice that arrive after its stop string matched (the core had not yet heard of the stop).
"""

from __future__ import annotations

from collections.abc import Sequence

from glmv.engine.messages import CoreOutput, ErrorInfo, SeqOutput
from glmv.engine.output_processor import OutputProcessor
from glmv.engine.request import EngineRequest, RequestOutput
from glmv.engine.sampling import SamplingParams
from glmv.errors import EngineError

EOS = 3


class CharTokenizer:
    special_token_ids: set[int] = {EOS}  # noqa: RUF012
    eos_token_ids = (EOS,)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join("" if (skip_special_tokens and i == EOS) else chr(i) for i in ids)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [chr(i) for i in ids]


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def out(rid: str, *seqs: SeqOutput, finished: bool = False, error: ErrorInfo | None = None) -> CoreOutput:
    return CoreOutput(rid, list(seqs), prompt_tokens=4, cached_tokens=2, finished=finished, error=error)


def joined(results: list[RequestOutput]) -> dict[int, tuple[str, list[int], str | None, int | str | None]]:
    acc: dict[int, tuple[str, list[int], str | None, int | str | None]] = {}
    for r in results:
        for d in r.deltas:
            text, toks, _, _ = acc.get(d.index, ("", [], None, None))
            acc[d.index] = (text + d.text, toks + d.token_ids, d.finish_reason, d.stop_reason)
    return acc


def processor(rid: str, **params: object) -> OutputProcessor:
    p = OutputProcessor(CharTokenizer())
    p.add(EngineRequest(rid, ids("abcd"), SamplingParams(**params)))  # type: ignore[arg-type]
    return p


def test_stop_string_across_tokens_cuts_finishes_and_asks_the_core_to_stop() -> None:
    p = processor("r", stop=["cX"])
    res1, stops1 = p.process([out("r", SeqOutput(0, ids("ab")))])
    res2, stops2 = p.process([out("r", SeqOutput(0, ids("cXY")))])
    assert stops1 == [] and stops2 == [("r", 0)]
    assert joined(res1 + res2) == {0: ("ab", ids("abcX"), "stop", "cX")}
    assert res2[-1].finished and res2[-1].completion_tokens == 4  # Y came after the stop: not kept
    assert (res2[-1].prompt_tokens, res2[-1].cached_tokens) == (4, 2)
    # The core had already computed more tokens before it heard of the stop: dropped.
    late, stops = p.process([out("r", SeqOutput(0, ids("ZZ"), finish_reason="length"), finished=True)])
    assert late == [] and stops == [] and len(p) == 0


def test_late_tokens_of_a_stopped_choice_are_dropped_while_the_others_go_on() -> None:
    p = processor("r", n=2, stop=["!"])
    a, s1 = p.process([out("r", SeqOutput(0, ids("hi!")), SeqOutput(1, ids("ok")))])
    b, s2 = p.process([out("r", SeqOutput(0, ids("late")), SeqOutput(1, ids("ay"), finish_reason="length"))])
    assert s1 == [("r", 0)] and s2 == []
    got = joined(a + b)
    assert got[0] == ("hi", ids("hi!"), "stop", "!")
    assert got[1] == ("okay", ids("okay"), "length", None)
    assert not a[-1].finished and b[-1].finished
    assert b[-1].completion_tokens == 3 + 4


def test_a_stop_token_ends_the_text_without_being_part_of_it() -> None:
    p = processor("r")
    res, stops = p.process([out("r", SeqOutput(0, [*ids("done"), EOS], finish_reason="stop"), finished=True)])
    assert stops == []
    assert joined(res) == {0: ("done", [*ids("done"), EOS], "stop", None)}
    assert res[0].completion_tokens == 5  # the eos token counts, as in the OpenAI API


def test_a_stop_string_on_the_last_token_wins_over_length() -> None:
    p = processor("r", stop=["d."])
    res, stops = p.process([out("r", SeqOutput(0, ids("end."), finish_reason="length"), finished=True)])
    assert stops == []  # the core already finished it
    assert joined(res) == {0: ("en", ids("end."), "stop", "d.")}


def test_text_held_back_for_a_possible_stop_is_released_at_the_end() -> None:
    p = processor("r", stop=["xyz"])
    first, _ = p.process([out("r", SeqOutput(0, ids("abx")))])
    assert joined(first)[0][0] == "ab"  # "x" might begin "xyz"
    last, _ = p.process([out("r", SeqOutput(0, ids("y"), finish_reason="length"), finished=True)])
    assert joined(first + last)[0] == ("abxy", ids("abxy"), "length", None)


def test_logprob_texts_and_errors() -> None:
    p = processor("r", logprobs=1)
    seq = SeqOutput(0, ids("A"), logprobs=[-0.5], top_ids=[[ord("B")]], top_logprobs=[[-0.25]])
    err = ErrorInfo("EngineError", "image could not be encoded", code="request_failed")
    res, _ = p.process(
        [out("r", seq), out("r", SeqOutput(0, [], finish_reason="error"), finished=True, error=err)]
    )
    lp = res[0].deltas[0].logprobs
    assert lp is not None and (lp[0].token_id, lp[0].token, lp[0].logprob) == (ord("A"), "A", -0.5)
    assert lp[0].top == [(ord("B"), "B", -0.25)]
    assert isinstance(res[1].error, EngineError) and res[1].error.code == "request_failed"
    assert res[1].finished and res[1].deltas[0].finish_reason == "error"


def test_outputs_of_unknown_or_aborted_requests_are_ignored() -> None:
    p = processor("r")
    p.abort("r")
    assert p.process([out("r", SeqOutput(0, ids("a"))), out("other", SeqOutput(0, ids("b")))]) == ([], [])
