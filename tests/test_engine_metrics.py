"""vLLM's engine metrics on /metrics on both backends (issue 15 part 4), and the transformers
backend's stall watchdog (part 5).

The transformers backend computes them in its scheduler (hfserve/backends/stats.py); the vLLM
backend serves vLLM's own Prometheus stat logger. After known traffic the counters equal the usage
the responses reported; during a flood ``running`` and ``waiting`` are what ``--max-num-seqs``
says; after a timeout or a dropped stream nothing stays running.
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, VLLM_INSTALLED, needs_vllm
from tests.servers import start_server, stop_server

ENGINE_METRICS = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:request_success",
)


def scrape(server) -> dict[str, list]:
    """Families by name (counters without ``_total``, as the parser names them)."""
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(families, name: str, sample: str | None = None, **labels: str) -> float:
    found = [
        s.value
        for s in families.get(name, [])
        if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, sample, labels, families.get(name))
    return found[0]


def counters(server) -> dict[str, float]:
    f = scrape(server)
    m = server.name
    return {
        "prompt": value(f, "vllm:prompt_tokens", "vllm:prompt_tokens_total", model_name=m),
        "generation": value(f, "vllm:generation_tokens", "vllm:generation_tokens_total", model_name=m),
        "stop": value(f, "vllm:request_success", "vllm:request_success_total", model_name=m, finished_reason="stop"),
        "length": value(f, "vllm:request_success", "vllm:request_success_total", model_name=m, finished_reason="length"),
        "abort": value(f, "vllm:request_success", "vllm:request_success_total", model_name=m, finished_reason="abort"),
        "e2e": value(f, "vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count", model_name=m),
        "ttft": value(f, "vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count", model_name=m),
    }


def gauges(server) -> tuple[float, float, float]:
    f = scrape(server)
    m = server.name
    return (
        value(f, "vllm:num_requests_running", model_name=m),
        value(f, "vllm:num_requests_waiting", model_name=m),
        value(f, "vllm:kv_cache_usage_perc", model_name=m),
    )


def wait_for(check, timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"not reached within {timeout}s (last: {last})")


def idle(server) -> bool:
    running, waiting, _ = gauges(server)
    return running == 0 and waiting == 0


@pytest.fixture(params=["huggingface", pytest.param("vllm", marks=needs_vllm)])
def llama_any(request):
    return request.getfixturevalue("llama_hf" if request.param == "huggingface" else "llama_vllm")


def test_metrics_served_with_vllm_names_and_no_created_series(llama_any):
    complete(llama_any, "Hello world", max_tokens=3)
    text = httpx.get(f"{llama_any.url}/metrics", timeout=30).text
    families = scrape(llama_any)
    for name in ENGINE_METRICS:
        assert name in families, name
        assert any(s.labels.get("model_name") == llama_any.name for s in families[name]), name
    assert "hfserve_requests_total" in text  # hfserve's own per-family metrics stay
    assert "_created" not in text
    buckets = [s.labels["le"] for s in families["vllm:time_to_first_token_seconds"] if s.name.endswith("_bucket")]
    assert buckets[:3] == ["0.001", "0.005", "0.01"] and buckets[-1] == "+Inf"


def complete(server, prompt: str, **body) -> dict:
    body.setdefault("model", server.name)
    r = httpx.post(f"{server.openai_url}/completions", json={"prompt": prompt, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_counters_equal_reported_usage(llama_any):
    wait_for(lambda: idle(llama_any))
    before = counters(llama_any)
    answers = [
        complete(llama_any, "Hello world", max_tokens=7, temperature=0),
        complete(llama_any, "Once upon a time", max_tokens=4, temperature=0),
        complete(llama_any, "a b c d e f", max_tokens=1, temperature=0),
    ]
    prompt = sum(a["usage"]["prompt_tokens"] for a in answers)
    generated = sum(a["usage"]["completion_tokens"] for a in answers)
    reasons = [a["choices"][0]["finish_reason"] for a in answers]

    def settled():  # vLLM's stats reach its logger with the engine's next output batch
        after = counters(llama_any)
        return after if after["e2e"] - before["e2e"] >= 3 else None

    after = wait_for(settled, timeout=15)
    assert after["prompt"] - before["prompt"] == prompt
    assert after["generation"] - before["generation"] == generated
    assert after["stop"] - before["stop"] == reasons.count("stop")
    assert after["length"] - before["length"] == reasons.count("length")
    assert after["ttft"] - before["ttft"] == 3
    wait_for(lambda: idle(llama_any))


def test_dropped_stream_leaves_nothing_running(llama_any):
    wait_for(lambda: idle(llama_any))
    before = counters(llama_any)
    body = {"model": llama_any.name, "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{llama_any.openai_url}/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one event, then the client goes away
    wait_for(lambda: idle(llama_any), timeout=20)
    time.sleep(0.5)
    after = counters(llama_any)
    # as on vLLM: an aborted request is no success and has no e2e latency; its prompt and tokens count
    assert (after["stop"], after["length"], after["abort"], after["e2e"]) == (before["stop"], before["length"], before["abort"], before["e2e"])
    assert after["ttft"] == before["ttft"] + 1 and after["generation"] > before["generation"]


# ------------------------------------------------------------------ transformers: a flood, a timeout, a stall
@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    return tmp_path_factory.mktemp("gate") / "hang"


@pytest.fixture(autouse=True)
def _gate_opens_after_each_test(request):
    """A failing test must not leave the forward passes hanging for the next ones."""
    yield
    if "gate" in request.fixturenames:
        request.getfixturevalue("gate").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def gated(models, log_dir, gate):
    """hfserve (transformers) whose forward passes hang while ``gate`` exists (tests/stall_server.py)."""
    handle = start_server(
        models["llama"],
        "gated",
        log_dir,
        "--backend",
        "huggingface",
        "--max-num-seqs",
        "2",
        # a batch window that waits for every request a test sends at once, so they are all in the
        # scheduler before the first forward pass hangs (tokenizing a late one would wait behind it)
        "--max_batch_wait_ms",
        "3000",
        "--batch_idle_ms",
        "1000",
        "--stall_timeout_seconds",
        # longer than any test here holds the gate before all its requests are in (else the stall
        # refuses the late ones), short enough for test_flood_and_stall to wait for
        "6",
        "--enable-lora",
        "--lora-modules",
        f"a={models['llama_lora_a']}",
        entry=[sys.executable, str(ROOT / "tests" / "stall_server.py")],
        env={"HFSERVE_TEST_GATE": str(gate)},
    )
    yield handle
    gate.unlink(missing_ok=True)
    assert stop_server(handle) == 0


def ready(server) -> int:
    return httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code


def test_flood_and_stall(gated, gate):
    """6 requests with --max-num-seqs 2 while the forward pass hangs: 2 running, 4 waiting; after
    --stall_timeout_seconds readiness turns 503 and the log says why; it returns with progress."""
    gate.touch()
    before = counters(gated)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(complete, gated, f"Hello world {i}", max_tokens=5, temperature=0) for i in range(6)]
        wait_for(lambda: gauges(gated)[:2] == (2, 4), timeout=30)
        wait_for(lambda: ready(gated) == 503, timeout=20)
        assert "no progress" in gated.log() and "--stall_timeout_seconds" in gated.log()
        # a new model request is refused while stalled; liveness stays
        r = httpx.post(f"{gated.openai_url}/completions", json={"model": "gated", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert httpx.get(f"{gated.url}/v2/health/live", timeout=10).status_code == 200
        # while the first two decode, the others wait: running never exceeds the limit
        gate.unlink()
        answers = [f.result(timeout=120) for f in futures]
    wait_for(lambda: ready(gated) == 200, timeout=15)
    assert "making progress again" in gated.log()
    wait_for(lambda: idle(gated), timeout=15)
    after = counters(gated)
    assert after["prompt"] - before["prompt"] == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert after["generation"] - before["generation"] == sum(a["usage"]["completion_tokens"] for a in answers)
    assert after["e2e"] - before["e2e"] == 6
    assert gauges(gated)[2] == 0


def lora_info(server) -> list[dict[str, str]]:
    return [s.labels for s in scrape(server)["vllm:lora_requests_info"]]


def test_lora_requests_info(gated, gate):
    """The adapters of the running and the waiting requests, and --max-loras (1 by default)."""
    wait_for(lambda: idle(gated))
    assert lora_info(gated) == [{"max_lora": "1", "waiting_lora_adapters": "", "running_lora_adapters": ""}]
    gate.touch()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(complete, gated, "Hello", model="a", max_tokens=3)]
        wait_for(lambda: gauges(gated)[:2] == (1, 0))  # the adapter's request is being prefilled
        futures.append(pool.submit(complete, gated, "Hello", max_tokens=3))
        futures.append(pool.submit(complete, gated, "Hello", model="a", max_tokens=3))
        wait_for(lambda: gauges(gated)[:2] == (1, 2))
        assert lora_info(gated) == [{"max_lora": "1", "waiting_lora_adapters": "a", "running_lora_adapters": "a"}]
        gate.unlink()
        assert [f.result(timeout=60)["model"] for f in futures] == ["a", "gated", "a"]
    wait_for(lambda: idle(gated))
    assert lora_info(gated) == [{"max_lora": "1", "waiting_lora_adapters": "", "running_lora_adapters": ""}]


def test_kv_cache_usage_while_decoding(gated, gate, models):
    """kv_cache_usage_perc = positions held / (max_num_seqs * max_model_len): a request hung in its
    decode step after k tokens holds its prompt and k - 1 generated tokens in the cache."""
    wait_for(lambda: idle(gated))
    max_model_len = json.loads((models["llama"] / "config.json").read_text())["max_position_embeddings"]
    body = {
        "model": "gated", "prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }  # fmt: skip
    usages: list[dict] = []

    def read() -> None:
        with httpx.stream("POST", f"{gated.openai_url}/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:]).get("usage"):
                    usages.append(json.loads(line[6:])["usage"])
                    if len(usages) == 3:
                        gate.touch()  # the next forward pass hangs: no more events until it is removed

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reader = pool.submit(read)
        try:
            wait_for(lambda: gate.exists())
            count = -1
            while count != len(usages):  # until the events stop
                count = len(usages)
                time.sleep(1)
            usage = usages[-1]
            assert 3 <= usage["completion_tokens"] < 100
            running, waiting, kv = gauges(gated)
            assert (running, waiting) == (1, 0)
            held = usage["prompt_tokens"] + usage["completion_tokens"] - 1
            assert kv == pytest.approx(held / (2 * max_model_len))
        finally:
            gate.unlink(missing_ok=True)
        reader.result(timeout=60)
    assert usages[-1]["completion_tokens"] == 100
    wait_for(lambda: idle(gated), timeout=15)
    assert gauges(gated)[2] == 0


def test_timeout_leaves_nothing_running(gated, gate):
    wait_for(lambda: idle(gated))
    gate.touch()
    try:
        r = httpx.post(
            f"{gated.openai_url}/completions",
            json={"model": "gated", "prompt": "Hello", "max_tokens": 50},
            headers={"x-request-timeout": "1"},
            timeout=30,
        )
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    finally:
        gate.unlink(missing_ok=True)
    wait_for(lambda: idle(gated), timeout=15)
    wait_for(lambda: ready(gated) == 200, timeout=15)


def test_stall_flag(models, capsys):
    from hfserve.cli import build_parser, resolve

    model = str(models["llama"])
    config = resolve(build_parser().parse_args(["--model_dir", model, "--stall-timeout-seconds", "7"]))
    assert config.batching.stall_timeout_seconds == 7
    assert resolve(build_parser().parse_args(["--model_dir", model])).batching.stall_timeout_seconds == 60
    with pytest.raises(SystemExit) as exc:
        resolve(build_parser().parse_args(["--model_dir", model, "--stall_timeout_seconds", "-1"]))
    assert exc.value.code == 2 and "--stall_timeout_seconds must be zero or positive" in capsys.readouterr().err


# ------------------------------------------------------------------ vLLM: a flood and a timeout on the session's engine
@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed")
def test_vllm_flood_running_and_waiting_follow_max_num_seqs(llama_vllm):
    """Twice --max-num-seqs long requests: vLLM's own gauges show max_num_seqs running and the rest
    waiting, never more running; afterwards nothing runs or waits."""
    from tests.conftest import VLLM_MAX_NUM_SEQS as LIMIT

    wait_for(lambda: idle(llama_vllm))
    seen: list[tuple[float, float, float]] = []
    body = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(2 * LIMIT) as pool:
        futures = [pool.submit(complete, llama_vllm, f"Once upon a time {i}", **body) for i in range(2 * LIMIT)]
        while not all(f.done() for f in futures):
            seen.append(gauges(llama_vllm))
            time.sleep(0.02)
        answers = [f.result() for f in futures]
    assert all(a["usage"]["completion_tokens"] == 200 for a in answers)
    assert max(running for running, _, _ in seen) == LIMIT
    assert any(running == LIMIT and waiting >= 1 for running, waiting, _ in seen), seen
    assert max(waiting for _, waiting, _ in seen) <= LIMIT
    assert max(usage for _, _, usage in seen) > 0
    wait_for(lambda: idle(llama_vllm), timeout=15)


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed")
def test_vllm_timeout_leaves_nothing_running(llama_vllm):
    wait_for(lambda: idle(llama_vllm))
    body = {"model": llama_vllm.name, "prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(
                httpx.post, f"{llama_vllm.openai_url}/completions", json=body, headers={"x-request-timeout": "0.3"}, timeout=60
            )
            for _ in range(4)
        ]
        answers = [f.result() for f in futures]
    assert {r.status_code for r in answers} == {504}, [r.text for r in answers]
    wait_for(lambda: idle(llama_vllm), timeout=15)


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_INSTALLED, reason="vLLM is not installed")
def test_vllm_lora_requests_info(models, log_dir):
    """vLLM's own vllm:lora_requests_info, without hfserve's all-zero base adapter (its name, its slot)."""
    handle = start_server(
        models["llama"], "lorav", log_dir, "--backend", "vllm", "--max_model_len", "256",
        "--enable-lora", "--max-loras", "1", "--max-lora-rank", "16", "--lora-modules", f"a={models['llama_lora_a']}",
    )  # fmt: skip
    try:
        seen: list[dict[str, str]] = []
        body = {"max_tokens": 200, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(complete, handle, "Hello", model="a", **body), pool.submit(complete, handle, "Hello", **body)]
            while not all(f.done() for f in futures):
                seen.extend(s.labels for s in scrape(handle).get("vllm:lora_requests_info", []))
                time.sleep(0.02)
            assert [f.result()["model"] for f in futures] == ["a", "lorav"]
        assert any(labels["running_lora_adapters"] == "a" for labels in seen), seen
        assert all(labels["max_lora"] == "1" and "__hfserve_base__" not in str(labels) for labels in seen), seen
        assert value(scrape(handle), "vllm:num_requests_running", model_name="lorav") == 0
    finally:
        assert stop_server(handle) == 0
