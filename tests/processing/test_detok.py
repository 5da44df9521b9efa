"""Tests for glmv.processing.detok: incremental detokenization and stop strings."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from glmv.errors import EngineError
from glmv.processing.detok import IncrementalDetokenizer, StopStringMatcher, find_stop

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|user|>",
    "<|assistant|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello tokenizer! Numbers 123 and 4567.",
    "我们今天去公园散步，天气很好。",
    "模型的回答在这里：答案是四十二。",
    "emoji 😀🎉 test 中文 mixed text",
] * 4


def _byte_to_char() -> dict[int, str]:
    """GPT-2 byte-level alphabet: byte value -> the character the vocabulary uses for it."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


class TinyTokenizer:
    """Adapter with the interface of glmv.processing.tokenizer.Tokenizer that detok relies on."""

    def __init__(self, raw: Tokenizer) -> None:
        self.raw = raw
        self.special_token_ids: set[int] = {raw.token_to_id(t) for t in SPECIAL_TOKENS}
        self.decode_lengths: list[int] = []
        b2c = _byte_to_char()
        self.byte_ids: dict[int, int] = {b: raw.token_to_id(c) for b, c in b2c.items()}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.decode_lengths.append(len(ids))
        return self.raw.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.raw.id_to_token(i) for i in ids]

    def encode(self, text: str) -> list[int]:
        return self.raw.encode(text, add_special_tokens=False).ids

    def bytes_to_ids(self, data: bytes) -> list[int]:
        return [self.byte_ids[b] for b in data]

    @property
    def vocab_size(self) -> int:
        return self.raw.get_vocab_size()


def _build_tokenizer() -> TinyTokenizer:
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    return TinyTokenizer(raw)


TOK = _build_tokenizer()
VOCAB = TOK.vocab_size
REPL = "\ufffd"

# Text made of pieces the tiny vocabulary knows, merges inside Chinese characters, emoji and tags.
TEXT_ALPHABET = list("abc xyz.,!\n") + list("我们天气模型答案中文") + ["😀", "🎉", "é", "ß"]
TEXT_PIECES = st.one_of(
    st.sampled_from(TEXT_ALPHABET),
    st.sampled_from(["<think>", "</think>", "<answer>", "<|begin_of_box|>", "hello", "天气很好"]),
)


def _stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], cuts: Sequence[int] | None = None
) -> list[str]:
    """Feed ids in chunks (sizes from `cuts`, cycling; default one at a time)."""
    deltas: list[str] = []
    sizes = list(cuts) if cuts else [1]
    i = k = 0
    while i < len(ids):
        size = max(1, sizes[k % len(sizes)])
        deltas.append(detok.add(ids[i : i + size]))
        i += size
        k += 1
    deltas.append(detok.finish())
    return deltas


# -- tokenizer sanity ------------------------------------------------------------------------------


def test_tiny_tokenizer_splits_chinese_and_emoji_across_tokens() -> None:
    ids = TOK.encode("天气 😀")
    pieces = [TOK.decode([i]) for i in ids]
    assert any(REPL in p for p in pieces), pieces
    assert TOK.decode(ids) == "天气 😀"
    # some learned merges cover only part of a character's bytes
    partial = [i for i in range(VOCAB) if REPL in TOK.decode([i]) and len(TOK.raw.id_to_token(i)) >= 2]
    assert partial


# -- IncrementalDetokenizer ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=st.lists(st.integers(min_value=0, max_value=VOCAB - 1), max_size=60),
    cuts=st.lists(st.integers(min_value=1, max_value=5), max_size=4),
    skip=st.booleans(),
)
def test_random_ids_concatenate_to_full_decode(ids: list[int], cuts: list[int], skip: bool) -> None:
    detok = IncrementalDetokenizer(TOK, skip_special_tokens=skip)
    deltas = _stream(detok, ids, cuts)
    expected = TOK.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == expected
    assert detok.text == expected
    assert detok.output_token_ids == ids


@settings(max_examples=200, deadline=None)
@given(
    raw=st.lists(st.integers(min_value=0, max_value=255), max_size=40),
    specials=st.lists(st.sampled_from(sorted(TOK.special_token_ids)), max_size=3),
    skip=st.booleans(),
    data=st.data(),
)
def test_raw_byte_streams_with_interleaved_specials(
    raw: list[int], specials: list[int], skip: bool, data: st.DataObject
) -> None:
    """Single-byte tokens exercise every invalid/incomplete UTF-8 shape."""
    ids = TOK.bytes_to_ids(bytes(raw))
    for sp in specials:
        ids.insert(data.draw(st.integers(min_value=0, max_value=len(ids))), sp)
    detok = IncrementalDetokenizer(TOK, skip_special_tokens=skip)
    assert "".join(_stream(detok, ids)) == TOK.decode(ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(TEXT_PIECES, max_size=30), skip=st.booleans())
def test_valid_text_never_emits_partial_characters(pieces: list[str], skip: bool) -> None:
    text = "".join(pieces)
    ids = TOK.encode(text)
    detok = IncrementalDetokenizer(TOK, skip_special_tokens=skip)
    deltas = _stream(detok, ids)
    assert all(REPL not in d for d in deltas)
    assert "".join(deltas) == TOK.decode(ids, skip_special_tokens=skip)
    if not skip:
        assert "".join(deltas) == text


def test_chinese_character_is_held_until_complete() -> None:
    ids = TOK.bytes_to_ids("中".encode())  # three byte tokens
    detok = IncrementalDetokenizer(TOK)
    assert detok.add(ids[:1]) == ""
    assert detok.add(ids[1:2]) == ""
    assert detok.add(ids[2:]) == "中"
    assert detok.finish() == ""
    assert detok.text == "中"


def test_emoji_split_across_calls_and_text_after_it() -> None:
    ids = TOK.bytes_to_ids("😀".encode()) + TOK.encode(" ok")
    detok = IncrementalDetokenizer(TOK)
    out = [detok.add([i]) for i in ids]
    assert out[:3] == ["", "", ""]
    assert out[3] == "😀"
    assert "".join(out) == "😀 ok"


def test_invalid_bytes_before_valid_text_are_emitted_as_replacement() -> None:
    # E4 B8 is an unfinished character that "a" terminates; 0x80 alone is invalid.
    ids = TOK.bytes_to_ids(b"\xe4\xb8a\x80b")
    detok = IncrementalDetokenizer(TOK)
    deltas = [detok.add([i]) for i in ids]
    assert deltas == ["", "", REPL + "a", "", REPL + "b"]


def test_finish_flushes_incomplete_tail_as_replacement() -> None:
    ids = TOK.encode("ok") + TOK.bytes_to_ids("中".encode()[:2])
    detok = IncrementalDetokenizer(TOK)
    assert detok.add(ids) == "ok"
    assert detok.finish() == REPL
    assert detok.text == "ok" + REPL == TOK.decode(ids)
    assert detok.finish() == ""
    with pytest.raises(EngineError):
        detok.add([1])


def test_text_before_an_incomplete_tail_is_not_delayed() -> None:
    ids = TOK.encode("ab") + TOK.bytes_to_ids(b"\xe4")
    detok = IncrementalDetokenizer(TOK)
    assert detok.add(ids) == "ab"
    assert detok.add(TOK.bytes_to_ids(b"\xb8\xad")) == "中"


def test_special_tokens_kept_or_skipped() -> None:
    think, end = TOK.raw.token_to_id("<think>"), TOK.raw.token_to_id("</think>")
    ids = [think, *TOK.encode("hm"), end, *TOK.encode("天气")]
    kept = IncrementalDetokenizer(TOK)
    assert "".join(_stream(kept, ids)) == "<think>hm</think>天气"
    skipped = IncrementalDetokenizer(TOK, skip_special_tokens=True)
    assert [skipped.add([think])] == [""]
    assert "".join(_stream(skipped, ids[1:])) == "hm天气"


def test_prompt_context_does_not_change_output() -> None:
    prompt = [*TOK.encode("我们今天 hello"), TOK.raw.token_to_id("<|assistant|>")]
    out_ids = TOK.encode(" world 天气很好 😀")
    for skip in (False, True):
        detok = IncrementalDetokenizer(TOK, prompt_token_ids=prompt, skip_special_tokens=skip)
        assert "".join(_stream(detok, out_ids)) == TOK.decode(out_ids, skip_special_tokens=skip)
        assert detok.output_token_ids == out_ids
        assert detok.num_output_tokens == len(out_ids)


def test_prompt_ending_inside_a_character_is_ignored_as_context() -> None:
    prompt = TOK.encode("hi") + TOK.bytes_to_ids(b"\xe4")
    out_ids = TOK.encode("ok天")
    detok = IncrementalDetokenizer(TOK, prompt_token_ids=prompt)
    assert "".join(_stream(detok, out_ids)) == "ok天"


def test_work_per_token_is_bounded_for_long_valid_output() -> None:
    text = "我们今天去公园散步，天气很好。 The quick brown fox 😀🎉. " * 60
    ids = TOK.encode(text)
    assert len(ids) > 2000
    TOK.decode_lengths.clear()
    detok = IncrementalDetokenizer(TOK)
    assert "".join(_stream(detok, ids)) == text
    assert max(TOK.decode_lengths) <= 10
    assert sum(TOK.decode_lengths) <= 8 * len(ids)


def test_work_is_bounded_for_a_long_run_of_invalid_bytes() -> None:
    # 600 lone continuation bytes: every step ends in U+FFFD; the window must not grow with it.
    ids = TOK.bytes_to_ids(b"\x80" * 600 + b"\xe4\xb8\xad")
    TOK.decode_lengths.clear()
    detok = IncrementalDetokenizer(TOK)
    deltas = _stream(detok, ids)
    assert "".join(deltas) == REPL * 600 + "中"
    assert max(TOK.decode_lengths) <= 24
    # output is not held back until the end either
    assert len("".join(deltas[:300])) >= 290


# -- stop strings ------------------------------------------------------------------------------------


def _expected_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Reference: cut before the stop occurrence that ends first (longest on a tie)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if s and text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return text[: end - len(s)], s
    return text, None


def _run_matcher(matcher: StopStringMatcher, deltas: Sequence[str]) -> tuple[str, bool]:
    out: list[str] = []
    stopped = False
    for d in deltas:
        piece, stopped = matcher.feed(d)
        out.append(piece)
        if stopped:
            break
    out.append(matcher.flush())
    return "".join(out), stopped


def _split_text(text: str, cuts: Sequence[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    parts, last = [], 0
    for p in points:
        parts.append(text[last:p])
        last = p
    parts.append(text[last:])
    return parts


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="ab<>\n中x", max_size=40),
    stops=st.lists(st.text(alphabet="ab<>\n中", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=10),
)
def test_stop_matcher_streaming_equals_truncation(text: str, stops: list[str], cuts: list[int]) -> None:
    expected, matched = _expected_stop(text, stops)
    matcher = StopStringMatcher(stops)
    got, stopped = _run_matcher(matcher, _split_text(text, cuts))
    assert got == expected
    assert stopped == (matched is not None)
    assert matcher.matched == matched
    hit = find_stop(text, stops)
    assert (hit is None) == (matched is None)
    if hit is not None:
        assert text[: hit[0]] == expected


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc d", max_size=40),
    stops=st.lists(st.sampled_from(["abc", "bc d", "d", "cab", "a b"]), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=10),
)
def test_stop_matcher_earliest_occurrence_when_no_stop_contains_another(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    if any(a != b and a in b for a in stops for b in stops):
        return
    firsts = [text.find(s) for s in stops if s in text]
    expected = text[: min(firsts)] if firsts else text
    got, _ = _run_matcher(StopStringMatcher(stops), _split_text(text, cuts))
    assert got == expected


def test_stop_across_deltas_and_held_text() -> None:
    m = StopStringMatcher(["</answer>", "STOP"])
    assert m.feed("The answer </an") == ("The answer ", False)
    assert m.feed("swer is near") == ("</answer is near", False)
    assert m.feed(" ST") == (" ", False)
    assert m.feed("OP and more") == ("", True)
    assert m.matched == "STOP"
    assert m.feed("ignored") == ("", True)
    assert m.flush() == ""


def test_stop_held_text_is_released_by_flush() -> None:
    m = StopStringMatcher(["\n\nUser:"])
    assert m.feed("hello\n") == ("hello", False)
    assert m.feed("\nUse") == ("", False)
    assert m.flush() == "\n\nUse"
    assert not m.stopped


def test_stop_matcher_without_stops_passes_through() -> None:
    m = StopStringMatcher([])
    assert not m.active
    assert m.feed("anything <") == ("anything <", False)
    assert m.flush() == ""
    m2 = StopStringMatcher(["", "x"])
    assert m2.feed("abxc") == ("ab", True)


def test_stop_string_with_chinese_and_overlap() -> None:
    m = StopStringMatcher(["答案", "aab"])
    assert m.feed("aa") == ("", False)
    assert m.feed("aab") == ("aa", True)
    m = StopStringMatcher(["答案"])
    assert m.feed("模型答") == ("模型", False)
    assert m.feed("复") == ("答复", False)
    assert m.feed("答案是") == ("", True)
