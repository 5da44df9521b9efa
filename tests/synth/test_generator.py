"""The synthetic document generator: determinism, schema-valid JSON, answers that are on the page,
the served prompt format of the training conversations, and the grading helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from glmv.engine.structured import schema_errors
from glmv.synth import DOCUMENT_KINDS, Augment, FontsMissingError, generate
from glmv.synth.formats import capital_amount, money
from glmv.synth.scoring import char_accuracy, field_matches, qa_exact
from glmv.synth.tasks import extraction_example, qa_example, read_example, training_examples
from glmv.tasks.schemas import BUILTIN_SCHEMAS

try:
    from glmv.synth.fonts import find_fonts

    find_fonts()
except FontsMissingError as exc:  # pragma: no cover - CI installs the fonts (make system-deps)
    pytest.skip(f"the generator needs fonts: {exc}", allow_module_level=True)


@pytest.mark.parametrize("kind", sorted(DOCUMENT_KINDS))
def test_every_kind_renders_deterministically_with_valid_json(kind: str) -> None:
    for seed in range(3):
        a, b = generate(kind, seed), generate(kind, seed)
        assert a.image.size == b.image.size and a.image.mode == "RGB"
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert a.text == b.text and a.qa == b.qa and a.data == b.data
        w, h = a.image.size
        assert w % 28 == 0 and h % 28 == 0 and (w // 28) * (h // 28) <= 400  # no resize at serving time
        assert a.qa, "every document has questions"
        for name, preset in BUILTIN_SCHEMAS.items():
            doc = a.extraction(name)
            assert schema_errors(preset.schema, doc) == [], (kind, name, doc)
        if a.schema is not None:
            assert a.extraction(a.schema) == a.data


def test_receipt_facts_are_printed_and_consistent() -> None:
    for seed in range(8):
        doc = generate("receipt", seed, augment=Augment.none())
        data = doc.data
        assert data is not None
        total = doc.answer("total")
        assert total is not None and total in doc.text
        assert float(total) == data["total"]
        assert round(sum(i["amount"] for i in data["items"]) + (data["tax"] or 0), 2) == data["total"]
        assert doc.answer("date") == data["date"]
        assert data["date"].replace("-", "") in doc.text.replace("-", "").replace("/", "").replace(".", "")


def test_invoice_amounts_add_up_and_capital_amount() -> None:
    doc = generate("invoice", 4)
    data = doc.data
    assert data is not None
    assert round(data["金额"] + data["税额"], 2) == data["价税合计"]
    assert f"¥{money(round(data['价税合计'] * 100))}" in doc.text
    assert data["价税合计大写"] in doc.text
    assert data["发票号码"] in doc.text and doc.answer("invoice_number") == data["发票号码"]
    assert capital_amount(189534) == "壹仟捌佰玖拾伍圆叁角肆分"
    assert capital_amount(1320000) == "壹万叁仟贰佰圆整"
    assert capital_amount(100520) == "壹仟零伍圆贰角"


def test_language_can_be_forced() -> None:
    assert generate("receipt", 1, lang="zh").lang == "zh"
    assert generate("receipt", 1, lang="en").lang == "en"


def test_examples_use_the_served_prompts() -> None:
    import random

    doc = generate("invoice", 2)
    ex = extraction_example(doc, "invoice")
    assert ex.turns[0][0] == BUILTIN_SCHEMAS["invoice"].prompt()
    assert json.loads(ex.turns[0][1]) == doc.data
    assert ", " in ex.turns[0][1] and ": " in ex.turns[0][1]  # the grammar's separators
    rng = random.Random(0)
    qa = qa_example(doc, rng, turns=3)
    assert len(qa.turns) == 3 and all((q, a) in [(x.question, x.answer) for x in doc.qa] for q, a in qa.turns)
    assert read_example(doc, rng).turns[0][1] == doc.text
    tasks = {e.task for _ in range(30) for e in training_examples(doc, rng, 3)}
    assert {"extract", "qa", "read"} <= tasks
    messages = qa.messages(upto=2)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"][0] == {"type": "image"}


def test_scoring() -> None:
    assert char_accuracy("abcd", "abcd") == 1.0
    assert char_accuracy("abxd", "abcd") == 0.75
    assert char_accuracy("", "abcd") == 0.0
    assert qa_exact(" 14.50\n", "14.50") and not qa_exact("14.5", "14.50")
    ref = {"a": 14.0, "b": {"c": "x", "d": None}, "e": [1, 2]}
    got = field_matches({"a": 14, "b": {"c": "x", "d": "y"}, "e": [1, 2]}, ref)
    assert got == {"a": True, "b.c": True, "b.d": False, "e": True}
    assert not any(field_matches(None, ref).values())


def test_demo_tokenizer_round_trips_generated_text(tmp_path: Path) -> None:
    from glmv.processing.tokenizer import Tokenizer
    from glmv.synth.tokenizer import write_demo_tokenizer

    write_demo_tokenizer(tmp_path, vocab_size=1200, documents=20)
    tok = Tokenizer.from_pretrained(tmp_path)
    doc = generate("invoice", 7)
    text = doc.text + json.dumps(doc.data, ensure_ascii=False)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    digits = [tok.id_to_token(i) for i in tok.encode("2024-03-15 1895.34")]
    assert "2024" not in digits and "2" in digits  # one digit per token
    for special in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|image|>", "<|begin_of_image|>"):
        assert tok.token_to_id(special) is not None
