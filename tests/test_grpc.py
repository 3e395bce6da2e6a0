"""The Open Inference Protocol over gRPC, against real servers, with real clients.

Every answer is checked against the REST v2 family of the same server for the
same input: the same output tensor, and for errors the same message, with the
gRPC status code of the error contract.

``tritonclient.grpc`` sends tensors as ``raw_input_contents``; the typed
``contents`` path is exercised with tritonclient's own generated stubs (the
wire format is the same ``inference`` package). This module must not import
``hfserve.grpc_gen``: it registers the same ``inference.*`` protobuf symbols
as tritonclient, and one process cannot hold both.
"""

from __future__ import annotations

import struct
import time
import uuid
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import needs_vllm

INPUT = "input-0"
OUTPUT = "output-0"
GREEDY = {"max_tokens": 8, "temperature": 0.0}

# fixture -> (inputs, request parameters)
TASKS: dict[str, tuple[list[str], dict[str, Any] | None]] = {
    "minilm": (["hello world", "a second, longer sentence about cats"], None),
    "bert_cls": (["hello world", "a second, longer sentence about cats"], None),
    "bert_tok": (["hello world", "a second, longer sentence about cats"], None),
    "bert_mlm": (["the cat sat on the [MASK].", "hello [MASK] world"], None),
    "llama": (["hello", "once upon a time"], GREEDY),
    "t5": (["translate: hello", "summarize: the cat sat on the mat"], GREEDY),
    # the same models on the vLLM backend: gRPC must answer the same way on both
    "llama_vllm": (["hello", "once upon a time"], GREEDY),
    "minilm_vllm": (["hello world", "a second, longer sentence about cats"], None),
}
MODELS = [pytest.param(name, marks=needs_vllm if name.endswith("_vllm") else ()) for name in TASKS]


# ------------------------------------------------------------------ helpers
def client(server) -> tg.InferenceServerClient:
    return tg.InferenceServerClient(server.grpc_host)


def bytes_input(texts: list[str], shape: list[int] | None = None) -> tg.InferInput:
    inp = tg.InferInput(INPUT, shape or [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode("utf-8") for t in texts], dtype=np.object_))
    return inp


def rest_infer(
    server,
    texts: list[Any],
    parameters: dict[str, Any] | None = None,
    *,
    name: str | None = None,
    version: str | None = None,
    datatype: str = "BYTES",
    shape: list[int] | None = None,
    extra_inputs: list[dict[str, Any]] | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {
        "inputs": [
            {"name": INPUT, "shape": shape if shape is not None else [len(texts)], "datatype": datatype, "data": texts},
            *(extra_inputs or []),
        ]
    }
    if parameters:
        body["parameters"] = parameters
    path = f"/v2/models/{name or server.name}"
    if version is not None:
        path += f"/versions/{version}"
    return httpx.post(f"{server.url}{path}/infer", json=body, timeout=120)


def rest_output(server, texts: list[str], parameters: dict[str, Any] | None) -> dict[str, Any]:
    response = rest_infer(server, texts, parameters)
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert out["name"] == OUTPUT
    return out


def rest_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]


def as_expected(out: dict[str, Any]) -> np.ndarray:
    """The REST output as the array tritonclient would give for it."""
    if out["datatype"] == "BYTES":
        return np.array([d.encode("utf-8") for d in out["data"]], dtype=np.object_).reshape(out["shape"])
    dtype = {"FP32": np.float32, "INT64": np.int64}[out["datatype"]]
    return np.asarray(out["data"], dtype=dtype).reshape(out["shape"])


def assert_same_tensor(actual: np.ndarray, out: dict[str, Any]) -> None:
    expected = as_expected(out)
    assert list(actual.shape) == out["shape"]
    if out["datatype"] == "FP32":
        assert actual.dtype == np.float32
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    elif out["datatype"] == "INT64":
        assert actual.dtype == np.int64
        np.testing.assert_array_equal(actual, expected)
    else:
        assert actual.tolist() == expected.tolist()


def stub(server) -> tuple[grpc.Channel, service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(server.grpc_host)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def set_parameter(params: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        params[key].bool_param = value
    elif isinstance(value, int):
        params[key].int64_param = value
    elif isinstance(value, float):
        params[key].double_param = value  # tritonclient's field 4, not in KServe's proto
    else:
        params[key].string_param = value


def typed_request(
    name: str, texts: list[str], parameters: dict[str, Any] | None = None, shape: list[int] | None = None
) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=name)
    inp = request.inputs.add(name=INPUT, datatype="BYTES", shape=shape if shape is not None else [len(texts)])
    inp.contents.bytes_contents.extend(t.encode("utf-8") for t in texts)
    for key, value in (parameters or {}).items():
        set_parameter(request.parameters, key, value)
    return request


def typed_output(response: service_pb2.ModelInferResponse) -> np.ndarray:
    (out,) = response.outputs
    assert out.name == OUTPUT
    assert not response.raw_output_contents, "typed inputs must get typed outputs"
    shape = list(out.shape)
    if out.datatype == "BYTES":
        return np.array(list(out.contents.bytes_contents), dtype=np.object_).reshape(shape)
    if out.datatype == "FP32":
        return np.array(out.contents.fp32_contents, dtype=np.float32).reshape(shape)
    assert out.datatype == "INT64", out.datatype
    return np.array(out.contents.int64_contents, dtype=np.int64).reshape(shape)


def raw_bytes(texts: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in (t.encode("utf-8") for t in texts))


def grpc_error(fn, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn(*args, **kwargs)
    return info.value


# ------------------------------------------------------------- health/metadata
def test_live_ready_and_model_ready(bert_cls):
    with client(bert_cls) as c:
        assert c.is_server_live() is True
        assert c.is_server_ready() is True
        assert c.is_model_ready("bert_cls") is True
        assert c.is_model_ready("bert_cls", "1") is True


def test_server_metadata_matches_rest(bert_cls):
    with client(bert_cls) as c:
        meta = c.get_server_metadata(as_json=True)
    rest = httpx.get(f"{bert_cls.url}/v2", timeout=30).json()
    assert meta == {"name": rest["name"], "version": rest["version"], "extensions": rest["extensions"]}


@pytest.mark.parametrize("model", MODELS)
def test_model_metadata_matches_rest(model, request):
    server = request.getfixturevalue(model)
    with client(server) as c:
        meta = c.get_model_metadata(server.name)
        assert c.get_model_metadata(server.name, "1") == meta
    rest = httpx.get(f"{server.url}/v2/models/{server.name}", timeout=30).json()
    assert meta.name == rest["name"] == server.name
    assert list(meta.versions) == rest["versions"] == ["1"]
    assert meta.platform == rest["platform"]
    for got, want in ((meta.inputs, rest["inputs"]), (meta.outputs, rest["outputs"])):
        assert [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in got] == want
    assert [t.name for t in meta.inputs] == [INPUT]
    assert [t.name for t in meta.outputs] == [OUTPUT]


# ------------------------------------------------------------------------ infer
@pytest.mark.parametrize("model", MODELS)
def test_infer_raw_matches_rest(model, request):
    """tritonclient's default: raw_input_contents in, raw_output_contents out."""
    server = request.getfixturevalue(model)
    texts, params = TASKS[model]
    expected = rest_output(server, texts, params)
    with client(server) as c:
        result = c.infer(server.name, [bytes_input(texts)], parameters=params, request_id="raw-1")
    response = result.get_response()
    assert response.model_name == server.name
    assert response.model_version == "1"
    assert response.id == "raw-1"
    assert len(response.raw_output_contents) == 1
    (out,) = response.outputs
    assert out.name == OUTPUT
    assert out.datatype == expected["datatype"]
    assert list(out.shape) == expected["shape"]
    assert_same_tensor(result.as_numpy(OUTPUT), expected)


@pytest.mark.parametrize("model", MODELS)
def test_infer_typed_matches_rest(model, request):
    """Typed contents.bytes_contents in, typed contents out."""
    server = request.getfixturevalue(model)
    texts, params = TASKS[model]
    expected = rest_output(server, texts, params)
    channel, s = stub(server)
    with channel:
        response = s.ModelInfer(typed_request(server.name, texts, params), timeout=120)
    assert response.model_name == server.name
    assert response.model_version == "1"
    (out,) = response.outputs
    assert out.datatype == expected["datatype"]
    assert list(out.shape) == expected["shape"]
    assert_same_tensor(typed_output(response), expected)


def test_infer_raw_by_hand_matches_tritonclient(bert_mlm):
    texts, _ = TASKS["bert_mlm"]
    request = service_pb2.ModelInferRequest(model_name=bert_mlm.name)
    request.inputs.add(name=INPUT, datatype="BYTES", shape=[len(texts)])
    request.raw_input_contents.append(raw_bytes(texts))
    channel, s = stub(bert_mlm)
    with channel:
        response = s.ModelInfer(request, timeout=120)
    assert not response.outputs[0].contents.bytes_contents
    (raw,) = response.raw_output_contents
    expected = rest_output(bert_mlm, texts, None)
    assert raw == raw_bytes(expected["data"])


def test_request_id_metadata(bert_cls):
    channel, s = stub(bert_cls)
    with channel:
        # x-request-id metadata wins, and comes back in the initial metadata
        response, call = s.ModelInfer.with_call(
            typed_request(bert_cls.name, ["hi"]), metadata=(("x-request-id", "rid-123"),), timeout=60
        )
        assert ("x-request-id", "rid-123") in tuple(call.initial_metadata())
        assert response.id == "rid-123"
        # else the request's id
        request = typed_request(bert_cls.name, ["hi"])
        request.id = "body-id"
        response, call = s.ModelInfer.with_call(request, timeout=60)
        assert dict(call.initial_metadata())["x-request-id"] == "body-id"
        assert response.id == "body-id"
        # else a new one; on errors too
        with pytest.raises(grpc.RpcError) as info:
            s.ModelMetadata(service_pb2.ModelMetadataRequest(name="nope"), timeout=60)
        rid = dict(info.value.initial_metadata())["x-request-id"]
        assert len(rid) == 32 and uuid.UUID(hex=rid)
        assert dict(info.value.trailing_metadata())["x-error-code"] == "model_not_found"


def test_float_and_int_parameters_reach_the_model(llama):
    """tritonclient sends floats as double_param, which KServe's proto lacks; they must not be dropped."""
    texts = ["hello"]
    with client(llama) as c:
        out = c.infer(llama.name, [bytes_input(texts)], parameters={"max_tokens": 3, "temperature": 0.0})
        text = out.as_numpy(OUTPUT)[0].decode()
        err = grpc_error(c.infer, llama.name, [bytes_input(texts)], parameters={"temperature": 5.5})
    assert text == rest_output(llama, texts, {"max_tokens": 3, "temperature": 0.0})["data"][0]
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.message() == rest_error(rest_infer(llama, texts, {"temperature": 5.5}), 400)


# ---------------------------------------------------------------------- errors
def test_unknown_model_is_not_found(bert_cls):
    with client(bert_cls) as c:
        infer = grpc_error(c.infer, "nope", [bytes_input(["hi"])])
        meta = grpc_error(c.get_model_metadata, "nope")
        ready = grpc_error(c.is_model_ready, "nope")
    want = rest_error(rest_infer(bert_cls, ["hi"], name="nope"), 404)
    assert want == "Model with name nope does not exist."
    for err in (infer, meta, ready):
        assert err.status() == "StatusCode.NOT_FOUND"
        assert err.message() == want
    assert meta.message() == rest_error(httpx.get(f"{bert_cls.url}/v2/models/nope", timeout=30), 404)


def test_unknown_version_is_not_found(bert_cls):
    with client(bert_cls) as c:
        infer = grpc_error(c.infer, bert_cls.name, [bytes_input(["hi"])], model_version="2")
        meta = grpc_error(c.get_model_metadata, bert_cls.name, "2")
        ready = grpc_error(c.is_model_ready, bert_cls.name, "2")
    want = rest_error(rest_infer(bert_cls, ["hi"], version="2"), 404)
    for err in (infer, meta, ready):
        assert err.status() == "StatusCode.NOT_FOUND"
        assert err.message() == want


def test_wrong_datatype_is_invalid_argument(bert_cls):
    inp = tg.InferInput(INPUT, [1], "INT64")
    inp.set_data_from_numpy(np.array([7], dtype=np.int64))
    with client(bert_cls) as c:
        err = grpc_error(c.infer, bert_cls.name, [inp])
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.message() == rest_error(rest_infer(bert_cls, [7], datatype="INT64"), 400)
    assert "BYTES" in err.message()


def test_shape_mismatch_is_invalid_argument(bert_cls):
    want = rest_error(rest_infer(bert_cls, ["a", "b"], shape=[3]), 400)
    channel, s = stub(bert_cls)
    with channel:
        with pytest.raises(grpc.RpcError) as typed:
            s.ModelInfer(typed_request(bert_cls.name, ["a", "b"], shape=[3]), timeout=60)
        raw = service_pb2.ModelInferRequest(model_name=bert_cls.name)
        raw.inputs.add(name=INPUT, datatype="BYTES", shape=[3])
        raw.raw_input_contents.append(raw_bytes(["a", "b"]))
        with pytest.raises(grpc.RpcError) as rawinfo:
            s.ModelInfer(raw, timeout=60)
    for info in (typed, rawinfo):
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == want


def test_two_inputs_is_invalid_argument(bert_cls):
    second = tg.InferInput("input-1", [1], "BYTES")
    second.set_data_from_numpy(np.array([b"b"], dtype=np.object_))
    with client(bert_cls) as c:
        err = grpc_error(c.infer, bert_cls.name, [bytes_input(["a"]), second])
    want = rest_error(
        rest_infer(bert_cls, ["a"], extra_inputs=[{"name": "input-1", "shape": [1], "datatype": "BYTES", "data": ["b"]}]),
        400,
    )
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.message() == want


def test_context_too_long_is_invalid_argument(bert_cls):
    texts = ["hello " * 400]
    with client(bert_cls) as c:
        err = grpc_error(c.infer, bert_cls.name, [bytes_input(texts)])
    want = rest_error(rest_infer(bert_cls, texts), 400)
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.message() == want
    assert "context length" in err.message()


def test_unsupported_parameter_is_invalid_argument(bert_cls):
    with client(bert_cls) as c:
        err = grpc_error(c.infer, bert_cls.name, [bytes_input(["hi"])], parameters={"temperature": 0.5})
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert err.message() == rest_error(rest_infer(bert_cls, ["hi"], {"temperature": 0.5}), 400)


def test_unknown_output_is_invalid_argument(bert_cls):
    with client(bert_cls) as c:
        err = grpc_error(c.infer, bert_cls.name, [bytes_input(["hi"])], outputs=[tg.InferRequestedOutput("nope")])
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "nope" in err.message() and OUTPUT in err.message()


def test_repository_load_is_unimplemented(bert_cls):
    with client(bert_cls) as c:
        err = grpc_error(c.load_model, "other")
    assert err.status() == "StatusCode.UNIMPLEMENTED"
    assert "not supported" in err.message()


def test_client_cancellation_cancels_the_work(llama):
    """A deadline that passes cancels the handler: logged as a cancellation, never as an error."""
    texts = ["once upon a time"] * 8
    params = {"max_tokens": 200, "ignore_eos": True}
    rid = f"cancel-{uuid.uuid4().hex[:8]}"
    with client(llama) as c:
        while True:  # work that outlasts the 0.3 s deadline several times over, however quick the machine
            started = time.monotonic()
            c.infer(llama.name, [bytes_input(texts)], parameters=params)
            full = time.monotonic() - started
            if full >= 1.0 or len(texts) >= 64:
                break
            texts = texts * 2
        assert full > 0.6, f"{len(texts)} requests of 200 tokens took only {full:.2f}s: no deadline of 0.3 s to pass"
        before = len(llama.log())
        err = grpc_error(c.infer, llama.name, [bytes_input(texts)], parameters=params, request_id=rid, client_timeout=0.3)
        assert err.status() == "StatusCode.DEADLINE_EXCEEDED"
        # the cancelled work is not still occupying the model: the next call is answered at once
        started = time.monotonic()
        c.infer(llama.name, [bytes_input(["hi"])], parameters={"max_tokens": 2})
        assert time.monotonic() - started < max(full / 2, 0.5), f"the cancelled request took {full:.1f}s to run in full"
    # the server either sees the deadline pass (timeout) or the call cancelled first; both cancel the work
    marks = (f"request {rid}: gRPC call cancelled", f"request {rid}: timeout")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(m in llama.log()[before:] for m in marks):
        time.sleep(0.1)
    log = llama.log()[before:]
    assert any(m in log for m in marks), log
    assert "Traceback" not in log
    assert " ERROR " not in log


def test_message_too_large_is_resource_exhausted(server_factory):
    """--max_request_body_bytes also bounds gRPC messages (grpc.max_receive_message_length), and
    --grpc_max_send_message_length its answers."""
    small = server_factory(
        "bert_cls", "--max_request_body_bytes", "1000", "--grpc_max_send_message_length", "300", name="bert_small"
    )
    with client(small) as c:
        ok = c.infer(small.name, [bytes_input(["hi"])])
        assert ok.as_numpy(OUTPUT).shape == (1,)
        err = grpc_error(c.infer, small.name, [bytes_input(["x" * 2000])])
        big_answer = grpc_error(c.infer, small.name, [bytes_input(["hi"] * 64)])  # 64 labels: over 300 bytes
    assert err.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "larger than max" in err.message() and "1000" in err.message()
    assert big_answer.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "300" in big_answer.message()
    assert rest_infer(small, ["hi"] * 64).status_code == 200  # the limit is gRPC's only
    # REST gives the same class for the same limit
    rest = rest_infer(small, ["x" * 2000])
    assert rest.status_code == 413
    assert rest.headers["x-error-code"] == "request_too_large"


# ------------------------------------------------------- both backends, API key
def test_errors_are_the_same_on_both_backends(llama_any):
    """The same contract errors, with the REST family's messages, whichever backend serves."""
    texts = ["hi"]
    with client(llama_any) as c:
        too_long = grpc_error(c.infer, llama_any.name, [bytes_input(texts)], parameters={"max_tokens": 1000})
        bad_value = grpc_error(c.infer, llama_any.name, [bytes_input(texts)], parameters={"temperature": 5.5})
        unknown = grpc_error(c.infer, "nope", [bytes_input(texts)])
    assert too_long.status() == bad_value.status() == "StatusCode.INVALID_ARGUMENT"
    assert too_long.message() == rest_error(rest_infer(llama_any, texts, {"max_tokens": 1000}), 400)
    assert "1000" in too_long.message() and "256" in too_long.message()
    assert bad_value.message() == rest_error(rest_infer(llama_any, texts, {"temperature": 5.5}), 400)
    assert unknown.status() == "StatusCode.NOT_FOUND"


def test_api_key_over_grpc(server_factory):
    server = server_factory("bert_cls", "--api_key", "s3cret-key", name="keyed")
    with client(server) as c:
        assert c.is_server_live() and c.is_server_ready()  # health stays open
        missing = grpc_error(c.infer, "keyed", [bytes_input(["x"])])
        wrong = grpc_error(c.infer, "keyed", [bytes_input(["x"])], headers={"authorization": "Bearer nope"})
        meta = grpc_error(c.get_model_metadata, "keyed")
        out = c.infer("keyed", [bytes_input(["x"])], headers={"authorization": "Bearer s3cret-key"})
    for err in (missing, wrong, meta):
        assert err.status() == "StatusCode.UNAUTHENTICATED"
        assert "s3cret" not in err.message()
    assert missing.message() == rest_error(httpx.post(f"{server.url}/v1/models/keyed:predict", json={"instances": ["x"]},
                                                      timeout=30), 401)
    assert out.as_numpy(OUTPUT).shape == (1,)
