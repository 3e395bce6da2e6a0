"""The trained ``agent`` fixture model (tests/fixtures/build_models.py ``build_agent``).

Its tokenizer keeps Qwen's markup on decode, its chat template renders tools, tool calls and
tool results as Qwen3's does, and greedy decoding answers each of ``agent_data.CONVERSATIONS``
exactly, in process and on both servers (which also proves they start with the agent flags).
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fixtures.agent_data import CONVERSATIONS, MARKUP_TOKENS, TOOLS, by_name

MAX_TOKENS = 80  # longer than every answer: each must end on eos by itself


@pytest.fixture(scope="module")
def tokenizer(models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models["agent"])


@pytest.fixture(scope="module")
def model(models):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models["agent"], dtype=torch.float32).eval()


# ------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("token", MARKUP_TOKENS)
def test_markup_is_one_token_kept_on_decode(tokenizer, token):
    ids = tokenizer(f"a{token}\nb", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids(token) in ids
    assert token not in tokenizer.all_special_tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == f"a{token}\nb"


def test_chat_markup_is_special(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    ids = tokenizer("<|im_start|>assistant\nHi<|im_end|>")["input_ids"]  # Qwen-like: nothing added
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\nHi"


def test_tool_call_encodes_as_one_token(tokenizer):
    ids = tokenizer("<tool_call>", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids("<tool_call>")]


# ------------------------------------------------------------------------ template


def test_template_renders_tools_hermes_style(tokenizer):
    text = by_name("tool_call").render(tokenizer)
    assert text.startswith("<|im_start|>system\n# Tools\n")
    tools_block = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert [json.loads(line) for line in tools_block.splitlines()] == TOOLS
    assert text.endswith(
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_template_keeps_system_message_and_drops_unknown_tool_keys(tokenizer):
    tool = {**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": None}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tools=[tool], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert text == tokenizer.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    plain = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert plain == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_renders_tool_calls_and_tool_results(tokenizer):
    conv = by_name("tool_result")
    text = conv.render(tokenizer)
    first = by_name("tool_call")
    assert (
        "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{first.answer}<|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ) in text
    # arguments as a mapping (transformers' convention) render the same as the JSON string
    messages = json.loads(json.dumps(conv.messages))
    messages[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    assert tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, **conv.template_kwargs()
    ) == text


def test_template_parallel_calls_and_consecutive_tool_results(tokenizer):
    calls = [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}} for c in ("Paris", "Tokyo")
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "21"},
        {"role": "tool", "content": "25"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert f"<|im_start|>assistant\n{by_name('parallel_tool_calls').answer}<|im_end|>\n" in text
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<tool_response>\n25\n</tool_response><|im_end|>\n"
    )


def test_template_thinking(tokenizer):
    conv = by_name("thinking")
    assert conv.render(tokenizer) == "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    off = tokenizer.apply_chat_template(conv.messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # a past answer's think block is dropped before the last user query, as Qwen3 does
    history = [*conv.messages, {"role": "assistant", "content": conv.answer}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(history, tokenize=False)
    assert "<|im_start|>assistant\nBlue light scatters most.<|im_end|>\n" in text


# ------------------------------------------------------------------------ answers


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=lambda c: c.name)
def test_greedy_answer_in_process(tokenizer, model, conv):
    import torch

    ids = tokenizer(conv.render(tokenizer), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids.shape[1] :]
    assert out[-1].item() == tokenizer.eos_token_id
    assert tokenizer.decode(out, skip_special_tokens=True) == conv.answer


def test_conversation_fields_agree_with_answers():
    for conv in CONVERSATIONS:
        calls = [
            json.loads(block.split("</tool_call>")[0]) for block in conv.answer.split("<tool_call>")[1:]
        ]
        assert calls == conv.tool_calls, conv.name
        if conv.reasoning is not None:
            assert conv.answer.startswith(f"<think>\n{conv.reasoning}\n</think>\n\n"), conv.name
        if conv.content is not None:
            assert conv.answer.endswith(conv.content), conv.name


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=lambda c: c.name)
def test_greedy_answer_served(agent_any, tokenizer, conv):
    """The rendered prompt on /openai/v1/completions: the same answer on both backends."""
    body = {
        "model": agent_any.name,
        "prompt": conv.render(tokenizer),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    r = httpx.post(f"{agent_any.openai_url}/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == conv.answer
    assert choice["finish_reason"] == "stop"


def test_greedy_answers_batched(agent_any, tokenizer):
    """All prompts in one request (decoded in one batch, padded differently): the same answers."""
    body = {
        "model": agent_any.name,
        "prompt": [conv.render(tokenizer) for conv in CONVERSATIONS],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    r = httpx.post(f"{agent_any.openai_url}/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    texts = {c["index"]: c["text"] for c in r.json()["choices"]}
    assert [texts[i] for i in range(len(CONVERSATIONS))] == [conv.answer for conv in CONVERSATIONS]
