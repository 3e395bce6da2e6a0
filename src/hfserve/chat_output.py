"""Tool calling and reasoning, output side: one choice's generated text read into the parts of a
chat message (reasoning, content, tool calls), whole or as a stream of deltas.

A :class:`ChoiceReader` reads one choice. In order:

1. **reasoning** (``--reasoning-parser``): what the model thinks goes to ``reasoning``, the rest
   on; not for constrained outputs (a ``response_format`` or a forced tool call is constrained from
   the first token, so there is no reasoning to split off, on either backend);
2. **tool calls**, by the request's :class:`~hfserve.tools.ToolPlan`:
   ``auto``: the server's tool-call parser (``--tool-call-parser``) reads the content;
   a named function: the constrained output *is* the call's arguments;
   ``required``: the constrained output is vLLM's JSON list of ``{"name", "parameters"}``;
   ``none``: content only.

Both backends produce text alike, and this module is the one reader of it, so both return the
same messages. Nothing here knows HTTP, a backend or the OpenAI types: :mod:`hfserve.api.openai`
renders what it returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .parsers.tool_calls import ToolCall, ToolCallDelta, arguments_json, make_tool_call_id
from .tools import ToolPlan

if TYPE_CHECKING:
    from .parsers.reasoning import ReasoningParser
    from .parsers.tool_calls import ToolCallParser


@dataclass
class MessageParts:
    """A whole choice's message."""

    content: str | None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class DeltaParts:
    """What one streamed piece of text adds to a choice's message."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def add(self, other: DeltaParts) -> DeltaParts:
        return DeltaParts(self.content + other.content, self.reasoning + other.reasoning, self.tool_calls + other.tool_calls)


class _ListScanner:
    """Finds the complete top-level elements of a JSON list as its text streams in."""

    def __init__(self) -> None:
        self.buffer = ""
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.start: int | None = None

    def feed(self, text: str) -> list[str]:
        done: list[str] = []
        for ch in text:
            self.buffer += ch
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
                if self.depth == 2 and ch == "{":
                    self.start = len(self.buffer) - 1
            elif ch in "]}":
                if self.depth == 2 and ch == "}" and self.start is not None:
                    done.append(self.buffer[self.start :])
                    self.start = None
                self.depth -= 1
        return done


def _required_calls(text: str) -> list[ToolCall] | None:
    """The calls of a ``required`` output (vLLM's list of ``{"name", "parameters"}``), None when
    it is not such a list (cut short by max_tokens)."""
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
        return None
    return [ToolCall(make_tool_call_id(), i["name"], arguments_json(i.get("parameters")) or "{}") for i in items]


class ChoiceReader:
    """Reads one choice's text (see the module docstring)."""

    def __init__(
        self,
        plan: ToolPlan,
        *,
        tool_parser: type[ToolCallParser] | None = None,
        reasoning_parser: type[ReasoningParser] | None = None,
        prompt_text: str | None = None,
        constrained: bool = False,
        template_parser: ToolCallParser | None = None,
    ):
        self.plan = plan
        constrained = constrained or plan.constrained
        self.reasoning = reasoning_parser(prompt_text) if reasoning_parser is not None and not constrained else None
        self.tools = tool_parser(plan.tools) if tool_parser is not None and plan.mode == "auto" else None
        #: the model's response template (``hf``): reads reasoning and calls in one pass
        self.template = template_parser if not constrained else None
        self.calls = 0  # tool calls begun (streaming)
        self._named_id: str | None = None
        self._scanner = _ListScanner() if plan.mode == "required" else None
        self._called = False

    # whole ---------------------------------------------------------------
    def whole(self, text: str) -> MessageParts:
        if self.template is not None:
            parsed = self.template.parse(text)
            self._called = bool(parsed.tool_calls)
            return MessageParts(parsed.content, parsed.reasoning, list(parsed.tool_calls))
        reasoning: str | None = None
        content: str | None = text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.split(text)
        if self.plan.mode == "named":
            assert self.plan.name is not None
            self._called = True
            return MessageParts(None, reasoning, [ToolCall(make_tool_call_id(), self.plan.name, text)])
        if self.plan.mode == "required":
            calls = _required_calls(text)
            if calls is None:
                return MessageParts(text or None, reasoning)
            self._called = bool(calls)
            return MessageParts(None, reasoning, calls)
        if self.tools is not None and content is not None:
            parsed = self.tools.parse(content)
            self._called = bool(parsed.tool_calls)
            return MessageParts(parsed.content, reasoning, list(parsed.tool_calls))
        return MessageParts(content, reasoning)

    # streaming -------------------------------------------------------------
    def feed(self, text: str) -> DeltaParts:
        if self.plan.mode == "named":
            return self._named(text)
        if self.plan.mode == "required":
            return self._required(text)
        if self.template is not None:
            step = self.template.feed(text)
            return DeltaParts(reasoning=step.reasoning).add(self._tool_delta(step.content, step.tool_calls))
        reasoning, content = ("", text) if self.reasoning is None else self.reasoning.feed(text)
        return DeltaParts(reasoning=reasoning).add(self._content(content))

    def finish(self) -> DeltaParts:
        if self.plan.mode in ("named", "required"):
            return DeltaParts()
        out = DeltaParts()
        if self.template is not None:
            step = self.template.finish()
            return DeltaParts(reasoning=step.reasoning).add(self._tool_delta(step.content, step.tool_calls))
        if self.reasoning is not None:
            reasoning, content = self.reasoning.finish()
            out = DeltaParts(reasoning=reasoning).add(self._content(content))
        if self.tools is not None:
            tail = self.tools.finish()
            out = out.add(self._tool_delta(tail.content, tail.tool_calls))
        return out

    def _content(self, text: str) -> DeltaParts:
        if self.tools is None or not text:
            return DeltaParts(content=text)
        step = self.tools.feed(text)
        return self._tool_delta(step.content, step.tool_calls)

    def _tool_delta(self, content: str, calls: list[ToolCallDelta]) -> DeltaParts:
        if calls:
            self._called = True
        return DeltaParts(content=content, tool_calls=list(calls))

    def _named(self, text: str) -> DeltaParts:
        out = DeltaParts()
        if self._named_id is None:
            self._named_id = make_tool_call_id()
            self._called = True
            out.tool_calls.append(ToolCallDelta(0, self._named_id, self.plan.name, ""))
        if text:
            out.tool_calls.append(ToolCallDelta(0, None, None, text))
        return out

    def _required(self, text: str) -> DeltaParts:
        assert self._scanner is not None
        out = DeltaParts()
        for element in self._scanner.feed(text):
            try:
                item: Any = json.loads(element)
            except ValueError:
                continue
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue
            index = self.calls
            self.calls += 1
            self._called = True
            out.tool_calls.append(ToolCallDelta(index, make_tool_call_id(), item["name"], ""))
            out.tool_calls.append(ToolCallDelta(index, None, None, arguments_json(item.get("parameters")) or "{}"))
        return out

    # finish reason -----------------------------------------------------------
    def finish_reason(self, reason: str | None) -> str:
        """OpenAI's: ``tool_calls`` when ``auto`` or ``required`` called a tool and the model
        stopped by itself; a named function keeps ``stop``."""
        reason = reason or "length"
        if reason == "stop" and self._called and self.plan.mode in ("auto", "required"):
            return "tool_calls"
        return reason
