"""Injected backend faults surface as contract errors on every family, and the server keeps serving.

The server is a real process (tests/fault_server.py: hfserve with a backend that fails on purpose),
so the failures are real exceptions escaping a backend, over HTTP and gRPC.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import uuid

import httpx
import numpy as np
import openai
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from tests.conftest import ROOT
from tests.contract import assert_error
from tests.servers import start_server, stop_server


@pytest.fixture(scope="module")
def faulty_server(models, log_dir):
    handle = start_server(
        models["llama"], "faulty", log_dir, entry=[sys.executable, str(ROOT / "tests" / "fault_server.py")]
    )
    yield handle
    assert stop_server(handle) == 0


@pytest.fixture(scope="module")
def faulty(faulty_server):
    return faulty_server.url


def grpc_infer(server, text: str, **kwargs):
    inp = tgrpc.InferInput("input-0", [1], "BYTES")
    inp.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    with tgrpc.InferenceServerClient(server.grpc_host) as c:
        return c.infer("faulty", [inp], parameters={"max_tokens": 2}, **kwargs)


def test_grpc_family_internal_error_and_deadline(faulty_server):
    with pytest.raises(InferenceServerException) as exc:
        grpc_infer(faulty_server, "FAIL_BEFORE")
    assert exc.value.status() == "StatusCode.INTERNAL"
    assert exc.value.message().startswith("Internal server error (request id ")
    with pytest.raises(InferenceServerException) as exc:
        grpc_infer(faulty_server, "HANG", client_timeout=0.5)
    assert exc.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert grpc_infer(faulty_server, "hi").as_numpy("output-0").shape == (1,)  # still serving


def test_internal_error_before_first_token_on_every_family(faulty):
    cases = [
        ("/openai/v1/completions", {"model": "faulty", "prompt": "FAIL_BEFORE", "max_tokens": 3}),
        ("/openai/v1/completions", {"model": "faulty", "prompt": "FAIL_BEFORE", "max_tokens": 3, "stream": True}),
        ("/openai/v1/chat/completions", {"model": "faulty", "messages": [{"role": "user", "content": "FAIL_BEFORE"}], "stream": True}),
        ("/v1/models/faulty:predict", {"instances": ["FAIL_BEFORE"]}),
        ("/v2/models/faulty/generate", {"text_input": "FAIL_BEFORE"}),
        ("/v2/models/faulty/generate_stream", {"text_input": "FAIL_BEFORE"}),
        ("/v2/models/faulty/infer", {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": ["FAIL_BEFORE"]}]}),
    ]
    for path, body in cases:
        resp = httpx.post(f"{faulty}{path}", json=body, timeout=60)
        msg = assert_error(resp, "internal_error", param=None)
        assert msg == f"Internal server error (request id {resp.headers['x-request-id']})"
        # ... and the server keeps serving
        ok = httpx.post(f"{faulty}/openai/v1/completions", json={"model": "faulty", "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200


def test_mid_stream_error_openai_sdk(faulty):
    client = openai.OpenAI(base_url=f"{faulty}/openai/v1", api_key="x", max_retries=0)
    stream = client.completions.create(model="faulty", prompt="FAIL_MID", max_tokens=10, stream=True, extra_body={"ignore_eos": True})
    got = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            got.append(chunk)
    assert len(got) == 2  # the two steps before the failure arrived
    assert exc.value.message.startswith("Internal server error (request id ")


def test_mid_stream_error_event_shapes(faulty):
    with httpx.stream(
        "POST",
        f"{faulty}/openai/v1/chat/completions",
        json={"model": "faulty", "messages": [{"role": "user", "content": "FAIL_MID"}], "max_tokens": 10, "stream": True,
              "ignore_eos": True},
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])
    assert set(err) == {"error"}
    assert err["error"]["code"] == "internal_error" and err["error"]["type"] == "server_error"
    assert set(err["error"]) == {"message", "type", "param", "code"}

    with httpx.stream(
        "POST", f"{faulty}/v2/models/faulty/generate_stream",
        json={"text_input": "FAIL_MID", "max_tokens": 10, "ignore_eos": True}, timeout=60,
    ) as resp:
        assert resp.status_code == 200
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert "text_output" in events[0]
    assert set(events[-1]) == {"error"} and isinstance(events[-1]["error"], str)
    assert "/secret" not in events[-1]["error"]


def ended_generations(server, request_id: str, count: int) -> list[tuple[str, int, int]]:
    """(how, steps, still running) of the request's generations, from the fault server's log."""
    pattern = re.compile(rf"generation of request {re.escape(request_id)} ended: (\w+) after (\d+) steps; (\d+) running")
    deadline = time.monotonic() + 30
    while True:
        found = [(m[1], int(m[2]), int(m[3])) for m in pattern.finditer(server.log())]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_a_failing_prompt_stops_the_other_prompts_of_its_request(faulty_server):
    """One generation of a request with several prompts fails after two steps: the long one beside
    it is cancelled before the error is answered, and no generation is left running."""
    long = {"max_tokens": 240, "ignore_eos": True}
    prompts = ["FAIL_MID", "once upon a time"]
    cases = [
        ("/openai/v1/completions", {"model": "faulty", "prompt": prompts, **long}),
        ("/v1/models/faulty:predict", {"instances": prompts, "parameters": long}),
        ("/v2/models/faulty/infer", {"inputs": [{"name": "input-0", "shape": [2], "datatype": "BYTES", "data": prompts}],
                                     "parameters": long}),
    ]
    for path, body in cases:
        rid = f"siblings-{uuid.uuid4().hex[:8]}"
        resp = httpx.post(f"{faulty_server.url}{path}", json=body, headers={"x-request-id": rid}, timeout=120)
        assert_error(resp, "internal_error", param=None)
        ended = ended_generations(faulty_server, rid, 2)
        assert sorted(how for how, _, _ in ended) == ["cancelled", "failed"], (path, ended)
        (cancelled_steps,) = [steps for how, steps, _ in ended if how == "cancelled"]
        assert cancelled_steps < 60, f"{path}: the sibling ran {cancelled_steps} of 240 steps"
        assert ended[-1][2] == 0, f"{path}: generations still running: {ended}"
    # gRPC ModelInfer takes the same path
    rid = f"siblings-{uuid.uuid4().hex[:8]}"
    inp = tgrpc.InferInput("input-0", [2], "BYTES")
    inp.set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=np.object_))
    with tgrpc.InferenceServerClient(faulty_server.grpc_host) as c, pytest.raises(InferenceServerException) as exc:
        c.infer("faulty", [inp], parameters=long, headers={"x-request-id": rid})
    assert exc.value.status() == "StatusCode.INTERNAL"
    ended = ended_generations(faulty_server, rid, 2)
    assert sorted(how for how, _, _ in ended) == ["cancelled", "failed"] and ended[-1][2] == 0, ended


def test_error_metrics_count_internal_errors(faulty):
    def count() -> float:
        sample = 'hfserve_errors_total{code="internal_error",family="v1"}'
        lines = [x for x in httpx.get(f"{faulty}/metrics", timeout=30).text.splitlines() if x.startswith(sample)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    before = count()
    httpx.post(f"{faulty}/v1/models/faulty:predict", json={"instances": ["FAIL_BEFORE"]}, timeout=60)
    assert count() == before + 1


def test_event_loop_stays_free_during_generation(llama):
    """Health answers, and a second request completes, while a long generation runs."""
    done = threading.Event()
    result = {}

    def long_generation():
        result["resp"] = httpx.post(
            f"{llama.openai_url}/completions",
            # 24 sequences: long-running, yet leaving room in the batch (--max_batch_size 32) for others
            json={"model": "llama", "prompt": ["hi"] * 3, "n": 8, "max_tokens": 240, "ignore_eos": True},
            timeout=300,
        )
        done.set()

    worker = threading.Thread(target=long_generation)
    worker.start()
    time.sleep(0.2)
    ready = httpx.get(f"{llama.url}/v2/health/ready", timeout=30)
    short = httpx.post(f"{llama.openai_url}/completions", json={"model": "llama", "prompt": "x", "max_tokens": 2}, timeout=300)
    answered_while_running = not done.is_set()
    worker.join()
    assert ready.status_code == 200 and short.status_code == 200
    assert answered_while_running, "health and a second request had to wait for the long generation"
    assert result["resp"].json()["usage"]["completion_tokens"] == 3 * 8 * 240
