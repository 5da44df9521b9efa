"""Structured output: JSON (any object, or one JSON Schema) enforced token by token.

The grammar library is llguidance (measured against xgrammar in `benchmarks/grammar_mask.py`:
faster per-step masks on the 151k GLM vocabulary, millisecond compiles, `multipleOf` on numbers,
no dependency on transformers). Output is compact JSON with `json.dumps`' separators.

* `StructuredOutput` is what a request asks for (`SamplingParams.structured`): built from an
  OpenAI `response_format` by `parse_response_format`, or from a schema by `json_schema_output`.
  Both check the schema at once and raise `InvalidRequestError` (400, `param` =
  `response_format...`) naming the JSON Schema features that cannot be enforced.
* `GrammarBackend` belongs to one engine: the token bytes of its tokenizer as llguidance sees
  them (special tokens are never text), the stop ids, and a cache of compiled matchers by schema
  hash; `new_state` hands each sequence its own copy.
* `GrammarState` follows one sequence. With a thinking model the constraint starts after
  `</think>`: when the prompt already opened `<think>`, or when the model's first token is
  `<think>` (allowed next to the grammar's tokens at the first step). A request that turns
  thinking off (`StructuredOutput.allow_thinking=False`) gets no `<think>`, and `</think>` is
  forced first if the prompt opened it. When the grammar is complete only stop tokens remain
  allowed, so the sequence ends.
* The guarantee: a constrained sequence can only end (with a stop token) once its grammar is
  complete. While the model thinks, the stop tokens (and a second `<think>`) are masked out, and
  when only `closing_reserve(budget)` tokens of the budget are left, `</think>` is forced so the
  answer has room; a model that has not started thinking by then may no longer start. So the
  text after the reasoning is a complete document whenever the finish reason is "stop"; only
  "length" can cut it.
* `close_on_budget` (glmv extension, used by /v1/extract, moderation and `glmv extract`): in the
  last `closing_reserve(budget)` tokens of the sequence's budget (max_tokens, or what is left of
  the context) the allowed tokens are narrowed to those that finish the document soonest (`null`,
  then closing quotes and brackets, then short values), so the answer stays complete and valid.
* `fill_masks` computes the packed allowed-token bitmasks of the constrained rows of a batch
  (in parallel, on the host, before the logits exist so it can overlap the forward pass);
  `apply_masks` sets the disallowed logits of those rows to -inf. Unconstrained rows are not
  touched. `GrammarState.advance` consumes each sampled token; rollback is never needed because
  sampled tokens are final.

Objects that list `properties` but say nothing about `additionalProperties` get no extra keys
(as OpenAI's strict mode and xgrammar's strict mode do): the output still validates against
the schema as written, and a model cannot wander into invented keys.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from glmv.errors import EngineError, InvalidRequestError
from glmv.processing.bytelevel import unicode_to_bytes

__all__ = [
    "GRAMMAR_OPTIONS",
    "GrammarBackend",
    "GrammarState",
    "StructuredOutput",
    "apply_bitmask",
    "apply_masks",
    "check_schema",
    "fill_masks",
    "json_object_output",
    "json_schema_output",
    "lark_output",
    "parse_response_format",
    "token_bytes_table",
]

# Compact JSON with the separators of `json.dumps`: no free whitespace a model could loop in.
GRAMMAR_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
_MAX_SCHEMA_BYTES = 64 * 1024
_CACHE_SIZE = 256
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_SUBSCHEMA_KEYS = ("items", "additionalItems", "contains", "propertyNames", "not", "if", "then", "else")
_SUBSCHEMA_LIST_KEYS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _llg() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise EngineError(
            "structured output needs the 'llguidance' package (pip install llguidance)",
            code="structured_output_unavailable",
        ) from exc
    return llguidance


# --- what a request asks for -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint: any JSON object (`json_object`), one JSON Schema (`json_schema`), or a
    grammar in llguidance's Lark syntax (`lark`, e.g. the tool-call format built by
    `glmv.tasks.tool_calls`)."""

    kind: Literal["json_object", "json_schema", "lark"]
    schema: Mapping[str, Any] | None = None  # as the client sent it (validation uses this one)
    name: str | None = None
    strict: bool | None = None
    grammar: str = field(default="", repr=False)  # llguidance grammar (JSON text)
    key: str = ""  # sha256 of the grammar: the compile cache's key
    # Whether a thinking model may reason (`<think>…</think>`) before the constrained answer. When
    # False and the prompt already opened `<think>`, `</think>` is forced first.
    allow_thinking: bool = True
    # When the token budget (max_tokens, or what is left of the context) is about to run out,
    # steer the output to close the JSON so that it stays complete and valid (glmv extension).
    close_on_budget: bool = False

    def with_thinking(self, allow: bool) -> StructuredOutput:
        return dataclasses.replace(self, allow_thinking=allow)

    def with_close_on_budget(self, close: bool = True) -> StructuredOutput:
        return dataclasses.replace(self, close_on_budget=close)

    def validate_output(self, value: Any) -> list[str]:
        """Messages of what `value` gets wrong against the schema (empty: valid)."""
        if self.kind == "json_object":
            return [] if isinstance(value, dict) else ["the output is not a JSON object"]
        if self.kind == "lark":
            return []  # the grammar's owner checks its own results
        return schema_errors(self.schema or {}, value)


def _invalid(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_value")


def _tighten(schema: Any) -> Any:
    """A copy in which objects with `properties` and no rule for other keys allow no other keys."""
    if isinstance(schema, list):
        return [_tighten(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_KEYS:
        if isinstance(out.get(key), (dict, list)):
            out[key] = _tighten(out[key])
    for key in _SUBSCHEMA_LIST_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [_tighten(s) for s in out[key]]
    for key in _SUBSCHEMA_MAP_KEYS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _tighten(v) for k, v in out[key].items()}
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _tighten(out["additionalProperties"])
    listed = out.get("properties")
    required = out.get("required")
    if (
        isinstance(listed, dict)
        and (not isinstance(required, list) or all(r in listed for r in required))
        and "additionalProperties" not in out
        and "patternProperties" not in out
        and "unevaluatedProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


def _grammar(schema: Mapping[str, Any], param: str) -> str:
    llg = _llg()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(dict(schema), defaults=GRAMMAR_OPTIONS)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    except Exception as exc:  # the library's own error types for schemas it cannot take
        raise _invalid(f"{param} is not a usable JSON Schema: {exc}", param) from None
    if is_error:
        raise InvalidRequestError(
            _explain(messages[0] if messages else "invalid schema", param),
            param=param,
            code="unsupported_schema",
        )
    return str(grammar)


def _explain(message: str, param: str) -> str:
    """llguidance's error as a sentence that names the unsupported features."""
    text = message.strip()
    for prefix in ("Unimplemented keys:", "Unimplemented keys"):
        if prefix in text:
            keys = text.split(prefix, 1)[1].split("\n", 1)[0].strip()
            try:
                names = json.loads(keys)
            except ValueError:
                names = [keys]
            return (
                f"{param} uses JSON Schema features this server cannot enforce: "
                f"{', '.join(map(str, names))}. Remove them or describe the constraint in the prompt."
            )
    first = text.split("\n", 1)[0]
    return f"{param} cannot be enforced: {first}"


def check_schema(schema: Any, param: str = "response_format.json_schema.schema") -> dict[str, Any]:
    """Raise `InvalidRequestError` unless `schema` is a JSON Schema this server can enforce."""
    if not isinstance(schema, dict):
        raise _invalid(f"{param} must be a JSON object (a JSON Schema).", param)
    try:
        size = len(json.dumps(schema, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise _invalid(f"{param} is not valid JSON: {exc}", param) from None
    if size > _MAX_SCHEMA_BYTES:
        raise _invalid(f"{param} is {size} bytes; at most {_MAX_SCHEMA_BYTES} are accepted.", param)
    problem = meta_schema_error(schema)
    if problem is not None:
        raise _invalid(f"{param} is not a valid JSON Schema: {problem}", param)
    return schema


def json_schema_output(
    schema: Any,
    *,
    name: str | None = None,
    strict: bool | None = None,
    param: str = "response_format.json_schema.schema",
) -> StructuredOutput:
    """The constraint for one JSON Schema; raises `InvalidRequestError` (400) naming `param`."""
    check_schema(schema, param)
    grammar = _grammar(_tighten(copy.deepcopy(schema)), param)
    return StructuredOutput(
        "json_schema",
        schema=schema,
        name=name,
        strict=strict,
        grammar=grammar,
        key=hashlib.sha256(grammar.encode()).hexdigest(),
    )


def lark_output(grammar: str, *, name: str | None = None, param: str = "grammar") -> StructuredOutput:
    """A constraint from an llguidance Lark grammar (special tokens as ``<name>``, JSON values as
    ``%json {schema}``); raises `InvalidRequestError` naming `param` if it does not compile."""
    llg = _llg()
    try:
        compiled = llg.grammar_from("lark", grammar)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(compiled)
    except Exception as exc:  # the library's own error types
        raise _invalid(f"{param} cannot be enforced: {exc}", param) from None
    if is_error:
        raise InvalidRequestError(
            _explain(messages[0] if messages else "invalid grammar", param), param=param, code="unsupported_schema"
        )
    text = str(compiled)
    return StructuredOutput("lark", name=name, grammar=text, key=hashlib.sha256(text.encode()).hexdigest())


def json_object_output() -> StructuredOutput:
    """Any JSON object (`response_format: {"type": "json_object"}`)."""
    grammar = _grammar({"type": "object"}, "response_format")
    return StructuredOutput("json_object", grammar=grammar, key=hashlib.sha256(grammar.encode()).hexdigest())


def parse_response_format(value: Any, param: str = "response_format") -> StructuredOutput | None:
    """An OpenAI `response_format` (dict) as a constraint; None for `{"type": "text"}` or None.
    glmv's extension `close_on_budget: true` keeps the JSON complete when the budget runs out."""
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if not isinstance(value, dict):
        raise _invalid(f"{param} must be an object with a 'type'.", param)
    close = value.get("close_on_budget")
    if close is not None and not isinstance(close, bool):
        raise _invalid("response_format.close_on_budget must be a boolean.", f"{param}.close_on_budget")
    out = _parse_format(value, param)
    return out.with_close_on_budget(True) if out is not None and close else out


def _parse_format(value: dict[str, Any], param: str) -> StructuredOutput | None:
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_output()
    if kind != "json_schema":
        raise InvalidRequestError(
            f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'.",
            param=f"{param}.type",
            code="invalid_value",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError(
            "response_format of type 'json_schema' needs a 'json_schema' object with 'name' and 'schema'.",
            param=f"{param}.json_schema",
            code="missing_required_parameter" if spec is None else "invalid_value",
        )
    name = spec.get("name")
    if name is not None and (
        not isinstance(name, str) or not name or len(name) > 64 or not set(name) <= _NAME_CHARS
    ):
        raise _invalid(
            "response_format.json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, '_' or '-'.",
            f"{param}.json_schema.name",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _invalid("response_format.json_schema.strict must be a boolean.", f"{param}.json_schema.strict")
    schema = spec.get("schema")
    if schema is None:
        # OpenAI allows a missing schema: any JSON object.
        schema = {"type": "object"}
    return json_schema_output(schema, name=name, strict=strict, param=f"{param}.json_schema.schema")


def closing_reserve(budget: int) -> int:
    """How many tokens before the end of a budget `close_on_budget` starts closing the JSON."""
    return min(256, max(32, budget // 8))


# --- JSON Schema validation of results (jsonschema, when installed) ---------------------------------


def meta_schema_error(schema: Mapping[str, Any]) -> str | None:
    """Why `schema` is not a valid JSON Schema (draft 2020-12 metaschema), or None."""
    try:
        from jsonschema import validators
    except ImportError:  # pragma: no cover - grammar compilation still rejects nonsense
        return None
    try:
        cls = validators.validator_for(schema, default=validators.Draft202012Validator)
        error = next(iter(cls(cls.META_SCHEMA).iter_errors(schema)), None)
    except Exception as exc:  # e.g. an unknown "$schema" dialect
        return str(exc).split("\n", 1)[0]
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message}" + (f" (at /{where})" if where else "")


def _decimal_multiple_of(validator: Any, divisor: Any, instance: Any, schema: Any) -> Any:
    """`multipleOf` on the decimal text of JSON numbers: 0.07 is a multiple of 0.01 (binary floats
    say it is not)."""
    from decimal import Decimal, InvalidOperation

    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "number"):
        return
    try:
        ok = Decimal(str(instance)) % Decimal(str(divisor)) == 0
    except (InvalidOperation, ValueError):
        ok = False
    if not ok:
        yield ValidationError(f"{instance!r} is not a multiple of {divisor!r}")


def _validator_class(schema: Mapping[str, Any]) -> Any:
    from jsonschema import validators

    base = validators.validator_for(schema, default=validators.Draft202012Validator)
    return validators.extend(base, {"multipleOf": _decimal_multiple_of})


def schema_errors(schema: Mapping[str, Any], value: Any) -> list[str]:
    """Validation messages of `value` against `schema` (empty: valid); `multipleOf` is decimal."""
    try:
        cls = _validator_class(schema)
    except ImportError:  # pragma: no cover - the grammar already enforced the schema
        return []
    messages = []
    try:
        for error in cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(value):
            where = "/".join(str(p) for p in error.absolute_path)
            messages.append(f"{error.message}" + (f" (at /{where})" if where else ""))
    except Exception as exc:  # a schema the validator cannot evaluate: report, never crash
        messages.append(f"the schema could not be evaluated: {str(exc).splitlines()[0]}")
    return messages


# --- the engine's side: token bytes, compiled matchers, per-sequence state ----------------------------


def token_bytes_table(tokenizer: Any, vocab_size: int) -> tuple[list[bytes], set[int]]:
    """Every id's raw bytes (byte-level BPE pieces decoded) and the ids that are not text:
    added/special tokens and the padding ids past the tokenizer's vocabulary."""
    decoder = unicode_to_bytes()
    added = set(getattr(tokenizer, "added_token_ids", set())) | set(
        getattr(tokenizer, "special_token_ids", set())
    )
    table: list[bytes] = []
    special: set[int] = set()
    for i in range(vocab_size):
        piece = tokenizer.id_to_token(i)
        if piece is None or i in added:
            table.append(b"")
            special.add(i)
            continue
        try:
            table.append(bytes(decoder[ch] for ch in piece))
        except KeyError:  # not a byte-level piece: take its decoded text
            table.append(tokenizer.decode([i]).encode("utf-8"))
        if not table[-1]:
            special.add(i)
    return table, special


class _Words:
    """The shape llguidance's `TokenizerWrapper` reads: token bytes, specials, eos, an encoder."""

    def __init__(self, tokenizer: Any, tokens: list[bytes], special: set[int], eos: int) -> None:
        self._tokenizer = tokenizer
        # llguidance names special tokens by a 0xFF-prefixed text; they never match grammar bytes.
        self.tokens = [
            (b"\xff" + (tokenizer.id_to_token(i) or f"<[{i}]>").encode()) if i in special else t
            for i, t in enumerate(tokens)
        ]
        self.special_token_ids = sorted(special)
        self.eos_token_id = eos
        self.bos_token_id = None

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tokenizer.encode(text))


class GrammarBackend:
    """One engine's grammar machinery: llguidance tokenizer, compiled-matcher cache, executor."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        *,
        threads: int | None = None,
    ) -> None:
        llg = _llg()
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        if not self.stop_token_ids:
            raise EngineError("structured output needs at least one end-of-sequence token id")
        tokens, special = token_bytes_table(tokenizer, vocab_size)
        self.special_ids = special
        words = _Words(tokenizer, tokens, special, self.stop_token_ids[0])
        self.tokenizer = llg.LLTokenizer(
            llg.TokenizerWrapper(words), n_vocab=vocab_size, eos_token=self.stop_token_ids
        )
        self.executor = llg.LLExecutor(num_threads=threads)
        self.words = (vocab_size + 31) // 32
        self.closing_classes = _closing_classes(tokens, special, self.words)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.think_start_id = _token_id(tokenizer, "<think>")
        self.think_end_id = _token_id(tokenizer, "</think>")
        self.assistant_id = _token_id(tokenizer, "<|assistant|>")
        self.thinking_mask = self._thinking_mask(tokenizer)
        self.cache_hits = 0
        self.cache_misses = 0

    def _thinking_mask(self, tokenizer: Any) -> np.ndarray:
        """Packed mask of what a thinking model may write before `</think>`: any token of the
        tokenizer except the stop tokens and a second `<think>`."""
        bits = np.zeros(self.words * 32, dtype=np.uint8)
        for i in range(self.vocab_size):
            if tokenizer.id_to_token(i) is not None:
                bits[i] = 1
        for t in (*self.stop_token_ids, self.think_start_id):
            if t is not None and t < len(bits):
                bits[t] = 0
        return np.packbits(bits, bitorder="little").view(np.int32)

    def matcher(self, output: StructuredOutput) -> Any:
        """A fresh matcher for `output`, copied from the compiled one in the cache."""
        with self._lock:
            base = self._cache.get(output.key)
            if base is not None:
                self._cache.move_to_end(output.key)
                self.cache_hits += 1
        if base is None:
            llg = _llg()
            base = llg.LLMatcher(self.tokenizer, output.grammar, log_level=0)
            if base.is_error():
                raise InvalidRequestError(
                    _explain(base.get_error(), "response_format"),
                    param="response_format",
                    code="unsupported_schema",
                )
            with self._lock:
                self.cache_misses += 1
                self._cache[output.key] = base
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        return base.deep_copy()

    def new_state(
        self, output: StructuredOutput, prompt_token_ids: Sequence[int], budget: int | None = None
    ) -> GrammarState:
        """The state of one sequence. If the prompt opened `<think>`, the constraint waits for
        `</think>` (or forces it first when thinking is not allowed); otherwise a thinking model
        may open `<think>` with its first token when thinking is allowed."""
        thinks = self.think_start_id is not None and self.think_end_id is not None
        opens = thinks and self.prompt_opens_thinking(prompt_token_ids)
        allow = output.allow_thinking
        may_open = thinks and allow and not opens and not self._prompt_closed_thinking(prompt_token_ids)
        return GrammarState(
            self,
            self.matcher(output),
            active=not opens,
            may_open_thinking=may_open,
            force_think_end=opens and not allow,
            budget=budget,
            close_on_budget=output.close_on_budget and output.kind != "lark",
        )

    def _assistant_tail(self, prompt: Sequence[int]) -> Sequence[int]:
        if self.assistant_id is None:
            return prompt[-8:]
        for i in range(len(prompt) - 1, -1, -1):
            if prompt[i] == self.assistant_id:
                return prompt[i + 1 :]
        return prompt[-8:]

    def prompt_opens_thinking(self, prompt: Sequence[int]) -> bool:
        """Whether the prompt's assistant turn holds a `<think>` that no `</think>` closes."""
        if self.think_start_id is None:
            return False
        tail = list(self._assistant_tail(prompt))
        start = max((i for i, t in enumerate(tail) if t == self.think_start_id), default=-1)
        end = max((i for i, t in enumerate(tail) if t == self.think_end_id), default=-1)
        return start > end

    def _prompt_closed_thinking(self, prompt: Sequence[int]) -> bool:
        return self.think_end_id is not None and self.think_end_id in self._assistant_tail(prompt)


# Token classes preferred, in this order, once a budget is about to run out: the shortest value
# (null), then closers (`"`, `]`, `}` and their runs), then other short values.
_NULL_PIECES = (b"null", b"n")
_CLOSER_BYTES = frozenset(b'"]}')
_SHORT_VALUES = frozenset({b"false", b"f", b"0", b"[]", b"{}", b'""', b"[", b"{"})


def _closing_classes(tokens: Sequence[bytes], special: set[int], words: int) -> list[np.ndarray]:
    classes = []
    for test in (
        lambda t: t in _NULL_PIECES,
        lambda t: bool(t) and set(t) <= _CLOSER_BYTES,
        lambda t: t in _SHORT_VALUES,
    ):
        bits = np.zeros(words * 32, dtype=np.uint8)
        for i, t in enumerate(tokens):
            if i not in special and test(t):
                bits[i] = 1
        classes.append(np.packbits(bits, bitorder="little").view(np.int32))
    return classes


def _token_id(tokenizer: Any, text: str) -> int | None:
    try:
        tid = tokenizer.token_to_id(text)
    except Exception:
        return None
    return int(tid) if tid is not None else None


class GrammarState:
    """The constraint on one sequence's output."""

    __slots__ = (
        "active",
        "backend",
        "budget",
        "close_on_budget",
        "error",
        "force_think_end",
        "generated",
        "matcher",
        "may_open_thinking",
        "num_consumed",
    )

    def __init__(
        self,
        backend: GrammarBackend,
        matcher: Any,
        *,
        active: bool,
        may_open_thinking: bool = False,
        force_think_end: bool = False,
        budget: int | None = None,
        close_on_budget: bool = False,
    ) -> None:
        self.backend = backend
        self.matcher = matcher
        self.active = active  # False while the model thinks (before `</think>`)
        self.may_open_thinking = may_open_thinking  # the first token may be `<think>`
        self.force_think_end = force_think_end  # the next token must be `</think>`
        self.error: str | None = None
        self.num_consumed = 0
        self.budget = budget  # tokens this sequence may generate in all (None: unknown)
        self.close_on_budget = close_on_budget  # steer the JSON to close near the budget's end
        self.generated = 0

    @property
    def constrains(self) -> bool:
        """Whether the next token is masked (always: while thinking, stop tokens are masked out)."""
        return True

    @property
    def answer_reserve_reached(self) -> bool:
        """Only the answer's reserve of the budget is left."""
        return self.budget is not None and self.budget - self.generated <= closing_reserve(self.budget)

    @property
    def must_end_thinking(self) -> bool:
        """The next token must be `</think>`: thinking is not allowed, or the budget's reserve for
        the answer is reached."""
        return not self.active and (self.force_think_end or self.answer_reserve_reached)

    @property
    def closing(self) -> bool:
        """The budget is about to run out: prefer tokens that finish the document."""
        return self.close_on_budget and self.active and self.answer_reserve_reached

    @property
    def is_complete(self) -> bool:
        """The grammar accepted a whole document; only stop tokens are allowed now."""
        return (
            self.active and self.error is None and not self.matcher.is_error() and self.matcher.is_stopped()
        )

    def advance(self, token_id: int) -> None:
        """Consume the sampled token (stop tokens end the document and are not consumed)."""
        first = self.may_open_thinking
        self.may_open_thinking = False
        self.generated += 1
        if not self.active:
            if token_id == self.backend.think_end_id:
                self.active = True
                self.force_think_end = False
            return
        if first and token_id == self.backend.think_start_id:
            self.active = False
            return
        if token_id in self.backend.stop_token_ids and self.matcher.is_accepting():
            return
        if self.matcher.is_stopped():
            return
        if not self.matcher.consume_token(token_id):
            self.error = self.matcher.get_error() or f"token {token_id} does not fit the grammar"
            return
        self.num_consumed += 1


# --- masks over a batch -----------------------------------------------------------------------------


@dataclass(slots=True)
class BatchMasks:
    """Packed allowed-token bitmasks of the constrained rows of one sampling batch."""

    rows: list[int]  # row indices of the logits they apply to
    bitmask: torch.Tensor  # int32 [len(rows), ceil(vocab / 32)], bit j of word w: token 32*w + j

    def select(self, keep: Sequence[int]) -> BatchMasks | None:
        """The masks after the batch is cut down to rows `keep` (renumbered 0..len(keep)-1)."""
        position = {row: k for k, row in enumerate(keep)}
        picked = [(position[row], m) for m, row in enumerate(self.rows) if row in position]
        if not picked:
            return None
        index = torch.tensor([m for _, m in picked])
        return BatchMasks([k for k, _ in picked], self.bitmask.index_select(0, index))


def fill_masks(states: Sequence[GrammarState | None]) -> BatchMasks | None:
    """Bitmasks of the rows whose state constrains the next token (None when no row does)."""
    rows = [i for i, s in enumerate(states) if s is not None and s.constrains]
    if not rows:
        return None
    backend = states[rows[0]].backend  # type: ignore[union-attr]
    bitmask = torch.zeros((len(rows), backend.words), dtype=torch.int32)
    pairs = []
    for k, i in enumerate(rows):
        state = states[i]
        assert state is not None
        if state.active and state.error is None and not state.matcher.is_error():
            pairs.append((state.matcher, k))
    if pairs:
        backend.executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), backend.words * 4, len(rows))
    view = bitmask.numpy()
    for k, i in enumerate(rows):
        state = states[i]
        assert state is not None
        if state.must_end_thinking:
            view[k] = 0
            _set_bits(view[k], [backend.think_end_id])  # type: ignore[list-item]
        elif not state.active:
            view[k] = backend.thinking_mask  # free reasoning, but it cannot end the sequence
        elif state.error is not None or state.matcher.is_error() or not view[k].any():
            # A broken or finished grammar: end the sequence.
            view[k] = 0
            _set_bits(view[k], backend.stop_token_ids)
        elif (
            state.may_open_thinking and backend.think_start_id is not None and not state.answer_reserve_reached
        ):
            _set_bits(view[k], [backend.think_start_id])
        elif state.closing:
            for preferred in backend.closing_classes:
                both = view[k] & preferred
                if both.any():
                    view[k] = both
                    break
    return BatchMasks(rows, bitmask)


def _set_bits(words: np.ndarray, ids: Sequence[int]) -> None:
    flat = words.view(np.uint32)
    for t in ids:
        flat[t >> 5] |= np.uint32(1 << (t & 31))


def unpack_bitmask(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """Bool `[rows, vocab]` on `device`: True where the token is allowed (ids past the mask: False)."""
    if device.type == "cpu":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        allowed = torch.from_numpy(bits).bool()
    else:
        allowed = _unpack_with_shifts(bitmask.to(device, non_blocking=True), vocab)
    if allowed.shape[1] < vocab:
        pad = torch.zeros(allowed.shape[0], vocab - allowed.shape[1], dtype=torch.bool, device=allowed.device)
        allowed = torch.cat([allowed, pad], dim=1)
    return allowed


def _unpack_with_shifts(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """The unpacking on the words' own device (the accelerator path; tested on the CPU)."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & 1).bool().reshape(words.shape[0], -1)[:, :vocab]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set logits[i, t] = -inf wherever bit t of bitmask row i is 0 (in place)."""
    allowed = unpack_bitmask(bitmask, logits.shape[-1], logits.device)
    logits.masked_fill_(~allowed, float("-inf"))


def apply_masks(logits: torch.Tensor, masks: BatchMasks | None) -> None:
    """Constrain the rows of `logits` `[B, vocab]` named by `masks`; other rows stay as they are."""
    if masks is None:
        return
    if len(masks.rows) == logits.shape[0]:
        apply_bitmask(logits, masks.bitmask)
        return
    index = torch.tensor(masks.rows, device=logits.device)
    sub = logits.index_select(0, index)
    apply_bitmask(sub, masks.bitmask)
    logits.index_copy_(0, index, sub)
