"""A bounded load test on loopback: mixed good and bad requests (streams included) at
concurrency 32 for about a minute (HFSERVE_LOAD_SECONDS). It fails on any connection error,
any answer outside the contract, any lost request, or memory growth beyond the bound, and it
prints the figures (requests/s, errors by class, p50/p99, memory). docs/load.md records a run."""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from collections import Counter

import httpx

from tests.contract import CODES

CONCURRENCY = 32
SECONDS = float(os.environ.get("HFSERVE_LOAD_SECONDS", "60"))
MEMORY_GROWTH_BOUND_MB = 300


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def kinds(name: str) -> list[tuple[str, str, str, object, int | None]]:
    """(label, method, path, body, expected status)"""
    return [
        ("completion", "POST", "/openai/v1/completions", {"model": name, "prompt": "hello", "max_tokens": 4}, 200),
        ("chat_stream", "POST", "/openai/v1/chat/completions",
         {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}, 200),
        ("v1_predict", "POST", f"/v1/models/{name}:predict", {"instances": ["hi"], "parameters": {"max_tokens": 3}}, 200),
        ("v2_generate_stream", "POST", f"/v2/models/{name}/generate_stream", {"text_input": "hi", "max_tokens": 3}, 200),
        ("ready", "GET", "/v2/health/ready", None, 200),
        ("bad_temperature", "POST", "/openai/v1/completions", {"model": name, "prompt": "x", "temperature": -1}, 400),
        ("unknown_model", "POST", "/v1/models/ghost:predict", {"instances": ["x"]}, 404),
        ("malformed", "POST", f"/v2/models/{name}/infer", b"{oops", 400),
        ("no_route", "GET", "/v3/nothing", None, 404),
        ("too_long", "POST", "/openai/v1/completions", {"model": name, "prompt": "x", "max_tokens": 10_000}, 400),
    ]


def contract_violation(label: str, resp: httpx.Response, body: bytes, expected: int | None) -> str | None:
    if expected is not None and resp.status_code != expected:
        return f"{label}: status {resp.status_code}, expected {expected}: {body[:200]!r}"
    if not resp.headers.get("x-request-id"):
        return f"{label}: no x-request-id"
    if resp.status_code >= 400:
        code = resp.headers.get("x-error-code")
        if code not in CODES or CODES[code] != resp.status_code:
            return f"{label}: bad x-error-code {code}"
        data = json.loads(body)
        if resp.request.url.path.startswith("/openai/"):
            if set(data) != {"error"} or set(data["error"]) != {"message", "type", "param", "code"}:
                return f"{label}: not an OpenAI error body: {data}"
        elif set(data) != {"error"} or not isinstance(data["error"], str):
            return f"{label}: not a KServe error body: {data}"
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        text = body.decode()
        events = [line for line in text.split("\n") if line.startswith("data: ")]
        if not events or any('"error"' in e for e in events):
            return f"{label}: stream without events or with an error: {text[-200:]}"
        if label == "chat_stream" and events[-1] != "data: [DONE]":
            return f"{label}: stream did not end with [DONE]"
    return None


async def run_load(url: str, name: str, seconds: float) -> dict:
    rng = random.Random(1234)
    menu = kinds(name)
    sent = answered = 0
    latencies: list[float] = []
    statuses: Counter = Counter()
    codes: Counter = Counter()
    violations: list[str] = []
    failures: list[str] = []
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal sent, answered
            while time.monotonic() < stop_at:
                label, method, path, body, expected = rng.choice(menu)
                kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
                sent += 1
                started = time.perf_counter()
                try:
                    async with client.stream(method, path, **kwargs) as resp:
                        data = await resp.aread()
                except httpx.HTTPError as exc:  # connection reset, timeout, ...
                    failures.append(f"{label}: {type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - started)
                answered += 1
                statuses[resp.status_code] += 1
                if resp.status_code >= 400:
                    codes[resp.headers.get("x-error-code")] += 1
                problem = contract_violation(label, resp, data, expected)
                if problem:
                    violations.append(problem)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "sent": sent,
        "answered": answered,
        "elapsed_s": round(elapsed, 1),
        "requests_per_s": round(answered / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
        "statuses": dict(statuses),
        "errors_by_class": dict(codes),
        "violations": violations[:10],
        "connection_failures": failures[:10],
    }


def test_bounded_load(server_factory):
    server = server_factory("llama", "--backend", "huggingface", name="llama_load")
    pid = server.proc.pid
    # warm up, then measure memory before
    httpx.post(f"{server.openai_url}/completions", json={"model": "llama_load", "prompt": "hi", "max_tokens": 4}, timeout=60)
    before = rss_mb(pid)
    report = asyncio.run(run_load(server.url, "llama_load", SECONDS))
    after = rss_mb(pid)
    report["rss_before_mb"], report["rss_after_mb"] = round(before, 1), round(after, 1)
    print("\nLOAD REPORT " + json.dumps(report, indent=2))
    assert not report["connection_failures"], report["connection_failures"]
    assert not report["violations"], report["violations"]
    assert report["sent"] == report["answered"], "requests were lost"
    assert report["answered"] > CONCURRENCY
    assert after - before < MEMORY_GROWTH_BOUND_MB, f"server memory grew {after - before:.0f} MB"
    assert server.proc.poll() is None
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
