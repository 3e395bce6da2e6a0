"""Tool calling and reasoning on the chat route, in the serving layer (in process, fake backend).

The fake backend echoes its prompt, and the chat template here renders only the last user
message, so a request's "model output" is the text the test sends: what is checked is how the
route reads that output (the parsers, the OpenAI shapes, streamed deltas, finish reasons) and
how it checks the tool fields (the error contract). End-to-end tests on real models, on both
backends, are in tests/test_tools_e2e.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from hfserve.tasks import Task
from tests.contract import assert_error

pytestmark = pytest.mark.anyio

#: renders the tools (so the route accepts them) and then only the last message's content
ECHO_TEMPLATE = "{% if tools %}{% endif %}{{ messages[-1]['content'] }}"
NO_TOOLS_TEMPLATE = "{{ messages[-1]['content'] }}"
CHAT_PATH = "/openai/v1/chat/completions"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


async def serve(fake: Any, **model_options: Any) -> Any:
    return await fake(Task.text_generation, chat_template=ECHO_TEMPLATE, max_model_len=2048, model_options=model_options)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    """A chat request whose fake output is exactly ``text``."""
    body = {"model": "fake", "messages": [{"role": "user", "content": text}], "max_tokens": len(text.encode())}
    body.update(extra)
    return body


async def streamed(server: Any, body: dict[str, Any]) -> list[ChatCompletionChunk]:
    resp = await server.post(CHAT_PATH, {**body, "stream": True})
    assert resp.status_code == 200, resp.text
    chunks = []
    for line in resp.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            data = json.loads(line[6:])
            assert "error" not in data, data
            chunks.append(ChatCompletionChunk.model_validate(data))
    return chunks


def assemble(chunks: list[ChatCompletionChunk]) -> dict[str, Any]:
    """A streamed choice 0 put back together the way the openai SDK's stream helpers do."""
    content, reasoning = "", ""
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning") or ""
            assert len(delta.tool_calls or []) <= 1, delta  # a call's header and its arguments: separate chunks
            for call in delta.tool_calls or []:
                if call.index not in calls:  # a call's first delta carries id, type and name
                    assert call.id and call.type == "function" and call.function and call.function.name, call
                    assert call.function.arguments == "", call
                    calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
                else:
                    assert call.id is None and (call.function is None or call.function.name is None), call
                calls[call.index]["arguments"] += (call.function.arguments if call.function else "") or ""
            finish = choice.finish_reason or finish
    return {"content": content, "reasoning": reasoning, "calls": [calls[i] for i in sorted(calls)], "finish": finish}


HERMES_TWO = (
    'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


# ------------------------------------------------------------------- auto, through the parsers
async def test_auto_tool_calls_whole_and_streamed_agree(fake):
    server = await serve(fake, enable_auto_tool_choice=True, tool_call_parser="hermes")
    body = chat(HERMES_TWO, tools=[WEATHER, TIME])
    resp = await server.post(CHAT_PATH, body)
    assert resp.status_code == 200, resp.text
    message = ChatCompletion.model_validate(resp.json()).choices[0].message
    assert message.content == "Let me check."
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(isinstance(c.function.arguments, str) for c in message.tool_calls or [])  # a JSON text, as OpenAI
    assert len({c.id for c in message.tool_calls or []}) == 2

    out = assemble(await streamed(server, body))
    assert out["content"] == "Let me check."  # no markup leaks into content deltas
    assert [(c["name"], json.loads(c["arguments"])) for c in out["calls"]] == calls


async def test_auto_without_a_call_is_content(fake):
    server = await serve(fake, enable_auto_tool_choice=True, tool_call_parser="hermes")
    text = "No tools needed: <tool_call> is just a word here"
    resp = await server.post(CHAT_PATH, chat(text, tools=[WEATHER]))
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert not choice["message"].get("tool_calls")
    assert choice["message"]["content"] == text  # unreadable markup is content, never an error
    assert assemble(await streamed(server, chat(text, tools=[WEATHER])))["content"] == text


async def test_tool_choice_none_keeps_markup_as_content(fake):
    server = await serve(fake, enable_auto_tool_choice=True, tool_call_parser="hermes")
    resp = await server.post(CHAT_PATH, chat(HERMES_TWO, tools=[WEATHER, TIME], tool_choice="none"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == HERMES_TWO
    assert not resp.json()["choices"][0]["message"].get("tool_calls")


async def test_reasoning_then_tool_call(fake):
    server = await serve(fake, enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="qwen3")
    text = '<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    body = chat(text, tools=[WEATHER])
    resp = await server.post(CHAT_PATH, body)
    assert resp.status_code == 200, resp.text
    message = resp.json()["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"]
    assert message["reasoning"].strip() == "I need the weather."
    assert "<think>" not in (message["content"] or "") and "<tool_call>" not in (message["content"] or "")
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"city": "Oslo"}]

    out = assemble(await streamed(server, body))
    assert out["reasoning"] == message["reasoning"]
    assert (out["content"] or None) == (message["content"] or None)
    assert [json.loads(c["arguments"]) for c in out["calls"]] == [{"city": "Oslo"}]


async def test_reasoning_alone(fake):
    server = await serve(fake, reasoning_parser="deepseek_r1")
    text = "<think>Light scatters.</think>Blue light scatters most."
    resp = await server.post(CHAT_PATH, chat(text))
    message = resp.json()["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == ("Light scatters.", "Blue light scatters most.")
    out = assemble(await streamed(server, chat(text)))
    assert (out["reasoning"], out["content"]) == ("Light scatters.", "Blue light scatters most.")


# ------------------------------------------------------------------------------- the errors
ERRORS = [
    ({"tools": []}, "invalid_request", "tools"),
    ({"tools": [{"type": "function"}]}, "invalid_request", "tools.0.function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "invalid_request", "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "invalid_request", "tools.0.function.name"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": []}}]}, "invalid_request", "tools.1.function.parameters"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "none"}, "invalid_request", "tools.1.function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "invalid_request", "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "invalid_request", "tool_choice"),
    ({"tool_choice": "required"}, "invalid_request", "tool_choice"),
    # tool_choice auto (the default with tools) on a server without --enable-auto-tool-choice
    ({"tools": [WEATHER]}, "invalid_request", "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "invalid_request", "tool_choice"),
    ({"functions": [WEATHER["function"]]}, "unsupported_parameter", "functions"),
]


@pytest.mark.parametrize(("extra", "code", "param"), ERRORS)
@pytest.mark.parametrize("stream", [False, True])
async def test_tool_field_errors(fake, extra, code, param, stream):
    server = await serve(fake)
    resp = await server.post(CHAT_PATH, chat("hi", stream=stream, **extra))
    message = assert_error(resp, code, param=param)  # before any stream starts
    if extra.get("tools") == [WEATHER] and extra.get("tool_choice") in (None, "auto"):
        assert "--enable-auto-tool-choice" in message  # says which flag to set


async def test_template_without_tools_is_refused(fake):
    server = await fake(Task.text_generation, chat_template=NO_TOOLS_TEMPLATE, model_options={"enable_auto_tool_choice": True, "tool_call_parser": "hermes"})
    resp = await server.post(CHAT_PATH, chat("hi", tools=[WEATHER]))
    assert "chat template" in assert_error(resp, "unsupported_parameter", param="tools")


HISTORY_TEMPLATE = (
    "{% if tools %}{% endif %}{% for m in messages %}[{{ m.role }}"
    "{% if m.tool_call_id %} {{ m.tool_call_id }}{% endif %}]"
    "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}"
    "{{ m.content }}{% endfor %}"
)


async def test_history_tool_calls_reach_the_template(fake):
    server = await fake(Task.text_generation, chat_template=HISTORY_TEMPLATE)
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21"},
    ]  # fmt: skip
    rendered = '[user]weather?[assistant]get_weather{"city": "Paris"}[tool call_1]21'
    resp = await server.post(CHAT_PATH, {"model": "fake", "messages": messages, "max_tokens": len(rendered)})
    assert resp.status_code == 200, resp.text
    # the fake echoes its prompt: the history as the template rendered it, arguments as an object
    assert resp.json()["choices"][0]["message"]["content"] == rendered


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
         "messages.0.tool_calls.0.function.arguments"),
        ({"role": "tool", "content": "21"}, "messages.0.tool_call_id"),
        ({"role": "user", "content": "x", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
         "messages.0.tool_calls"),
    ],
)  # fmt: skip
async def test_history_errors(fake, message, param):
    server = await fake(Task.text_generation, chat_template=HISTORY_TEMPLATE)
    resp = await server.post(CHAT_PATH, {"model": "fake", "messages": [message]})
    assert_error(resp, "invalid_request", param=param)


# ------------------------------------------------- hf: the model's own response template
async def test_response_template_reads_reasoning_and_calls(fake, monkeypatch):
    """--tool-call-parser hf --reasoning-parser hf: transformers' response template of the
    tokenizer reads the answer, whole and streamed, into the same message."""
    from tests.fakes import FakeTokenizer
    from tests.test_parsers import QWEN_LIKE_TEMPLATE

    monkeypatch.setattr(FakeTokenizer, "response_template", QWEN_LIKE_TEMPLATE, raising=False)
    server = await serve(fake, enable_auto_tool_choice=True, tool_call_parser="hf", reasoning_parser="hf")
    text = '<think>\nOslo, so get_weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    body = chat(text, tools=[WEATHER])
    message = (await server.post(CHAT_PATH, body)).json()["choices"][0]["message"]
    assert message["reasoning"] == "Oslo, so get_weather."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Oslo"})
    ]
    out = assemble(await streamed(server, body))
    assert out["reasoning"] == message["reasoning"]
    assert [(c["name"], json.loads(c["arguments"])) for c in out["calls"]] == [("get_weather", {"city": "Oslo"})]
    # tool_choice none: the template still reads the reasoning, the call stays text
    none = (await server.post(CHAT_PATH, chat(text, tools=[WEATHER], tool_choice="none"))).json()["choices"][0]["message"]
    assert none["reasoning"] == "Oslo, so get_weather." and not none.get("tool_calls")
    assert "get_weather" in none["content"]


async def test_response_template_missing_stops_the_start(fake):
    with pytest.raises(ValueError, match="response template"):
        await serve(fake, enable_auto_tool_choice=True, tool_call_parser="hf")


# ------------------------------------------------------------- forced calls (constrained decoding)
async def forced_server(fake: Any) -> Any:
    server = await serve(fake)
    server.backend.capabilities.structured_outputs = True  # the fake checks constraints, as the real backends
    return server


async def test_required_output_becomes_calls(fake):
    """The constrained output of tool_choice required (vLLM's list of {name, parameters}) read into
    tool calls, whole and streamed (the fake echoes: its output is the text sent)."""
    server = await forced_server(fake)
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    body = chat(text, tools=[WEATHER, TIME], tool_choice="required")
    message = (await server.post(CHAT_PATH, body)).json()["choices"][0]["message"]
    expected = [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == expected
    assert message["content"] is None
    out = assemble(await streamed(server, body))
    assert [(c["name"], json.loads(c["arguments"])) for c in out["calls"]] == expected and out["content"] == ""
    # the constraint reached the backend: vLLM's schema for required calls
    constraint = server.backend.params[0].structured
    assert constraint is not None and constraint.kind == "json"
    assert json.loads(constraint.source)["items"]["anyOf"][0]["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}


async def test_named_output_is_the_arguments(fake):
    server = await forced_server(fake)
    text = '{"city": "Paris"}'
    body = chat(text, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = (await server.post(CHAT_PATH, body)).json()["choices"][0]["message"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [("get_weather", text)]
    out = assemble(await streamed(server, body))
    assert [(c["name"], c["arguments"]) for c in out["calls"]] == [("get_weather", text)]
    constraint = server.backend.params[0].structured
    assert constraint is not None and json.loads(constraint.source) == WEATHER["function"]["parameters"]


@pytest.mark.parametrize("stream", [False, True])
async def test_forced_call_errors(fake, stream):
    server = await forced_server(fake)
    named = {"type": "function", "function": {"name": "get_weather"}}
    # a forced call and response_format both fix the output's form
    resp = await server.post(CHAT_PATH, chat("x", tools=[WEATHER], tool_choice=named, response_format={"type": "json_object"}, stream=stream))
    assert_error(resp, "invalid_request", param="tool_choice")
    # the forced function's parameters are not a schema the grammar can hold decoding to
    bad = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "(unclosed"}}}}}
    resp = await server.post(CHAT_PATH, chat("x", tools=[TIME, bad], tool_choice=named, stream=stream))
    message = assert_error(resp, "invalid_request", param="tools.1.function.parameters")
    assert "Traceback" not in message


async def test_forced_schema_keeps_the_tools_property_order(fake):
    """Arguments come out in the order the tool declares its parameters (not sorted)."""
    server = await forced_server(fake)
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "integer"}}, "required": ["zeta", "alpha"],
    }}}  # fmt: skip
    body = chat('{"zeta": "z", "alpha": 1}', tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}})
    assert (await server.post(CHAT_PATH, body)).status_code == 200
    constraint = server.backend.params[0].structured
    assert list(json.loads(constraint.source)["properties"]) == ["zeta", "alpha"]
