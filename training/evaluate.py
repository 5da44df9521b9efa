"""Grade a demo-model checkpoint on held-out synthetic documents.

    python -m training.evaluate --model glmv/checkpoints/glmv-demo                 # glmv engine, CPU float32
    python -m training.evaluate --model DIR --backend hf --device cuda --dtype bfloat16   # transformers
    python -m training.evaluate --url http://127.0.0.1:8000                         # a running server

Held-out documents use negative seeds (training draws non-negative ones) with the training
augmentations. Reported per task: character accuracy of reading, exact match of question answers
(per key; "总金额是多少？" / "What is the total?" and "What is the date?" / "日期是哪天？" are asked
of every receipt and invoice), and per-field exact match of extraction for every built-in schema,
plus the amount/date/number fields of `invoice` and `receipt` (`KEY_FIELDS`). The glmv and server
backends extract exactly as POST /v1/extract does (the preset prompt, the JSON-Schema grammar,
greedy); the transformers backend decodes without a grammar.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmv.synth import SyntheticDocument, generate
from glmv.synth.scoring import KEY_FIELDS, Tally, char_accuracy, field_matches, qa_exact
from glmv.synth.tasks import READ_PROMPTS
from glmv.tasks.schemas import BUILTIN_SCHEMAS

__all__ = ["EvalItem", "eval_items", "main", "score"]

MAIN_SCHEMAS = ("invoice", "receipt")
CANONICAL = {"total": ("总金额是多少？", "What is the total?"), "date": ("What is the date?", "日期是哪天？")}
KIND_OF_SCHEMA = {s: s for s in BUILTIN_SCHEMAS}


@dataclass(slots=True)
class EvalItem:
    kind: str
    seed: int
    task: str  # extract, qa, read
    prompt: str
    reference: Any  # str, or the JSON object for extraction
    key: str  # schema name for extraction, QA key, or the kind for reading
    doc: SyntheticDocument | None = None

    def document(self) -> SyntheticDocument:
        if self.doc is None:
            self.doc = generate(self.kind, self.seed)
        return self.doc


def eval_items(
    n_extract: int = 60, n_extract_other: int = 20, n_qa: int = 200, n_read: int = 40
) -> list[EvalItem]:
    """The held-out set: documents from negative seeds, one item each."""
    items: list[EvalItem] = []
    seed = -1

    def next_doc(kind: str) -> SyntheticDocument:
        nonlocal seed
        seed -= 1
        return generate(kind, seed)

    for schema in BUILTIN_SCHEMAS:
        for _ in range(n_extract if schema in MAIN_SCHEMAS else n_extract_other):
            doc = next_doc(KIND_OF_SCHEMA[schema])
            items.append(
                EvalItem(
                    doc.kind,
                    seed,
                    "extract",
                    BUILTIN_SCHEMAS[schema].prompt(),
                    doc.extraction(schema),
                    schema,
                    doc,
                )
            )
    others = ("id_card", "business_license", "business_card", "table", "chat_screenshot")
    for i in range(n_qa):
        kind = ("receipt", "invoice")[i % 2] if i % 5 != 4 else others[(i // 5) % len(others)]
        doc = next_doc(kind)
        if kind in MAIN_SCHEMAS and (i // 2) % 3 < 2:
            key = ("total", "date")[(i // 2) % 3]
            question = CANONICAL[key][(i // 6) % 2]
            answer = doc.answer(key)
            assert answer is not None
        else:
            qa = doc.qa[(i * 7) % len(doc.qa)]
            key, question, answer = qa.key, qa.question, qa.answer
        items.append(EvalItem(kind, seed, "qa", question, answer, key, doc))
    kinds = ("receipt", "invoice", "id_card", "business_license", "business_card", "table", "chat_screenshot")
    for i in range(n_read):
        doc = next_doc(kinds[i % len(kinds)])
        prompt = READ_PROMPTS[1 if doc.lang == "zh" else 0][0]
        items.append(EvalItem(doc.kind, seed, "read", prompt, doc.text, doc.kind, doc))
    return items


def score(items: list[EvalItem], answers: list[str], tally: Tally | None = None) -> Tally:
    tally = tally or Tally()
    for item, answer in zip(items, answers, strict=True):
        if item.task == "read":
            acc = char_accuracy(answer, item.reference)
            tally.add(f"read/{item.kind}", acc)
            tally.add("read/all", acc)
        elif item.task == "qa":
            ok = qa_exact(answer, item.reference)
            tally.add(f"qa/{item.key}", ok)
            tally.add(f"qa/by_kind/{item.kind}", ok)
            tally.add("qa/all", ok)
            if item.kind in MAIN_SCHEMAS and item.key in CANONICAL:
                tally.add("qa/receipt_invoice_total_date", ok)
        else:
            schema = item.key
            try:
                data = json.loads(answer)
            except ValueError:
                data = None
            tally.add(f"extract/{schema}/valid_json", isinstance(data, dict))
            matches = field_matches(data, item.reference)
            for path, ok in matches.items():
                tally.add(f"extract/{schema}/all_fields", ok)
                if path in KEY_FIELDS.get(schema, ()):
                    tally.add(f"extract/{schema}/key_fields", ok)
                    tally.add(f"extract/{schema}/field/{path}", ok)
                    tally.add("extract/invoice_receipt_key_fields", ok)
            tally.add(f"extract/{schema}/document_exact", all(matches.values()))
    return tally


def _max_tokens(item: EvalItem) -> int:
    return {"extract": 480, "qa": 48, "read": 400}[item.task]


# --- backends ---------------------------------------------------------------------------------------------


def run_glmv(items: list[EvalItem], model: str, dtype: str, progress: bool = True) -> list[str]:
    """glmv's offline `LLM` in this process: extraction with the schema grammar, as /v1/extract
    serves it. Items that share sampling settings (the task, and the schema of an extraction) are
    submitted together and batched by the engine."""
    from glmv.tasks.llm import LLM
    from glmv.tasks.structured import json_schema_output
    from glmv.tasks.types import SamplingParams

    llm = LLM(model, dtype=dtype, max_model_len=4096)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item.task, item.key if item.task == "extract" else ""), []).append(i)
    answers = [""] * len(items)
    try:
        for (task, schema_name), indices in groups.items():
            structured = None
            if task == "extract":
                schema = BUILTIN_SCHEMAS[schema_name].schema
                structured = (
                    json_schema_output(schema, param="schema").with_thinking(False).with_close_on_budget()
                )
            params = SamplingParams(
                temperature=0.0, max_tokens=_max_tokens(items[indices[0]]), structured=structured
            )
            conversations = [
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": items[i].document().image},
                            {"type": "text", "text": items[i].prompt},
                        ],
                    }
                ]
                for i in indices
            ]
            results = llm.chat(conversations, params, use_tqdm=progress)
            for i, result in zip(indices, results, strict=True):
                answers[i] = result.outputs[0].text if result.outputs else ""
    finally:
        llm.close()
    return answers


def _data_url(item: EvalItem) -> str:
    buf = io.BytesIO()
    item.document().image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_server(items: list[EvalItem], url: str, concurrency: int = 8) -> list[str]:
    """A running glmv server: POST /v1/extract and /v1/chat/completions."""
    import asyncio

    import httpx

    async def one(client: httpx.AsyncClient, item: EvalItem) -> str:
        if item.task == "extract":
            r = await client.post(
                "/v1/extract",
                json={"images": [_data_url(item)], "schema": item.key, "max_tokens": _max_tokens(item)},
            )
            return json.dumps(r.json().get("data"), ensure_ascii=False) if r.status_code == 200 else ""
        body = {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _data_url(item)}},
                        {"type": "text", "text": item.prompt},
                    ],
                }
            ],
            "temperature": 0,
            "max_tokens": _max_tokens(item),
        }
        r = await client.post("/v1/chat/completions", json=body)
        return str(r.json()["choices"][0]["message"]["content"] or "") if r.status_code == 200 else ""

    async def all_items() -> list[str]:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=600) as client:

            async def guarded(item: EvalItem) -> str:
                async with sem:
                    return await one(client, item)

            return list(await asyncio.gather(*(guarded(it) for it in items)))

    return asyncio.run(all_items())


def run_hf(
    items: list[EvalItem],
    model_or_dir: Any,
    checkpoint: str,
    device: str,
    dtype: str,
    batch_size: int = 64,
    deadline: float | None = None,
    max_new_cap: int | None = None,
) -> list[str | None]:
    """transformers, greedy without a grammar (the device check right after training). Items not
    reached before `deadline` (time.monotonic()) get None."""
    import torch

    from training.data import Encoder, encode_example
    from training.model import Batch, greedy

    enc = Encoder(checkpoint)
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    if isinstance(model_or_dir, str):
        from transformers import Glm4vForConditionalGeneration

        model = (
            Glm4vForConditionalGeneration.from_pretrained(model_or_dir, dtype=torch_dtype).to(device).eval()
        )
    else:
        model = model_or_dir
    image_id = enc.chat.image_token_id
    stop = set(enc.tokenizer.eos_token_ids)
    pad = enc.tokenizer.pad_token_id or 0
    answers: list[str | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: (items[i].task, items[i].kind))
    from glmv.synth.tasks import Example

    for start in range(0, len(order), batch_size):
        if deadline is not None and time.monotonic() > deadline:
            print(f"eval: deadline reached after {start} of {len(order)} items", flush=True)
            break
        chunk = order[start : start + batch_size]
        seqs = []
        for i in chunk:
            item = items[i]
            pixels = enc.images.resize(item.document().image)
            grid = (1, pixels.shape[0] // 14, pixels.shape[1] // 14)
            example = Example(item.task, [(item.prompt, "")])
            e = encode_example(enc, example, grid)
            n = len(e.ids) - 1  # drop the end-of-turn token after the empty answer
            seqs.append((e.ids[:n], e.targets[:n], e.positions[:, :n], item.task, pixels, grid))
        batch = Batch.build(seqs, enc.images, pad, torch.device(device))
        with torch.autocast(
            device_type=torch.device(device).type, dtype=torch_dtype, enabled=torch_dtype != torch.float32
        ):
            budget = max(_max_tokens(items[i]) for i in chunk)
            outs = greedy(model, batch, image_id, stop, min(budget, max_new_cap or budget), pad, deadline)
        for i, toks in zip(chunk, outs, strict=True):
            answers[i] = enc.tokenizer.decode(toks)
    return answers


def report(
    tally: Tally, items: list[EvalItem], answers: list[str], meta: dict[str, Any], out: Path | None
) -> None:
    print(tally.table())
    if out is not None:
        examples = [
            {
                "task": it.task,
                "kind": it.kind,
                "key": it.key,
                "prompt": it.prompt[:80],
                "reference": it.reference,
                "answer": a,
            }
            for it, a in list(zip(items, answers, strict=True))[::9]
        ]
        out.write_text(
            json.dumps(
                {"meta": meta, "scores": tally.as_dict(), "examples": examples}, ensure_ascii=False, indent=1
            )
            + "\n",
            encoding="utf-8",
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="checkpoint folder (glmv and hf backends)")
    p.add_argument("--url", help="a running glmv server (backend server)")
    p.add_argument("--backend", choices=("glmv", "hf", "server"), default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--extract", type=int, default=60, help="documents per schema for invoice and receipt")
    p.add_argument("--extract-other", type=int, default=20, help="documents per other schema")
    p.add_argument("--qa", type=int, default=200)
    p.add_argument("--read", type=int, default=40)
    p.add_argument("--out", type=Path, help="write scores and sample answers as JSON here")
    args = p.parse_args(argv)
    backend = args.backend or ("server" if args.url else "glmv")
    items = eval_items(args.extract, args.extract_other, args.qa, args.read)
    started = time.monotonic()
    answers: list[str]
    if backend == "server":
        if not args.url:
            p.error("--url is needed for the server backend")
        answers = run_server(items, args.url)
    elif backend == "hf":
        answers = [a or "" for a in run_hf(items, args.model, args.model, args.device, args.dtype)]
    else:
        if not args.model:
            from glmv.models.defaults import default_model_dir

            args.model = str(default_model_dir())
        answers = run_glmv(items, args.model, args.dtype)
    meta = {
        "backend": backend,
        "model": args.model or args.url,
        "dtype": args.dtype,
        "device": args.device,
        "items": len(items),
        "seconds": round(time.monotonic() - started, 1),
    }
    report(score(items, answers), items, answers, meta, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
