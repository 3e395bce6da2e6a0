"""Reasoning parsers: a thinking model's output -> (reasoning, content), whole or streamed.

Registered under vLLM's ``--reasoning-parser`` names. As with the tool-call parsers, :meth:`split`
runs the streaming machine over the whole text, so both always agree.

Semantics of ``deepseek_r1`` and ``qwen3`` (vLLM 0.32's, with the rendered prompt as a hint):

- The answer starts in reasoning: ``<think>`` is optional, because many chat templates (DeepSeek
  R1's, Qwen3 thinking-2507's) put it in the prompt. ``<think>`` tags inside reasoning are dropped.
- ``</think>`` ends reasoning; everything after it is content (a second, stray ``</think>`` is dropped).
- If ``</think>`` never comes, the whole answer is reasoning and content is None (a truncated
  thought, as vLLM).
- If the rendered prompt already ends with ``</think>`` (Qwen3's template with
  ``enable_thinking: false`` renders an empty ``<think>\\n\\n</think>\\n\\n``), the answer is all content.
- ``qwen3`` only: a ``<tool_call>`` inside reasoning ends it too (Qwen3 may call a tool without
  closing its thought); the ``<tool_call>`` and what follows are content, for the tool-call parser.
- Whitespace: reasoning is stripped at both ends, content at its start; an empty one is None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from hfserve.parsers._registry import Registry
from hfserve.parsers._text import BufferedSteps, WhitespaceHolder, find_first, partial_overlap

__all__ = [
    "REASONING_PARSERS",
    "DeepSeekR1ReasoningParser",
    "Qwen3ReasoningParser",
    "ReasoningParser",
    "reasoning_parser",
]


class ReasoningParser(BufferedSteps):
    """``<think>...</think>`` reasoning. One instance per answer (``feed`` ... ``finish``); ``split`` any time."""

    name: ClassVar[str] = ""
    START: ClassVar[str] = "<think>"
    END: ClassVar[str] = "</think>"
    #: Tags that end reasoning without being reasoning markup: they stay, as the content's start.
    IMPLICIT_ENDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, prompt_text: str | None = None) -> None:
        self.prompt_text = prompt_text
        tail = (prompt_text or "").rstrip()
        self._reasoning = not tail.endswith(self.END)
        self._buf = ""
        self._r = WhitespaceHolder(drop_leading=True)
        self._c = WhitespaceHolder(drop_leading=True)
        self._r_out: list[str] = []
        self._c_out: list[str] = []
        self._finished = False

    @property
    def in_reasoning(self) -> bool:
        """Whether the text fed so far leaves the model inside its reasoning."""
        return self._reasoning

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole answer, each None when empty."""
        parser = type(self)(self.prompt_text)
        r1, c1 = parser.feed(text)
        r2, c2 = parser.finish()
        return (r1 + r2) or None, (c1 + c2) or None

    def feed(self, text: str) -> tuple[str, str]:
        """The next piece of generated text (any split) -> (reasoning delta, content delta)."""
        self._push(text)
        return self._take()

    def finish(self) -> tuple[str, str]:
        """End of the answer: releases held-back text."""
        if self._finished:
            return "", ""
        self._finished = True
        while self._step(final=True):
            pass
        self._r.drop()
        self._c_out.append(self._c.release())
        return self._take()

    def _take(self) -> tuple[str, str]:
        out = "".join(self._r_out), "".join(self._c_out)
        self._r_out, self._c_out = [], []
        return out

    def _step(self, final: bool) -> bool:
        if not self._buf:
            return False
        if self._reasoning:
            tags = (self.START, self.END, *self.IMPLICIT_ENDS)
            i, tag = find_first(self._buf, tags)
            if tag is None:
                keep = 0 if final else partial_overlap(self._buf, tags)
                cut = len(self._buf) - keep
                self._r_out.append(self._r.push(self._buf[:cut]))
                self._buf = self._buf[cut:]
                return False
            self._r_out.append(self._r.push(self._buf[:i]))
            if tag == self.START:
                self._buf = self._buf[i + len(tag) :]
            elif tag == self.END:
                self._buf = self._buf[i + len(tag) :]
                self._reasoning = False
            else:  # an implicit end: stays in the text, as content
                self._buf = self._buf[i:]
                self._reasoning = False
            if not self._reasoning:
                self._r.drop()
            return True
        i, tag = find_first(self._buf, (self.END,))
        if tag is not None:
            self._c_out.append(self._c.push(self._buf[:i]))
            self._buf = self._buf[i + len(tag) :]
            return True
        keep = 0 if final else partial_overlap(self._buf, (self.END,))
        cut = len(self._buf) - keep
        text, self._buf = self._buf[:cut], self._buf[cut:]
        # content keeps its trailing whitespace: release it as it comes once content has started
        out = self._c.push(text)
        if self._c.started:
            out += self._c.release()
        self._c_out.append(out)
        return False


class DeepSeekR1ReasoningParser(ReasoningParser):
    """``deepseek_r1``: DeepSeek R1 and its distills (``<think>`` usually in the prompt)."""

    name = "deepseek_r1"


class Qwen3ReasoningParser(ReasoningParser):
    """``qwen3``: Qwen3 (hybrid and thinking); ``<tool_call>`` ends reasoning too."""

    name = "qwen3"
    IMPLICIT_ENDS = ("<tool_call>",)


_REGISTRY = Registry[ReasoningParser](
    "reasoning parser",
    {
        "deepseek_r1": DeepSeekR1ReasoningParser,
        "qwen3": Qwen3ReasoningParser,
    },
)

REASONING_PARSERS: Mapping[str, type[ReasoningParser]] = _REGISTRY.view
register_reasoning_parser = _REGISTRY.register
reasoning_parser = _REGISTRY.get
