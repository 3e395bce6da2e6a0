"""Limits, overload, deadlines, API keys and graceful shutdown (issue 6), on real servers; which
routes take an admission slot and need the API key, in this process."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from unittest import mock

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from hfserve.app import create_app
from hfserve.config import Config, LimitsConfig, ModelConfig
from tests.contract import assert_error
from tests.servers import start_server, stop_server

# ~15k tokens: long enough to still be running after a second, even with batching
LONG_GEN = {"prompt": ["hi"] * 8, "n": 8, "max_tokens": 240, "ignore_eos": True}


def stream_first_chunk(url: str, body: dict, holder: dict, release: threading.Event) -> None:
    """Open a stream, read one event, keep it open until ``release`` is set, then read the rest."""
    with httpx.stream("POST", url, json=body, timeout=300) as resp:
        holder["status"] = resp.status_code
        lines = resp.iter_lines()
        holder["first"] = next(line for line in lines if line.startswith("data: "))
        holder["started"].set()
        release.wait(120)
        holder["rest"] = [line for line in lines if line.startswith("data: ")]


def hold_stream(server, model: str) -> tuple[threading.Thread, dict, threading.Event]:
    """A long completion stream in a thread, held open after its first event (see stream_first_chunk)."""
    holder = {"started": threading.Event()}
    release = threading.Event()
    body = {"model": model, **LONG_GEN, "stream": True}
    t = threading.Thread(target=stream_first_chunk, args=(f"{server.openai_url}/completions", body, holder, release))
    t.start()
    return t, holder, release


# ------------------------------------------------------------------ overloaded
def test_overloaded_beyond_concurrency_and_queue(server_factory):
    server = server_factory("llama", "--backend", "huggingface", "--max_concurrent_requests", "1", "--max_queue_size", "0",
                            name="llama_one")
    t, holder, release = hold_stream(server, "llama_one")
    try:
        assert holder["started"].wait(60)
        for path, req in [
            ("/openai/v1/completions", {"model": "llama_one", "prompt": "x", "max_tokens": 2}),
            ("/v1/models/llama_one:predict", {"instances": ["x"]}),
            ("/v2/models/llama_one/generate", {"text_input": "x"}),
        ]:
            resp = httpx.post(f"{server.url}{path}", json=req, timeout=30)
            msg = assert_error(resp, "overloaded", param=None)
            assert "1 concurrent" in msg
        # gRPC ModelInfer takes a slot from the same pool: UNAVAILABLE with the same message
        inp = tgrpc.InferInput("input-0", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
        with tgrpc.InferenceServerClient(server.grpc_host) as g, pytest.raises(InferenceServerException) as exc:
            g.infer("llama_one", [inp], parameters={"max_tokens": 2})
        assert exc.value.status() == "StatusCode.UNAVAILABLE"
        assert exc.value.message() == msg
        # health, readiness and metrics are not model work: they still answer
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200
    finally:
        release.set()
        t.join(120)
    assert holder["rest"][-1] == "data: [DONE]"
    # the slot is free again
    ok = httpx.post(f"{server.openai_url}/completions", json={"model": "llama_one", "prompt": "x", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_queued_request_waits_for_a_slot(server_factory):
    server = server_factory("llama", "--backend", "huggingface", "--max_concurrent_requests", "1", "--max_queue_size", "4",
                            name="llama_queue")
    results = []

    def call():
        results.append(
            httpx.post(f"{server.openai_url}/completions", json={"model": "llama_queue", "prompt": "x", "max_tokens": 20,
                                                                  "ignore_eos": True}, timeout=120)
        )

    threads = [threading.Thread(target=call) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [r.status_code for r in results] == [200] * 4


def in_process_app(**limits) -> object:
    """The app with these limits, over a service that is never asked to do model work."""
    service = mock.MagicMock()
    service.name = "m"
    return create_app(service, Config(model=ModelConfig(source="m", name="m"), limits=LimitsConfig(**limits)))


def test_only_model_work_takes_an_admission_slot():
    """While the one slot is busy, what is not model work is answered as it would be: an unknown
    route 404, POST /metrics and GET :predict 405, :explain its not_found; model routes are overloaded."""
    app = in_process_app(max_concurrent_requests=1, max_queue_size=0)

    async def run() -> None:
        async with app.state.admission.slot(), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            assert_error(await client.post("/v2/nothing", json={}), "not_found", param=None)
            assert_error(await client.post("/metrics", json={}), "method_not_allowed", param=None)
            assert_error(await client.get("/v1/models/m:predict"), "method_not_allowed", param=None)
            assert_error(await client.post("/v1/models/m:explain", json={"instances": ["x"]}), "not_found", param=None)
            assert (await client.get("/metrics")).status_code == 200
            for path, body in VALID_MODEL_WORK.items():
                assert_error(await client.post(path, json=body), "overloaded", param=None)
        assert app.state.admission.active == 0

    asyncio.run(run())


# a valid request for every model-work route (tests/test_routing.py: FACTS)
VALID_MODEL_WORK = {
    "/v1/models/m:predict": {"instances": ["x"]},
    "/v2/models/m/infer": {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["x"]}]},
    "/v2/models/m/versions/1/infer": {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["x"]}]},
    "/v2/models/m/generate": {"text_input": "x"},
    "/v2/models/m/versions/1/generate": {"text_input": "x"},
    "/v2/models/m/generate_stream": {"text_input": "x"},
    "/v2/models/m/versions/1/generate_stream": {"text_input": "x"},
    "/openai/v1/completions": {"model": "m", "prompt": "x"},
    "/openai/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
    "/openai/v1/embeddings": {"model": "m", "input": "x"},
    "/openai/v1/rerank": {"model": "m", "query": "q", "documents": ["d"]},
    "/openai/v1/score": {"model": "m", "text_1": "a", "text_2": "b"},
}


def test_every_model_work_route_takes_a_slot():
    """Every route declared as model work is listed above, so the test before reaches its admission."""
    index = in_process_app().router.middleware_stack  # the route index: every route with its full path
    declared = {
        entry.path.replace("{name}", "m").replace("{name:model}", "m").replace("{version}", "1")
        for entry in index.routes
        if entry.route.facts.model_work
    }
    assert declared == set(VALID_MODEL_WORK)


def test_invalid_requests_are_answered_while_every_slot_is_busy():
    """A malformed request is not queued behind model work nor refused as overloaded: it gets
    its invalid_request at once, on every model-work route, with the one slot taken and a queue
    it could wait in."""
    app = in_process_app(max_concurrent_requests=1, max_queue_size=4)

    async def run() -> None:
        async with app.state.admission.slot(), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            for path, body in VALID_MODEL_WORK.items():
                bad = {**body, "no_such_field": 1}
                resp = await asyncio.wait_for(client.post(path, json=bad), 5)
                assert_error(resp, "invalid_request")
                assert_error(await asyncio.wait_for(client.post(path, content=b"{not json"), 5), "invalid_request")
            assert app.state.admission.waiting == 0
        assert app.state.admission.active == 0

    asyncio.run(run())


def test_api_key_only_on_the_routes_that_need_it():
    """Without the key: a route that does not exist is 404 and a route's wrong method 405 (no
    route asked for a key); public routes answer; the others are invalid_api_key."""
    app = in_process_app(api_key="s3cret-key")

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert_error(await client.post("/v2/nothing", json={}), "not_found", param=None)
            assert_error(await client.get("/openai/v1/embeddings"), "method_not_allowed", param=None)
            for path in ["/", "/metrics", "/v2/health/live", "/v1/models/m"]:
                assert (await client.get(path)).status_code == 200, path
            assert_error(await client.get("/v2/models"), "invalid_api_key", param=None)
            assert_error(await client.post("/v1/models/m:explain", json={}), "invalid_api_key", param=None)

    asyncio.run(run())


# --------------------------------------------------------------------- timeout
def test_timeout_on_every_family_and_work_is_cancelled(server_factory):
    server = server_factory("llama", "--backend", "huggingface", "--request_timeout_seconds", "0.1",
                            "--max_concurrent_requests", "1", name="llama_deadline")
    cases = [
        ("/openai/v1/completions", {"model": "llama_deadline", **LONG_GEN}),
        ("/openai/v1/chat/completions", {"model": "llama_deadline", "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 240, "n": 8, "ignore_eos": True}),
        ("/v1/models/llama_deadline:predict", {"instances": ["hi"] * 16, "parameters": {"max_tokens": 240, "ignore_eos": True}}),
        ("/v2/models/llama_deadline/generate", {"text_input": "hi", "max_tokens": 250, "ignore_eos": True}),
    ]
    for path, body in cases:
        started = time.monotonic()
        resp = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        elapsed = time.monotonic() - started
        msg = assert_error(resp, "timeout", param=None)
        assert "0.1 seconds" in msg
        assert elapsed < 5
    # the abandoned generations were cancelled: with one slot, a short request is served at once
    ok = httpx.post(f"{server.openai_url}/completions", json={"model": "llama_deadline", "prompt": "x", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200


def test_timeout_mid_stream_is_reported_in_the_stream(server_factory):
    server = server_factory("llama", "--backend", "huggingface", name="llama_hdr")
    body = {"model": "llama_hdr", **LONG_GEN, "stream": True}
    with httpx.stream("POST", f"{server.openai_url}/completions", json=body, headers={"x-request-timeout": "1"},
                      timeout=60) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "timeout" and err["type"] == "server_error"
    assert len(events) > 2  # some tokens came before the deadline


def test_timeout_header_is_validated(llama):
    routes = [
        ("/openai/v1/completions", {"model": "llama", "prompt": "x"}),
        ("/v1/models/llama:predict", {"instances": ["x"]}),
        ("/v2/models/llama/generate", {"text_input": "x"}),
    ]
    for path, body in routes:
        for bad in ["soon", "-1", "0", "1e9"]:
            resp = httpx.post(f"{llama.url}{path}", json=body, headers={"x-request-timeout": bad}, timeout=30)
            msg = assert_error(resp, "invalid_request", param=None)
            assert "x-request-timeout" in msg


# --------------------------------------------------------------------- api key
@pytest.fixture(scope="module")
def keyed(server_factory):
    return server_factory("bert_cls", "--api_key", "s3cret-key", name="keyed")


def test_api_key_protects_model_routes(keyed):
    good = {"Authorization": "Bearer s3cret-key"}
    for headers in [None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}]:
        for method, path, body in [
            ("POST", "/v1/models/keyed:predict", {"instances": ["x"]}),
            ("POST", "/v2/models/keyed/infer", {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}),
            ("GET", "/v2/models/keyed", None),
            ("POST", "/openai/v1/embeddings", {"model": "keyed", "input": "x"}),
            ("GET", "/openai/v1/models", None),
        ]:
            resp = httpx.request(method, f"{keyed.url}{path}", json=body, headers=headers, timeout=30)
            msg = assert_error(resp, "invalid_api_key", param=None)
            assert "s3cret" not in msg
    ok = httpx.post(f"{keyed.url}/v1/models/keyed:predict", json={"instances": ["x"]}, headers=good, timeout=30)
    assert ok.status_code == 200
    for path in ["/", "/metrics", "/v2/health/live", "/v2/health/ready", "/v2/models/keyed/ready", "/v1/models/keyed"]:
        assert httpx.get(f"{keyed.url}{path}", timeout=30).status_code == 200, path
    log = keyed.log()
    assert '"POST /v1/models/keyed:predict" 401' in log  # the log holds these requests...
    assert "s3cret-key" not in log  # ...and never the key


def test_api_key_with_real_clients(keyed):
    c = openai.OpenAI(base_url=keyed.openai_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        c.models.list()
    assert exc.value.code == "invalid_api_key"
    c = openai.OpenAI(base_url=keyed.openai_url, api_key="s3cret-key", max_retries=0)
    assert [m.id for m in c.models.list().data] == ["keyed"]
    t = triton.InferenceServerClient(keyed.http_host)
    inp = triton.InferInput("input-0", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        t.infer("keyed", [inp])
    assert e.value.status() == "401"
    assert t.infer("keyed", [inp], headers={"Authorization": "Bearer s3cret-key"}).as_numpy("output-0").shape == (1,)


# ------------------------------------------------------------ graceful shutdown
def test_sigterm_drains_in_flight_streams_then_exits_zero(models, log_dir):
    server = start_server(models["llama"], "draining", log_dir, "--backend", "huggingface", "--shutdown_grace_seconds", "60")
    t, holder, release = hold_stream(server, "draining")
    try:
        assert holder["started"].wait(60)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        ready = httpx.get(f"{server.url}/v2/health/ready", timeout=10)
        assert_error(ready, "model_not_ready", param=None)
        new = httpx.post(f"{server.openai_url}/completions", json={"model": "draining", "prompt": "x"}, timeout=10)
        assert_error(new, "model_not_ready", param=None)
        assert server.proc.poll() is None  # still serving the stream
    finally:
        release.set()
        t.join(120)
    assert holder["status"] == 200
    assert holder["rest"][-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in holder["rest"][:-1]]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"] == "length"]
    assert sorted(finished) == list(range(64))  # every one of the 8 x 8 sequences ran to the end
    assert server.proc.wait(60) == 0
    stop_server(server)
