"""Every row of the error contract, on every route family, with plain httpx."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.servers import start_server, stop_server
from tests.contract import assert_error

JSON = {"content-type": "application/json"}


@pytest.fixture
def llama(llama_any):
    """Every contract case on the generative model runs on both backends: same status, shape, code."""
    return llama_any
LONG = " ".join(["word"] * 400)


def post(server, path, body=None, *, raw: bytes | None = None, headers=None):
    kwargs = {"content": raw} if raw is not None else {"json": body}
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=60, **kwargs)


# ------------------------------------------------------------ invalid_request
@pytest.mark.parametrize(
    "path",
    [
        "/openai/v1/completions",
        "/openai/v1/chat/completions",
        "/v1/models/llama:predict",
        "/v2/models/llama/infer",
        "/v2/models/llama/generate",
        "/v2/models/llama/generate_stream",
    ],
)
@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_bodies(llama, path, raw):
    assert_error(post(llama, path, raw=raw, headers=JSON), "invalid_request")


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/openai/v1/completions", {"model": "llama", "prompt": "x", "temperature": -1}, "temperature"),
        ("/openai/v1/completions", {"model": "llama", "prompt": "x", "n": 0}, "n"),
        ("/openai/v1/completions", {"model": "llama", "prompt": "x", "top_p": 5}, "top_p"),
        ("/openai/v1/completions", {"model": "llama", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ("/openai/v1/completions", {"model": "llama"}, "prompt"),
        ("/openai/v1/chat/completions", {"model": "llama", "messages": [{"role": "user"}], "stream": "yes"}, "stream"),
        ("/openai/v1/chat/completions", {"model": "llama", "messages": "hi"}, "messages"),
        ("/openai/v1/chat/completions", {"model": "llama", "messages": [{"content": "x"}]}, "messages.0.role"),
        ("/openai/v1/chat/completions", {"model": "llama", "messages": []}, "messages"),
    ],
)
def test_openai_validation(llama, path, body, param):
    msg = assert_error(post(llama, path, body), "invalid_request", param=param)
    assert param.split(".")[0] in msg


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/models/llama:predict", {"instances": "not a list"}),
        ("/v1/models/llama:predict", {"instances": [1, 2]}),
        ("/v1/models/llama:predict", {"instances": ["x"], "parameters": {"temperature": -1}}),
        ("/v1/models/llama:predict", {}),
        ("/v2/models/llama/infer", {"inputs": []}),
        ("/v2/models/llama/infer", {"inputs": [{"name": "a", "shape": [1], "datatype": "FP99", "data": ["x"]}]}),
        ("/v2/models/llama/infer", {"inputs": [{"name": "a", "shape": [2], "datatype": "BYTES", "data": ["x"]}]}),
        ("/v2/models/llama/infer", {"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": [3]}]}),
        ("/v2/models/llama/generate", {"text_input": "x", "parameters": {"temperature": -1}}),
        ("/v2/models/llama/generate", {"parameters": {}}),
        ("/v2/models/llama/generate_stream", {"text_input": "x", "top_p": 9}),
    ],
)
def test_kserve_validation(llama, path, body):
    assert_error(post(llama, path, body), "invalid_request")


# ------------------------------------------------------- unsupported_parameter
@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/openai/v1/completions", {"model": "llama", "prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
        ("/openai/v1/completions", {"model": "llama", "prompt": "x", "best_of": 3}, "best_of"),
        ("/openai/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": "x"}],
                                         "response_format": {"type": "json_object"}}, "response_format.type"),
        ("/v2/models/llama/generate", {"text_input": "x", "parameters": {"n": 2}}, type),
    ],
)
def test_unsupported_parameter_generative(llama, path, body, param):
    assert_error(post(llama, path, body), "unsupported_parameter", param=param)


def test_unsupported_parameter_encoders(bert_cls, minilm):
    assert_error(post(bert_cls, "/v1/models/bert_cls:predict", {"instances": ["x"], "parameters": {"temperature": 1}}),
                 "unsupported_parameter")
    assert_error(post(minilm, "/openai/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 3}),
                 "unsupported_parameter", param="dimensions")


@pytest.mark.parametrize("inp, param", [("", "input"), ([""], "input"), (["a sentence", ""], "input.1")])
def test_empty_embedding_input_is_refused(minilm, inp, param):
    """OpenAI refuses an empty string; a tokenizer would embed its special tokens alone."""
    msg = assert_error(post(minilm, "/openai/v1/embeddings", {"model": "minilm", "input": inp}), "invalid_request", param=param)
    assert "empty string" in msg


# ------------------------------------------------------ context_length_exceeded
def test_context_length_openai(llama):
    msg = assert_error(
        post(llama, "/openai/v1/completions", {"model": "llama", "prompt": "hello", "max_tokens": 1000}),
        "context_length_exceeded",
        param="max_tokens",
    )
    assert "1000" in msg and "256" in msg and "tokens" in msg
    assert_error(
        post(llama, "/openai/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": "x"}],
                                                    "max_completion_tokens": 1000}),
        "context_length_exceeded",
        param="max_completion_tokens",
    )
    assert_error(
        post(llama, "/openai/v1/completions", {"model": "llama", "prompt": LONG * 2}), "context_length_exceeded"
    )


def test_context_length_kserve(llama, bert_cls):
    assert_error(post(llama, "/v2/models/llama/generate", {"text_input": "x", "max_tokens": 999}), "context_length_exceeded")
    assert_error(post(llama, "/v1/models/llama:predict", {"instances": [LONG * 2]}), "context_length_exceeded")
    msg = assert_error(post(bert_cls, "/v1/models/bert_cls:predict", {"instances": [LONG]}), "context_length_exceeded")
    assert "128" in msg
    body = {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [LONG]}]}
    assert_error(post(bert_cls, "/v2/models/bert_cls/infer", body), "context_length_exceeded")


# ------------------------------------------------------------ unsupported_task
def test_unsupported_task(llama, bert_cls):
    assert_error(post(llama, "/openai/v1/embeddings", {"model": "llama", "input": "x"}), "unsupported_task", param=None)
    assert_error(
        post(bert_cls, "/openai/v1/chat/completions", {"model": "bert_cls", "messages": [{"role": "user", "content": "x"}]}),
        "unsupported_task",
        param=None,
    )
    assert_error(post(bert_cls, "/openai/v1/completions", {"model": "bert_cls", "prompt": "x"}), "unsupported_task")
    assert_error(post(bert_cls, "/v2/models/bert_cls/generate_stream", {"text_input": "x"}), "unsupported_task")


# ------------------------------------------------------------- model_not_found
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
        ("GET", "/v2/models/llama/versions/7", None),
        ("POST", "/v2/models/nope/infer", {"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}),
        ("POST", "/v2/models/nope/generate", {"text_input": "x"}),
        ("POST", "/v2/models/nope/generate_stream", {"text_input": "x"}),
    ],
)
def test_model_not_found(llama, method, path, body):
    resp = httpx.request(method, f"{llama.url}{path}", json=body, timeout=30)
    msg = assert_error(resp, "model_not_found", param="model" if path.startswith("/openai") else type)
    assert "nope" in msg or "7" in msg


# ------------------------------------------------------ not_found / method
@pytest.mark.parametrize("path", ["/openai/v1/nothing", "/v1/nothing", "/v2/nothing/here", "/nothing", "/openai/v2/x"])
def test_unknown_route(llama, path):
    assert_error(httpx.get(f"{llama.url}{path}", timeout=30), "not_found", param=None)


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/openai/v1/completions"),
        ("DELETE", "/openai/v1/chat/completions"),
        ("PUT", "/v1/models"),
        ("GET", "/v2/models/llama/infer"),
        ("POST", "/v2/health/ready"),
        ("POST", "/metrics"),
    ],
)
def test_method_not_allowed(llama, method, path):
    resp = httpx.request(method, f"{llama.url}{path}", timeout=30)
    assert_error(resp, "method_not_allowed", param=None)
    assert resp.headers.get("allow")


# ------------------------------------------------------ unsupported_media_type
@pytest.mark.parametrize(
    "path",
    ["/openai/v1/completions", "/openai/v1/embeddings", "/v1/models/llama:predict", "/v2/models/llama/infer",
     "/v2/models/llama/generate"],
)
def test_wrong_content_type(llama, path):
    resp = post(llama, path, raw=b'{"model": "llama"}', headers={"content-type": "text/plain"})
    assert_error(resp, "unsupported_media_type", param=None)


# ------------------------------------------------------ request_too_large
@pytest.mark.parametrize(
    "path", ["/openai/v1/completions", "/v1/models/bert_small:predict", "/v2/models/bert_small/infer", "/anything"]
)
def test_request_too_large(server_factory, path):
    server = server_factory("bert_cls", "--max_request_body_bytes", "2000", name="bert_small")
    big = {"model": "bert_small", "prompt": "x" * 5000, "instances": ["x" * 5000]}
    msg = assert_error(post(server, path, big), "request_too_large", param=None)
    assert "2000" in msg
    if path == "/anything":
        return  # no route reads a body there: an unknown route is answered 404 without reading it
    # a chunked body with no Content-Length is counted as it arrives
    def chunks():
        for _ in range(10):
            yield b"x" * 500

    resp = httpx.post(f"{server.url}{path}", content=chunks(), headers=JSON, timeout=30)
    assert_error(resp, "request_too_large", param=None)


# ------------------------------------------------------- model_not_ready
def test_model_not_ready_while_loading(models, log_dir):
    server = start_server(models["minilm"], "loading", log_dir, wait_ready=False)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                live = httpx.get(f"{server.url}/v2/health/live", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert live.status_code == 200
        answers = [
            httpx.get(f"{server.url}/v2/health/ready", timeout=5),
            httpx.get(f"{server.url}/v2/models/loading/ready", timeout=5),
            httpx.post(f"{server.url}/openai/v1/embeddings", json={"model": "loading", "input": "x"}, timeout=5),
            httpx.post(f"{server.url}/v1/models/loading:predict", json={"instances": ["x"]}, timeout=5),
        ]
        for resp in answers:
            msg = assert_error(resp, "model_not_ready", param=None)
            assert "loading" in msg
        # ... and then it becomes ready by itself
        while time.monotonic() < deadline:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200:
                break
            time.sleep(0.2)
        assert httpx.post(f"{server.url}/v1/models/loading:predict", json={"instances": ["x"]}, timeout=30).status_code == 200
    finally:
        assert stop_server(server) == 0


# ------------------------------------------------------- request ids
def test_request_id_on_every_response(llama):
    for method, path in [("GET", "/"), ("GET", "/metrics"), ("GET", "/nope"), ("GET", "/v2/health/ready"),
                         ("POST", "/v1/models/llama:predict"), ("GET", "/openai/v1/models")]:
        resp = httpx.request(method, f"{llama.url}{path}", timeout=30)
        assert len(resp.headers["x-request-id"]) >= 16
        mine = httpx.request(method, f"{llama.url}{path}", headers={"x-request-id": "my-id-123"}, timeout=30)
        assert mine.headers["x-request-id"] == "my-id-123"


def test_error_metrics_count_family_and_code(llama):
    def count() -> float:
        text = httpx.get(f"{llama.url}/metrics", timeout=30).text
        for line in text.splitlines():
            if line.startswith('hfserve_errors_total{code="model_not_found",family="v1"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count()
    httpx.get(f"{llama.url}/v1/models/ghost", timeout=30)
    assert count() == before + 1


def test_user_input_in_messages_is_bounded_and_escaped(llama):
    name = "x%0A" * 500  # percent-encoded newlines: the server decodes them into the name
    resp = httpx.get(f"{llama.url}/v1/models/{name}", timeout=30)
    msg = assert_error(resp, "model_not_found")
    assert "\n" not in msg and len(msg) < 200


def test_openai_prefix_is_configurable(models, log_dir):
    """KSERVE_OPENAI_ROUTE_PREFIX moves the OpenAI family, its error shape included (as in KServe)."""
    server = start_server(models["bert_cls"], "prefixed", log_dir, env={"KSERVE_OPENAI_ROUTE_PREFIX": "ai"})
    try:
        assert httpx.get(f"{server.url}/ai/v1/models", timeout=30).json()["data"][0]["id"] == "prefixed"
        assert_error(httpx.get(f"{server.url}/ai/v1/models/other", timeout=30), "model_not_found", param="model",
                     family="openai")
        assert_error(httpx.get(f"{server.url}/ai/v1/nothing", timeout=30), "not_found", param=None, family="openai")
        assert_error(httpx.get(f"{server.url}/openai/v1/models", timeout=30), "not_found", family="kserve")
    finally:
        assert stop_server(server) == 0


def test_access_log_names_the_error_code(llama_hf):
    """A client error's code is on its access log line; its message went to the client, so it is
    not logged again at INFO (the server's own refusals, 5xx, are: see test_grpc's timeout test)."""
    rid = f"log-{time.monotonic_ns()}"
    resp = post(llama_hf, "/openai/v1/completions", {"model": "llama", "prompt": "hi", "temperature": -1}, headers={"x-request-id": rid})
    assert_error(resp, "invalid_request", param="temperature")
    line = f"request_id={rid} error=invalid_request"
    deadline = time.monotonic() + 10
    while line not in llama_hf.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = llama_hf.log()
    assert line in log, log[-2000:]
    assert f"request {rid}: invalid_request" not in log
