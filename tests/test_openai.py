"""OpenAI-compatible routes, driven with the real ``openai`` SDK, checked against transformers."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers

PROMPTS = ["The cat sat on", "Once upon a time", "hello"]


@pytest.fixture(scope="module")
def client(llama):
    return openai.OpenAI(base_url=llama.openai_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf_llama(models):
    tok = transformers.AutoTokenizer.from_pretrained(models["llama"])
    model = transformers.AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).eval()
    return tok, model


def greedy_reference(tok, model, prompt_ids: list[int], max_new: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_matches_transformers(client, hf_llama, prompt):
    tok, model = hf_llama
    ids = tok(prompt)["input_ids"]
    expected = greedy_reference(tok, model, ids, 12)
    r = client.completions.create(model="llama", prompt=prompt, max_tokens=12, temperature=0, logprobs=0)
    choice = r.choices[0]
    eos = set([tok.eos_token_id])
    cut = next((i for i, t in enumerate(expected) if t in eos), None)
    expected_text = tok.decode(expected[:cut] if cut is not None else expected, skip_special_tokens=True)
    assert choice.text == expected_text
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == (cut + 1 if cut is not None else 12)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason == ("stop" if cut is not None else "length")
    # the logprob of each chosen token is the model's own log-softmax
    with torch.inference_mode():
        full = torch.tensor([ids + expected])
        logits = model(full).logits[0].float()
    lps = torch.log_softmax(logits, dim=-1)
    assert len(choice.logprobs.token_logprobs) == r.usage.completion_tokens
    want = [float(lps[len(ids) - 1 + i, t]) for i, t in enumerate(expected[: r.usage.completion_tokens])]
    assert np.allclose(choice.logprobs.token_logprobs, want, atol=1e-3)


def test_usage_and_length_limit(client):
    r = client.completions.create(model="llama", prompt="hello", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"


def test_completions_default_max_tokens_is_16(client):
    r = client.completions.create(model="llama", prompt="hello", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model="llama", prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=1234)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    c = client.completions.create(**{**kw, "seed": 99}).choices[0].text
    assert a == b
    assert a != c


def test_temperature_zero_is_greedy_and_sampling_differs(client):
    greedy = {client.completions.create(model="llama", prompt="hello", max_tokens=8, temperature=0).choices[0].text for _ in range(2)}
    assert len(greedy) == 1
    sampled = {
        client.completions.create(model="llama", prompt="hello", max_tokens=8, temperature=1.5).choices[0].text
        for _ in range(4)
    }
    assert len(sampled) > 1


def test_n_choices(client):
    r = client.completions.create(model="llama", prompt="hello", max_tokens=6, n=3, temperature=1.0, seed=7, logprobs=0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1
    # usage counts every generated token of every choice
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)


def test_multiple_prompts_and_n(client):
    r = client.completions.create(model="llama", prompt=["hello", "Once upon"], max_tokens=4, n=2, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1]  # greedy: both choices of a prompt agree
    assert by_index[2] == by_index[3]


def test_stop_string_is_excluded(client, hf_llama):
    tok, model = hf_llama
    full = client.completions.create(model="llama", prompt="The cat sat on", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert len(text) > 6
    stop = text[3:6]
    r = client.completions.create(model="llama", prompt="The cat sat on", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text
    # streaming gives the same text, with the stop string held back
    s = client.completions.create(model="llama", prompt="The cat sat on", max_tokens=20, temperature=0, stop=[stop], stream=True)
    chunks = list(s)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_echo_and_prompt_logprobs(client, hf_llama):
    tok, _ = hf_llama
    r = client.completions.create(model="llama", prompt="The cat sat on", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("The cat sat on")
    r = client.completions.create(model="llama", prompt="The cat sat on", max_tokens=3, temperature=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    n_prompt = len(tok("The cat sat on")["input_ids"])
    assert len(lp.tokens) == n_prompt + 3
    assert lp.token_logprobs[0] is None  # nothing precedes the first prompt token
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[1:]) == r.choices[0].text  # the BOS token decodes to nothing in the text


def test_logprobs_top_k(client):
    r = client.completions.create(model="llama", prompt="hello", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(chosen)  # greedy picks the most likely token


def test_streaming_completion_matches_non_streaming(client):
    r = client.completions.create(model="llama", prompt="Once upon a time", max_tokens=10, temperature=0)
    s = client.completions.create(
        model="llama", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(s)
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


CONTINUOUS_USAGE = {"include_usage": True, "continuous_usage_stats": True}


def test_continuous_usage_stats_on_every_completion_chunk(client, hf_llama):
    """As vLLM: every chunk carries usage, with its prompt's tokens and its choice's tokens so far
    (counted here from the chunks' log-probabilities); the final chunk has the totals."""
    tok, _ = hf_llama
    prompts = ["hello", "Once upon a time"]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    s = client.completions.create(
        model="llama", prompt=prompts, n=2, max_tokens=5, temperature=0, logprobs=0, stream=True,
        stream_options=CONTINUOUS_USAGE, extra_body={"ignore_eos": True},
    )  # fmt: skip
    *content, final = list(s)
    so_far = {index: 0 for index in range(4)}
    for chunk in content:
        (choice,) = chunk.choices
        so_far[choice.index] += len(choice.logprobs.tokens)
        prompt_tokens = lengths[choice.index // 2]
        assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.total_tokens) == (
            prompt_tokens, so_far[choice.index], prompt_tokens + so_far[choice.index]
        )
    assert so_far == {0: 5, 1: 5, 2: 5, 3: 5}
    assert final.choices == []
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (sum(lengths), 20)


def test_continuous_usage_stats_on_every_chat_chunk(client):
    """Chat with n = 2: a chunk per choice, each with that choice's tokens so far."""
    s = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hello"}], n=2, max_tokens=6, temperature=0,
        logprobs=True, stream=True, stream_options=CONTINUOUS_USAGE, extra_body={"ignore_eos": True},
    )  # fmt: skip
    *content, final = list(s)
    prompt_tokens = final.usage.prompt_tokens
    so_far = {0: 0, 1: 0}
    for chunk in content:
        (choice,) = chunk.choices
        so_far[choice.index] += len(choice.logprobs.content)
        assert (chunk.usage.prompt_tokens, chunk.usage.completion_tokens) == (prompt_tokens, so_far[choice.index])
    assert so_far == {0: 6, 1: 6}
    assert final.choices == [] and final.usage.completion_tokens == 12


def test_usage_only_on_the_final_chunk_without_continuous_usage_stats(client):
    s = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    *content, final = list(s)
    assert content and all(chunk.usage is None for chunk in content)
    assert final.usage is not None and final.usage.completion_tokens > 0


def test_stream_ends_with_done(llama):
    with httpx.stream(
        "POST",
        f"{llama.openai_url}/completions",
        json={"model": "llama", "prompt": "hi", "max_tokens": 3, "stream": True},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_chat_uses_the_chat_template(client, hf_llama):
    tok, model = hf_llama
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    expected = greedy_reference(tok, model, list(ids), 8)
    r = client.chat.completions.create(model="llama", messages=messages, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    eos = tok.eos_token_id
    cut = expected.index(eos) if eos in expected else None
    assert r.choices[0].message.content == tok.decode(expected[:cut], skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant"


def test_chat_request_template_overrides(client, hf_llama):
    tok, _ = hf_llama
    r = client.chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": "abc"}],
        max_tokens=2,
        temperature=0,
        extra_body={"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
    )
    # the request's template renders "abc" alone (no special tokens are added to a rendered template)
    assert r.usage.prompt_tokens == len(tok("abc", add_special_tokens=False)["input_ids"])


def test_chat_stream_and_logprobs(client):
    s = client.chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        logprobs=True,
        top_logprobs=2,
        stream_options={"include_usage": True},
    )
    chunks = list(s)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant"
    content = [c.choices[0] for c in chunks if c.choices]
    assert content[-1].finish_reason in ("stop", "length")
    tokens = [t for c in content for t in c.logprobs.content]
    assert len(tokens) == chunks[-1].usage.completion_tokens > 0
    assert all(len(t.top_logprobs) == 2 for t in tokens)


def test_chat_n_and_logprobs(client):
    r = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2, logprobs=True, top_logprobs=3, seed=3
    )
    assert len(r.choices) == 2
    tokens = [t for c in r.choices for t in c.logprobs.content]
    assert len(tokens) == r.usage.completion_tokens and all(c.logprobs.content for c in r.choices)
    assert all(len(t.top_logprobs) == 3 for t in tokens)


def test_chat_without_template_is_a_clear_error(llama_nochat):
    c = openai.OpenAI(base_url=llama_nochat.openai_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="llama_nochat", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "invalid_request"
    assert "chat template" in exc.value.message
    assert exc.value.param == "chat_template"
    # completions still work on it
    assert c.completions.create(model="llama_nochat", prompt="hi", max_tokens=2).choices


def test_text2text_completion_matches_transformers(t5, models):
    tok = transformers.AutoTokenizer.from_pretrained(models["t5"])
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(models["t5"], dtype=torch.float32).eval()
    prompt = "translate the cat sat on the mat"
    ids = tok(prompt)["input_ids"]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0].tolist()
    c = openai.OpenAI(base_url=t5.openai_url, api_key="x", max_retries=0)
    r = c.completions.create(model="t5", prompt=prompt, max_tokens=8, temperature=0)
    generated = out[1:]  # drop the decoder start token
    eos = tok.eos_token_id
    cut = generated.index(eos) if eos in generated else None
    assert r.choices[0].text == tok.decode(generated[:cut], skip_special_tokens=True)


def test_embeddings_match_sentence_transformers(minilm, models):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(models["minilm"]), device="cpu")
    sentences = ["This is an example sentence.", "Each sentence is converted", "hello"]
    want = st.encode(sentences, normalize_embeddings=False)
    c = openai.OpenAI(base_url=minilm.openai_url, api_key="x", max_retries=0)
    r = c.embeddings.create(model="minilm", input=sentences)
    got = np.array([d.embedding for d in sorted(r.data, key=lambda d: d.index)])
    assert got.shape == (3, 384)
    assert np.allclose(got, want, atol=1e-4)
    tok = st.tokenizer
    assert r.usage.prompt_tokens == sum(len(tok(s)["input_ids"]) for s in sentences)
    assert r.usage.prompt_tokens == r.usage.total_tokens
    # base64 decodes (little-endian float32) to the same vectors
    raw = httpx.post(
        f"{minilm.openai_url}/embeddings",
        json={"model": "minilm", "input": sentences, "encoding_format": "base64"},
        timeout=60,
    ).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    assert np.allclose(decoded, want, atol=1e-4)
    # asked for base64 explicitly, the SDK hands the string over undecoded
    r2 = c.embeddings.create(model="minilm", input="hello", encoding_format="base64")
    assert isinstance(r2.data[0].embedding, str)
    assert np.allclose(np.frombuffer(base64.b64decode(r2.data[0].embedding), dtype="<f4"), want[2], atol=1e-4)


def test_embeddings_token_input(minilm, models):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(models["minilm"])
    ids = tok("hello world")["input_ids"]
    c = openai.OpenAI(base_url=minilm.openai_url, api_key="x", max_retries=0)
    by_ids = c.embeddings.create(model="minilm", input=[ids]).data[0].embedding
    by_text = c.embeddings.create(model="minilm", input="hello world").data[0].embedding
    assert np.allclose(by_ids, by_text, atol=1e-5)


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["llama"]
    assert client.models.retrieve("llama").id == "llama"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("other")
    assert exc.value.code == "model_not_found"
    assert exc.value.param == "model"


def test_sdk_error_classes(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert (e.value.code, e.value.type, e.value.param) == ("model_not_found", "invalid_request_error", "model")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="x", max_tokens=100000)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "max_tokens")
    assert "100000" in e.value.message and "256" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="x", top_p=5)
    assert (e.value.code, e.value.param) == ("invalid_request", "top_p")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="x", n=0)
    assert (e.value.code, e.value.param) == ("invalid_request", "n")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], logit_bias={"1": 5})
    assert (e.value.code, e.value.param) == ("unsupported_parameter", "logit_bias")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="llama",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice="none",
        )
    # the fixture's chat template never renders tools
    assert (e.value.code, e.value.param) == ("unsupported_parameter", "tools")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="llama",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    # tool_choice auto (the default with tools) on a server without --enable-auto-tool-choice
    assert (e.value.code, e.value.param) == ("invalid_request", "tool_choice")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llama", messages=[{"role": "wizard", "content": "x"}])  # type: ignore[list-item]
    assert e.value.code == "invalid_request" and e.value.param == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
        )
    assert (e.value.code, e.value.param) == ("unsupported_parameter", "messages.0.content.0")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="x", logprobs=21)
    assert (e.value.code, e.value.param) == ("invalid_request", "logprobs")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama", prompt="x", extra_body={"frobnicate": 1})
    assert e.value.code == "invalid_request" and e.value.param == "frobnicate"


def test_sse_payloads_are_json(llama):
    with httpx.stream(
        "POST",
        f"{llama.openai_url}/chat/completions",
        json={"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        timeout=60,
    ) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 1
    for e in events[:-1]:
        assert json.loads(e)["object"] == "chat.completion.chunk"
