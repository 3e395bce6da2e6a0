"""Property-based fuzzing: every route from the server's own OpenAPI document (schemathesis),
plus hypothesis-made v2 tensors and chat messages. No answer may be a 500, and every non-2xx
answer must be a contract error in its family's shape."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.contract import CODES, assert_error

EXAMPLES = 12  # per route; bounded so the suite stays fast on 2 cores

schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema(llama):
    loaded = schemathesis.openapi.from_url(f"{llama.url}/openapi.json")
    loaded.config.update(base_url=llama.url)  # type: ignore[attr-defined]
    return loaded


def header(response, name: str) -> str | None:
    value = response.headers.get(name)
    return value[0] if isinstance(value, list) else value  # schemathesis keeps header lists


def check(response) -> None:
    status = response.status_code
    assert status != 500, f"{response.request.method} {response.request.url}: {response.text[:500]}"
    if status >= 400:
        code = header(response, "x-error-code")
        assert code in CODES, (status, code, response.text[:300])
        assert CODES[code] == status
        path = httpx.URL(str(response.request.url)).path
        family = "openai" if path.startswith("/openai/") else "kserve"
        body = response.json()
        assert "detail" not in body
        if family == "openai":
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["code"] == code
        else:
            assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert header(response, "x-request-id")


MODEL_ROUTES = [
    "/openai/v1/completions",
    "/openai/v1/chat/completions",
    "/openai/v1/embeddings",
    "/openai/v1/rerank",
    "/openai/v1/score",
    "/v1/models/{name}:predict",
    "/v2/models/{name}/infer",
    "/v2/models/{name}/generate",
    "/v2/models/{name}/generate_stream",
]


def test_the_schema_documents_every_model_route(llama):
    """The route fuzzing below draws its cases from this document: a model route missing from it, or
    documented without its body, would be fuzzed with nothing and pass."""
    paths = httpx.get(f"{llama.url}/openapi.json", timeout=30).json()["paths"]
    for route in MODEL_ROUTES:
        body = paths.get(route, {}).get("post", {}).get("requestBody", {})
        assert body.get("content", {}).get("application/json", {}).get("schema"), route


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_every_route_answers_inside_the_contract(case):
    if case.body is not None and isinstance(case.body, dict):
        # keep generations short: the property is about answers, not about long texts
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > 8:
                case.body[key] = 8
        if isinstance(case.body.get("n"), int) and case.body["n"] > 2:
            case.body["n"] = 2
    response = case.call(timeout=120)
    check(response)


# ----------------------------------------------------------- v2 tensors
DATATYPES = ["BYTES", "FP32", "INT64", "BOOL", "FP99", "bytes", ""]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=12))
shapes = st.lists(st.integers(-2, 4), max_size=3)
tensors = st.fixed_dictionaries(
    {"name": st.text(max_size=8), "shape": shapes, "datatype": st.sampled_from(DATATYPES)},
    optional={"data": st.one_of(st.lists(json_scalars, max_size=5), st.lists(st.lists(st.text(max_size=5), max_size=2), max_size=2), json_scalars),
              "parameters": st.dictionaries(st.text(max_size=5), json_scalars, max_size=2)},
)
infer_bodies = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3)},
    optional={"id": st.text(max_size=5), "parameters": st.dictionaries(st.sampled_from(["max_tokens", "temperature", "x"]), json_scalars, max_size=2),
              "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["output-0", "other"])}), max_size=2)},
)


@given(body=infer_bodies)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_v2_infer_tensors(bert_cls, body):
    resp = httpx.post(f"{bert_cls.url}/v2/models/bert_cls/infer", json=body, timeout=60)
    if resp.status_code == 200:
        out = resp.json()["outputs"][0]
        assert out["name"] == "output-0" and out["datatype"] == "INT64"
        assert len(out["data"]) == out["shape"][0]
    else:
        assert_error(resp, resp.headers.get("x-error-code", "?"))


# ---------------------------------------------------------- chat messages
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"])
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "video"]), "image_url": st.just({"url": "x"})}),
)
messages = st.lists(
    st.fixed_dictionaries({"role": roles}, optional={"content": st.one_of(st.text(max_size=30), st.lists(parts, max_size=2), st.none(), st.integers()),
                                                     "name": st.text(max_size=5)}),
    max_size=4,
)


@given(msgs=messages, extra=st.dictionaries(st.sampled_from(["temperature", "top_logprobs", "logprobs", "n", "stop", "seed"]), json_scalars, max_size=2))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_chat_messages(llama, msgs, extra):
    body = {"model": "llama", "messages": msgs, "max_tokens": 3, **extra}
    resp = httpx.post(f"{llama.openai_url}/chat/completions", json=body, timeout=60)
    if resp.status_code == 200:
        data = resp.json()
        assert data["object"] == "chat.completion" and data["choices"]
    else:
        assert_error(resp, resp.headers.get("x-error-code", "?"))
