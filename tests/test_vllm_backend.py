"""The vLLM backend against the Hugging Face backend: same answers, same errors.

One vLLM server per model for the whole module (an engine takes ~20-60 s to
start on CPU), next to the session's HF servers of the same fixture models.
Greedy decoding runs in float32 on both, so texts and token counts must match
exactly; log-probabilities match to float tolerance.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import signal
import time

import httpx
import openai
import pytest

from tests.conftest import VLLM_MAX_NUM_SEQS

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    # importing vLLM in this process (the exception-translation tests) trips torch's own deprecations
    pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning"),
]

PROMPTS = ["Hello world", "The weather today is", "Once upon a time", "a b c d e f"]


MAX_NUM_SEQS = VLLM_MAX_NUM_SEQS  # the session's vLLM servers (tests/conftest.py)


def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)


def complete(server, prompt, **kwargs):
    return oai(server).completions.create(model=server.name, prompt=prompt, **kwargs)


# ------------------------------------------------------------------ basics
def test_served_by_vllm(llama_vllm, llama):
    meta = httpx.get(f"{llama_vllm.url}/v2/models/{llama_vllm.name}", timeout=30).json()
    assert meta["platform"] == "hfserve-vllm"
    assert httpx.get(f"{llama.url}/v2/models/{llama.name}", timeout=30).json()["platform"] == "hfserve-huggingface"
    assert "vllm" in llama_vllm.log().lower()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_matches_hf(llama_vllm, llama, prompt):
    v = complete(llama_vllm, prompt, max_tokens=40, temperature=0)
    h = complete(llama, prompt, max_tokens=40, temperature=0)
    assert v.choices[0].text == h.choices[0].text
    assert v.usage.completion_tokens == h.usage.completion_tokens
    assert v.usage.prompt_tokens == h.usage.prompt_tokens
    assert v.choices[0].finish_reason == h.choices[0].finish_reason


def test_greedy_logprobs_match_hf(llama_vllm, llama):
    v = complete(llama_vllm, PROMPTS[0], max_tokens=12, temperature=0, logprobs=3)
    h = complete(llama, PROMPTS[0], max_tokens=12, temperature=0, logprobs=3)
    vl, hl = v.choices[0].logprobs, h.choices[0].logprobs
    assert len(vl.tokens) == len(vl.token_logprobs) == len(vl.top_logprobs) == v.usage.completion_tokens == 12
    assert vl.tokens == hl.tokens
    assert vl.text_offset == hl.text_offset
    assert len(hl.token_logprobs) == len(hl.top_logprobs) == 12
    for a, b in zip(vl.token_logprobs, hl.token_logprobs):
        assert a == pytest.approx(b, abs=1e-3)
    for a, b in zip(vl.top_logprobs, hl.top_logprobs):
        assert 1 <= len(a) <= 3 and set(a) == set(b)
        for tok in a:
            assert a[tok] == pytest.approx(b[tok], abs=1e-3)


def test_echo_prompt_logprobs_match_hf(llama_vllm, llama):
    kwargs = dict(max_tokens=3, temperature=0, logprobs=2, echo=True)
    v = complete(llama_vllm, PROMPTS[1], **kwargs).choices[0]
    h = complete(llama, PROMPTS[1], **kwargs).choices[0]
    assert v.text == h.text and v.text.startswith(PROMPTS[1])
    assert v.logprobs.tokens == h.logprobs.tokens
    assert v.logprobs.token_logprobs[0] is None and h.logprobs.token_logprobs[0] is None
    assert len(v.logprobs.token_logprobs) == len(h.logprobs.token_logprobs) == len(h.logprobs.tokens) > 3
    for a, b in zip(v.logprobs.token_logprobs[1:], h.logprobs.token_logprobs[1:]):
        assert a == pytest.approx(b, abs=1e-3)


def test_chat_matches_hf(llama_vllm, llama):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    kwargs = dict(messages=messages, max_tokens=30, temperature=0, logprobs=True, top_logprobs=2)
    v = oai(llama_vllm).chat.completions.create(model=llama_vllm.name, **kwargs)
    h = oai(llama).chat.completions.create(model=llama.name, **kwargs)
    assert v.choices[0].message.role == "assistant"
    assert v.choices[0].message.content == h.choices[0].message.content
    assert v.usage.prompt_tokens == h.usage.prompt_tokens
    assert v.usage.completion_tokens == h.usage.completion_tokens
    assert [c.token for c in v.choices[0].logprobs.content] == [c.token for c in h.choices[0].logprobs.content]
    content = v.choices[0].logprobs.content
    assert len(content) == v.usage.completion_tokens > 0
    assert [len(c.top_logprobs) for c in content] == [2] * len(content)


def test_stop_string_excluded(llama_vllm, llama):
    full = complete(llama, PROMPTS[2], max_tokens=40, temperature=0).choices[0].text
    # a stop string that first occurs a few characters into the greedy text
    stop = next(full[i : i + 3] for i in range(5, len(full) - 3) if full[i : i + 3].strip() and full.find(full[i : i + 3]) == i)
    v = complete(llama_vllm, PROMPTS[2], max_tokens=40, temperature=0, stop=[stop]).choices[0]
    h = complete(llama, PROMPTS[2], max_tokens=40, temperature=0, stop=[stop]).choices[0]
    assert v.text == h.text == full[: full.index(stop)]
    assert v.finish_reason == h.finish_reason == "stop"
    assert stop not in v.text
    assert getattr(v, "stop_reason", None) == stop


def test_stream_completion(llama_vllm):
    stream = complete(llama_vllm, PROMPTS[0], max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert len(chunks) > 2
    assert text == complete(llama_vllm, PROMPTS[0], max_tokens=20, temperature=0).choices[0].text

    # the raw SSE stream ends with [DONE]
    body = {"model": llama_vllm.name, "prompt": PROMPTS[0], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{llama_vllm.openai_url}/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3  # at least one chunk, the last with finish_reason, then [DONE]
    assert [e for e in events[:-1] if "error" in json.loads(e[6:])] == []


def test_stream_chat(llama_vllm, llama):
    messages = [{"role": "user", "content": "Hello there"}]
    parts = []
    for chunk in oai(llama_vllm).chat.completions.create(
        model=llama_vllm.name, messages=messages, max_tokens=20, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    h = oai(llama).chat.completions.create(model=llama.name, messages=messages, max_tokens=20, temperature=0)
    assert h.choices[0].message.content and len(parts) > 1
    assert "".join(parts) == h.choices[0].message.content


def test_n2_with_seed(llama_vllm):
    kwargs = dict(max_tokens=12, temperature=1.0, seed=1234, n=2)
    a = complete(llama_vllm, PROMPTS[0], **kwargs)
    b = complete(llama_vllm, PROMPTS[0], **kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert a.usage.completion_tokens == 24
    assert a.choices[0].text != a.choices[1].text  # two samples, not one copied
    other = complete(llama_vllm, PROMPTS[0], **{**kwargs, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_greedy_n2_matches_hf(llama_vllm, llama):
    # vLLM itself refuses n > 1 with greedy sampling; the backend runs one and copies it
    v = complete(llama_vllm, PROMPTS[3], max_tokens=10, temperature=0, n=2)
    h = complete(llama, PROMPTS[3], max_tokens=10, temperature=0, n=2)
    assert [c.text for c in v.choices] == [c.text for c in h.choices]
    assert v.choices[0].text == v.choices[1].text
    assert v.usage.completion_tokens == h.usage.completion_tokens == 20


def test_several_prompts_one_request(llama_vllm, llama):
    v = complete(llama_vllm, PROMPTS, max_tokens=8, temperature=0)
    h = complete(llama, PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in v.choices] == [c.text for c in h.choices]


def test_penalties_and_min_tokens_accepted(llama_vllm):
    r = complete(
        llama_vllm,
        PROMPTS[0],
        max_tokens=10,
        temperature=0.7,
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.2, "min_tokens": 5, "top_k": 20},
    )
    assert r.usage.completion_tokens == 10


def test_v1_predict_matches_hf(llama_vllm, llama):
    body = {"instances": [PROMPTS[0], PROMPTS[1]], "parameters": {"max_tokens": 10, "temperature": 0}}
    v = httpx.post(f"{llama_vllm.url}/v1/models/{llama_vllm.name}:predict", json=body, timeout=60)
    h = httpx.post(f"{llama.url}/v1/models/{llama.name}:predict", json=body, timeout=60)
    assert v.status_code == h.status_code == 200
    assert v.json() == h.json()


def test_v2_generate_matches_hf(llama_vllm, llama):
    body = {"text_input": PROMPTS[2], "parameters": {"max_tokens": 15, "temperature": 0}}
    v = httpx.post(f"{llama_vllm.url}/v2/models/{llama_vllm.name}/generate", json=body, timeout=60)
    h = httpx.post(f"{llama.url}/v2/models/{llama.name}/generate", json=body, timeout=60)
    assert v.status_code == h.status_code == 200
    vj, hj = v.json(), h.json()
    assert vj["text_output"] == hj["text_output"]
    assert vj["usage"] == hj["usage"] == {"prompt_tokens": vj["usage"]["prompt_tokens"], "completion_tokens": 15}
    assert vj["finish_reason"] == "length"

    with httpx.stream(
        "POST", f"{llama_vllm.url}/v2/models/{llama_vllm.name}/generate_stream", json=body, timeout=60
    ) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == hj["text_output"]
    assert events[-1]["finish_reason"] == "length"


# ------------------------------------------------------------------ errors
def _error(server, method, path, body):
    r = httpx.request(method, f"{server.url}{path}", json=body, timeout=60)
    return r.status_code, r.json(), r.headers.get("x-error-code")


ERROR_CASES = [
    # (id, path template, body, status, code, param)
    ("unknown-model", "/openai/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model_not_found", "model"),
    (
        "max-tokens-too-big",
        "/openai/v1/completions",
        {"model": "{name}", "prompt": "hi", "max_tokens": 5000},
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    ("temperature-negative", "/openai/v1/completions", {"model": "{name}", "prompt": "hi", "temperature": -1}, 400, "invalid_request", "temperature"),
    ("logprobs-too-many", "/openai/v1/completions", {"model": "{name}", "prompt": "hi", "logprobs": 21}, 400, "invalid_request", "logprobs"),
    ("n-too-big", "/openai/v1/completions", {"model": "{name}", "prompt": "hi", "n": 17, "max_tokens": 2}, 400, "invalid_request", "n"),
    (
        "chat-top-logprobs-too-many",
        "/openai/v1/chat/completions",
        {"model": "{name}", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
        400,
        "invalid_request",
        "top_logprobs",
    ),
    ("prompt-too-long", "/openai/v1/completions", {"model": "{name}", "prompt": "hello " * 400}, 400, "context_length_exceeded", None),
    ("embeddings-from-generator", "/openai/v1/embeddings", {"model": "{name}", "input": "hi"}, 400, "unsupported_task", None),
]


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_openai_errors_same_on_both_backends(llama_vllm, llama, path, body, status, code, param):
    results = []
    for server in (llama_vllm, llama):
        b = json.loads(json.dumps(body).replace("{name}", server.name))
        got_status, got, header = _error(server, "POST", path, b)
        assert got_status == status, got
        assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
        assert got["error"]["code"] == code
        if param is not None:
            assert got["error"]["param"] == param
        assert got["error"]["message"]
        message = got["error"]["message"].replace(server.name, "MODEL")
        assert "Traceback" not in message and "vllm" not in message.lower() and "Error" not in message
        results.append((got_status, got["error"]["type"], got["error"]["code"], got["error"]["param"]))
    assert results[0] == results[1]


def test_openai_sdk_error_classes(llama_vllm):
    client = oai(llama_vllm)
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="nope", prompt="hi")
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.completions.create(model=llama_vllm.name, prompt="hi", logprobs=21)
    assert br.value.code == "invalid_request" and br.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as cl:
        client.completions.create(model=llama_vllm.name, prompt="hi", max_tokens=5000)
    assert cl.value.code == "context_length_exceeded" and "256" in cl.value.message


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v2/models/{name}/generate", {"text_input": "hi", "parameters": {"max_tokens": 5000}}),
        ("/v2/models/{name}/generate", {"text_input": "hi", "parameters": {"temperature": -1}}),
        ("/v2/models/nope/generate", {"text_input": "hi"}),
        ("/v1/models/{name}:predict", {"instances": ["hi"], "parameters": {"max_tokens": 5000}}),
    ],
    ids=["v2-context-length", "v2-temperature", "v2-unknown-model", "v1-context-length"],
)
def test_kserve_errors_same_on_both_backends(llama_vllm, llama, path, body):
    results = []
    for server in (llama_vllm, llama):
        status, got, header = _error(server, "POST", path.replace("{name}", server.name), body)
        assert status in (400, 404)
        assert set(got) == {"error"} and isinstance(got["error"], str)
        results.append((status, header))
    assert results[0] == results[1]


# ------------------------------------------------------------------ cancellation
def _seconds_of_work(server) -> dict:
    """A completions body of 8 prompts x n=8 x 240 tokens: seconds of work for an engine that runs 8 sequences at a time."""
    return {
        "model": server.name,
        "prompt": [f"{p} {i}" for i in range(2) for p in PROMPTS],
        "max_tokens": 240,
        "n": MAX_NUM_SEQS,
        "temperature": 1.0,
        "ignore_eos": True,
    }


def test_disconnected_stream_aborts_the_vllm_request(llama_vllm):
    """A client that goes away mid-stream gets its vLLM requests aborted.

    The abandoned request asks for 8 prompts x n=8 x ~240 tokens, 64 sequences
    through an engine that runs 8 at a time: seconds of work. If it kept
    running, a later request would queue behind it.
    """
    url = f"{llama_vllm.openai_url}/completions"
    before = llama_vllm.log().count("aborted vLLM request")
    body = {**_seconds_of_work(llama_vllm), "stream": True}
    # how long the small follow-up request takes on an idle engine
    start = time.monotonic()
    complete(llama_vllm, PROMPTS[0], max_tokens=20, temperature=0)
    idle = time.monotonic() - start

    with httpx.Client(timeout=60) as client:
        with client.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # first chunk received: hang up

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and llama_vllm.log().count("aborted vLLM request") == before:
        time.sleep(0.1)
    aborted = llama_vllm.log().count("aborted vLLM request") - before
    assert aborted >= 1, llama_vllm.log()[-3000:]

    start = time.monotonic()
    r = complete(llama_vllm, PROMPTS[0], max_tokens=20, temperature=0)
    took = time.monotonic() - start
    assert r.usage.completion_tokens == 20
    assert took < idle + 1.5, f"follow-up took {took:.2f}s (idle {idle:.2f}s): the abandoned work kept running"
    assert httpx.get(f"{llama_vllm.url}/v2/health/ready", timeout=10).status_code == 200


def test_a_client_gone_before_a_whole_result_aborts_the_vllm_request(llama_vllm):
    """A request that is not streamed reaches vLLM as FINAL_ONLY (one output at the end, as in
    vLLM's own server); a client that hangs up before it still gets its work aborted."""
    url = f"{llama_vllm.openai_url}/completions"
    before = llama_vllm.log().count("aborted vLLM request")
    body = _seconds_of_work(llama_vllm)
    start = time.monotonic()
    complete(llama_vllm, PROMPTS[0], max_tokens=20, temperature=0)
    idle = time.monotonic() - start
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=httpx.Timeout(60, read=1.0))  # hangs up after a second
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and llama_vllm.log().count("aborted vLLM request") == before:
        time.sleep(0.1)
    assert llama_vllm.log().count("aborted vLLM request") > before, llama_vllm.log()[-3000:]
    start = time.monotonic()
    assert complete(llama_vllm, PROMPTS[0], max_tokens=20, temperature=0).usage.completion_tokens == 20
    assert time.monotonic() - start < idle + 1.5


def test_whole_results_are_asked_of_vllm_in_one_piece(bare_backend):
    from vllm.sampling_params import RequestOutputKind

    from hfserve.generation import SamplingParams

    assert bare_backend._vllm_params(SamplingParams(max_tokens=5), 1).output_kind == RequestOutputKind.DELTA
    assert bare_backend._vllm_params(SamplingParams(max_tokens=5, whole=True), 1).output_kind == RequestOutputKind.FINAL_ONLY


# ------------------------------------------------------------------ embeddings
def test_embeddings_match_hf(minilm_vllm, minilm):
    texts = ["A cat sits on the mat.", "Quantum chromodynamics", "hello"]
    v = oai(minilm_vllm).embeddings.create(model=minilm_vllm.name, input=texts)
    h = oai(minilm).embeddings.create(model=minilm.name, input=texts)
    assert len(v.data) == len(h.data) == 3
    assert v.usage.prompt_tokens == h.usage.prompt_tokens
    for a, b in zip(v.data, h.data):
        assert a.index == b.index
        assert len(a.embedding) == len(b.embedding) == 384
        assert sum(x * x for x in a.embedding) == pytest.approx(1.0, abs=1e-4)
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-4


def test_embedding_model_refuses_generation(minilm_vllm):
    status, got, _ = _error(minilm_vllm, "POST", "/openai/v1/completions", {"model": minilm_vllm.name, "prompt": "hi"})
    assert status == 400 and got["error"]["code"] == "unsupported_task"


# ------------------------------------------------------------------ exception translation (no engine)
@pytest.fixture
def bare_backend():
    from hfserve.backends.vllm import VLLMBackend
    from hfserve.config import ModelConfig

    return VLLMBackend(ModelConfig(source="m"))


def _translate(backend, exc, request_id="rid-1"):
    from hfserve import errors

    with pytest.raises(errors.HFServeError) as info:
        with backend.map_exceptions(request_id):
            raise exc
    return info.value


def test_map_validation_errors(bare_backend):
    from vllm.exceptions import VLLMValidationError

    from hfserve import errors

    err = _translate(bare_backend, VLLMValidationError("temperature must be non-negative, got -1.0.", parameter="temperature", value=-1.0))
    assert isinstance(err, errors.InvalidRequest) and err.param == "temperature"
    assert err.message == "temperature must be non-negative, got -1.0."

    err = _translate(
        bare_backend,
        VLLMValidationError(
            "The decoder prompt (length 300) is longer than the maximum model length of 256. "
            "Make sure that `max_model_len` is no smaller than the number of text tokens."
        ),
    )
    assert isinstance(err, errors.ContextLengthExceeded)
    assert "300" in err.message and "256" in err.message and "`" not in err.message

    err = _translate(bare_backend, VLLMValidationError("n must be an int, but is of type <class 'float'>"))
    assert isinstance(err, errors.InvalidRequest) and "<class" not in err.message and err.message.endswith("float")


def test_map_sampling_params_rejection(bare_backend):
    from hfserve import errors
    from hfserve.generation import SamplingParams

    with pytest.raises(errors.InvalidRequest) as info:
        with bare_backend.map_exceptions("rid"):
            bare_backend._vllm_params(SamplingParams(max_tokens=5, temperature=-1.0), 1)
    assert info.value.param == "temperature"


def test_map_client_server_and_engine_errors(bare_backend):
    from vllm.exceptions import GenerationError, QueueOverflowError, RetryableRequestError, VLLMClientError, VLLMNotFoundError
    from vllm.v1.engine.exceptions import EngineDeadError

    from hfserve import errors

    assert isinstance(_translate(bare_backend, VLLMNotFoundError("no such adapter")), errors.ModelNotFound)
    assert isinstance(_translate(bare_backend, VLLMClientError("bad")), errors.InvalidRequest)
    assert isinstance(_translate(bare_backend, QueueOverflowError()), errors.Overloaded)
    assert isinstance(_translate(bare_backend, RetryableRequestError()), errors.Overloaded)
    for exc in (GenerationError("kv load failed"), RuntimeError("boom in /opt/secret/path.py")):
        err = _translate(bare_backend, exc, "rid-42")
        assert isinstance(err, errors.InternalError)
        assert err.message == "Internal server error (request id rid-42)"
    assert bare_backend.healthy()
    err = _translate(bare_backend, EngineDeadError())
    assert isinstance(err, errors.ModelNotReady) and err.retry_after
    assert not bare_backend.healthy()


def test_map_passes_through_cancellation_and_contract_errors(bare_backend):
    import asyncio

    from hfserve import errors

    with pytest.raises(asyncio.CancelledError):
        with bare_backend.map_exceptions("rid"):
            raise asyncio.CancelledError()
    original = errors.InvalidRequest("x", param="y")
    assert _translate(bare_backend, original) is original


def test_vllm_server_log_is_clean(llama_vllm):
    """No tracebacks from the contract errors above (they are client errors, not crashes)."""
    log = llama_vllm.log()
    assert not re.search(r"request \S+ failed with an unexpected error", log), log[-3000:]


# ------------------------------------------------------------------ engine death (last: it kills the module's engine)
def _children(pid: int) -> list[int]:
    kids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_dead_engine_is_not_ready_then_exits(server_factory):
    """Issue 15 part 5: the engine core process is killed. Readiness turns 503 at once, model routes
    answer 503 model_not_ready in their family's shape, liveness fails (/, /v2/health/live, gRPC
    ServerLive), an in-flight stream is finished in the stream, and the process exits non-zero
    within a bound (server.ENGINE_DEATH_DRAIN_SECONDS), so Kubernetes restarts it."""
    import tritonclient.grpc as tgrpc

    # its own server: the session's vLLM servers are shared with other modules
    llama_vllm = server_factory("llama", "--backend", "vllm", "--max_model_len", "256", name="doomed")
    engines = [
        p
        for p in _children(llama_vllm.proc.pid)
        if "EngineCore" in pathlib.Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
    ]
    assert len(engines) == 1, "cannot find the server's vLLM engine process"
    body = {"model": llama_vllm.name, "prompt": "Once upon a time", "max_tokens": 240, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{llama_vllm.openai_url}/completions", json=body, timeout=60) as stream:
        events = stream.iter_lines()
        assert next(line for line in events if line.startswith("data: {"))
        killed = time.monotonic()
        os.kill(engines[0], signal.SIGKILL)
        rest = [line for line in events if line.startswith("data: ")]  # the stream ends properly
    assert rest[-1] == "data: [DONE]"

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(f"{llama_vllm.url}/v2/health/ready", timeout=10).status_code == 503:
            break
        time.sleep(0.05)
    assert httpx.get(f"{llama_vllm.url}/v2/health/ready", timeout=10).status_code == 503
    r = httpx.post(
        f"{llama_vllm.openai_url}/completions", json={"model": llama_vllm.name, "prompt": "hi", "max_tokens": 3}, timeout=30
    )
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "model_not_ready"
    r = httpx.post(f"{llama_vllm.url}/v2/models/{llama_vllm.name}/generate", json={"text_input": "hi"}, timeout=30)
    assert r.status_code == 503 and isinstance(r.json()["error"], str) and r.headers["x-error-code"] == "model_not_ready"
    for path in ("/v2/health/live", "/"):
        r = httpx.get(f"{llama_vllm.url}{path}", timeout=10)
        assert r.status_code == 503 and isinstance(r.json()["error"], str), path
    with tgrpc.InferenceServerClient(llama_vllm.grpc_host) as client:
        assert client.is_server_live() is False
    code = llama_vllm.proc.wait(timeout=60)
    assert code != 0 and time.monotonic() - killed < 45
    assert "has died: liveness fails; exiting with code 1" in llama_vllm.log()
