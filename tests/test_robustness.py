"""Issue 16 part 4: no request, however malformed or long, stops the scheduler.

``transformers serve``'s continuous-batching worker died on a request longer than its context and
answered 503 to every later request. Here the worst requests the error contract knows (over-long
prompts as text and as token ids, ``max_tokens`` far beyond the context, token ids outside the
vocabulary, limits exceeded, malformed bodies, invalid constraints, clients that go away mid-stream,
and bursts of all of them at once) are sent to the session's running server of each backend, on
the OpenAI and KServe v2 routes. Each gets its contract error; and after each batch of them the
same server is still ready and answers a greedy completion exactly as it did before any of them.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from typing import Any

import httpx
import pytest

from tests.contract import assert_error
from tests.servers import ServerHandle

MODEL = "llama"
CONTEXT = 256  # the fixture Llama's context length on both session servers
VOCAB = 1024
LONG_TEXT = "hello " * 2000  # ~8000 tokens
LONG_IDS = [5] * 5000

#: the request whose answer must not change: greedy, so deterministic on either backend
PROBE = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True}

_before: dict[str, dict[str, Any]] = {}


@pytest.fixture
def server(llama_any: ServerHandle) -> ServerHandle:
    """The session's tiny Llama on each backend in turn, with its answer to PROBE taken before any
    request of this module reached it."""
    if llama_any.url not in _before:
        _before[llama_any.url] = _probe(llama_any)
    return llama_any


def _probe(server: ServerHandle) -> dict[str, Any]:
    r = httpx.post(f"{server.openai_url}/completions", json=PROBE, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "usage": r.json()["usage"]}


def _running(server: ServerHandle) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    match = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
    assert match, "no vllm:num_requests_running on /metrics"
    return float(match.group(1))


def assert_still_serves(server: ServerHandle) -> None:
    """Ready, the same answer to PROBE as before the bad requests, and nothing left running in the
    engine (cancelled and refused requests hold no rows)."""
    assert server.proc.poll() is None, f"the server exited:\n{server.log()[-3000:]}"
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 200
    assert _probe(server) == _before[server.url]
    deadline = time.monotonic() + 30
    while _running(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(server) == 0


def _post(server: ServerHandle, path: str, body: Any = None, *, content: bytes | None = None) -> httpx.Response:
    if content is not None:
        return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"}, timeout=120)
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


COMPLETIONS = "/openai/v1/completions"
CHAT = "/openai/v1/chat/completions"
GENERATE = f"/v2/models/{MODEL}/generate"
GENERATE_STREAM = f"/v2/models/{MODEL}/generate_stream"
INFER = f"/v2/models/{MODEL}/infer"


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, **fields}


def _chat(content: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def _infer(text: str, **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [text]}]}
    if parameters:
        body["parameters"] = parameters
    return body


BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}

#: (id, route, JSON body or raw bytes, the contract code it must get)
BAD_REQUESTS: list[tuple[str, str, Any, str]] = [
    # longer than the context: as text, as token ids, one prompt of several, on every generating route
    ("long-text", COMPLETIONS, _completion(prompt=LONG_TEXT), "context_length_exceeded"),
    ("long-ids", COMPLETIONS, _completion(prompt=LONG_IDS), "context_length_exceeded"),
    ("long-one-of-several-texts", COMPLETIONS, _completion(prompt=["hi", LONG_TEXT]), "context_length_exceeded"),
    ("long-one-of-several-ids", COMPLETIONS, _completion(prompt=[[5, 6], LONG_IDS]), "context_length_exceeded"),
    ("exactly-the-context", COMPLETIONS, _completion(prompt=[5] * CONTEXT, max_tokens=None), "context_length_exceeded"),
    ("long-chat", CHAT, _chat(LONG_TEXT), "context_length_exceeded"),
    ("long-generate", GENERATE, {"text_input": LONG_TEXT, "parameters": {"max_tokens": 4}}, "context_length_exceeded"),
    (
        "long-generate-stream",
        GENERATE_STREAM,
        {"text_input": LONG_TEXT, "parameters": {"max_tokens": 4}},
        "context_length_exceeded",
    ),
    ("long-infer", INFER, _infer(LONG_TEXT), "context_length_exceeded"),
    # max_tokens far beyond the context
    ("max-tokens-1e9", COMPLETIONS, _completion(max_tokens=10**9), "context_length_exceeded"),
    ("max-tokens-2**63", COMPLETIONS, _completion(max_tokens=2**63), "context_length_exceeded"),
    ("max-completion-tokens-1e9", CHAT, _chat(max_completion_tokens=10**9, max_tokens=None), "context_length_exceeded"),
    ("max-tokens-generate", GENERATE, {"text_input": "hi", "parameters": {"max_tokens": 10**9}}, "context_length_exceeded"),
    ("max-tokens-infer", INFER, _infer("hi", max_tokens=10**9), "context_length_exceeded"),
    # token ids outside the vocabulary
    ("id-vocab-size", COMPLETIONS, _completion(prompt=[5, VOCAB]), "invalid_request"),
    ("id-1e6", COMPLETIONS, _completion(prompt=[5, 10**6]), "invalid_request"),
    ("id-negative", COMPLETIONS, _completion(prompt=[5, -1]), "invalid_request"),
    ("id-2**63", COMPLETIONS, _completion(prompt=[5, 2**63]), "invalid_request"),
    ("id-in-batch", COMPLETIONS, _completion(prompt=[[5, 6], [7, VOCAB + 5]]), "invalid_request"),
    # limits
    ("n-1e6", COMPLETIONS, _completion(n=10**6), "invalid_request"),
    ("n-1e6-chat", CHAT, _chat(n=10**6), "invalid_request"),
    ("logprobs-1e6", COMPLETIONS, _completion(logprobs=10**6), "invalid_request"),
    ("top-logprobs-1e6", CHAT, _chat(logprobs=True, top_logprobs=10**6), "invalid_request"),
    ("stop-list-10000", COMPLETIONS, _completion(stop=["x" * 10] * 10000), "invalid_request"),
    ("min-tokens-over-max", COMPLETIONS, _completion(min_tokens=10**9), "invalid_request"),
    ("seed-2**64", COMPLETIONS, _completion(seed=2**64), "invalid_request"),
    # malformed bodies
    ("malformed-json", COMPLETIONS, b'{"model": "llama", "prompt": ', "invalid_request"),
    ("invalid-utf8", COMPLETIONS, b'{"model": "llama", "prompt": "\xff\xfe"}', "invalid_request"),
    ("nan", COMPLETIONS, b'{"model": "llama", "prompt": "hi", "max_tokens": 4, "temperature": NaN}', "invalid_request"),
    ("array-body", COMPLETIONS, b"[1, 2, 3]", "invalid_request"),
    ("malformed-json-infer", INFER, b'{"inputs": [', "invalid_request"),
    ("invalid-utf8-infer", INFER, b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","data":["\xff"]}]}', "invalid_request"),
    ("invalid-utf8-generate", GENERATE, b'{"text_input": "\xc3\x28"}', "invalid_request"),
    # wrong types
    ("wrong-types", COMPLETIONS, _completion(prompt={"a": 1}, max_tokens="many", temperature="hot"), "invalid_request"),
    ("wrong-types-chat", CHAT, {"model": MODEL, "messages": "hi", "max_tokens": 4}, "invalid_request"),
    ("wrong-types-generate", GENERATE, {"text_input": 5, "parameters": "x"}, "invalid_request"),
    (
        "shape-mismatch-infer",
        INFER,
        {"inputs": [{"name": "t", "shape": [3], "datatype": "BYTES", "data": ["a"]}]},
        "invalid_request",
    ),
    # empty prompts
    ("empty-ids", COMPLETIONS, _completion(prompt=[]), "invalid_request"),
    ("empty-messages", CHAT, {"model": MODEL, "messages": [], "max_tokens": 4}, "invalid_request"),
    # constraints that do not compile
    ("bad-json-schema", CHAT, _chat(response_format=BAD_SCHEMA), "invalid_request"),
    (
        "schema-not-an-object",
        CHAT,
        _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "nope"}}),
        "invalid_request",
    ),
    ("bad-regex", COMPLETIONS, _completion(structured_outputs={"regex": "(unclosed["}), "invalid_request"),
    ("bad-grammar", COMPLETIONS, _completion(structured_outputs={"grammar": "root ::= ("}), "invalid_request"),
    ("empty-choice", COMPLETIONS, _completion(structured_outputs={"choice": []}), "invalid_request"),
    (
        "bad-regex-generate",
        GENERATE,
        {"text_input": "hi", "parameters": {"max_tokens": 4, "structured_outputs": {"regex": "(["}}},
        "invalid_request",
    ),
]


def _send(server: ServerHandle, route: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return _post(server, route, content=body)
    return _post(server, route, {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body)


def test_worst_requests_get_their_contract_error_and_the_scheduler_lives(server):
    failures = []
    for case, route, body, code in BAD_REQUESTS:
        resp = _send(server, route, body)
        try:
            assert_error(resp, code)
        except AssertionError as exc:
            failures.append(f"{case}: {exc} ({resp.status_code} {resp.headers.get('x-error-code')} {resp.text[:200]})")
    assert not failures, "\n".join(failures)
    assert_still_serves(server)


#: requests at the edges of what is valid: they are served (200), and serving them harms nothing
EDGE_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("empty-text-prompt", COMPLETIONS, _completion(prompt="")),
    ("empty-text-generate", GENERATE, {"text_input": "", "parameters": {"max_tokens": 4}}),
    ("one-token-of-room", COMPLETIONS, _completion(prompt=[5] * (CONTEXT - 1), max_tokens=1)),
    ("the-rest-of-the-context", COMPLETIONS, _completion(prompt=[5] * (CONTEXT - 8), max_tokens=None, ignore_eos=True)),
    ("every-limit-at-once", COMPLETIONS, _completion(n=8, logprobs=20, echo=True, temperature=1.0, seed=1)),
    ("highest-vocab-id", COMPLETIONS, _completion(prompt=[VOCAB - 1, 0])),
    ("one-huge-stop-string", COMPLETIONS, _completion(stop="x" * 100_000)),
    ("negative-seed", COMPLETIONS, _completion(seed=-1, temperature=1.0)),
    ("top-k-huge", COMPLETIONS, _completion(top_k=10**9, temperature=1.0)),
    (
        "penalties-at-the-limits",
        COMPLETIONS,
        _completion(frequency_penalty=2, presence_penalty=-2, repetition_penalty=10, temperature=1.0),
    ),
    ("many-prompts", COMPLETIONS, _completion(prompt=["hi"] * 64, max_tokens=2)),
    ("hard-regex", COMPLETIONS, _completion(structured_outputs={"regex": "(a{1,1000}){1,1000}"})),
    ("tiny-temperature", COMPLETIONS, _completion(temperature=1e-300)),
    ("tiny-top-p", COMPLETIONS, _completion(temperature=1.0, top_p=1e-300)),
]


@pytest.mark.parametrize(("case", "route", "body"), [pytest.param(*row, id=row[0]) for row in EDGE_REQUESTS])
def test_edge_requests_are_served(server, case, route, body):
    resp = _send(server, route, body)
    assert_still_serves(server)
    assert resp.status_code == 200, resp.text[:500]


def test_tiny_temperature_and_top_p_sample_as_vllm(server):
    """As vLLM samples: a temperature between 0 and 0.01 is raised to 0.01 (vLLM's SamplingParams),
    so a seeded answer is the one at 0.01; and top-p keeps at least the most likely token, so a top-p
    that rounds to 0 answers as temperature 0 does. The same on both backends."""

    def texts(**fields: Any) -> list[str]:
        resp = _post(server, COMPLETIONS, {**PROBE, **fields})
        assert resp.status_code == 200, resp.text[:500]
        return [choice["text"] for choice in resp.json()["choices"]]

    assert texts(temperature=1e-300, seed=7, n=2) == texts(temperature=0.01, seed=7, n=2)
    assert texts(temperature=1.0, top_p=1e-300, n=3) == [_before[server.url]["text"]] * 3


def test_deeply_nested_json(server):
    body = b'{"model": "llama", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = _post(server, COMPLETIONS, content=body)
    assert_still_serves(server)
    assert "nests arrays and objects deeper than" in assert_error(resp, "invalid_request")


# ----------------------------------------------------------------- clients that go away
STREAMS = [
    (COMPLETIONS, _completion(max_tokens=200, ignore_eos=True, stream=True)),
    (CHAT, _chat(max_tokens=200, ignore_eos=True, stream=True)),
    (COMPLETIONS, _completion(max_tokens=200, ignore_eos=True, stream=True, n=3, logprobs=5, temperature=1.0)),
    (CHAT, _chat(max_tokens=200, ignore_eos=True, stream=True, response_format={"type": "json_object"})),
    (GENERATE_STREAM, {"text_input": "hi", "parameters": {"max_tokens": 200, "ignore_eos": True}}),
]


def _disconnect_after_first_chunk(server: ServerHandle, route: str, body: dict[str, Any]) -> None:
    with httpx.stream("POST", f"{server.url}{route}", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                return  # closing the stream here drops the connection mid-generation
    raise AssertionError(f"{route}: the stream ended before its first event")


def test_clients_that_disconnect_mid_stream(server):
    for route, body in STREAMS:
        _disconnect_after_first_chunk(server, route, body)
    assert_still_serves(server)


# ----------------------------------------------------------------- all of it at once
def test_concurrent_bursts(server):
    """Bad requests, edge requests, disconnecting streams and good requests at once, three times
    over: the good ones are answered in full, the bad ones refused, and nothing is left running."""
    jobs: list[tuple[str, Any]] = []
    for _case, route, body, code in BAD_REQUESTS:
        jobs.append((code, (route, body)))
    for _case, route, body in EDGE_REQUESTS:
        jobs.append(("ok", (route, body)))
    for route, body in STREAMS:
        jobs.append(("disconnect", (route, body)))
    good = _completion(max_tokens=16, ignore_eos=True, temperature=0)
    jobs += [("good", (COMPLETIONS, good))] * 8
    jobs = jobs * 3

    def run(job: tuple[str, Any]) -> str | None:
        expect, (route, body) = job
        try:
            if expect == "disconnect":
                _disconnect_after_first_chunk(server, route, body)
                return None
            resp = _send(server, route, body)
            if expect == "good":
                assert resp.status_code == 200, resp.text[:300]
                assert resp.json()["usage"]["completion_tokens"] == 16
            elif expect == "ok":
                assert resp.status_code == 200, resp.text[:300]
            else:
                try:
                    assert_error(resp, expect)
                except AssertionError as exc:
                    raise AssertionError(
                        f"{exc} ({resp.status_code} {resp.headers.get('x-error-code')} {resp.text[:200]})"
                    ) from None
        except AssertionError as exc:
            return f"{expect} {route}: {exc}"
        return None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        failures = [f for f in pool.map(run, jobs) if f]
    assert not failures, "\n".join(failures[:20])
    assert_still_serves(server)
