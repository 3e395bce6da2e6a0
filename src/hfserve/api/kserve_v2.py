"""KServe v2 / Open Inference Protocol over REST, with the generate extension.

Also serves the routes outside any family (``/``, ``/metrics``), which use the
KServe error shape. Supports the binary tensor extension that ``tritonclient``
uses by default (``Inference-Header-Content-Length``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__, errors
from ..predict import INPUT_NAME, OUTPUT_NAME, Prediction, Tensor, model_metadata, predict
from ..sampling import SamplingOptions
from ..service import ModelService
from ..structured import from_structured_outputs
from ..tasks import Task
from ..validation import check_content_type, load_json, validate
from .routing import (
    ContractRoute,
    JSONResponse,
    admit,
    dump_json,
    json_schema_body,
    read_json,
    request_id,
    sse,
    sse_response,
    until_disconnect,
)

router = APIRouter(prefix="/v2", route_class=ContractRoute, tags=["v2"])
root_router = APIRouter(route_class=ContractRoute, tags=["server"])

BINARY_HEADER = "inference-header-content-length"
EXTENSIONS = ["generate", "binary_tensor_data"]
DATATYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


# --------------------------------------------------------------------- errors
def render_error(err: errors.HFServeError, headers: dict[str, str]) -> Response:
    return JSONResponse({"error": err.message}, status_code=err.http_status, headers=headers)


def error_event(err: errors.HFServeError) -> str:
    return sse(json.dumps({"error": err.message}))


# -------------------------------------------------------------- data models
Parameters = dict[str, str | int | float | bool | None]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: Parameters | None = None
    data: Any = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str | None = None
    parameters: Parameters | None = None
    inputs: Annotated[list[RequestInput], Field(min_length=1)]
    outputs: list[RequestOutput] | None = None


class GenerateRequest(SamplingOptions):
    text_input: str
    parameters: dict[str, Any] | None = None
    stream: bool | None = None


# --------------------------------------------------------------- helpers
def _service(request: Request) -> ModelService:
    return request.app.state.service


def check_model(service: ModelService, name: str, version: str | None = None) -> None:
    service.check_name(name)
    if version not in (None, "", "1"):
        raise errors.ModelNotFound(f"Model {errors.echo(name)} has no version {errors.echo(version)}; the only version is 1")


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for item in data:
            out.extend(_flatten(item)) if isinstance(item, list) else out.append(item)
        return out
    return [data]


def _decode_bytes_tensor(raw: bytes, where: str) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise errors.InvalidRequest(f"{where}: truncated BYTES element length", param=where)
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise errors.InvalidRequest(f"{where}: a BYTES element runs past the end of the data", param=where)
        items.append(raw[offset : offset + length])
        offset += length
    return items


def encode_bytes_tensor(items: Iterable[str]) -> bytes:
    """BYTES elements in the binary tensor format: each a 4-byte little-endian length, then the bytes."""
    out = bytearray()
    for item in items:
        b = item.encode("utf-8")
        out += struct.pack("<I", len(b)) + b
    return bytes(out)


def parse_infer_body(body: bytes, headers: Any) -> tuple[InferenceRequest, dict[str, bytes]]:
    """JSON body, or the binary extension (JSON header + raw tensor bytes)."""
    header_len = headers.get(BINARY_HEADER)
    raw: dict[str, bytes] = {}
    if header_len is None:
        check_content_type(headers.get("content-type"))
        data = load_json(body)
        if not isinstance(data, dict):
            raise errors.InvalidRequest("The request body must be a JSON object")
        return validate(data, InferenceRequest), raw
    try:
        n = int(header_len)
    except ValueError:
        raise errors.InvalidRequest(f"{BINARY_HEADER} must be an integer, got {errors.echo(header_len)}") from None
    if n < 0 or n > len(body):
        raise errors.InvalidRequest(f"{BINARY_HEADER} ({n}) is outside the body of {len(body)} bytes")
    data = load_json(body[:n])
    if not isinstance(data, dict):
        raise errors.InvalidRequest("The JSON part of the request must be an object")
    req = validate(data, InferenceRequest)
    offset = n
    for i, inp in enumerate(req.inputs):
        size = (inp.parameters or {}).get("binary_data_size")
        if inp.data is None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise errors.InvalidRequest(
                    f"input {errors.echo(inp.name)} has neither data nor parameters.binary_data_size",
                    param=f"inputs.{i}.data",
                )
            if offset + size > len(body):
                raise errors.InvalidRequest(
                    f"input {errors.echo(inp.name)}: binary_data_size {size} runs past the end of the body",
                    param=f"inputs.{i}.parameters.binary_data_size",
                )
            raw[inp.name] = body[offset : offset + size]
            offset += size
    return req, raw


def input_texts(req: InferenceRequest, raw: dict[str, bytes]) -> list[str]:
    """The request's one BYTES input as a list of strings, with its shape checked."""
    if len(req.inputs) != 1:
        raise errors.InvalidRequest(
            f"this model takes exactly one BYTES input ({INPUT_NAME}), got {len(req.inputs)} inputs", param="inputs"
        )
    inp = req.inputs[0]
    where = "inputs.0"
    if inp.datatype != "BYTES":
        known = inp.datatype in DATATYPES
        hint = "" if known else f"; {errors.echo(inp.datatype)} is not a v2 datatype"
        raise errors.InvalidRequest(
            f"input {errors.echo(inp.name)} must have datatype BYTES (text), got {errors.echo(inp.datatype)}{hint}",
            param=f"{where}.datatype",
        )
    if inp.name in raw:
        items: list[Any] = _decode_bytes_tensor(raw[inp.name], f"{where}.data")
    else:
        items = _flatten(inp.data)
    expected = int(np.prod(inp.shape)) if inp.shape else 1
    if len(items) != expected:
        raise errors.InvalidRequest(
            f"input {errors.echo(inp.name)} has shape {inp.shape} ({expected} elements) but {len(items)} data elements",
            param=f"{where}.shape",
        )
    texts = []
    for j, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise errors.InvalidRequest(f"element {j} of input {errors.echo(inp.name)} is not UTF-8", param=f"{where}.data") from None
        if not isinstance(item, str):
            raise errors.InvalidRequest(
                f"element {j} of BYTES input {errors.echo(inp.name)} must be a string, got {errors.echo(item)}",
                param=f"{where}.data.{j}",
            )
        texts.append(item)
    return texts


def wants_binary(req: InferenceRequest) -> bool:
    if req.outputs:
        for i, out in enumerate(req.outputs):
            if out.name != OUTPUT_NAME:
                raise errors.InvalidRequest(
                    f"unknown output {errors.echo(out.name)}; this model's output is {OUTPUT_NAME}", param=f"outputs.{i}.name"
                )
        return any(bool((o.parameters or {}).get("binary_data")) for o in req.outputs)
    return bool((req.parameters or {}).get("binary_data_output"))


def infer_response(
    service: ModelService, req_id: str, tensor: Tensor, binary: bool, extra: Sequence[Tensor] = (), model_name: str | None = None
) -> Response:
    tensors = [tensor, *extra]
    outs: list[dict[str, Any]] = [{"name": t.name, "datatype": t.datatype, "shape": t.shape} for t in tensors]
    body = {"id": req_id, "model_name": model_name or service.name, "model_version": "1", "outputs": outs}
    if not binary:
        for out, t in zip(outs, tensors, strict=True):
            out["data"] = t.data
        return JSONResponse(body)
    raw = b""
    for out, t in zip(outs, tensors, strict=True):
        part = encode_bytes_tensor(t.data) if t.datatype == "BYTES" else t.as_numpy().tobytes()
        out["parameters"] = {"binary_data_size": len(part)}
        raw += part
    head = dump_json(body)
    return Response(
        head + raw, media_type="application/octet-stream", headers={BINARY_HEADER: str(len(head))}
    )


# ------------------------------------------------------------------ routes
@root_router.get("/")
@ContractRoute.declare("other", public=True)
async def root_live(request: Request) -> dict[str, str]:
    _service(request).check_live()  # a dead engine: 503, so the orchestrator restarts the server
    return {"status": "alive"}


@root_router.get("/metrics")
@ContractRoute.declare("other", public=True)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("")
@ContractRoute.declare("v2")
async def server_metadata() -> dict[str, Any]:
    return {"name": "hfserve", "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live")
@ContractRoute.declare("v2", public=True)
async def live(request: Request) -> dict[str, bool]:
    _service(request).check_live()
    return {"live": True}


@router.get("/health/ready")
@ContractRoute.declare("v2", public=True)
async def ready(request: Request) -> Response:
    service = _service(request)
    if not service.ready:
        service.check_ready()  # raises model_not_ready with the reason
    return JSONResponse({"ready": True})


@router.get("/models")
@ContractRoute.declare("v2")
async def list_models(request: Request) -> dict[str, list[str]]:
    service = _service(request)
    return {"models": [service.name, *service.adapters]}


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
@ContractRoute.declare("v2")
async def get_model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    service = _service(request)
    check_model(service, name, version)
    service.check_ready()
    return {**model_metadata(service), "name": name} if name in service.adapters else model_metadata(service)


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
@ContractRoute.declare("v2", public=True)
async def model_ready(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
    service = _service(request)
    check_model(service, name, version)
    service.check_ready()
    return {"name": name, "ready": True}


@router.post("/models/{name}/infer", openapi_extra=json_schema_body(InferenceRequest))
@router.post("/models/{name}/versions/{version}/infer", openapi_extra=json_schema_body(InferenceRequest))
@ContractRoute.declare("v2", model_work=True)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    service = _service(request)
    body = await request.body()
    req, raw = parse_infer_body(body, request.headers)
    check_model(service, name, version)
    service.check_ready()
    texts = input_texts(req, raw)
    binary = wants_binary(req)
    params = {k: v for k, v in (req.parameters or {}).items() if k != "binary_data_output"}
    await admit(request)
    result: Prediction = await until_disconnect(
        request, predict(service, texts, params or None, request_id(request), param="inputs.0.data")
    )
    return infer_response(
        service, req.id or request_id(request), result.tensor, binary, result.extra, service.reported_name(name)
    )


def _generate_options(body: GenerateRequest) -> SamplingOptions:
    top = body.model_dump(exclude_unset=True, exclude={"text_input", "parameters", "stream"})
    nested = dict(body.parameters or {})
    nested.pop("structured_outputs", None)  # vLLM's request extra: see _prepare_generate
    for key in set(top) & set(nested):
        raise errors.InvalidRequest(f"{key} is given both at the top level and in parameters", param=f"parameters.{key}")
    opts = validate(nested, SamplingOptions, prefix="parameters")
    return opts.model_copy(update={k: getattr(body, k) for k in top})


async def _prepare_generate(request: Request, name: str, version: str | None) -> tuple[ModelService, GenerateRequest, list[int], Any]:
    service = _service(request)
    body = await read_json(request, GenerateRequest)
    check_model(service, name, version)
    service.require("the generate extension", Task.text_generation, Task.text2text_generation)
    opts = _generate_options(body)
    if opts.n != 1:
        raise errors.UnsupportedParameter("n must be 1 on the generate routes", param="parameters.n")
    await admit(request)
    prompt = service.tokenize(body.text_input)
    constraint = (body.parameters or {}).get("structured_outputs")
    params = service.sampling_params(
        opts,
        len(prompt),
        default_max_tokens=None,
        structured=None if constraint is None else from_structured_outputs(constraint, param="parameters.structured_outputs"),
    )
    return service, body, prompt, params


@router.post("/models/{name}/generate", openapi_extra=json_schema_body(GenerateRequest))
@router.post("/models/{name}/versions/{version}/generate", openapi_extra=json_schema_body(GenerateRequest))
@ContractRoute.declare("v2", model_work=True)
async def generate(request: Request, name: str, version: str | None = None) -> Response:
    service, _, prompt, params = await _prepare_generate(request, name, version)
    gen = await until_disconnect(request, service.generate_full(prompt, params, request_id(request)))
    choice = gen.choices[0]
    return JSONResponse(
        {
            "model_name": service.model_name(params),
            "model_version": "1",
            "text_output": choice.text,
            "finish_reason": choice.finish_reason,
            "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens},
        }
    )


@router.post("/models/{name}/generate_stream", openapi_extra=json_schema_body(GenerateRequest))
@router.post("/models/{name}/versions/{version}/generate_stream", openapi_extra=json_schema_body(GenerateRequest))
@ContractRoute.declare("v2", model_work=True)
async def generate_stream(request: Request, name: str, version: str | None = None) -> Response:
    service, _, prompt, params = await _prepare_generate(request, name, version)
    stream = service.generate(prompt, params, request_id(request))

    async def events() -> AsyncIterator[str]:
        async for deltas in stream:
            for d in deltas:
                event: dict[str, Any] = {"model_name": service.model_name(params), "model_version": "1", "text_output": d.text}
                if d.finish_reason:
                    event["finish_reason"] = d.finish_reason
                yield sse(json.dumps(event))

    return await sse_response(request, events(), error_event)

