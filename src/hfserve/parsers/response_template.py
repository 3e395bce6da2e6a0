"""``hf``: reasoning, content and tool calls read by the model's own ``response_template``.

transformers (5.x) lets a tokenizer declare how its chat model's output is parsed
(``tokenizer.response_template``, read by ``transformers.utils.chat_parsing.ResponseParser``); vLLM
0.32 serves that as ``--tool-call-parser hf`` / ``--reasoning-parser hf``. This adapter turns the
region events of such a parser into hfserve's deltas, with the same rules as the other parsers
(arguments always JSON object text, markup it cannot read comes back as content, any split of the
output streams the same). It does not import transformers: the caller, which knows the tokenizer,
passes ``make_parser(prefix)``, e.g.::

    from transformers.utils.chat_parsing import ResponseParser
    ResponseTemplateParser(tools, prompt_text=prompt,
                           make_parser=lambda prefix: ResponseParser(tok.response_template, prefix=prefix, tools=tools))

Fields, by vLLM's names: ``thinking`` (also ``reasoning``/``reasoning_content``) is reasoning,
``tool_calls`` are calls (each ``{"type": "function", "function": {"name", "arguments"}}`` or
``{"name", "arguments"}``, one or a list per region), ``content`` and any other field's text is
content. The parser is fed one character at a time, so what it decides never depends on how the
output was split; a region it fails on (transformers raises on bad JSON) comes back as content
(its text without its delimiters) and so does everything after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from hfserve.parsers._text import WhitespaceHolder
from hfserve.parsers.tool_calls import ParsedMessage, StreamDelta, ToolCall, ToolCallParser, arguments_json

__all__ = ["RESPONSE_TEMPLATE_PARSER", "EventParser", "ResponseTemplateParser"]

#: vLLM's name for this parser, as a tool-call parser and as a reasoning parser.
RESPONSE_TEMPLATE_PARSER = "hf"


class EventParser(Protocol):
    """What ``transformers.utils.chat_parsing.ResponseParser`` offers."""

    def feed(self, text: str) -> list[dict[str, Any]]: ...

    def finalize(self) -> tuple[dict[str, Any], list[dict[str, Any]]]: ...


def _calls_of(value: Any) -> list[tuple[str, str]] | None:
    """A tool region's value -> [(name, arguments JSON)], None when any of it is not a call."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict):
            return None
        fn = item.get("function", item)
        if not isinstance(fn, dict):
            return None
        name = fn.get("name")
        arguments = arguments_json(fn.get("arguments"))
        if not isinstance(name, str) or not name.strip() or arguments is None:
            return None
        calls.append((name.strip(), arguments))
    return calls or None


class ResponseTemplateParser(ToolCallParser):
    """Reasoning, content and calls through a response-template event parser. One instance per answer."""

    name = RESPONSE_TEMPLATE_PARSER
    REASONING_FIELDS = frozenset({"thinking", "reasoning", "reasoning_content"})
    TOOL_FIELD = "tool_calls"

    def __init__(
        self,
        tools: list[dict[str, Any]] | None = None,
        *,
        make_parser: Callable[[str], EventParser],
        prompt_text: str | None = None,
        parse_tools: bool = True,
        parse_reasoning: bool = True,
    ) -> None:
        super().__init__(tools)
        self.make_parser = make_parser
        self.prompt_text = prompt_text
        self.parse_tools = parse_tools
        self.parse_reasoning = parse_reasoning
        # the prompt's own events (a <think> the template opened) only set the parser's state
        self._parser: EventParser = make_parser(prompt_text or "")
        self._r = WhitespaceHolder(drop_leading=True)
        self._r_out: list[str] = []
        self._body: list[str] = []
        self._failed = False

    def parse(self, text: str) -> ParsedMessage:
        parser = type(self)(
            self.tools,
            make_parser=self.make_parser,
            prompt_text=self.prompt_text,
            parse_tools=self.parse_tools,
            parse_reasoning=self.parse_reasoning,
        )
        first, last = parser.feed(text), parser.finish()
        content = first.content + last.content
        reasoning = first.reasoning + last.reasoning
        calls: list[ToolCall] = []
        for delta in first.tool_calls + last.tool_calls:
            if delta.id is not None:
                calls.append(ToolCall(id=delta.id, name=delta.name or "", arguments=""))
            calls[delta.index].arguments += delta.arguments
        return ParsedMessage(content=content if content.strip() else None, tool_calls=calls, reasoning=reasoning or None)

    def feed(self, text: str) -> StreamDelta:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        for i, ch in enumerate(text):
            if self._failed:
                self._content(text[i:])
                break
            try:
                events = self._parser.feed(ch)
            except Exception:  # noqa: BLE001 - any failure of the third-party parser: the region just closed is content
                self._fail()
                continue
            self._route(events)
        return self._take()

    def finish(self) -> StreamDelta:
        if self._finished:
            return StreamDelta()
        self._finished = True
        if not self._failed:
            try:
                _, events = self._parser.finalize()
            except Exception:  # noqa: BLE001 - as in feed()
                self._fail()
            else:
                self._route(events)
        self._r.drop()
        if self._n_calls == 0:
            self._content_out.append(self._ws.release())
        self._ws.drop()
        return self._take()

    def _fail(self) -> None:
        self._failed = True
        self._content("".join(self._body))
        self._body = []

    def _route(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind, fname = event.get("type"), event.get("field")
            text = event.get("text") or ""
            if fname == self.TOOL_FIELD and self.parse_tools:
                if kind == "region_open":
                    self._body = []
                elif kind == "region_chunk":
                    self._body.append(text)
                elif kind in ("region_close", "region_malformed"):
                    calls = _calls_of(event.get("value")) if kind == "region_close" else None
                    if calls is None:
                        self._content("".join(self._body))
                    else:
                        for call in calls:
                            self._call(*call)
                    self._body = []
            elif kind == "region_chunk":
                if fname in self.REASONING_FIELDS and self.parse_reasoning:
                    self._r_out.append(self._r.push(text))
                else:
                    self._content(text)
            elif kind == "region_close" and fname in self.REASONING_FIELDS:
                self._r.drop()

    def _step(self, final: bool) -> bool:  # pragma: no cover - feed and finish are overridden
        return False

    def _take(self) -> StreamDelta:
        out = super()._take()
        out.reasoning = "".join(self._r_out)
        self._r_out = []
        return out
