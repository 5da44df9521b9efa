"""Splitting GLM-V output into reasoning and answer (`reasoning_content` / `content`).

Output shapes handled (the text must be detokenized with special tokens kept):

* GLM-4.1V-Thinking: `<think>…</think><answer>…</answer>`.
* GLM-4.5V / 4.6V style: `<think>…</think>answer`; the chat template may already have put
  `<think>` at the end of the prompt (then the output starts inside the reasoning: pass
  `starts_in_thinking=True`, see `prompt_opens_thinking`), or thinking is off and the output
  starts with `</think>` or carries no tags at all.
* Grounding boxes `<|begin_of_box|>…<|end_of_box|>` stay in the text they belong to; the two
  tags themselves are removed (unless `keep_box_tags=True`).

Rules, one state machine for streaming and non-streaming alike:

* `<think>` switches to reasoning; `</think>`, `<answer>` and `</answer>` switch to content. All
  four tags are removed. Text before any tag is content (reasoning if `starts_in_thinking`).
* Newlines (`\\n` only, not other whitespace) adjacent to those four tags, and at the very start
  and end of the output, are dropped. This is what GLM's own chat templates do when they parse a
  past assistant turn (`split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n')`
  for the reasoning and `split('</think>')[-1].lstrip('\\n')` for the answer), extended to
  `<answer>`/`</answer>`; the official GLM-4.1V demo strips all whitespace of both parts, which
  would also eat meaningful indentation, so only newlines go here.
* While streaming, a possible partial tag at the end of a delta (`<thi`) and trailing newlines
  are held back until the next delta resolves them.

`split(text)` equals the concatenation of `feed` deltas plus `flush` for any way of cutting the
text into deltas (tested).
"""

from __future__ import annotations

__all__ = [
    "ANSWER_END",
    "ANSWER_START",
    "BOX_END",
    "BOX_START",
    "THINK_END",
    "THINK_START",
    "ReasoningParser",
    "prompt_opens_thinking",
    "split",
]

THINK_START = "<think>"
THINK_END = "</think>"
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"
BOX_START = "<|begin_of_box|>"
BOX_END = "<|end_of_box|>"
_ASSISTANT = "<|assistant|>"

# Tag -> whether the text after it is reasoning.
_SECTION_TAGS: dict[str, bool] = {
    THINK_START: True,
    THINK_END: False,
    ANSWER_START: False,
    ANSWER_END: False,
}
_BOX_TAGS = (BOX_START, BOX_END)
_ALL_TAGS = (*_SECTION_TAGS, *_BOX_TAGS)
# Every tag has exactly one "<", at its start, so a partial tag is always the text from the last
# "<" of the buffer.
_PARTIAL_TAGS = frozenset(tag[:k] for tag in _ALL_TAGS for k in range(1, len(tag)))


class ReasoningParser:
    """Incremental splitter: `feed(delta) -> (reasoning_delta, content_delta)`, then `flush()`."""

    __slots__ = ("_at_start", "_buf", "_in_reasoning", "_keep_box", "_newlines", "_saw_reasoning")

    def __init__(self, starts_in_thinking: bool = False, keep_box_tags: bool = False) -> None:
        self._in_reasoning = starts_in_thinking
        self._saw_reasoning = starts_in_thinking
        self._keep_box = keep_box_tags
        self._buf = ""  # a possible partial tag held back from the previous delta
        self._newlines = ""  # trailing newlines of the current section, held back
        self._at_start = True  # leading newlines of a section are dropped

    @property
    def in_reasoning(self) -> bool:
        """Whether text fed now would count as reasoning."""
        return self._in_reasoning

    @property
    def saw_reasoning(self) -> bool:
        """Whether the output entered a reasoning section at any point."""
        return self._saw_reasoning

    def feed(self, delta: str) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        buf = self._buf + delta if self._buf else delta
        self._buf = ""
        i, n = 0, len(buf)
        while i < n:
            j = buf.find("<", i)
            if j < 0:
                self._text(buf[i:], reasoning, content)
                break
            if j > i:
                self._text(buf[i:j], reasoning, content)
            tag = _tag_at(buf, j)
            if tag is not None:
                self._tag(tag, reasoning, content)
                i = j + len(tag)
            elif buf[j:] in _PARTIAL_TAGS:
                self._buf = buf[j:]
                break
            else:
                self._text("<", reasoning, content)
                i = j + 1
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of output: a held partial tag is plain text; trailing newlines are dropped."""
        reasoning: list[str] = []
        content: list[str] = []
        if self._buf:
            held, self._buf = self._buf, ""
            self._text(held, reasoning, content)
        self._newlines = ""
        return "".join(reasoning), "".join(content)

    @staticmethod
    def split(
        text: str, starts_in_thinking: bool = False, keep_box_tags: bool = False
    ) -> tuple[str | None, str]:
        """Same as the module-level `split`."""
        return split(text, starts_in_thinking=starts_in_thinking, keep_box_tags=keep_box_tags)

    # -- internals --------------------------------------------------------------------------------

    def _text(self, s: str, reasoning: list[str], content: list[str]) -> None:
        if self._at_start:
            s = s.lstrip("\n")
            if not s:
                return
            self._at_start = False
        body = s.rstrip("\n")
        if not body:
            self._newlines += s
            return
        out = reasoning if self._in_reasoning else content
        if self._newlines:
            out.append(self._newlines)
        out.append(body)
        self._newlines = s[len(body) :]

    def _tag(self, tag: str, reasoning: list[str], content: list[str]) -> None:
        to_reasoning = _SECTION_TAGS.get(tag)
        if to_reasoning is None:  # a box tag
            if self._keep_box:
                self._text(tag, reasoning, content)
            return
        self._in_reasoning = to_reasoning
        self._saw_reasoning = self._saw_reasoning or to_reasoning
        self._newlines = ""
        self._at_start = True


def _tag_at(buf: str, j: int) -> str | None:
    for tag in _ALL_TAGS:
        if buf.startswith(tag, j):
            return tag
    return None


def split(text: str, starts_in_thinking: bool = False, keep_box_tags: bool = False) -> tuple[str | None, str]:
    """Non-streaming: `(reasoning or None when there is none, content)`."""
    parser = ReasoningParser(starts_in_thinking=starts_in_thinking, keep_box_tags=keep_box_tags)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.flush()
    reasoning = r1 + r2
    return (reasoning or None), c1 + c2


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether the rendered prompt ends inside an open `<think>` of the assistant turn.

    Looks at the text after the last `<|assistant|>`: true when it holds a `<think>` that no
    `</think>` follows (GLM-4.5V/4.6V-style templates that pre-open the reasoning).
    """
    tail = prompt.rsplit(_ASSISTANT, 1)[-1]
    return tail.rfind(THINK_START) > tail.rfind(THINK_END)
