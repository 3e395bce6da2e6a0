"""The backend-neutral tool-call and reasoning parsers (hfserve.parsers, issue 13 parts 2-3).

Pure-text tests: known outputs (vLLM's documented examples among them) parse to the calls they
hold; for any way of splitting an output into streamed pieces, the stream says the same as the
whole-text parse; markup never leaks into content; malformed markup comes back as content.
"""

from __future__ import annotations

import json
import keyword
import random
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfserve.parsers import (
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    ParsedMessage,
    ReasoningParser,
    StreamDelta,
    ToolCallParser,
    reasoning_parser,
    tool_call_parser,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "hourly": {"type": ["boolean", "null"]}},
            },
        },
    }
]

# -- streaming helpers ------------------------------------------------------------------------


def pieces_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(text))), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def stream_tools(parser: ToolCallParser, pieces: list[str]) -> tuple[list[StreamDelta], str, list[dict[str, Any]]]:
    """Feed ``pieces``; return the deltas, the concatenated content, and the calls the deltas assemble to.

    Asserts the OpenAI streaming shape on the way: a call's first delta has index, id, name and
    empty arguments; later deltas have only index and arguments; indices count up from 0.
    """
    deltas = [parser.feed(p) for p in pieces]
    deltas.append(parser.finish())
    content = "".join(d.content for d in deltas)
    calls: list[dict[str, Any]] = []
    for d in deltas:
        for tc in d.tool_calls:
            if tc.id is not None:
                assert tc.index == len(calls), "a new call takes the next index"
                assert tc.name and tc.arguments == ""
                calls.append({"id": tc.id, "name": tc.name, "arguments": ""})
            else:
                assert tc.name is None
                assert tc.index == len(calls) - 1, "fragments belong to the call being streamed"
                calls[tc.index]["arguments"] += tc.arguments
    return deltas, content, calls


def assert_stream_matches_parse(name: str, text: str, pieces: list[str]) -> ParsedMessage:
    parsed = tool_call_parser(name)(TOOLS).parse(text)
    _, content, calls = stream_tools(tool_call_parser(name)(TOOLS), pieces)
    assert content == (parsed.content or "")
    assert [c["name"] for c in calls] == [c.name for c in parsed.tool_calls]
    assert [json.loads(c["arguments"]) for c in calls] == [json.loads(c.arguments) for c in parsed.tool_calls]
    return parsed


def stream_reasoning(parser: ReasoningParser, pieces: list[str]) -> tuple[str, str]:
    r, c = "", ""
    for p in pieces:
        dr, dc = parser.feed(p)
        r, c = r + dr, c + dc
    dr, dc = parser.finish()
    return r + dr, c + dc


def random_pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        out.append(text[i : i + n])
        i += n
    return out


def calls_of(parsed: ParsedMessage) -> list[tuple[str, Any]]:
    for call in parsed.tool_calls:
        assert isinstance(call.arguments, str)
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}|[A-Za-z0-9]{9}", call.id)
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


# -- registry ---------------------------------------------------------------------------------


def test_registered_names_are_vllms():
    for name in (
        "hermes",
        "qwen3_json",
        "qwen3_xml",
        "qwen3_coder",
        "llama3_json",
        "llama4_json",
        "mistral",
        "pythonic",
        "llama4_pythonic",
    ):
        assert tool_call_parser(name) is TOOL_CALL_PARSERS[name]
    for name in ("deepseek_r1", "qwen3"):
        assert reasoning_parser(name) is REASONING_PARSERS[name]


def test_unknown_names_are_a_value_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="hermes.*llama3_json.*mistral.*pythonic"):
        tool_call_parser("nope")
    with pytest.raises(ValueError, match="deepseek_r1.*qwen3"):
        reasoning_parser("nope")


# -- whole-text examples ----------------------------------------------------------------------

# (parser, model output, expected content, expected [(name, arguments)])
EXAMPLES: list[tuple[str, str, str | None, list[tuple[str, Any]]]] = [
    # vLLM's hermes example (Qwen 2.5 / Hermes 2 Pro)
    (
        "hermes",
        '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}}\n</tool_call>',
        None,
        [("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})],
    ),
    (
        "hermes",
        'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin"}}\n</tool_call>',
        "Let me check both.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Berlin"})],
    ),
    # no closing tag at the end: the JSON is complete, so it is a call (the model stopped early)
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"x": [1, 2]}}\n', None, [("f", {"x": [1, 2]})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_', None, [("f", {"x": 1})]),
    # arguments: missing -> {}, null -> {}, a quoted JSON object -> the object, non-ASCII kept
    ("hermes", '<tool_call>{"name": "ping"}</tool_call>', None, [("ping", {})]),
    ("hermes", '<tool_call>{"name": "ping", "arguments": null}</tool_call>', None, [("ping", {})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", {"a": 1})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"city": "Zürich"}}</tool_call>', None, [("f", {"city": "Zürich"})]),
    ("hermes", "The capital of France is Paris.", "The capital of France is Paris.", []),
    ("hermes", "   \n ", None, []),
    # text after and between calls is content too
    (
        "hermes",
        'A <tool_call>{"name": "f", "arguments": {}}</tool_call> B <tool_call>{"name": "g", "arguments": {}}</tool_call>\n',
        "A B",
        [("f", {}), ("g", {})],
    ),
    # vLLM's llama3_json examples: Llama 3.1 (bare JSON, "parameters") and 3.2 (<|python_tag|>, several with ;)
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"location": "San Francisco, CA", "unit": "fahrenheit"}}',
        None,
        [("get_weather", {"location": "San Francisco, CA", "unit": "fahrenheit"})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "searchTool", "arguments": {"query": "vllm"}}; {"name": "getOpenIncidentsTool", "parameters": {}}',
        None,
        [("searchTool", {"query": "vllm"}), ("getOpenIncidentsTool", {})],
    ),
    ("llama3_json", '{"name": "f", "parameters": {"a": 1}}\n\nDone.', "Done.", [("f", {"a": 1})]),
    ("llama3_json", "Hello! How can I help?", "Hello! How can I help?", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),  # JSON that is not a call is content
    ("llama3_json", 'I would call {"name": "f", "parameters": {}}', 'I would call {"name": "f", "parameters": {}}', []),
    # vLLM's mistral examples: tokenizers before v11 (a JSON list) and v11+ (name[ARGS]{...})
    (
        "mistral",
        '[TOOL_CALLS] [ {"name": "add", "arguments":{"a": 3.5, "b": 4}}]',
        None,
        [("add", {"a": 3.5, "b": 4})],
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"city": "San Francisco", "state": "CA", "unit": "celsius"}}, '
        '{"name": "get_current_weather", "arguments": {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}}]',
        None,
        [
            ("get_current_weather", {"city": "San Francisco", "state": "CA", "unit": "celsius"}),
            ("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"}),
        ],
    ),
    ("mistral", '[TOOL_CALLS]add_this_and_that[ARGS]{"a": 3.5, "b": 4}', None, [("add_this_and_that", {"a": 3.5, "b": 4})]),
    (
        "mistral",
        'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time{"tz": "CET"}',
        "Sure.",
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})],
    ),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1} and some words', "and some words", [("f", {"a": 1})]),
    ("mistral", "No tools needed.", "No tools needed.", []),
    # vLLM's pythonic example (Llama 3.2 / ToolACE), and Llama 4's <|python_start|> wrapping
    (
        "pythonic",
        "[get_weather(city='San Francisco', metric='celsius'), get_weather(city='Seattle', metric='celsius')]",
        None,
        [
            ("get_weather", {"city": "San Francisco", "metric": "celsius"}),
            ("get_weather", {"city": "Seattle", "metric": "celsius"}),
        ],
    ),
    (
        "pythonic",
        '[f(a=1, b=-2.5, c=None, d=True, e=[1, "x"], g={"k": (1, 2)}, h=null, i=false)]',
        None,
        [("f", {"a": 1, "b": -2.5, "c": None, "d": True, "e": [1, "x"], "g": {"k": [1, 2]}, "h": None, "i": False})],
    ),
    ("llama4_pythonic", '<|python_start|>[api.search(q="x]")]<|python_end|>', None, [("api.search", {"q": "x]"})]),
    ("pythonic", "[ping()]\nAnything else?", "Anything else?", [("ping", {})]),
    (
        "pythonic",
        "[f(s='''a]\"b''', t=\"it's ]\"), g(u=r'\\d]')]",
        None,
        [("f", {"s": 'a]"b', "t": "it's ]"}), ("g", {"u": "\\d]"})],
    ),
    ("pythonic", "Sure, here it is.", "Sure, here it is.", []),
    # Qwen3-Coder's XML calls: values are text unless the tool's schema says otherwise
    (
        "qwen3_coder",
        "I'll check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n"
        "<parameter=days>\n5\n</parameter>\n<parameter=hourly>\ntrue\n</parameter>\n</function>\n</tool_call>",
        "I'll check.",
        [("get_weather", {"city": "San Francisco", "days": 5, "hourly": True})],
    ),
    (
        "qwen3_xml",
        "<tool_call>\n<function=other>\n<parameter=n>\n5\n<parameter=text>\nline one\nline two\n</function>\n</tool_call>",
        None,
        [("other", {"n": "5", "text": "line one\nline two"})],
    ),
    ("qwen3_xml", "<tool_call>\n<function=ping>\n</function>\n</tool_call>", None, [("ping", {})]),
]


@pytest.mark.parametrize(("name", "text", "content", "calls"), EXAMPLES)
def test_examples_parse_to_their_calls(name, text, content, calls):
    parsed = tool_call_parser(name)(TOOLS).parse(text)
    assert parsed.content == content
    assert calls_of(parsed) == calls


@pytest.mark.parametrize(("name", "text", "content", "calls"), EXAMPLES)
def test_examples_stream_as_they_parse_char_by_char_and_in_random_pieces(name, text, content, calls):
    for pieces in ([text], list(text), random_pieces(text, 0), random_pieces(text, 1)):
        assert_stream_matches_parse(name, text, pieces)
        _, streamed, _ = stream_tools(tool_call_parser(name)(TOOLS), pieces)
        if calls:
            for tag in tool_call_parser(name).markup:
                assert tag not in streamed


def test_arguments_are_always_a_json_object_text():
    p = tool_call_parser("hermes")()
    for text in (
        '<tool_call>{"name": "f"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": null}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {}}</tool_call>',
    ):
        (call,) = p.parse(text).tool_calls
        assert call.arguments == "{}"
    assert tool_call_parser("pythonic")().parse("[f()]").tool_calls[0].arguments == "{}"


def test_ids_are_unique_and_shaped_as_openai_or_mistral_wants():
    calls = tool_call_parser("hermes")().parse('<tool_call>{"name": "f"}</tool_call>' * 50).tool_calls
    assert len({c.id for c in calls}) == 50
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in calls)
    # Mistral's chat templates refuse ids that are not 9 alphanumerics when the history is rendered back
    (call,) = tool_call_parser("mistral")().parse('[TOOL_CALLS]f[ARGS]{"a": 1}').tool_calls
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id)


def test_a_streamed_call_is_one_header_delta_then_its_arguments():
    p = tool_call_parser("hermes")()
    assert p.feed("I'll check. <tool_") == StreamDelta(content="I'll check.")
    assert p.feed('call>{"name": "get_weather", "arguments": {"city": "Paris"}}') == StreamDelta()
    delta = p.feed("</tool_call>")
    assert delta.content == ""
    header, args = delta.tool_calls
    assert (header.index, header.name, header.arguments) == (0, "get_weather", "")
    assert header.id is not None and header.id.startswith("call_")
    assert (args.index, args.id, args.name, json.loads(args.arguments)) == (0, None, None, {"city": "Paris"})
    assert p.finish() == StreamDelta()


def test_text_that_only_looks_like_a_tag_is_held_then_released():
    p = tool_call_parser("hermes")()
    assert p.feed("a <tool").content == "a"
    assert p.feed("box> b").content == " <toolbox> b"
    assert p.feed(" <").content == ""
    assert p.finish().content == " <"
    m = tool_call_parser("mistral")()
    assert m.feed("x [TOOL").content == "x"
    assert m.feed("S]").content == " [TOOLS]"
    pyth = tool_call_parser("llama4_pythonic")()
    assert pyth.feed("<|python").content == ""
    assert pyth.feed("ic|> hi").content == "<|pythonic|> hi"


# -- malformed markup is content ----------------------------------------------------------------

MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1\n'),  # unterminated, bad JSON
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>'),  # closed, bad JSON
    ("hermes", '<tool_call>{"arguments": {"a": 1}}</tool_call>'),  # no name
    ("hermes", '<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>'),  # arguments not an object
    ("hermes", '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f"} trailing</tool_call>'),
    ("hermes", "<tool_call>"),
    ("llama3_json", '{"name": "f", "parameters": {"a": '),
    ("llama3_json", "<|python_tag|>"),
    ("llama3_json", "<|python_tag|>print('hi')"),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}'),
    ("mistral", "[TOOL_CALLS] sorry, no"),
    ("mistral", "[TOOL_CALLS]f[ARGS]not json"),
    ("mistral", "[TOOL_CALLS][1, 2]"),
    ("pythonic", "[f(x=1)"),
    ("pythonic", "[f(1, 2)]"),  # positional arguments cannot be named
    ("pythonic", "[f(x=open('/etc/passwd'))]"),  # not a literal: never evaluated
    ("pythonic", "[1, 2, 3] are numbers"),
    ("qwen3_xml", "<tool_call>\n<function=f>\nstray text<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>"),
    ("qwen3_xml", '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'),  # JSON is the other parser's
]


@pytest.mark.parametrize(("name", "text"), MALFORMED)
def test_malformed_markup_comes_back_as_content(name, text):
    parsed = tool_call_parser(name)().parse(text)
    assert parsed.tool_calls == []
    # no call was made, so only leading whitespace is normalised away
    assert parsed.content == text.lstrip()
    for pieces in (list(text), random_pieces(text, 3)):
        _, content, calls = stream_tools(tool_call_parser(name)(), pieces)
        assert calls == [] and content == text.lstrip()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("hermes", "<tool_call>" + '{"a":' * 50_000 + "1" + "}" * 50_000 + "</tool_call>"),
        ("hermes", '<tool_call>{"name": "f", "arguments": ' + "[" * 50_000 + "]" * 50_000 + "}</tool_call>"),
        ("llama3_json", '{"name": "f", "parameters": ' + '{"a":' * 50_000 + "1" + "}" * 50_000 + "}"),
        ("mistral", "[TOOL_CALLS]" + "[" * 50_000 + "]" * 50_000),
        ("mistral", "[TOOL_CALLS]f[ARGS]" + '{"a":' * 50_000 + "1" + "}" * 50_000),
        ("pythonic", "[f(x=" + "[" * 50_000 + "]" * 50_000 + ")]"),
    ],
)
def test_nesting_deeper_than_the_stack_is_content_not_a_crash(name, text):
    parsed = tool_call_parser(name)().parse(text)
    assert parsed.tool_calls == [] and parsed.content == text


def test_a_bad_call_after_good_ones_keeps_the_good_ones():
    parsed = tool_call_parser("hermes")().parse(
        '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": oops}</tool_call>'
    )
    assert calls_of(parsed) == [("f", {})]
    assert parsed.content == '<tool_call>{"name": oops}</tool_call>'
    parsed = tool_call_parser("llama3_json")().parse('{"name": "f", "parameters": {}}; {"name": 3}')
    assert calls_of(parsed) == [("f", {})]
    assert parsed.content == '; {"name": 3}'


# -- any split: generated outputs ---------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
identifiers = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True).filter(lambda n: not keyword.iskeyword(n))
arguments = st.dictionaries(identifiers, json_values, max_size=4)
fn_names = identifiers
# content made of the characters markup is made of, so near-misses of tags are common
prose = st.text(alphabet="ab <>/[]{}|_;\n\ttoolcal_TOOLS", max_size=30)


def split_points(draw: st.DrawFn, text: str) -> list[int]:
    return draw(st.lists(st.integers(0, max(len(text), 1)), max_size=12))


def expected_content(name: str, pre: str, post: str, n_calls: int) -> str | None:
    if n_calls == 0:
        return (pre + post).lstrip() or None
    return (pre.strip() + post.rstrip()).lstrip() or None


@st.composite
def tool_outputs(draw: st.DrawFn) -> tuple[str, str, str | None, list[tuple[str, Any]], list[int]]:
    name = draw(st.sampled_from(["hermes", "llama3_json", "mistral", "mistral_v11", "pythonic", "qwen3_xml"]))
    calls = draw(st.lists(st.tuples(fn_names, arguments), min_size=1, max_size=3))
    pre = draw(prose) if name in ("hermes", "mistral", "mistral_v11", "qwen3_xml") else ""
    post = draw(prose)
    if name == "hermes":
        body = "".join(
            draw(st.sampled_from(["", "\n"]))
            + "<tool_call>\n"
            + json.dumps({"name": n, "arguments": a}, ensure_ascii=draw(st.booleans()))
            + "\n</tool_call>"
            for n, a in calls
        )
    elif name == "qwen3_xml":
        text_values = st.dictionaries(identifiers, st.text(alphabet="ab \n{}[]\"'>/=1", max_size=12), max_size=3)
        calls = draw(st.lists(st.tuples(fn_names, text_values), min_size=1, max_size=3))
        body = "\n".join(
            f"<tool_call>\n<function={n}>\n"
            + "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in a.items())
            + "</function>\n</tool_call>"
            for n, a in calls
        )
    elif name == "llama3_json":
        key = draw(st.sampled_from(["parameters", "arguments"]))
        body = draw(st.sampled_from(["", "<|python_tag|>"])) + "; ".join(json.dumps({"name": n, key: a}) for n, a in calls)
        post = draw(st.sampled_from(["", "\n\n"])) + post.lstrip("; \n\t{")
    elif name == "mistral":
        body = "[TOOL_CALLS] " + json.dumps([{"name": n, "arguments": a} for n, a in calls])
    elif name == "mistral_v11":
        body = "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a)}" for n, a in calls)
        name = "mistral"
    else:
        body = "[" + ", ".join(f"{n}(" + ", ".join(f"{k}={v!r}" for k, v in a.items()) + ")" for n, a in calls) + "]"
        calls = [(n, json.loads(json.dumps(a))) for n, a in calls]
        post = post.lstrip(" \n\t[<")  # text after the list must not continue the Python expression
        post = ("\n" + post) if post else post
    for tag in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "<|python_end|>"):
        pre, post = pre.replace(tag, ""), post.replace(tag, "")
    text = pre + body + post
    return name, text, expected_content(name, pre, post, len(calls)), calls, split_points(draw, text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tool_outputs())
def test_any_split_streams_the_same_calls_and_content_as_the_whole_parse(case):
    name, text, content, calls, cuts = case
    parsed = assert_stream_matches_parse(name, text, pieces_at(text, cuts))
    assert calls_of(parsed) == calls
    assert parsed.content == content
    _, streamed, _ = stream_tools(tool_call_parser(name)(TOOLS), pieces_at(text, cuts))
    for tag in tool_call_parser(name).markup:
        assert tag not in streamed


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(TOOL_CALL_PARSERS)),
    st.text(alphabet='ab <>/[]{}()|_;:"=,\n0toolcal_TOOLSARGpythonag', max_size=60),
    st.data(),
)
def test_any_text_any_split_never_raises_and_streams_as_it_parses(name, text, data):
    assert_stream_matches_parse(name, text, pieces_at(text, split_points(data.draw, text)))


# -- reasoning --------------------------------------------------------------------------------

QWEN3_THINKING_OFF_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
R1_PROMPT = "<｜User｜>Hi<｜Assistant｜><think>\n"

REASONING_EXAMPLES: list[tuple[str, str | None, str, str | None, str | None]] = [
    # (parser, prompt, output, reasoning, content)
    ("deepseek_r1", None, "<think>\nThe user greets me.\n</think>\n\nHello!", "The user greets me.", "Hello!"),
    # R1's template opens <think> in the prompt: the output starts inside the thought
    ("deepseek_r1", R1_PROMPT, "The user greets me.\n</think>\n\nHello!", "The user greets me.", "Hello!"),
    ("deepseek_r1", None, "The user greets me.\n</think>\n\nHello!", "The user greets me.", "Hello!"),
    # </think> never comes (max_tokens hit): all reasoning, content None, as vLLM
    ("deepseek_r1", R1_PROMPT, "Let me think about this for a", "Let me think about this for a", None),
    ("qwen3", None, "<think>\nLet me think about this for a", "Let me think about this for a", None),
    # stopped right after </think>: content None
    ("qwen3", None, "<think>\nok\n</think>\n\n", "ok", None),
    ("qwen3", None, "<think>\n\n</think>\n\nParis.", None, "Paris."),
    # enable_thinking=false: Qwen3's template closes the thought in the prompt, the output is all content
    ("qwen3", QWEN3_THINKING_OFF_PROMPT, "Paris is the capital.", None, "Paris is the capital."),
    ("deepseek_r1", QWEN3_THINKING_OFF_PROMPT, "Paris.\n", None, "Paris.\n"),
    # qwen3: a tool call ends the thought even without </think>; the call stays in content
    (
        "qwen3",
        None,
        '<think>\nI need the weather.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "I need the weather.",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ),
    # a stray second </think> is dropped, content whitespace inside and at the end is kept
    ("qwen3", None, "<think>a</think>\nb</think> c\n\n", "a", "b c\n\n"),
]


@pytest.mark.parametrize(("name", "prompt", "text", "reasoning", "content"), REASONING_EXAMPLES)
def test_reasoning_examples_split_and_stream_alike(name, prompt, text, reasoning, content):
    cls = reasoning_parser(name)
    assert cls(prompt).split(text) == (reasoning, content)
    for pieces in ([text], list(text), random_pieces(text, 5)):
        assert stream_reasoning(cls(prompt), pieces) == (reasoning or "", content or "")


def test_streamed_reasoning_never_shows_think_tags():
    p = reasoning_parser("deepseek_r1")()
    out = [p.feed(ch) for ch in "<think>\nabc\n</think>\n\nxyz"] + [p.finish()]
    assert all("<" not in r and "<" not in c for r, c in out)
    assert "".join(r for r, _ in out) == "abc"
    assert "".join(c for _, c in out) == "xyz"


@st.composite
def reasoning_outputs(draw: st.DrawFn) -> tuple[str, str | None, str, list[int]]:
    name = draw(st.sampled_from(sorted(REASONING_PARSERS)))
    prompt = draw(st.sampled_from([None, "", R1_PROMPT, QWEN3_THINKING_OFF_PROMPT, "plain prompt"]))
    text = "".join(
        draw(st.lists(st.sampled_from(["<think>", "</think>", "<tool_call>", "\n", " ", "a", "b<", "</", "<th"]), max_size=12))
    )
    return name, prompt, text, split_points(draw, text)


@settings(max_examples=400, deadline=None)
@given(reasoning_outputs())
def test_reasoning_any_split_streams_as_it_splits(case):
    name, prompt, text, cuts = case
    reasoning, content = reasoning_parser(name)(prompt).split(text)
    assert stream_reasoning(reasoning_parser(name)(prompt), pieces_at(text, cuts)) == (reasoning or "", content or "")
    assert reasoning is None or ("<think>" not in reasoning and "</think>" not in reasoning)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab \n", max_size=20), st.text(alphabet="ab \n", max_size=20), st.data())
def test_reasoning_of_well_formed_thoughts(thought, answer, data):
    text = f"<think>{thought}</think>{answer}"
    reasoning, content = reasoning_parser("deepseek_r1")().split(text)
    assert reasoning == (thought.strip() or None)
    assert content == (answer.lstrip() or None)
    assert stream_reasoning(reasoning_parser("deepseek_r1")(), pieces_at(text, split_points(data.draw, text))) == (
        reasoning or "",
        content or "",
    )


# -- composition: think, then call a tool ---------------------------------------------------------


def compose(reasoning_name: str, tool_name: str, prompt: str | None, pieces: list[str]) -> tuple[str, str, list[dict[str, Any]]]:
    """What the chat route does: reasoning parser first, its content deltas into the tool-call parser."""
    rp = reasoning_parser(reasoning_name)(prompt)
    tp = tool_call_parser(tool_name)(TOOLS)
    reasoning, content, calls = "", "", []
    for piece in [*pieces, None]:
        r, c = rp.feed(piece) if piece is not None else rp.finish()
        reasoning += r
        deltas = [tp.feed(c)] if piece is not None else [tp.feed(c), tp.finish()]
        for d in deltas:
            content += d.content
            for tc in d.tool_calls:
                if tc.id is not None:
                    calls.append({"name": tc.name, "arguments": ""})
                calls[tc.index]["arguments"] += tc.arguments
    return reasoning, content, calls


COMPOSED = [
    (
        "qwen3",
        "hermes",
        None,
        "<think>\nThe user wants the weather in Paris. I should call get_weather.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ),
    (  # the thought is opened by the prompt, and the call comes without </think>
        "qwen3",
        "hermes",
        "<|im_start|>assistant\n<think>\n",
        "The user wants the weather in Paris. I should call get_weather.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ),
    (
        "deepseek_r1",
        "hermes",
        R1_PROMPT,
        "The user wants the weather in Paris. I should call get_weather.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    ),
]


@pytest.mark.parametrize(("rname", "tname", "prompt", "text"), COMPOSED)
def test_a_model_that_thinks_then_calls_a_tool(rname, tname, prompt, text):
    reasoning, content = reasoning_parser(rname)(prompt).split(text)
    assert reasoning == "The user wants the weather in Paris. I should call get_weather."
    assert content is not None
    parsed = tool_call_parser(tname)(TOOLS).parse(content)
    assert parsed.content is None
    assert calls_of(parsed) == [("get_weather", {"city": "Paris"})]
    for pieces in (list(text), random_pieces(text, 7), [text]):
        r, c, calls = compose(rname, tname, prompt, pieces)
        assert r == reasoning and c == ""
        assert [(x["name"], json.loads(x["arguments"])) for x in calls] == [("get_weather", {"city": "Paris"})]


def test_thinking_off_then_a_tool_call_with_text_before_it():
    text = 'Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    r, c, calls = compose("qwen3", "hermes", QWEN3_THINKING_OFF_PROMPT, random_pieces(text, 11))
    assert (r, c) == ("", "Let me look that up.")
    assert [(x["name"], json.loads(x["arguments"])) for x in calls] == [("get_weather", {"city": "Oslo"})]


# -- hf: the model's own response_template (transformers' response parsing) ------------------------

QWEN_LIKE_TEMPLATE = {
    "start_anchor": "<|im_start|>assistant\n",
    "defaults": {"role": "assistant"},
    "fields": {
        "thinking": {"open": "<think>", "close": "</think>"},
        "content": {},
        "tool_calls": {
            "open": "<tool_call>",
            "close": "</tool_call>",
            "content": "json",
            "repeats": True,
            "transform": {"type": "function", "function": "{content}"},
        },
    },
}
CHATML_OPEN_THINK = "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n"
CHATML = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def template_parser(prompt: str, tools: list[dict[str, Any]] | None = None):
    from transformers.utils.chat_parsing import ResponseParser

    from hfserve.parsers.response_template import ResponseTemplateParser

    return ResponseTemplateParser(
        tools,
        prompt_text=prompt,
        make_parser=lambda prefix: ResponseParser(QWEN_LIKE_TEMPLATE, prefix=prefix, tools=tools),
    )


TEMPLATE_EXAMPLES = [
    # (prompt, output, reasoning, content, calls)
    (
        CHATML_OPEN_THINK,  # the template opened the thought
        'Paris, so get_weather.\n</think>\n\nLet me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        "Paris, so get_weather.",
        "Let me check.",
        [("get_weather", {"city": "Paris"})],
    ),
    (CHATML, "<think>\nhmm\n</think>\n\nHello!", "hmm", "Hello!", []),
    (CHATML, "Hello!", None, "Hello!", []),
    (
        CHATML,
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b"}</tool_call>',
        None,
        None,
        [("a", {}), ("b", {})],
    ),
    # bad JSON in a call region: its text, and all after it, is content
    (CHATML, 'Hi <tool_call>{"name": oops}</tool_call> there', None, 'Hi {"name": oops} there', []),
    # a call cut off at the end of the answer, its JSON complete
    (CHATML, '<tool_call>{"name": "a", "arguments": {"x": 1}}', None, None, [("a", {"x": 1})]),
]


@pytest.mark.parametrize(("prompt", "text", "reasoning", "content", "calls"), TEMPLATE_EXAMPLES)
def test_response_template_parser_reads_the_templates_fields_streamed_or_whole(prompt, text, reasoning, content, calls):
    parsed = template_parser(prompt, TOOLS).parse(text)
    assert (parsed.reasoning, parsed.content, calls_of(parsed)) == (reasoning, content, calls)
    for pieces in (list(text), random_pieces(text, 13), [text]):
        p = template_parser(prompt, TOOLS)
        deltas = [p.feed(piece) for piece in pieces] + [p.finish()]
        assert "".join(d.reasoning for d in deltas) == (reasoning or "")
        _, streamed, streamed_calls = stream_tools(template_parser(prompt, TOOLS), pieces)
        assert streamed == (content or "")
        assert [(c["name"], json.loads(c["arguments"])) for c in streamed_calls] == calls


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([CHATML, CHATML_OPEN_THINK]),
    st.lists(
        st.sampled_from(["<think>", "</think>", "<tool_call>", "</tool_call>", '{"name": "f"}', "{", "a", " ", "\n", "<"]),
        max_size=10,
    ),
    st.data(),
)
def test_response_template_parser_any_split_streams_as_it_parses(prompt, parts, data):
    text = "".join(parts)
    parsed = template_parser(prompt).parse(text)
    p = template_parser(prompt)
    deltas = [p.feed(piece) for piece in pieces_at(text, split_points(data.draw, text))] + [p.finish()]
    assert "".join(d.reasoning for d in deltas) == (parsed.reasoning or "")
    assert "".join(d.content for d in deltas) == (parsed.content or "")
    assert sum(1 for d in deltas for tc in d.tool_calls if tc.id) == len(parsed.tool_calls)
