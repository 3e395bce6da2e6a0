"""Tool calling and reasoning end to end, on both backends, with real clients (the ``openai`` SDK
and LangChain's ``ChatOpenAI``).

The ``agent`` fixture model (tests/fixtures/build_models.py) was trained to answer the
conversations of tests/fixtures/agent_data.py with a Hermes tool call, two calls, plain text, a
Qwen3 think block, a think block then a call, and a reply to a tool result; the servers run with
``--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3``. Each test
compares what the server returns with what the conversation says the model answers and what
the parsers read from it; both backends must give the same.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from openai import NOT_GIVEN, OpenAI

from tests.conftest import VLLM_INSTALLED
from tests.contract import assert_error
from tests.fixtures.agent_data import CONVERSATIONS, TOOLS, Conversation, by_name

pytestmark = pytest.mark.timeout(900)


def client(server: Any) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)


def expected_finish(conv: Conversation) -> str:
    return "tool_calls" if conv.tool_calls else "stop"


def create(server: Any, conv: Conversation, **extra: Any) -> Any:
    extras = conv.request_extras()
    options: dict[str, Any] = {"temperature": 0, "max_tokens": 64, **extra}
    return client(server).chat.completions.create(
        model=server.name,
        messages=conv.messages,  # type: ignore[arg-type]
        tools=extras.pop("tools", None) or NOT_GIVEN,  # type: ignore[arg-type]
        extra_body=extras,
        **options,
    )


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=lambda c: c.name)
def test_conversation(agent_any, conv):
    """The whole message: reasoning, content and tool calls as the parsers read the trained answer."""
    resp = create(agent_any, conv)
    choice = resp.choices[0]
    message = choice.message
    extra = message.model_extra or {}
    assert extra.get("reasoning") == conv.reasoning
    assert extra.get("reasoning_content") == conv.reasoning
    assert message.content == conv.content
    calls = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in message.tool_calls or []]
    assert calls == conv.tool_calls
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_")
        assert isinstance(call.function.arguments, str)  # JSON text, as OpenAI sends it
    assert choice.finish_reason == expected_finish(conv)


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=lambda c: c.name)
def test_conversation_streamed(agent_any, conv):
    """The same message as deltas: OpenAI's tool-call delta layout, no markup in content deltas."""
    stream = create(agent_any, conv, stream=True)
    content, reasoning, finish = "", "", None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            assert "<tool_call>" not in (delta.content or "") and "<think>" not in (delta.content or "")
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning") or ""
            assert len(delta.tool_calls or []) <= 1, delta  # a call's header and its arguments: separate chunks
            for call in delta.tool_calls or []:
                if call.index not in calls:
                    assert call.id and call.type == "function" and call.function.name and call.function.arguments == ""
                    calls[call.index] = {"name": call.function.name, "arguments": ""}
                else:
                    assert call.id is None and call.function.name is None
                    calls[call.index]["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert (reasoning or None) == conv.reasoning
    assert (content.strip() or None) == conv.content
    assert [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls.values()] == conv.tool_calls
    assert finish == expected_finish(conv)


def test_tool_choice_none_returns_the_markup(agent_any):
    """tool_choice none: the tools reach the prompt, the output is not parsed for calls."""
    conv = by_name("tool_call")
    message = create(agent_any, conv, tool_choice="none").choices[0].message
    assert not message.tool_calls
    assert message.content == conv.answer


# ----------------------------------------------------------------------------------- LangChain
def langchain_llm(server: Any) -> Any:
    """LangChain's ChatOpenAI on the server, greedy, thinking off (as the tool conversations were trained)."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=f"{server.url}/openai/v1",
        api_key="unused",  # type: ignore[arg-type]
        model=server.name,
        temperature=0,
        max_tokens=96,
        max_retries=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )


def test_langchain_bind_tools(agent_any):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return json.dumps({"temperature": 21})

    conv = by_name("tool_call")
    llm = langchain_llm(agent_any)
    # the fixture's tool as the model was trained on it (LangChain's own schema would change the prompt)
    bound = llm.bind_tools(TOOLS)
    question = HumanMessage(conv.messages[0]["content"])
    ai = bound.invoke([question])
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [(c["name"], c["arguments"]) for c in conv.tool_calls]

    # streamed: LangChain's chunks add up to the same call
    total = None
    for chunk in bound.stream([question]):
        total = chunk if total is None else total + chunk
    assert total is not None
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [(c["name"], c["args"]) for c in ai.tool_calls]

    # the call's result goes back as LangChain sends it (assistant tool_calls + a tool message)
    follow = by_name("tool_result")
    result = ToolMessage(follow.messages[2]["content"], tool_call_id=ai.tool_calls[0]["id"])
    answer = bound.invoke([question, ai, result])
    assert answer.content == follow.content and not answer.tool_calls
    assert get_weather.name == "get_weather"


# ------------------------------------------------------------------------------ errors, both backends
def test_errors_are_the_same_on_both_backends(llama_any):
    """The tool errors come from the one check, before any backend work: same class, same param."""
    url = f"{llama_any.url}/openai/v1/chat/completions"
    base = {"model": llama_any.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ({"tools": TOOLS}, "invalid_request", "tool_choice"),  # auto without --enable-auto-tool-choice
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "invalid_request", "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "x y"}}], "tool_choice": "none"}, "invalid_request", "tools.0.function.name"),
    ]
    for extra, code, param in cases:
        for stream in (False, True):
            resp = httpx.post(url, json={**base, **extra, "stream": stream}, timeout=60)
            assert_error(resp, code, param=param)


# ------------------------------------------------------------- forced calls: constrained decoding
def forced(server: Any, conv: Conversation, tool_choice: Any, stream: bool = False) -> Any:
    return create(server, conv, tool_choice=tool_choice, stream=stream, max_tokens=96)


NAMED = {"type": "function", "function": {"name": "get_weather"}}


def calls_of(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def streamed_calls(stream: Any) -> tuple[list[tuple[str, Any]], str | None]:
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.content, choice.delta  # a forced call has no content
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": call.function.name, "arguments": ""})
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return [(c["name"], json.loads(c["arguments"])) for c in calls.values()], finish


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
@pytest.mark.parametrize("conv", [by_name("tool_call"), by_name("no_tool_call")], ids=lambda c: c.name)
def test_forced_calls_are_valid_and_the_same_on_both_backends(request, conv, tool_choice):
    """required / a named function: decoding is held to the tool's schema, so every call's
    arguments are a JSON text valid against its parameters (even where the model would not have
    called a tool); greedy, both backends give the same calls, whole and streamed."""
    import jsonschema

    backends = ["agent_hf"] + (["agent_vllm"] if VLLM_INSTALLED else [])
    results = []
    for fixture in backends:
        server = request.getfixturevalue(fixture)
        choice = forced(server, conv, tool_choice).choices[0]
        calls = calls_of(choice.message)
        assert calls, choice
        for name, arguments in calls:
            assert name == "get_weather"
            jsonschema.validate(arguments, TOOLS[0]["function"]["parameters"])
        assert choice.finish_reason == ("tool_calls" if tool_choice == "required" else "stop")  # OpenAI's rule
        assert streamed_calls(forced(server, conv, tool_choice, stream=True)) == (calls, choice.finish_reason)
        results.append(calls)
    assert all(r == results[0] for r in results), results


def test_parallel_tool_calls_false_allows_one_call(agent_any):
    conv = by_name("parallel_tool_calls")
    message = create(agent_any, conv, tool_choice="required", parallel_tool_calls=False, max_tokens=96).choices[0].message
    assert len(message.tool_calls or []) == 1


def test_openai_parse_with_a_pydantic_function_tool(agent_any):
    """The openai SDK's strict pydantic tool: its parsed arguments come back as the model."""
    import openai
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        city: str

    conv = by_name("tool_call")
    resp = client(agent_any).chat.completions.parse(
        model=agent_any.name,
        messages=conv.messages,  # type: ignore[arg-type]
        tools=[openai.pydantic_function_tool(GetWeather, name="get_weather")],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=96,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    (call,) = resp.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, GetWeather)


def test_langchain_with_structured_output(agent_any):
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """Get the current weather in a city."""

        city: str = Field(description="The city, e.g. Paris.")

    llm = langchain_llm(agent_any)
    for method in ("function_calling", "json_schema"):  # a forced tool call; response_format json_schema
        out = llm.with_structured_output(Weather, method=method).invoke("What is the weather in Paris?")
        assert isinstance(out, Weather), method
