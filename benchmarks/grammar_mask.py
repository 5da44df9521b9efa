"""Per-step token-mask cost of the two grammar libraries on a GLM-sized (151,552-token) vocabulary.

    python benchmarks/grammar_mask.py [--steps 64] [--batches 1 32] [--threads N]

Builds a byte-level vocabulary of the GLM-4.1V size (the tiny checkpoint's trained BPE tokens
plus seeded filler tokens drawn like a real 150k vocabulary: English word pieces with and without
a leading space, digits, punctuation runs, whitespace runs, CJK words, JSON-ish fragments), the
GLM special tokens and padding to 151,552 ids. Both libraries get the same token bytes, special
ids and stop ids. For each schema (the built-in `invoice`, a flat 4-field object, and
`json_object`) it compiles a grammar, then walks a valid document token by token, measuring per
step: filling the packed allowed-token bitmask for every sequence of the batch (batch 1: one
matcher; batch 32: 32 matchers, through each library's parallel batch call), and advancing the
matchers by the sampled token. Applying the mask to the logits is glmv's own code and the same
for both, so it is timed once. Prints one table; the numbers are recorded in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL_VOCAB = 151_552

_WORD_TEXT = (
    "invoice total amount date number seller buyer tax name address phone bank account item "
    "quantity unit price remark code payee reviewer drawer receipt store cashier change card "
    "table row column header message sender time text license company registered capital scope "
    "the of and to in is for on with as by at from this that be are was it not or have an"
)


def _filler_tokens(count: int, seed: int, taken: set[bytes]) -> list[bytes]:
    """`count` distinct byte strings shaped like the tokens of a large byte-level BPE vocabulary."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    punct = list("\"',.:;!?()[]{}<>-_=+*/\\|@#$%^&~`")
    cjk_ranges = [(0x4E00, 0x9FA5)]
    words = _WORD_TEXT.split(" ")
    out: list[bytes] = []
    seen = set(taken)

    def cjk(n: int) -> str:
        lo, hi = cjk_ranges[0]
        # A few thousand common characters carry most real CJK tokens.
        return "".join(chr(lo + int(rng.paretovariate(1.2) * 40) % (hi - lo)) for _ in range(n))

    makers: list[tuple[float, Callable[[], str]]] = [
        (0.42, lambda: " " + "".join(rng.choice(letters) for _ in range(rng.randint(2, 10)))),
        (0.16, lambda: "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))),
        (
            0.08,
            lambda: (" " if rng.random() < 0.5 else "") + rng.choice(words).capitalize() + rng.choice(words),
        ),
        (0.16, lambda: cjk(rng.randint(1, 4))),
        (0.05, lambda: "".join(rng.choice(punct) for _ in range(rng.randint(1, 4)))),
        (0.03, lambda: str(rng.randint(0, 999))),
        (0.03, lambda: rng.choice([" ", "\n", "\t"]) * rng.randint(1, 16)),
        (
            0.04,
            lambda: (
                rng.choice(['{"', '":', '",', '"}', '":"', '","', "},", "],", '["', '":{', '":['])
                + "".join(rng.choice(letters) for _ in range(rng.randint(0, 6)))
            ),
        ),
        (0.03, lambda: bytes(rng.randint(0x80, 0xFF) for _ in range(rng.randint(1, 2))).decode("latin-1")),
    ]
    weights = [w for w, _ in makers]
    while len(out) < count:
        make = rng.choices([m for _, m in makers], weights)[0]
        text = make()
        raw = (
            text.encode("latin-1")
            if all(ord(c) < 256 for c in text) and any(ord(c) > 127 for c in text)
            else text.encode()
        )
        if raw and raw not in seen:
            seen.add(raw)
            out.append(raw)
    return out


def build_full_vocab(seed: int = 0) -> tuple[list[bytes], set[int], list[int]]:
    """(token bytes by id, special ids, stop ids) of a 151,552-id GLM-like vocabulary."""
    from glmv.engine.structured import token_bytes_table
    from glmv.models.tiny import create_tiny_model
    from glmv.processing.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        directory = create_tiny_model(Path(tmp) / "tiny", variant="glm41v", seed=seed)
        tok = Tokenizer.from_pretrained(directory)
        table, special = token_bytes_table(tok, tok.vocab_size)
        names = [tok.id_to_token(i) or "" for i in sorted(tok.added_token_ids)]
        eos_names = [tok.id_to_token(i) for i in tok.eos_token_ids]
    base = [table[i] for i in range(len(table)) if i not in special]
    n_special = len(names)
    fillers = _filler_tokens(FULL_VOCAB - 208 - n_special - len(base), seed, set(base))
    vocab = base + fillers
    first_special = len(vocab)
    vocab += [b""] * n_special  # special tokens carry no text the grammar may use
    special_ids = set(range(first_special, first_special + n_special))
    stop_ids = [first_special + names.index(n) for n in eos_names if n in names]
    special_ids |= set(range(len(vocab), FULL_VOCAB))
    vocab += [b""] * (FULL_VOCAB - len(vocab))
    return vocab, special_ids, stop_ids


def greedy_tokenize(text: str, index: dict[bytes, int], max_len: int = 24) -> list[int]:
    """Longest-match tokenization of `text` over the vocabulary (a plausible model output)."""
    data = text.encode()
    out: list[int] = []
    i = 0
    while i < len(data):
        for n in range(min(max_len, len(data) - i), 0, -1):
            tid = index.get(data[i : i + n])
            if tid is not None:
                out.append(tid)
                i += n
                break
        else:
            raise ValueError(f"byte {data[i]} has no token")
    return out


_FLAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string", "enum": ["Beijing", "Shanghai", "Shenzhen"]},
        "vip": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "vip"],
    "additionalProperties": False,
}
_FLAT_DOC = {"name": "Zhang Wei, senior accountant", "age": 41, "city": "Shenzhen", "vip": True}


def _documents() -> list[tuple[str, dict[str, Any] | None, str]]:
    from glmv.tasks.schemas import BUILTIN_SCHEMAS, example_document

    invoice = BUILTIN_SCHEMAS["invoice"].schema
    doc = json.dumps(example_document("invoice"), ensure_ascii=False, separators=(",", ":"))
    obj = json.dumps(
        {"title": "季度报告", "items": [{"k": "营收", "v": 1234.5}, {"k": "利润", "v": -3}], "ok": None},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return [
        ("invoice", invoice, doc),
        ("flat-4", _FLAT, json.dumps(_FLAT_DOC, separators=(",", ":"))),
        ("json_object", None, obj),
    ]


def _time_per_step(run_step: Callable[[int], None], steps: int) -> float:
    start = time.perf_counter()
    for s in range(steps):
        run_step(s)
    return (time.perf_counter() - start) / steps * 1e6


def bench_llguidance(
    vocab: list[bytes],
    special: set[int],
    stops: list[int],
    cases: list[Any],
    batches: list[int],
    threads: int,
    keep_masks: list[torch.Tensor],
) -> list[tuple[str, str, int, float, float, float]]:
    import llguidance as llg
    import llguidance.torch as llt

    index = {v: i for i, v in enumerate(vocab) if v and i not in special}

    class _Words:
        eos_token_id = stops[0]
        bos_token_id = None
        tokens = vocab
        special_token_ids = sorted(special)

        def __call__(self, s: bytes | str) -> list[int]:  # llguidance tokenizes forced bytes with it
            return greedy_tokenize(s.decode("utf-8", "replace") if isinstance(s, bytes) else s, index)

    t0 = time.perf_counter()
    tok = llg.LLTokenizer(llg.TokenizerWrapper(_Words()), n_vocab=FULL_VOCAB, eos_token=stops)
    setup = time.perf_counter() - t0
    executor = llg.LLExecutor(num_threads=threads)
    rows = []
    for name, schema, ids in cases:
        t0 = time.perf_counter()
        grammar = llg.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else {"type": "object"},
            defaults={"whitespace_flexible": False},
        )
        base = llg.LLMatcher(tok, grammar, log_level=0)
        assert not base.is_error(), base.get_error()
        compile_ms = (time.perf_counter() - t0) * 1e3
        for b in batches:
            matchers = [base.deep_copy() for _ in range(b)]
            mask = llt.allocate_token_bitmask(b, FULL_VOCAB)
            fill = adv = 0.0
            steps = len(ids)
            for s in range(steps):
                t = time.perf_counter()
                if b == 1:
                    llt.fill_next_token_bitmask(matchers[0], mask, 0)
                else:
                    llt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
                t2 = time.perf_counter()
                if b == 1 and name == "invoice":
                    keep_masks.append(mask.clone())
                for m in matchers:
                    ok = m.consume_token(ids[s])
                    assert ok, (name, s, m.get_error())
                fill += t2 - t
                adv += time.perf_counter() - t2
            rows.append(("llguidance", name, b, fill / steps * 1e6, adv / steps * 1e6, compile_ms))
    print(f"llguidance {_version('llguidance')}: tokenizer set-up {setup * 1e3:.0f} ms")
    return rows


def bench_xgrammar(
    vocab: list[bytes],
    special: set[int],
    stops: list[int],
    cases: list[Any],
    batches: list[int],
    threads: int,
) -> list[tuple[str, str, int, float, float, float]]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=FULL_VOCAB, stop_token_ids=stops)
    compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
    setup = time.perf_counter() - t0
    batch_matcher = xgr.BatchGrammarMatcher(max_threads=threads)
    rows = []
    for name, schema, ids in cases:
        t0 = time.perf_counter()
        if schema is None:
            compiled = compiler.compile_builtin_json_grammar()
        else:
            compiled = compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, separators=(",", ":")
            )
        compile_ms = (time.perf_counter() - t0) * 1e3
        for b in batches:
            matchers = [xgr.GrammarMatcher(compiled) for _ in range(b)]
            mask = xgr.allocate_token_bitmask(b, FULL_VOCAB)
            fill = adv = 0.0
            steps = len(ids)
            for s in range(steps):
                t = time.perf_counter()
                if b == 1:
                    matchers[0].fill_next_token_bitmask(mask, 0)
                else:
                    batch_matcher.batch_fill_next_token_bitmask(matchers, mask)
                t2 = time.perf_counter()
                for m in matchers:
                    ok = m.accept_token(ids[s])
                    assert ok, (name, s)
                fill += t2 - t
                adv += time.perf_counter() - t2
            rows.append(("xgrammar", name, b, fill / steps * 1e6, adv / steps * 1e6, compile_ms))
    print(f"xgrammar {_version('xgrammar')}: tokenizer set-up {setup * 1e3:.0f} ms")
    return rows


def bench_apply(masks: list[torch.Tensor], batches: list[int], device: str) -> dict[int, float]:
    """glmv's `apply_bitmask` over the masks a real walk produced (batch b: b consecutive steps)."""
    from glmv.engine.structured import apply_bitmask

    stack = torch.cat(masks)
    out = {}
    for b in batches:
        logits = torch.randn(b, FULL_VOCAB, device=device)
        groups = [stack[i : i + b] for i in range(0, max(1, stack.shape[0] - b + 1), max(1, b // 4))][:64]
        for g in groups[:3]:
            apply_bitmask(logits, g)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for g in groups:
            apply_bitmask(logits, g)
        if device == "cuda":
            torch.cuda.synchronize()
        out[b] = (time.perf_counter() - t) / len(groups) * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--no-xgrammar", action="store_true", help="measure llguidance only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    t0 = time.perf_counter()
    vocab, special, stops = build_full_vocab()
    index = {v: i for i, v in enumerate(vocab) if v and i not in special}
    cases = [(name, schema, greedy_tokenize(doc, index)) for name, schema, doc in _documents()]
    print(
        f"vocabulary: {len(vocab)} ids, {len(special)} special/padding, stops {stops}; "
        f"built in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs, {args.threads} grammar threads"
    )
    for name, _, ids in cases:
        print(f"  document {name}: {len(ids)} tokens")
    rows = []
    masks: list[torch.Tensor] = []
    rows += bench_llguidance(vocab, special, stops, cases, args.batches, args.threads, masks)
    if not args.no_xgrammar:
        rows += bench_xgrammar(vocab, special, stops, cases, args.batches, args.threads)
    apply = bench_apply(masks, args.batches, args.device)
    print()
    print("| library | schema | batch | fill mask µs/step | advance µs/step | fill per seq µs | compile ms |")
    print("|---|---|---|---|---|---|---|")
    for lib, name, b, fill, adv, comp in rows:
        print(f"| {lib} | {name} | {b} | {fill:.1f} | {adv:.1f} | {fill / b:.1f} | {comp:.1f} |")
    print()
    for b, us in apply.items():
        print(
            f"apply_bitmask on {args.device}, batch {b}: {us:.1f} µs/step "
            "(glmv's, same for both libraries; the invoice walk's real masks)"
        )


if __name__ == "__main__":
    main()
