"""Tool-call parsers: a model's generated text -> OpenAI ``tool_calls`` (whole, or streamed as deltas).

One implementation for every backend, registered under vLLM's ``--tool-call-parser`` names. Each
parser is a small state machine over the generated text; :meth:`ToolCallParser.parse` runs the same
machine over the whole text, so a streamed answer and a whole one are the same by construction
(``tests/test_parsers.py`` checks it for arbitrary splits).

The rules every parser keeps:

- ``arguments`` is always JSON text of an object (``"{}"`` when the model gave none), never an
  object, never ``"null"``.
- A call is only emitted once it is complete and readable; until then its text is held back. So a
  streamed call arrives as two deltas (``index``/``id``/``name`` with ``arguments=""``, then the
  whole ``arguments``), and markup the parser cannot read comes back, verbatim, as content: never
  a half-sent call, never an exception.
- Text that might be the start of a tag (``"<tool_"``) is held back until it is decided.
- Content whitespace is normalised the same way streamed or whole: leading whitespace is dropped,
  and whitespace before a call or at the end of an answer that made calls is dropped. An answer
  that is only whitespace has content ``None``.
"""

from __future__ import annotations

import ast
import json
import random
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hfserve.parsers._registry import Registry
from hfserve.parsers._text import BufferedSteps, JsonEnd, PythonListEnd, WhitespaceHolder, find_first, partial_overlap

__all__ = [
    "TOOL_CALL_PARSERS",
    "Hermes2ProToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "ParsedMessage",
    "PythonicToolParser",
    "Qwen3XmlToolParser",
    "StreamDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "tool_call_parser",
]

_ALNUM = string.ascii_letters + string.digits
_random = random.Random()


def make_tool_call_id() -> str:
    """``call_`` and 24 random alphanumerics (what OpenAI's ids look like)."""
    return "call_" + "".join(_random.choices(_ALNUM, k=24))


@dataclass
class ToolCall:
    """One complete call. ``arguments`` is JSON text of an object."""

    id: str
    name: str
    arguments: str


@dataclass
class ParsedMessage:
    """A whole answer: ``content`` (None when empty or whitespace only) and its calls, in order.

    ``reasoning`` is only filled by parsers that also read reasoning (the response-template parser).
    """

    content: str | None
    tool_calls: list[ToolCall]
    reasoning: str | None = None


@dataclass
class ToolCallDelta:
    """A streamed piece of call ``index``: the first has ``id`` and ``name`` and ``arguments=""``, later ones ``arguments`` text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class StreamDelta:
    """What one :meth:`ToolCallParser.feed` releases. ``tool_calls`` may hold several deltas, for the same index too.

    ``reasoning`` is only filled by parsers that also read reasoning (the response-template parser).
    """

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    reasoning: str = ""

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls or self.reasoning)


def arguments_json(value: Any) -> str | None:
    """A call's arguments as JSON text of an object, or None when they are not an object.

    Missing or null arguments are ``{}``; a string holding a JSON object (some models quote them) is
    re-serialised.
    """
    if value is None:
        return "{}"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return None
    if not isinstance(value, dict):
        return None
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return None


def _call_from_object(obj: Any) -> tuple[str, str] | None:
    """``{"name": ..., "arguments"|"parameters": {...}}`` -> (name, arguments JSON), None when it is not a call."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    arguments = arguments_json(args)
    if arguments is None:
        return None
    return name.strip(), arguments


_decoder = json.JSONDecoder()
_WS = re.compile(r"\s*")


def _skip_ws(text: str, i: int) -> int:
    """The index of the first non-whitespace character at or after ``i`` (``len(text)`` if none)."""
    m = _WS.match(text, i)
    return m.end() if m else i


def _decode_prefix(text: str) -> tuple[Any, int] | None:
    """The JSON value at the start of ``text`` and where it ends, or None when there is none (yet)."""
    try:
        return _decoder.raw_decode(text)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        return None


class ToolCallParser(BufferedSteps):
    """Base class: the streaming machinery. Subclasses implement :meth:`_step`.

    One instance parses one answer (``feed`` ... ``finish``); :meth:`parse` uses a fresh instance and
    may be called on any instance at any time.
    """

    name: ClassVar[str] = ""
    #: The strings that mark tool calls in this format; they never reach content of a well-formed answer.
    markup: ClassVar[tuple[str, ...]] = ()

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        # The request's tools, OpenAI form. Like vLLM's parsers for these formats, calls to names not
        # in ``tools`` are kept (the client sees what the model asked for).
        self.tools = list(tools or [])
        self._buf = ""
        self._state = "start"
        self._json_end = JsonEnd()  # where the JSON value being read ends
        self._find_from = 0  # where to look for a tag next in the buffer
        self._ws = WhitespaceHolder(drop_leading=True)
        self._content_out: list[str] = []
        self._calls_out: list[ToolCallDelta] = []
        self._n_calls = 0
        self._finished = False

    # -- public interface ---------------------------------------------------------------------

    def parse(self, text: str) -> ParsedMessage:
        """Parse a whole answer. Text it cannot read stays content; never raises."""
        parser = type(self)(self.tools)
        first = parser.feed(text)
        last = parser.finish()
        content = first.content + last.content
        calls: list[ToolCall] = []
        for delta in first.tool_calls + last.tool_calls:
            if delta.id is not None:
                calls.append(ToolCall(id=delta.id, name=delta.name or "", arguments=""))
            calls[delta.index].arguments += delta.arguments
        return ParsedMessage(content=content if content.strip() else None, tool_calls=calls)

    def feed(self, text: str) -> StreamDelta:
        """The next piece of generated text (any split); returns what is decided so far."""
        self._push(text)
        return self._take()

    def finish(self) -> StreamDelta:
        """The end of the answer: flushes held-back text; an incomplete call comes back as content."""
        if self._finished:
            return StreamDelta()
        self._finished = True
        while self._step(final=True):
            pass
        if self._buf:  # pragma: no cover - every _step consumes everything when final
            self._content(self._buf)
            self._buf = ""
        if self._n_calls == 0:
            self._content_out.append(self._ws.release())
        self._ws.drop()
        return self._take()

    @property
    def calls_made(self) -> int:
        """How many calls have been emitted so far."""
        return self._n_calls

    # -- for subclasses -----------------------------------------------------------------------

    def _step(self, final: bool) -> bool:
        """Consume what can be decided from ``self._buf``; True to be called again. When ``final``, consume it all."""
        raise NotImplementedError

    def _content(self, text: str) -> None:
        self._content_out.append(self._ws.push(text))

    def _call(self, name: str, arguments: str) -> None:
        self._ws.drop()
        index = self._n_calls
        self._n_calls += 1
        self._calls_out.append(ToolCallDelta(index=index, id=self._new_id(), name=name, arguments=""))
        self._calls_out.append(ToolCallDelta(index=index, arguments=arguments))

    def _new_id(self) -> str:
        return make_tool_call_id()

    def _set_state(self, state: str) -> None:
        self._state = state
        self._find_from = 0
        self._json_end = JsonEnd()

    def _read_json(self, start: int, limit: int | None = None) -> tuple[bool, tuple[Any, int] | None]:
        """``(ended, decoded)``: the JSON value at ``start`` in the buffer (which only grows while the state stays).

        ``ended`` is False while the value may still come (its brackets are not balanced before
        ``limit``); then ``decoded`` is the value and the buffer index after it, or None when it is
        not JSON.
        """
        end = self._json_end.scan(self._buf, start, limit)
        if end is None:
            return False, None
        decoded = _decode_prefix(self._buf[start:end])
        if decoded is None or start + decoded[1] != end:
            return True, None
        return True, (decoded[0], end)

    def _take(self) -> StreamDelta:
        out = StreamDelta(content="".join(self._content_out), tool_calls=self._calls_out)
        self._content_out, self._calls_out = [], []
        return out

    def _pass_content(self, tags: tuple[str, ...], final: bool) -> str | None:
        """Content state: emit text up to the first of ``tags`` and return that tag (consumed), or hold a partial tag and return None."""
        i, tag = find_first(self._buf, tags)
        if tag is not None:
            self._content(self._buf[:i])
            self._buf = self._buf[i + len(tag) :]
            return tag
        keep = 0 if final else partial_overlap(self._buf, tags)
        cut = len(self._buf) - keep
        self._content(self._buf[:cut])
        self._buf = self._buf[cut:]
        return None


class Hermes2ProToolParser(ToolCallParser):
    """``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number, text around them is content.

    Hermes 2 Pro / 3, Qwen 2.5 and Qwen 3 (their JSON form). A call without its closing tag at the
    end of the answer still counts when its JSON is complete (the model stopped early, as vLLM).
    """

    name = "hermes"
    START = "<tool_call>"
    END = "</tool_call>"
    markup = (START, END)

    def _step(self, final: bool) -> bool:
        if self._state != "call":
            if self._pass_content((self.START,), final) is None:
                return False
            self._set_state("call")
            self._scan = 0
            return True
        j = self._buf.find(self.END, self._scan)
        if j >= 0:
            body = self._buf[:j]
            self._buf = self._buf[j + len(self.END) :]
            self._close(body, self.START + body + self.END)
            return True
        if not final:
            self._scan = max(0, len(self._buf) - len(self.END) + 1)
            return False
        body = self._buf
        self._buf = ""
        cut = partial_overlap(body, (self.END,))
        self._close(body[: len(body) - cut], self.START + body)
        return False

    _scan = 0

    def _close(self, body: str, raw: str) -> None:
        self._set_state("content")
        call = self._read_body(body)
        if call is None:
            self._content(raw)
        else:
            self._call(*call)

    def _read_body(self, body: str) -> tuple[str, str] | None:
        """A call's text between the tags -> (name, arguments JSON), None when it is not one."""
        decoded = _decode_prefix(body.strip())
        if decoded is None or decoded[1] != len(body.strip()):
            return None
        return _call_from_object(decoded[0])


_XML_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)(?:</function>\s*)?", re.DOTALL)
_XML_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


def _schema_types(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else [t for t in declared or [] if isinstance(t, str)]
    for key in ("anyOf", "oneOf"):
        for choice in schema.get(key) or []:
            types += _schema_types(choice)
    return types


def _coerce_xml_value(raw: str, schema: Any) -> Any:
    """A ``<parameter>`` value (always text) as the type its JSON schema declares; text when it is not one."""
    for kind in _schema_types(schema):
        text = raw.strip()
        if kind == "string":
            return raw
        if kind in ("integer", "number", "boolean", "null", "object", "array"):
            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                if kind == "boolean" and text in ("True", "False"):
                    return text == "True"
                continue
            expected: dict[str, Any] = {
                "integer": int,
                "number": (int, float),
                "boolean": bool,
                "null": type(None),
                "object": dict,
                "array": list,
            }
            if isinstance(value, expected[kind]) and not (kind in ("integer", "number") and isinstance(value, bool)):
                return value
    return raw


class Qwen3XmlToolParser(Hermes2ProToolParser):
    """``qwen3_xml`` (also ``qwen3_coder``): Qwen3-Coder's XML calls inside ``<tool_call>`` tags.

    ``<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n</function>\n</tool_call>``.
    Values are text (one newline at each end is the template's and is dropped); a value whose
    parameter the request's tool declares as a number, boolean, null, object or array is read as
    that JSON type when it is one. A missing ``</parameter>`` ends at the next ``<parameter=``.
    """

    name = "qwen3_xml"

    def _read_body(self, body: str) -> tuple[str, str] | None:
        m = _XML_FUNCTION.fullmatch(body)
        if m is None:
            return None
        name = m.group(1).strip()
        properties: dict[str, Any] = {}
        for tool in self.tools:
            fn = tool.get("function", tool) if isinstance(tool, dict) else None
            if isinstance(fn, dict) and fn.get("name") == name:
                params = fn.get("parameters")
                props = params.get("properties") if isinstance(params, dict) else None
                properties = props if isinstance(props, dict) else {}
        args: dict[str, Any] = {}
        inner = m.group(2)
        end = 0
        for p in _XML_PARAMETER.finditer(inner):
            if inner[end : p.start()].strip():
                return None  # text between parameters: not this format
            value = p.group(2)
            value = value[1:] if value.startswith("\n") else value
            value = value[:-1] if value.endswith("\n") else value
            key = p.group(1).strip()
            args[key] = _coerce_xml_value(value, properties.get(key))
            end = p.end()
        if inner[end:].strip() or not name:
            return None
        arguments = arguments_json(args)
        return None if arguments is None else (name, arguments)


class Llama3JsonToolParser(ToolCallParser):
    """``llama3_json`` (also ``llama4_json``): the answer is JSON calls, optionally after ``<|python_tag|>``.

    ``{"name": "f", "parameters": {...}}`` (or ``"arguments"``), several separated by ``;``. An answer
    that does not start (after whitespace) with ``<|python_tag|>`` or ``{`` is all content, as
    vLLM streams it. Text after the calls is content; a JSON object that is not a call, and
    everything after it, is content.
    """

    name = "llama3_json"
    TAG = "<|python_tag|>"
    markup = (TAG,)

    def _step(self, final: bool) -> bool:
        if self._state == "start":
            s = self._buf.lstrip()
            if not s:
                if final:
                    self._content(self._buf)
                    self._buf = ""
                return False
            if s.startswith(self.TAG) or s[0] == "{":
                self._set_state("calls")
                return True
            if self.TAG.startswith(s) and not final:
                return False
            self._set_state("text")
            return True
        if self._state == "text":
            self._content(self._buf)
            self._buf = ""
            return False
        # "calls" (before the first call) or "sep" (after one): skip markup up to the next object
        i = _skip_ws(self._buf, 0)
        if self._state == "calls" and self._buf.startswith(self.TAG, i):
            i += len(self.TAG)
        elif self._state == "sep" and self._buf.startswith(";", i):
            i += 1
        i = _skip_ws(self._buf, i)
        if i == len(self._buf):
            if final:
                if self._n_calls == 0:
                    self._content(self._buf)
                self._buf = ""
            return False
        if self._buf[i] != "{":
            self._set_state("text")
            return True
        ended, decoded = self._read_json(i)
        if not ended and not final:
            return False
        call = None if decoded is None else _call_from_object(decoded[0])
        if call is None or decoded is None:
            self._set_state("text")
            return True
        self._call(*call)
        self._buf = self._buf[decoded[1] :]
        self._set_state("sep")
        return True


class MistralToolParser(ToolCallParser):
    """``mistral``: ``[TOOL_CALLS]`` then either a JSON list of ``{"name", "arguments"}`` (tokenizers before
    v11) or ``name[ARGS]{...}`` / ``name{...}`` (v11 and later; each call has its own ``[TOOL_CALLS]``).

    Text before the first ``[TOOL_CALLS]`` and after the calls is content. Ids are 9 alphanumerics,
    which Mistral's chat templates require of the calls they render back.
    """

    name = "mistral"
    MARK = "[TOOL_CALLS]"
    ARGS = "[ARGS]"
    markup = (MARK, ARGS)
    _NAME = re.compile(r"[A-Za-z0-9_.\-]+")

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._raw = ""  # the markup consumed since [TOOL_CALLS], given back as content if the call is malformed
        self._fname = ""

    def _new_id(self) -> str:
        return "".join(_random.choices(_ALNUM, k=9))

    def _malformed(self) -> bool:
        self._content(self._raw)
        self._raw = ""
        self._set_state("content")
        return True

    def _step(self, final: bool) -> bool:
        if self._state in ("start", "content"):
            if self._pass_content((self.MARK,), final) is None:
                return False
            self._raw = self.MARK
            self._set_state("marker")
            return True
        buf = self._buf
        i = _skip_ws(buf, 0)
        if i == len(buf):
            return self._malformed() if final else False
        if self._state == "marker" and buf[i] not in "[{":
            m = self._NAME.match(buf, i)
            if m is None:
                return self._malformed()
            rest = buf[m.end() : m.end() + len(self.ARGS)]
            if not rest or (self.ARGS.startswith(rest) and rest != self.ARGS):
                return self._malformed() if final else False
            if rest == self.ARGS:
                sep = self.ARGS
            elif rest[0] == "{":
                sep = ""
            else:
                return self._malformed()
            self._fname = m.group()
            self._raw += buf[: m.end()] + sep
            self._buf = buf[m.end() + len(sep) :]
            self._set_state("args")
            return True
        # a JSON value: the pre-v11 list (state "marker") or a call's arguments (state "args")
        if self._state == "args" and buf[i] != "{":
            return self._malformed()
        # a value that does not end before the next [TOOL_CALLS] is malformed
        next_mark = buf.find(self.MARK, max(i, self._find_from))
        if next_mark < 0:
            self._find_from = max(0, len(buf) - len(self.MARK) + 1)
        ended, decoded = self._read_json(i, next_mark if next_mark >= 0 else None)
        if not ended and not (final or next_mark >= 0):
            return False
        if decoded is None:
            return self._malformed()
        value, end = decoded
        if self._state == "args":
            arguments = arguments_json(value)
            if arguments is None:
                return self._malformed()
            self._call(self._fname, arguments)
        else:
            items = value if isinstance(value, list) else [value]
            calls = [_call_from_object(item) for item in items]
            if not calls or any(c is None for c in calls):
                return self._malformed()
            for c in calls:
                assert c is not None
                self._call(*c)
        self._raw = ""
        self._buf = buf[end:]
        self._set_state("content")
        return True


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _literal(node: ast.expr) -> Any:
    """A Python (or JSON-spelled) literal's value; ValueError for anything else."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float, bool))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:
                raise ValueError("** in a dict")
            key = _literal(k)
            if not isinstance(key, str):
                raise ValueError("dict keys must be strings")
            out[key] = _literal(v)
        return out
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise ValueError("not a literal")


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    raise ValueError("not a function name")


def _pythonic_calls(tree: ast.Expression) -> list[tuple[str, str]] | None:
    """``[f(a=1), g.h(b="x")]`` -> [(name, arguments JSON)], None when it is anything else."""
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for e in tree.body.elts:
        if not isinstance(e, ast.Call) or e.args:
            return None
        try:
            name = _dotted(e.func)
            args = {}
            for kw in e.keywords:
                if kw.arg is None:
                    return None
                args[kw.arg] = _literal(kw.value)
            text = json.dumps(args, ensure_ascii=False, allow_nan=False)
        except (ValueError, RecursionError):
            return None
        calls.append((name, text))
    return calls


class PythonicToolParser(ToolCallParser):
    """``pythonic`` (also ``llama4_pythonic``): the answer starts with a Python list of calls.

    ``[get_weather(city="Paris"), f(x=1)]``, keyword arguments with literal values only (JSON's
    ``true``/``false``/``null`` too), read with :mod:`ast`, never evaluated. Llama 4's
    ``<|python_start|>``/``<|python_end|>`` around the list are markup. An answer that does not start
    with the list is all content; text after the list is content.
    """

    name = "pythonic"
    START = "<|python_start|>"
    END = "<|python_end|>"
    markup = (START, END)

    def _set_state(self, state: str) -> None:
        super()._set_state(state)
        self._list_end = PythonListEnd()

    def _step(self, final: bool) -> bool:
        if self._state == "start":
            s = self._buf.lstrip()
            if s.startswith(self.START):
                s = s[len(self.START) :].lstrip()
            if not s:
                if final:
                    self._set_state("text")
                    return True
                return False
            if s[0] == "[":
                self._set_state("list")
                return True
            if self.START.startswith(s) and not final:
                return False
            self._set_state("text")
            return True
        if self._state == "text":
            self._content(self._buf)
            self._buf = ""
            return False
        if self._state == "after":
            s = self._buf.lstrip()
            if s.startswith(self.END):
                self._buf = s[len(self.END) :]
            elif self.END.startswith(s) and not final:
                return False
            self._set_state("text")
            return True
        # "list": from "[" on; try each "]" where the brackets balance
        i = _skip_ws(self._buf, 0)
        if self._buf.startswith(self.START, i):
            i = _skip_ws(self._buf, i + len(self.START))
        while (end := self._list_end.scan(self._buf, i)) is not None:
            try:
                tree: ast.Expression | None = ast.parse(self._buf[i:end], mode="eval")
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                tree = None  # balanced but not Python: no longer text makes it a list
            calls = None if tree is None else _pythonic_calls(tree)
            if calls is None:
                self._set_state("text")
                return True
            for c in calls:
                self._call(*c)
            self._buf = self._buf[end:]
            self._set_state("after")
            return True
        if final:
            self._set_state("text")
            return True
        return False


_REGISTRY = Registry[ToolCallParser](
    "tool-call parser",
    {
        "hermes": Hermes2ProToolParser,
        "qwen3_json": Hermes2ProToolParser,
        "qwen3_xml": Qwen3XmlToolParser,
        "qwen3_coder": Qwen3XmlToolParser,
        "llama3_json": Llama3JsonToolParser,
        "llama4_json": Llama3JsonToolParser,
        "mistral": MistralToolParser,
        "pythonic": PythonicToolParser,
        "llama4_pythonic": PythonicToolParser,
    },
)

TOOL_CALL_PARSERS: Mapping[str, type[ToolCallParser]] = _REGISTRY.view
register_tool_call_parser = _REGISTRY.register
tool_call_parser = _REGISTRY.get
