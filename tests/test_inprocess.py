"""The app in this process, on a fake backend (tests/fakes.py): routing, validation, the error
contract on every family, response shapes, and that a request's work stops with the request.

No model, no server process: what is checked here is the serving layer's own behaviour, which
does not depend on what a real model computes. The end-to-end tests with real clients and real
models are in test_openai, test_kserve, test_grpc, test_faults and test_limits.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from hfserve.config import LimitsConfig
from hfserve.tasks import Task
from hfserve.validation import MAX_JSON_DEPTH
from tests.contract import assert_error
from tests.fakes import CHAT_TEMPLATE, EMBEDDING_DIM, FAIL_BEFORE, FAIL_MID, FAIL_MID_STEP, HANG, FakeServer

pytestmark = pytest.mark.anyio

LONG_TOKENS = 200
STEP_SECONDS = 0.01  # a long generation runs LONG_TOKENS * STEP_SECONDS = 2 s unless it is stopped


# ----------------------------------------------------------------- the error contract
JSON = {"content-type": "application/json"}
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "fake", "prompt": "hi"}
GENERATIVE_POSTS = [
    "/openai/v1/completions",
    "/openai/v1/chat/completions",
    "/v1/models/fake:predict",
    "/v2/models/fake/infer",
    "/v2/models/fake/generate",
    "/v2/models/fake/generate_stream",
]


def v2_inputs(texts: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "input-0", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


def one_request_per_family(text: str) -> list[tuple[str, dict[str, Any]]]:
    """A request that reaches a generative model's backend with ``text``, on every HTTP route that generates."""
    return [
        ("/openai/v1/completions", {"model": "fake", "prompt": text}),
        ("/openai/v1/completions", {"model": "fake", "prompt": text, "stream": True}),
        ("/openai/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": text}]}),
        ("/openai/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": text}], "stream": True}),
        ("/v1/models/fake:predict", {"instances": [text]}),
        ("/v2/models/fake/infer", v2_inputs([text])),
        ("/v2/models/fake/generate", {"text_input": text}),
        ("/v2/models/fake/generate_stream", {"text_input": text}),
    ]


# invalid_request
@pytest.mark.parametrize("path", GENERATIVE_POSTS)
@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
async def test_malformed_bodies(fake, path, raw):
    srv = await fake()
    assert_error(await srv.client.post(path, content=raw, headers=JSON), "invalid_request")


def nested(depth: int) -> bytes:
    """A JSON object whose ``x`` nests arrays so that the body is ``depth`` levels deep."""
    return b'{"x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("path", GENERATIVE_POSTS)
async def test_deeply_nested_bodies(fake, path):
    """Deeper than json.loads can recurse (a RecursionError, once a 500), or just past the limit."""
    srv = await fake()
    for raw in (b"[" * 100_000 + b"]" * 100_000, nested(MAX_JSON_DEPTH + 1)):
        msg = assert_error(await srv.client.post(path, content=raw, headers=JSON), "invalid_request")
        assert f"nests arrays and objects deeper than {MAX_JSON_DEPTH} levels" in msg
    msg = assert_error(await srv.client.post(path, content=nested(MAX_JSON_DEPTH), headers=JSON), "invalid_request")
    assert "deeper" not in msg  # at the limit: parsed, then refused by the schema


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/openai/v1/completions", {**COMPLETION, "temperature": -1}, "temperature"),
        ("/openai/v1/completions", {**COMPLETION, "n": 0}, "n"),
        ("/openai/v1/completions", {**COMPLETION, "top_p": 5}, "top_p"),
        ("/openai/v1/completions", {**COMPLETION, "max_tokens": "many"}, "max_tokens"),
        ("/openai/v1/completions", {"model": "fake"}, "prompt"),
        ("/openai/v1/chat/completions", {"model": "fake", "messages": [{"role": "user"}], "stream": "yes"}, "stream"),
        ("/openai/v1/chat/completions", {"model": "fake", "messages": "hi"}, "messages"),
        ("/openai/v1/chat/completions", {"model": "fake", "messages": [{"content": "x"}]}, "messages.0.role"),
        ("/openai/v1/chat/completions", {"model": "fake", "messages": []}, "messages"),
    ],
)
async def test_openai_validation(fake, path, body, param):
    srv = await fake()
    msg = assert_error(await srv.post(path, body), "invalid_request", param=param)
    assert param.split(".")[0] in msg


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/models/fake:predict", {"instances": "not a list"}),
        ("/v1/models/fake:predict", {"instances": [1, 2]}),
        ("/v1/models/fake:predict", {"instances": ["x"], "parameters": {"temperature": -1}}),
        ("/v1/models/fake:predict", {}),
        ("/v2/models/fake/infer", {"inputs": []}),
        ("/v2/models/fake/infer", {"inputs": [{"name": "a", "shape": [1], "datatype": "FP99", "data": ["x"]}]}),
        ("/v2/models/fake/infer", {"inputs": [{"name": "a", "shape": [2], "datatype": "BYTES", "data": ["x"]}]}),
        ("/v2/models/fake/infer", {"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": [3]}]}),
        ("/v2/models/fake/generate", {"text_input": "x", "parameters": {"temperature": -1}}),
        ("/v2/models/fake/generate", {"parameters": {}}),
        ("/v2/models/fake/generate_stream", {"text_input": "x", "top_p": 9}),
    ],
)
async def test_kserve_validation(fake, path, body):
    srv = await fake()
    assert_error(await srv.post(path, body), "invalid_request")


@pytest.mark.parametrize("inp, param", [("", "input"), ([""], "input"), (["a sentence", ""], "input.1")])
async def test_empty_embedding_input_is_refused(fake, inp, param):
    """OpenAI refuses an empty string; a tokenizer would embed its special tokens alone."""
    srv = await fake(Task.text_embedding)
    resp = await srv.post("/openai/v1/embeddings", {"model": "fake", "input": inp})
    assert "empty string" in assert_error(resp, "invalid_request", param=param)


# unsupported_parameter
@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/openai/v1/completions", {**COMPLETION, "logit_bias": {"5": 1}}, "logit_bias"),
        ("/openai/v1/completions", {**COMPLETION, "best_of": 3}, "best_of"),
        ("/openai/v1/completions", {**COMPLETION, "suffix": "y"}, "suffix"),
        # a backend without a grammar engine (both real backends have one)
        ("/openai/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format"),
        ("/v2/models/fake/generate", {"text_input": "x", "parameters": {"n": 2}}, type),
    ],
)
async def test_unsupported_parameter_generative(fake, path, body, param):
    srv = await fake()
    assert_error(await srv.post(path, body), "unsupported_parameter", param=param)


async def test_unsupported_parameter_encoders(fake):
    classifier = await fake(Task.sequence_classification)
    resp = await classifier.post("/v1/models/fake:predict", {"instances": ["x"], "parameters": {"temperature": 1}})
    assert_error(resp, "unsupported_parameter")
    embedder = await fake(Task.text_embedding)
    resp = await embedder.post("/openai/v1/embeddings", {"model": "fake", "input": "x", "dimensions": EMBEDDING_DIM - 1})
    assert str(EMBEDDING_DIM) in assert_error(resp, "unsupported_parameter", param="dimensions")


# unsupported_task
async def test_unsupported_task(fake):
    generator = await fake()
    assert_error(await generator.post("/openai/v1/embeddings", {"model": "fake", "input": "x"}), "unsupported_task", param=None)
    classifier = await fake(Task.sequence_classification)
    for path, body in [
        ("/openai/v1/chat/completions", CHAT),
        ("/openai/v1/completions", COMPLETION),
        ("/v2/models/fake/generate", {"text_input": "x"}),
        ("/v2/models/fake/generate_stream", {"text_input": "x"}),
    ]:
        msg = assert_error(await classifier.post(path, body), "unsupported_task", param=None)
        assert "sequence classification" in msg


# model_not_found
@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/openai/v1/completions", {"model": "nope", "prompt": "x"}),
        ("POST", "/openai/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        ("POST", "/openai/v1/embeddings", {"model": "nope", "input": "x"}),
        ("GET", "/openai/v1/models/nope", None),
        ("GET", "/v1/models/nope", None),
        ("POST", "/v1/models/nope:predict", {"instances": ["x"]}),
        ("GET", "/v2/models/nope", None),
        ("GET", "/v2/models/nope/ready", None),
        ("GET", "/v2/models/fake/versions/7", None),
        ("POST", "/v2/models/nope/infer", v2_inputs(["x"])),
        ("POST", "/v2/models/nope/generate", {"text_input": "x"}),
        ("POST", "/v2/models/nope/generate_stream", {"text_input": "x"}),
    ],
)
async def test_model_not_found(fake, method, path, body):
    srv = await fake()
    resp = await srv.client.request(method, path, json=body)
    msg = assert_error(resp, "model_not_found", param="model" if path.startswith("/openai") else type)
    assert "nope" in msg or "7" in msg


async def test_user_input_in_messages_is_bounded_and_escaped(fake):
    srv = await fake()
    name = "x%0A" * 500  # percent-encoded newlines: the server decodes them into the name
    msg = assert_error(await srv.client.get(f"/v1/models/{name}"), "model_not_found")
    assert "\n" not in msg and len(msg) < 200


# not_found, method_not_allowed, unsupported_media_type
@pytest.mark.parametrize("path", ["/openai/v1/nothing", "/v1/nothing", "/v2/nothing/here", "/nothing", "/openai/v2/x"])
async def test_unknown_route(fake, path):
    srv = await fake()
    assert_error(await srv.client.get(path), "not_found", param=None)


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/openai/v1/completions"),
        ("DELETE", "/openai/v1/chat/completions"),
        ("PUT", "/v1/models"),
        ("GET", "/v2/models/fake/infer"),
        ("POST", "/v2/health/ready"),
        ("POST", "/metrics"),
    ],
)
async def test_method_not_allowed(fake, method, path):
    srv = await fake()
    resp = await srv.client.request(method, path)
    assert_error(resp, "method_not_allowed", param=None)
    assert resp.headers.get("allow")


@pytest.mark.parametrize(
    "path",
    ["/openai/v1/completions", "/openai/v1/embeddings", "/v1/models/fake:predict", "/v2/models/fake/infer",
     "/v2/models/fake/generate"],
)  # fmt: skip
async def test_wrong_content_type(fake, path):
    srv = await fake()
    resp = await srv.client.post(path, content=b'{"model": "fake"}', headers={"content-type": "text/plain"})
    assert_error(resp, "unsupported_media_type", param=None)


@pytest.mark.parametrize("path,body", one_request_per_family("hi"))
async def test_curls_default_content_type_is_read_as_json(fake, path, body):
    """``curl -d @input.json URL`` (no -H) sends application/x-www-form-urlencoded, as KServe's
    documentation calls its servers: the JSON body is served as with application/json, on every
    family; a body that is not JSON is still ``invalid_request``."""
    srv = await fake()
    form = {"content-type": "application/x-www-form-urlencoded"}
    as_form = await srv.client.post(path, content=json.dumps(body).encode(), headers=form)
    as_json = await srv.client.post(path, content=json.dumps(body).encode(), headers=JSON)
    assert as_form.status_code == as_json.status_code == 200, as_form.text
    if not body.get("stream") and not path.endswith("generate_stream"):
        answer, expected = as_form.json(), as_json.json()
        for volatile in ("id", "created", "model_version"):  # per response, not per request
            answer.pop(volatile, None), expected.pop(volatile, None)
        assert answer == expected
    assert_error(await srv.client.post(path, content=b"instances=hi", headers=form), "invalid_request")


# request_too_large
@pytest.mark.parametrize("path", ["/openai/v1/completions", "/v1/models/fake:predict", "/v2/models/fake/infer", "/anything"])
async def test_request_too_large(fake, path):
    srv = await fake(limits=LimitsConfig(max_request_body_bytes=2000))
    big = {"model": "fake", "prompt": "x" * 5000, "instances": ["x" * 5000]}
    assert "2000" in assert_error(await srv.post(path, big), "request_too_large", param=None)
    if path == "/anything":
        return  # no route reads a body there: an unknown route is answered 404 without reading it

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"x" * 500

    resp = await srv.client.post(path, content=chunks(), headers=JSON)
    assert_error(resp, "request_too_large", param=None)


# model_not_ready
NOT_READY = {
    "loading": "still loading",
    "stopping": "shutting down",
    "engine_died": "engine has stopped",
}


@pytest.mark.parametrize("state", NOT_READY)
async def test_model_not_ready_on_every_family(fake, state):
    srv = await fake(start=state != "loading")
    if state == "stopping":
        srv.service.begin_shutdown()
    elif state == "engine_died":
        srv.backend.healthy = lambda: False  # type: ignore[method-assign]
    reads = ["/v2/health/ready", "/v2/models/fake/ready", "/v2/models/fake", "/v1/models/fake"]
    answers = [await srv.client.get(path) for path in reads]
    answers += [await srv.post(path, body) for path, body in one_request_per_family("hi")]
    answers.append(await srv.post("/openai/v1/embeddings", {"model": "fake", "input": "x"}))
    for resp in answers:
        assert NOT_READY[state] in assert_error(resp, "model_not_ready", param=None)
    assert (await srv.client.get("/v2/health/live")).json() == {"live": True}


# overloaded
async def test_overloaded_on_every_family(fake):
    srv = await fake(limits=LimitsConfig(max_concurrent_requests=1, max_queue_size=0))
    holder = asyncio.create_task(srv.post("/openai/v1/completions", {"model": "fake", "prompt": HANG}))
    while srv.backend.running == 0:  # the one slot is taken
        await asyncio.sleep(0.01)
    try:
        for path, body in one_request_per_family("hi"):
            msg = assert_error(await srv.post(path, body), "overloaded", param=None)
            assert "limit of 1 concurrent requests and 0 queued" in msg
        # a request that cannot succeed is told why, not that the server is busy
        embeddings = await srv.post("/openai/v1/embeddings", {"model": "fake", "input": "x"})
        assert_error(embeddings, "unsupported_task", param=None)
        assert_error(await srv.post("/openai/v1/completions", {"model": "nope", "prompt": "x"}), "model_not_found")
        # health, readiness and metrics are not model work: they still answer
        for path in ["/v2/health/ready", "/metrics", "/v1/models/fake"]:
            assert (await srv.client.get(path)).status_code == 200
    finally:
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
    assert srv.backend.running == 0
    assert (await srv.post("/openai/v1/completions", COMPLETION)).status_code == 200  # the slot is free again


# timeout
async def test_hanging_backend_times_out_on_every_family(fake):
    """A backend that never answers: past the deadline every family answers ``timeout`` (before the
    first token a stream is a normal error response), the work is cancelled, the server serves on."""
    srv = await fake()
    embedder = await fake(Task.text_embedding)
    cases = [(srv, path, body) for path, body in one_request_per_family(HANG)]
    cases.append((embedder, "/openai/v1/embeddings", {"model": "fake", "input": HANG}))
    for server, path, body in cases:
        resp = await server.post(path, body, headers={"x-request-timeout": "0.2"})
        assert "0.2 seconds" in assert_error(resp, "timeout", param=None)
        assert server.backend.running == 0
    assert [e.how for e in srv.backend.ended] == ["cancelled"] * (len(cases) - 1)
    assert (await srv.post("/v1/models/fake:predict", {"instances": ["hi"]})).status_code == 200


# request ids and metrics
async def test_request_id_on_every_response(fake):
    srv = await fake()
    for method, path in [("GET", "/"), ("GET", "/metrics"), ("GET", "/nope"), ("GET", "/v2/health/ready"),
                         ("POST", "/v1/models/fake:predict"), ("GET", "/openai/v1/models")]:  # fmt: skip
        resp = await srv.client.request(method, path)
        assert len(resp.headers["x-request-id"]) >= 16
        mine = await srv.client.request(method, path, headers={"x-request-id": "my-id-123"})
        assert mine.headers["x-request-id"] == "my-id-123"


async def test_error_metrics_count_family_and_code(fake):
    srv = await fake()
    sample = 'hfserve_errors_total{code="model_not_found",family="v1"}'
    before = srv.metric(sample)
    await srv.client.get("/v1/models/ghost")
    assert srv.metric(sample) == before + 1


# ------------------------------------------------------------------ response shapes
# The fake echoes its prompt's tokens (BOS dropped) one per step, so every text and count is known.
def sse_events(resp) -> list[str]:
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in resp.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] for line in lines]


async def test_completion_shape(fake):
    srv = await fake()
    body = {"model": "fake", "prompt": ["ab", "cd"], "n": 2, "max_tokens": 3, "logprobs": 1}
    completion = Completion.model_validate((await srv.post("/openai/v1/completions", body)).json())
    assert completion.object == "text_completion" and completion.model == "fake"
    assert [(c.index, c.text, c.finish_reason) for c in completion.choices] == [
        (0, "aba", "length"), (1, "aba", "length"), (2, "cdc", "length"), (3, "cdc", "length")
    ]  # fmt: skip
    assert all(c.logprobs.tokens == list(c.text) for c in completion.choices)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (6, 12, 18)
    echoed = Completion.model_validate((await srv.post("/openai/v1/completions", {**COMPLETION, "max_tokens": 3, "echo": True})).json())
    assert echoed.choices[0].text == "hi" + "hih"


async def test_chat_shape(fake):
    srv = await fake()
    chat = ChatCompletion.model_validate((await srv.post("/openai/v1/chat/completions", {**CHAT, "max_tokens": 6})).json())
    prompt = "<|user|>hi\n<|assistant|>"  # CHAT_TEMPLATE rendered
    assert CHAT_TEMPLATE.startswith("{% for m in messages %}<|{{ m['role'] }}|>")
    (choice,) = chat.choices
    assert (choice.index, choice.message.role, choice.message.content, choice.finish_reason) == (0, "assistant", prompt[:6], "length")
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(prompt), 6)


async def test_stream_shapes(fake):
    srv = await fake()
    resp = await srv.post("/openai/v1/completions", {**COMPLETION, "max_tokens": 3, "stream": True})
    *chunks, done = sse_events(resp)
    assert done == "[DONE]"
    parsed = [json.loads(c) for c in chunks]  # not Completion: its type forbids a null finish_reason
    assert {c["object"] for c in parsed} == {"text_completion"}
    assert [(c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in parsed] == [
        ("h", None), ("i", None), ("h", "length")
    ]  # fmt: skip

    resp = await srv.post("/openai/v1/chat/completions", {**CHAT, "max_tokens": 3, "stream": True})
    *chunks, done = sse_events(resp)
    assert done == "[DONE]"
    deltas = [ChatCompletionChunk.model_validate_json(c).choices[0] for c in chunks]
    assert [(d.delta.role, d.delta.content, d.finish_reason) for d in deltas] == [
        ("assistant", "<", None), (None, "|", None), (None, "u", "length")
    ]  # fmt: skip

    resp = await srv.post("/v2/models/fake/generate_stream", {"text_input": "hi", "max_tokens": 2})
    events = [json.loads(e) for e in sse_events(resp)]  # no [DONE] on the generate extension
    assert events == [
        {"model_name": "fake", "model_version": "1", "text_output": "h"},
        {"model_name": "fake", "model_version": "1", "text_output": "i", "finish_reason": "length"},
    ]


async def test_generate_shape(fake):
    srv = await fake()
    resp = await srv.post("/v2/models/fake/generate", {"text_input": "hi", "parameters": {"max_tokens": 3}})
    assert resp.json() == {
        "model_name": "fake", "model_version": "1", "text_output": "hih", "finish_reason": "length",
        "usage": {"prompt_tokens": 3, "completion_tokens": 3},
    }  # fmt: skip


async def test_embeddings_shape(fake):
    srv = await fake(Task.text_embedding)
    body = {"model": "fake", "input": ["a", "bc"]}
    floats = CreateEmbeddingResponse.model_validate((await srv.post("/openai/v1/embeddings", body)).json())
    assert [(d.index, len(d.embedding)) for d in floats.data] == [(0, EMBEDDING_DIM), (1, EMBEDDING_DIM)]
    assert (floats.usage.prompt_tokens, floats.usage.total_tokens) == (5, 5)
    b64 = (await srv.post("/openai/v1/embeddings", {**body, "encoding_format": "base64"})).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist() for d in b64["data"]]
    assert decoded == [d.embedding for d in floats.data]


TASK_INPUTS = {
    Task.text_generation: ["ab", "cd"],
    Task.text2text_generation: ["ab", "cd"],
    Task.text_embedding: ["ab", "cd"],
    Task.sequence_classification: ["ab", "cde"],
    Task.token_classification: ["ab", "cde"],
    Task.fill_mask: ["a [MASK] b", "[MASK] c [MASK]"],
}


@pytest.mark.parametrize(
    "task,probabilities", [(task, False) for task in TASK_INPUTS] + [(task, True) for task in TASK_INPUTS if not task.is_generative]
)
async def test_v1_and_v2_outputs_follow_the_model_metadata(fake, task, probabilities):
    """v2 ``output-0`` has the datatype and rank the model metadata announces; v1 has a prediction per input."""
    srv = await fake(task, return_probabilities=probabilities)
    texts = TASK_INPUTS[task]
    (announced,) = (await srv.client.get("/v2/models/fake")).json()["outputs"]
    parameters = {"max_tokens": 2} if task.is_generative else None
    v2 = (await srv.post("/v2/models/fake/infer", {**v2_inputs(texts), "parameters": parameters})).json()
    (out,) = v2["outputs"]
    assert (out["name"], out["datatype"]) == (announced["name"], announced["datatype"])
    assert len(out["shape"]) == len(announced["shape"]) and out["shape"][0] == len(texts)
    assert len(out["data"]) == int(np.prod(out["shape"]))
    v1 = (await srv.post("/v1/models/fake:predict", {"instances": texts, "parameters": parameters})).json()
    assert len(v1["predictions"]) == len(texts)


# -------------------------------------------------- several generations in one request
MULTI_ROUTES = ["completions", "v1", "v2"]


def multi_request(route: str, prompts: list[str], max_tokens: int) -> tuple[str, dict[str, Any]]:
    """A request with one generation per prompt on the routes that take several."""
    if route == "completions":
        return "/openai/v1/completions", {"model": "fake", "prompt": prompts, "max_tokens": max_tokens}
    if route == "v1":
        return "/v1/models/fake:predict", {"instances": prompts, "parameters": {"max_tokens": max_tokens}}
    inputs = [{"name": "input-0", "shape": [len(prompts)], "datatype": "BYTES", "data": prompts}]
    return "/v2/models/fake/infer", {"inputs": inputs, "parameters": {"max_tokens": max_tokens}}


def assert_all_stopped(srv: FakeServer, sibling: str) -> None:
    """No generation runs any more, and ``sibling`` was cancelled long before its end."""
    assert srv.backend.running == 0, f"{srv.backend.running} generation(s) still running after the answer"
    (ended,) = [e for e in srv.backend.ended if e.prompt == sibling]
    assert ended.how == "cancelled", ended
    assert ended.steps < LONG_TOKENS // 2, ended


@pytest.mark.parametrize("fault", [FAIL_BEFORE, FAIL_MID])
@pytest.mark.parametrize("route", MULTI_ROUTES)
async def test_a_failing_generation_stops_its_siblings(fake, route, fault):
    srv = await fake(step_seconds=STEP_SECONDS)
    path, body = multi_request(route, [fault, "a long one"], LONG_TOKENS)
    resp = await srv.post(path, body)
    assert_error(resp, "internal_error", param=None)
    assert_all_stopped(srv, "a long one")


@pytest.mark.parametrize("route", MULTI_ROUTES)
async def test_a_deadline_stops_every_generation(fake, route):
    srv = await fake(step_seconds=STEP_SECONDS)
    path, body = multi_request(route, [HANG, "a long one"], LONG_TOKENS)
    resp = await srv.post(path, body, headers={"x-request-timeout": "0.3"})
    assert_error(resp, "timeout", param=None)
    assert_all_stopped(srv, "a long one")


async def call_and_disconnect(srv: FakeServer, path: str, body: dict[str, Any], after: float) -> list[dict[str, Any]]:
    """Call the app as a server would, with a client that goes away ``after`` seconds in; what it sent."""
    loop = asyncio.get_running_loop()
    gone_at = loop.time() + after
    pending = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        if loop.time() < gone_at:  # the app polls with a cancelled scope: nothing to await after this
            await asyncio.sleep(gone_at - loop.time())
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("fake", 80),
    }  # fmt: skip
    await srv.app(scope, receive, send)
    return sent


@pytest.mark.parametrize("route", MULTI_ROUTES)
async def test_a_client_that_goes_away_stops_every_generation(fake, route):
    srv = await fake(step_seconds=STEP_SECONDS)
    path, body = multi_request(route, ["a long one", "another long one"], LONG_TOKENS)
    sent = await call_and_disconnect(srv, path, body, after=0.2)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]  # logged as a client gone
    assert_all_stopped(srv, "a long one")
    assert_all_stopped(srv, "another long one")
    assert srv.metric('hfserve_client_disconnects_total{family=') == 1


async def test_a_failing_stream_stops_its_siblings(fake):
    srv = await fake(step_seconds=STEP_SECONDS)
    body = {"model": "fake", "prompt": [FAIL_MID, "a long one"], "max_tokens": LONG_TOKENS, "stream": True}
    resp = await srv.post("/openai/v1/completions", body)
    assert resp.status_code == 200
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "internal_error"
    assert_all_stopped(srv, "a long one")
    (failed,) = [e for e in srv.backend.ended if e.prompt == FAIL_MID]
    assert (failed.how, failed.steps) == ("failed", FAIL_MID_STEP)


# ------------------------------------------------------------------ stream options


@pytest.mark.parametrize("path,body", [("/openai/v1/completions", COMPLETION), ("/openai/v1/chat/completions", CHAT)])
async def test_continuous_usage_stats_needs_include_usage(fake, path, body):
    """vLLM ignores continuous_usage_stats without include_usage; here nothing is silently ignored."""
    srv = await fake()
    options = {"continuous_usage_stats": True}
    resp = await srv.post(path, {**body, "stream": True, "stream_options": options})
    msg = assert_error(resp, "invalid_request", param="stream_options.continuous_usage_stats")
    assert "include_usage" in msg
