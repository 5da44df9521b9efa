"""Tool calling for the GLM-4.5V/4.6V chat format: request plan, output parser, call grammar.

The format (what the checkpoint's chat template renders for past calls, and what the model
writes)::

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    <arg_key>days</arg_key>
    <arg_value>3</arg_value>
    </tool_call>

String values are written as they are, other values as JSON (the template's ``v | tojson if v is
not string``). Several calls follow one another, one per ``<tool_call>`` block.

* `plan_tools` turns a request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` into a
  `ToolPlan`: what the template renders, whether the output is parsed, and for ``required`` or a
  named function the constraint (`StructuredOutput` of kind ``lark``) that forces well-formed
  calls whose arguments validate against each function's JSON Schema. Models whose template has
  no tool calling get tools ignored with a warning (``tool_choice`` absent, ``auto`` or ``none``,
  which is what Open WebUI sends) or a 400 when a call is required.
* `ToolCallParser` turns the model's text (the answer part, after the reasoning split) into
  content and OpenAI tool calls, incrementally: `feed` returns `ToolCallDelta`s as soon as a
  call's name is complete, then argument pieces (string values stream character by character;
  other values when complete) whose concatenation is the call's arguments JSON; `finish` closes
  whatever is open. The same parser serves streaming and whole responses.
* `tool_call_grammar` builds the Lark grammar: ``<tool_call>``, ``<arg_key>``, … are the
  tokenizer's special tokens, each function's parameters appear in the schema's order (required
  ones always, optional ones optionally), string values are raw text without ``</arg_value>``
  (``enum``/``const``/``pattern``/``minLength``/``maxLength`` enforced; ``format`` is not), other
  values are JSON under their own sub-schema (``$defs`` carried along).
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from glmv.engine.structured import (
    GRAMMAR_OPTIONS,
    StructuredOutput,
    _llg,
    _tighten,
    check_schema,
    lark_output,
    schema_errors,
)
from glmv.errors import InvalidRequestError

__all__ = [
    "ARG_KEY_END",
    "ARG_KEY_START",
    "ARG_VALUE_END",
    "ARG_VALUE_START",
    "TOOL_CALL_END",
    "TOOL_CALL_START",
    "Function",
    "ParsedToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "ToolDelta",
    "ToolPlan",
    "finish_reason",
    "parse_tool_calls",
    "plan_tools",
    "tool_call_grammar",
]

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
ARG_KEY_START = "<arg_key>"
ARG_KEY_END = "</arg_key>"
ARG_VALUE_START = "<arg_value>"
ARG_VALUE_END = "</arg_value>"

Mode = Literal["none", "auto", "required", "named"]

# $defs-like keys carried into every %json sub-grammar so that "$ref"s resolve.
_DEFINITION_KEYS = ("$defs", "definitions")


# --- the request side ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Function:
    """One callable function of a request."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None  # JSON Schema of the arguments object

    def property_schema(self, key: str) -> Mapping[str, Any] | None:
        """The sub-schema of argument `key` (None when the schema does not name it)."""
        properties = (self.parameters or {}).get("properties")
        if isinstance(properties, Mapping):
            sub = properties.get(key)
            if isinstance(sub, Mapping):
                return sub
        extra = (self.parameters or {}).get("additionalProperties")
        return extra if isinstance(extra, Mapping) else None

    def argument_errors(self, arguments: Any) -> list[str]:
        """What `arguments` (the decoded object) gets wrong against the parameters schema."""
        if not isinstance(arguments, dict):
            return ["the arguments are not a JSON object"]
        if self.parameters is None:
            return [] if not arguments else ["the function takes no arguments"]
        return schema_errors(self.parameters, arguments)


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request uses tools.

    `tools`: the definitions for the chat template's ``tools`` variable (None: render none).
    `parse`: whether the answer is run through `ToolCallParser`. `constraint`: the grammar for
    ``required`` / named calls (None otherwise). `warning`: set when the request's tools are
    ignored because the model has no tool calling (log it).
    """

    mode: Mode
    functions: Mapping[str, Function] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    parse: bool = False
    constraint: StructuredOutput | None = None
    named: str | None = None
    parallel: bool = True
    warning: str | None = None

    def parser(self, new_id: Callable[[], str] | None = None) -> ToolCallParser | None:
        """A fresh output parser for one choice, or None when the output is not parsed."""
        return ToolCallParser(self.functions, new_id=new_id) if self.parse else None


def _as_plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    return dump(exclude_none=True) if callable(dump) else value


def _functions(tools: Sequence[Any]) -> tuple[dict[str, Function], list[dict[str, Any]]]:
    functions: dict[str, Function] = {}
    rendered: list[dict[str, Any]] = []
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        tool = _as_plain(tool)
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise InvalidRequestError(
                "each tool must be an object with type 'function'",
                param=f"{param}.type",
                code="invalid_value",
            )
        spec = _as_plain(tool.get("function"))
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise InvalidRequestError(
                "a tool needs a 'function' object with a 'name'",
                param=f"{param}.function",
                code="invalid_value",
            )
        name = spec["name"]
        if name in functions:
            raise InvalidRequestError(
                f"two tools are named {name!r}; function names must be unique",
                param=f"{param}.function.name",
                code="invalid_value",
            )
        parameters = spec.get("parameters")
        if parameters is not None:
            parameters = check_schema(parameters, f"{param}.function.parameters")
            if parameters.get("type", "object") != "object":
                raise InvalidRequestError(
                    "a function's parameters must be a JSON Schema of type 'object'",
                    param=f"{param}.function.parameters",
                    code="invalid_value",
                )
        description = spec.get("description")
        functions[name] = Function(name, description if isinstance(description, str) else None, parameters)
        rendered.append({"type": "function", "function": dict(spec)})
    return functions, rendered


def _choice(tool_choice: Any) -> tuple[Mode, str | None]:
    tool_choice = _as_plain(tool_choice)
    if tool_choice is None or tool_choice == "auto":
        return "auto", None
    if tool_choice in ("none", "required"):
        return tool_choice, None
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            return "named", function["name"]
    raise InvalidRequestError(
        'tool_choice must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}',
        param="tool_choice",
        code="invalid_value",
    )


def plan_tools(
    tools: Sequence[Any] | None,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    *,
    supports_tools: bool,
    has_response_format: bool = False,
) -> ToolPlan:
    """The `ToolPlan` of a request (raises `InvalidRequestError`, a 400, for what cannot be done).

    `supports_tools`: whether the model's chat template renders tools (`ChatProcessor.supports_tools`).
    Without it, tools are ignored with a warning unless a call is required (400). ``tool_choice:
    "none"`` renders no tools (the model is not told about them) but the history may still hold
    calls and results.
    """
    mode, named = _choice(tool_choice)
    tools = list(tools or [])
    parallel = parallel_tool_calls is not False
    if not tools:
        if mode in ("required", "named"):
            raise InvalidRequestError(
                "tool_choice requires a call but the request has no tools",
                param="tool_choice",
                code="invalid_value",
            )
        return ToolPlan("none" if mode == "none" else "auto")
    functions, rendered = _functions(tools)
    if named is not None and named not in functions:
        raise InvalidRequestError(
            f"tool_choice names the function {named!r}, which is not among the request's tools",
            param="tool_choice.function.name",
            code="invalid_value",
        )
    if not supports_tools:
        if mode in ("required", "named"):
            raise InvalidRequestError(
                "This model's chat template has no tool calling, so a tool call cannot be required; "
                "send tool_choice 'auto' or 'none' (tools are then ignored) or use a GLM-4.5V/4.6V model.",
                param="tool_choice",
                code="unsupported_parameter",
            )
        return ToolPlan(
            mode,
            functions,
            warning=f"ignoring {len(functions)} tool(s): this model's chat template has no tool calling",
        )
    if mode == "none":
        return ToolPlan("none", functions)
    if mode == "auto":
        return ToolPlan("auto", functions, tools=rendered, parse=True, parallel=parallel)
    if has_response_format:
        raise InvalidRequestError(
            "response_format cannot be combined with a required tool call (tool_choice 'required' or a named "
            "function): the answer is a tool call",
            param="response_format",
            code="invalid_value",
        )
    allowed = [named] if named is not None else list(functions)
    grammar = tool_call_grammar(functions, allowed, multiple=parallel and named is None)
    constraint = lark_output(grammar, name="tool_calls", param="tools")
    return ToolPlan(
        mode,
        functions,
        tools=rendered,
        parse=True,
        constraint=constraint,
        named=named,
        parallel=parallel and named is None,
    )


def finish_reason(reason: str | None, calls: int) -> str | None:
    """OpenAI's finish reason: ``tool_calls`` when an answer that ended normally made calls."""
    return "tool_calls" if reason == "stop" and calls else reason


# --- the grammar --------------------------------------------------------------------------------------


def _is_string_schema(schema: Mapping[str, Any] | None) -> bool:
    """Whether values of this schema are written raw (the template's rule for strings)."""
    if not isinstance(schema, Mapping):
        return False
    kind = schema.get("type")
    if kind == "string":
        return True
    if kind is None:
        values = (
            schema.get("enum") if "enum" in schema else ([schema["const"]] if "const" in schema else None)
        )
        return bool(values) and all(isinstance(v, str) for v in values)
    return False


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _regex_body(pattern: str) -> str:
    """A JSON Schema `pattern` (a search, unanchored unless it says otherwise) as a full-match regex."""
    start = pattern.startswith("^")
    end = pattern.endswith("$") and not pattern.endswith("\\$")
    core = pattern[1 if start else 0 : -1 if end else None]
    return ("" if start else "(?s:.*)") + f"(?:{core})" + ("" if end else "(?s:.*)")


def _lark_regex(regex: str, ascii_classes: str = "") -> str:
    """`regex` as a Lark regex literal; `ascii_classes` "dw" gives JSON Schema's (ECMA) meaning of
    \\d and \\w."""
    return "/" + _llg().regex_to_lark(regex, ascii_classes) + "/"


class _GrammarBuilder:
    def __init__(self) -> None:
        self.rules: list[str] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def string_value(self, schema: Mapping[str, Any] | None) -> str:
        """A terminal for a raw string value (never containing ``</arg_value>``)."""
        schema = schema or {}
        values = (
            schema.get("enum") if "enum" in schema else ([schema["const"]] if "const" in schema else None)
        )
        if values is not None:
            literals = [_lark_string(v) for v in values if isinstance(v, str) and ARG_VALUE_END not in v]
            if not literals:
                raise InvalidRequestError(
                    "a string parameter's enum has no usable value", param="tools", code="unsupported_schema"
                )
            rule = self.name("enum")
            self.rules.append(f"{rule}: {' | '.join(literals)}")
            return rule
        parts = [_lark_regex("(?s:.*)"), "~" + _lark_regex(f"(?s:.*){ARG_VALUE_END}(?s:.*)")]
        low, high = schema.get("minLength"), schema.get("maxLength")
        if isinstance(low, int) or isinstance(high, int):
            low_text = str(low) if isinstance(low, int) else "0"
            high_text = str(high) if isinstance(high, int) else ""
            parts.append(_lark_regex(f"(?s:.{{{low_text},{high_text}}})"))
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            parts.append(_lark_regex(_regex_body(pattern), "dw"))
        terminal = self.name("VALUE").upper()
        self.rules.append(f"{terminal}: {' & '.join(parts)}")
        return terminal

    def json_value(self, schema: Mapping[str, Any] | None, root: Mapping[str, Any] | None) -> str:
        """A `%json` sub-grammar for a non-string value (any JSON when there is no schema)."""
        sub: dict[str, Any] = copy.deepcopy(dict(schema)) if isinstance(schema, Mapping) else {}
        for key in _DEFINITION_KEYS:
            if isinstance(root, Mapping) and key in root and key not in sub:
                sub[key] = copy.deepcopy(root[key])
        sub["x-guidance"] = dict(GRAMMAR_OPTIONS)
        rule = self.name("json")
        # The same strictness as response_format: listed properties only.
        self.rules.append(f"{rule}: %json {json.dumps(_tighten(sub), ensure_ascii=False)}")
        return rule

    def value(self, schema: Mapping[str, Any] | None, root: Mapping[str, Any] | None) -> str:
        return self.string_value(schema) if _is_string_schema(schema) else self.json_value(schema, root)

    def argument(self, key_rule: str, value_rule: str) -> str:
        rule = self.name("arg")
        self.rules.append(
            f'{rule}: <arg_key> {key_rule} </arg_key> "\\n" <arg_value> {value_rule} </arg_value> "\\n"'
        )
        return rule

    def call(self, function: Function) -> str:
        params = function.parameters or {}
        properties = params.get("properties") if isinstance(params.get("properties"), Mapping) else {}
        required = set(params.get("required") or []) if isinstance(params.get("required"), list) else set()
        items: list[str] = []
        for key, sub in properties.items():
            value_rule = self.value(sub if isinstance(sub, Mapping) else None, params)
            arg = self.argument(_lark_string(key), value_rule)
            items.append(arg if key in required else f"{arg}?")
        extra = params.get("additionalProperties", None if properties else True)
        if function.parameters is not None and extra not in (None, False):
            key_terminal = self.name("KEY").upper()
            self.rules.append(f"{key_terminal}: /[^<\\n]+/")
            value_rule = self.value(extra if isinstance(extra, Mapping) else None, params)
            items.append(f"{self.argument(key_terminal, value_rule)}*")
        rule = self.name("call")
        body = " ".join(items)
        self.rules.append(f'{rule}: <tool_call> {_lark_string(function.name)} "\\n" {body} </tool_call>')
        return rule


def tool_call_grammar(functions: Mapping[str, Function], allowed: Sequence[str], *, multiple: bool) -> str:
    """The Lark grammar of one call (or, with `multiple`, one or more calls) to the `allowed`
    functions, each call's arguments valid against its function's schema."""
    builder = _GrammarBuilder()
    calls = [builder.call(functions[name]) for name in allowed]
    builder.rules.append(f"any_call: {' | '.join(calls)}")
    repeat = ' ("\\n"? any_call)*' if multiple else ""
    return "\n".join(['start: "\\n"? any_call' + repeat, *builder.rules]) + "\n"


# --- the output side --------------------------------------------------------------------------------


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of one call: the first piece of a call has `id` and `name`, later ones only
    `arguments` text (the pieces of one call concatenate to its arguments JSON)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI stream shape (`choices[].delta.tool_calls[]`)."""
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function["name"] = self.name
        function["arguments"] = self.arguments  # "" in a call's first piece, as OpenAI sends it
        out["function"] = function
        return out


@dataclass(slots=True)
class ToolDelta:
    """What one `feed` (or `finish`) adds: answer text and tool-call pieces."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


@dataclass(slots=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON object text
    complete: bool = True  # False when the output ended inside the call

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


_State = Literal["content", "name", "call", "key", "after_key", "value"]


class ToolCallParser:
    """Incremental parser of GLM tool calls in the answer text (see the module docstring).

    `functions` (by name) tells which arguments are strings (kept raw and streamed as they come);
    other values are decoded as JSON when they parse, else kept as strings.
    """

    def __init__(
        self, functions: Mapping[str, Function] | None = None, *, new_id: Callable[[], str] | None = None
    ) -> None:
        self.functions = dict(functions or {})
        self._new_id = new_id or _new_call_id
        self._buffer = ""
        self._state: _State = "content"
        self._pending_space = ""  # whitespace held until we know whether a call follows
        self._content_since_call = False
        self._space_before_call = ""
        self._content: list[str] = []
        self.calls: list[ParsedToolCall] = []
        self._name = ""
        self._key = ""
        self._value = ""
        self._value_streamed = False
        self._args: list[str] = []  # argument JSON pieces of the open call
        self._has_args = False
        self._out: ToolDelta = ToolDelta()

    # ----------------------------------------------------------------------------- public

    @property
    def content(self) -> str:
        """All answer text outside tool calls so far."""
        return "".join(self._content)

    def feed(self, text: str) -> ToolDelta:
        """Consume the next piece of answer text; what became final."""
        self._out = ToolDelta()
        self._buffer += text
        self._run(final=False)
        return self._out

    def finish(self) -> ToolDelta:
        """End of output: flush held text and close an open call (its arguments stay valid JSON)."""
        self._out = ToolDelta()
        self._run(final=True)
        if self._state == "name":
            # A call that never got its name is not a call: its text is content.
            self._pending_space = self._space_before_call
            self._emit_content(TOOL_CALL_START + self._name)
            self._state = "content"
        if self._state == "content":
            self._in_content(final=True)
        else:
            if self._state == "value":  # a key without a value is dropped; a value is kept
                self._value += self._buffer
                if self._value_streamed:
                    self._emit_args(json.dumps(self._buffer, ensure_ascii=False)[1:-1])
                self._end_value()
            self._close_call(complete=False)
            self._pending_space = ""
        self._buffer = ""
        self._state = "content"
        return self._out

    # ---------------------------------------------------------------------------- machinery

    def _run(self, final: bool) -> None:
        while True:
            before = (self._state, len(self._buffer))
            if self._state == "content":
                self._in_content(final)
            elif self._state == "name":
                self._in_name(final)
            elif self._state == "call":
                self._in_call(final)
            elif self._state == "key":
                self._in_key(final)
            elif self._state == "after_key":
                self._after_key(final)
            else:
                self._in_value(final)
            if (self._state, len(self._buffer)) == before:
                return

    @staticmethod
    def _held(text: str, tags: Sequence[str]) -> int:
        """How many trailing characters of `text` could start one of `tags`."""
        for size in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
            tail = text[-size:]
            if any(t.startswith(tail) for t in tags):
                return size
        return 0

    def _emit_content(self, text: str) -> None:
        """Answer text outside calls. Whitespace right before a call, right after one, and at the
        end of an answer that made calls is not part of the answer."""
        if self.calls and not self._content_since_call:
            text = text.lstrip()
        if not text:
            return
        stripped = text.rstrip()
        if stripped:
            out = self._pending_space + stripped
            self._pending_space = ""
            self._content_since_call = True
            self._content.append(out)
            self._out.content += out
        self._pending_space += text[len(stripped) :]

    def _in_content(self, final: bool) -> None:
        index = self._buffer.find(TOOL_CALL_START)
        if index >= 0 and not final:
            self._emit_content(self._buffer[:index])
            self._space_before_call = self._pending_space
            self._pending_space = ""
            self._buffer = self._buffer[index + len(TOOL_CALL_START) :]
            self._state = "name"
            self._name = ""
            return
        if final:
            self._emit_content(self._buffer)
            self._buffer = ""
            if not self.calls and self._pending_space:
                self._content.append(self._pending_space)
                self._out.content += self._pending_space
            self._pending_space = ""
            return
        cut = len(self._buffer) - self._held(self._buffer, [TOOL_CALL_START])
        self._emit_content(self._buffer[:cut])
        self._buffer = self._buffer[cut:]

    def _in_name(self, final: bool) -> None:
        ends = [(i, t) for t in ("\n", ARG_KEY_START, TOOL_CALL_END) if (i := self._buffer.find(t)) >= 0]
        if not ends:
            if not final:
                cut = len(self._buffer) - self._held(self._buffer, [ARG_KEY_START, TOOL_CALL_END])
                self._name += self._buffer[:cut]
                self._buffer = self._buffer[cut:]
            return
        end, tag = min(ends)
        self._name += self._buffer[:end]
        self._buffer = self._buffer[end + (1 if tag == "\n" else 0) :]
        name = self._name.strip()
        if not name and tag == "\n":
            return  # a newline before the name
        if not name and tag == TOOL_CALL_END:
            self._buffer = self._buffer[len(TOOL_CALL_END) :]  # "<tool_call></tool_call>": nothing
            self._state = "content"
            return
        self._open_call(name)
        self._state = "call"

    def _open_call(self, name: str) -> None:
        call = ParsedToolCall(id=self._new_id(), name=name, arguments="")
        self.calls.append(call)
        self._args = []
        self._has_args = False
        self._out.calls.append(ToolCallDelta(len(self.calls) - 1, id=call.id, name=name))

    def _in_call(self, final: bool) -> None:
        text = self._buffer.lstrip()
        if text.startswith(ARG_KEY_START):
            self._buffer = text[len(ARG_KEY_START) :]
            self._key = ""
            self._state = "key"
        elif text.startswith(TOOL_CALL_END):
            self._buffer = text[len(TOOL_CALL_END) :]
            self._close_call(complete=True)
            self._state = "content"
        else:
            self._buffer = _skip_stray(text, (ARG_KEY_START, TOOL_CALL_END))

    def _in_key(self, final: bool) -> None:
        index = self._buffer.find(ARG_KEY_END)
        if index < 0:
            if not final:
                keep = self._held(self._buffer, [ARG_KEY_END])
                cut = len(self._buffer) - keep
                self._key += self._buffer[:cut]
                self._buffer = self._buffer[cut:]
            return
        self._key += self._buffer[:index]
        self._buffer = self._buffer[index + len(ARG_KEY_END) :]
        self._key = self._key.strip()
        self._state = "after_key"

    def _after_key(self, final: bool) -> None:
        text = self._buffer.lstrip()
        tags = (ARG_VALUE_START, ARG_KEY_START, TOOL_CALL_END)
        if text.startswith(ARG_VALUE_START):
            self._buffer = text[len(ARG_VALUE_START) :]
            self._value = ""
            self._value_streamed = False
            self._state = "value"
            if self._streams(self._key):
                self._emit_args(self._arg_prefix() + '"')
                self._value_streamed = True
        elif text.startswith(TOOL_CALL_END) or text.startswith(ARG_KEY_START):
            self._buffer = text  # a key without a value: dropped
            self._state = "call"
        else:
            self._buffer = _skip_stray(text, tags)

    def _streams(self, key: str) -> bool:
        function = self.functions.get(self.calls[-1].name)
        return function is not None and _is_string_schema(function.property_schema(key))

    def _arg_prefix(self) -> str:
        prefix = ", " if self._has_args else "{"
        self._has_args = True
        return prefix + json.dumps(self._key, ensure_ascii=False) + ": "

    def _emit_args(self, text: str) -> None:
        if not text:
            return
        self._args.append(text)
        out = self._out.calls
        index = len(self.calls) - 1
        if out and out[-1].index == index:
            out[-1].arguments += text
        else:
            out.append(ToolCallDelta(index, arguments=text))

    def _in_value(self, final: bool) -> None:
        index = self._buffer.find(ARG_VALUE_END)
        if index < 0:
            if final:
                return
            keep = self._held(self._buffer, [ARG_VALUE_END])
            cut = len(self._buffer) - keep
            piece = self._buffer[:cut]
            self._buffer = self._buffer[cut:]
            self._value += piece
            if self._value_streamed and piece:
                self._emit_args(json.dumps(piece, ensure_ascii=False)[1:-1])
            return
        piece = self._buffer[:index]
        self._buffer = self._buffer[index + len(ARG_VALUE_END) :]
        self._value += piece
        if self._value_streamed and piece:
            self._emit_args(json.dumps(piece, ensure_ascii=False)[1:-1])
        self._end_value()
        self._state = "call"

    def _end_value(self) -> None:
        if self._value_streamed:
            self._emit_args('"')
        else:
            self._emit_args(self._arg_prefix() + json.dumps(_decode_value(self._value), ensure_ascii=False))
        self._value_streamed = False

    def _close_call(self, *, complete: bool) -> None:
        self._content_since_call = False
        self._emit_args("}" if self._has_args else "{}")
        call = self.calls[-1]
        call.arguments = "".join(self._args)
        call.complete = complete
        self._args = []
        self._has_args = False


def _skip_stray(text: str, tags: Sequence[str]) -> str:
    """`text` from the first of `tags` on (stray text before it is dropped); a possible partial
    tag at its end is kept."""
    found = [i for i in (text.find(t) for t in tags) if i >= 0]
    if found:
        return text[min(found) :]
    return text[len(text) - ToolCallParser._held(text, tags) :] if text else text


def _decode_value(raw: str) -> Any:
    """A non-string argument: its JSON value when it is JSON, else the text itself."""
    try:
        return json.loads(raw.strip())
    except ValueError:
        return raw


def parse_tool_calls(
    text: str, functions: Mapping[str, Function] | None = None
) -> tuple[str, list[ParsedToolCall]]:
    """A whole answer: its content (text outside the calls) and its tool calls."""
    parser = ToolCallParser(functions)
    parser.feed(text)
    parser.finish()
    return parser.content, parser.calls
