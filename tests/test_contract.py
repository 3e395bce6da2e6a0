"""The rows of the error contract that need a real model or a real server process, with plain httpx:
the context length (a real tokenizer and model, on both backends), readiness while a server is still
loading, the OpenAI prefix from the environment, the access log.

The rest of the contract (every class on every family, validation, routing) is checked in-process
on a fake backend, in test_inprocess.py.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.contract import assert_error
from tests.servers import start_server, stop_server

LONG = " ".join(["word"] * 400)


@pytest.fixture
def llama(llama_any):
    """Every contract case on the generative model runs on both backends: same status, shape, code."""
    return llama_any


def post(server, path, body, *, headers=None):
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


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
