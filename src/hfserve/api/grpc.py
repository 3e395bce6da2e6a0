"""KServe v2 / Open Inference Protocol over gRPC (``inference.GRPCInferenceService``).

The same semantics as the REST v2 family (:mod:`hfserve.api.kserve_v2`): the
same model/version checks, the same input validation and messages, the same
``output-0`` tensor. It runs on ``grpc.aio`` in the event loop that serves HTTP.

Errors follow the contract's gRPC column: every exception is classified by
:meth:`ErrorHandling.contract_error` under the family ``"grpc"`` and the call is
aborted with the class's status code and the contract message as details
(classes without a gRPC status are INVALID_ARGUMENT). A call the client
cancels (or whose deadline passes) has its handler task cancelled by grpc.aio;
that cancels the model work and is counted as a disconnect, never logged as an
error.

Tensor data: BYTES inputs come either as typed ``contents.bytes_contents`` or
as ``raw_input_contents`` (each element a 4-byte little-endian length followed
by its bytes, as ``tritonclient.grpc`` sends them). The output is returned in
the same representation the request used: raw inputs get
``raw_output_contents``, typed inputs get typed ``contents``.

``tritonclient`` sends float and uint64 parameters as ``double_param`` (field 4)
and ``uint64_param`` (field 5) of ``InferParameter``, which KServe's proto does
not declare; they are read from the message's unknown fields so that they are
honoured (or rejected) rather than silently dropped.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import unknown_fields

from .. import __version__, errors, limits
from ..error_handling import ErrorHandling
from ..grpc_gen import grpc_predict_v2_pb2 as pb2
from ..grpc_gen import grpc_predict_v2_pb2_grpc as pb2_grpc
from ..middleware import valid_request_id
from ..predict import Tensor, model_metadata, predict
from ..service import ModelService
from ..validation import validate
from .kserve_v2 import EXTENSIONS, InferenceRequest, check_model, encode_bytes_tensor, input_texts, wants_binary

logger = logging.getLogger("hfserve.grpc")

FAMILY = "grpc"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
REQUEST_ID_KEY = "x-request-id"

T = TypeVar("T")

# InferParameter fields that tritonclient's proto has and KServe's does not.
_DOUBLE_PARAM_FIELD = 4  # double, wire type 1 (fixed64)
_UINT64_PARAM_FIELD = 5  # uint64, wire type 0 (varint)


# ----------------------------------------------------------------- helpers
def request_id(context: grpc.aio.ServicerContext, request_field: str = "") -> str:
    """``x-request-id`` metadata, else the request's ``id`` field, else a new id."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == REQUEST_ID_KEY:
            rid = valid_request_id(value)
            if rid:
                return rid
    return valid_request_id(request_field) or uuid.uuid4().hex


def parameter_value(param: pb2.InferParameter, where: str) -> Any:
    """One ``InferParameter`` as a plain Python value."""
    which = param.WhichOneof("parameter_choice")
    if which is not None:
        return getattr(param, which)
    for field in unknown_fields.UnknownFieldSet(param):
        if field.field_number == _DOUBLE_PARAM_FIELD and field.wire_type == 1:
            return struct.unpack("<d", struct.pack("<Q", field.data))[0]
        if field.field_number == _UINT64_PARAM_FIELD and field.wire_type == 0:
            return int(field.data)
    if len(unknown_fields.UnknownFieldSet(param)):
        raise errors.InvalidRequest(
            f"{where} has a value type this server does not support; use a bool, integer, float or string",
            param=where,
        )
    return None


def parameters_dict(params: Any, where: str) -> dict[str, Any]:
    return {key: parameter_value(params[key], f"{where}.{key}") for key in params}


def request_model(request: pb2.ModelInferRequest) -> tuple[InferenceRequest, dict[str, bytes], bool]:
    """The gRPC request as the REST family's request model, its raw inputs, and whether it was raw."""
    raw_contents = list(request.raw_input_contents)
    is_raw = bool(raw_contents)
    if is_raw:
        if len(raw_contents) != len(request.inputs):
            raise errors.InvalidRequest(
                f"raw_input_contents has {len(raw_contents)} entries but the request has {len(request.inputs)} inputs; "
                "give exactly one per input, in the order of inputs",
                param="raw_input_contents",
            )
        for i, inp in enumerate(request.inputs):
            if inp.HasField("contents") and inp.contents.ByteSize():
                raise errors.InvalidRequest(
                    f"input {errors.echo(inp.name)} has contents although raw_input_contents is used; use one or the other",
                    param=f"inputs.{i}.contents",
                )
    inputs: list[dict[str, Any]] = []
    raw: dict[str, bytes] = {}
    for i, inp in enumerate(request.inputs):
        item: dict[str, Any] = {"name": inp.name, "shape": list(inp.shape), "datatype": inp.datatype}
        if inp.parameters:
            item["parameters"] = parameters_dict(inp.parameters, f"inputs.{i}.parameters")
        if is_raw:
            raw.setdefault(inp.name, raw_contents[i])
        else:
            item["data"] = list(inp.contents.bytes_contents)
        inputs.append(item)
    body: dict[str, Any] = {"inputs": inputs}
    if request.id:
        body["id"] = request.id
    if request.parameters:
        body["parameters"] = parameters_dict(request.parameters, "parameters")
    if request.outputs:
        outputs = []
        for i, out in enumerate(request.outputs):
            o: dict[str, Any] = {"name": out.name}
            if out.parameters:
                o["parameters"] = parameters_dict(out.parameters, f"outputs.{i}.parameters")
            outputs.append(o)
        body["outputs"] = outputs
    return validate(body, InferenceRequest), raw, is_raw


def output_tensor(tensor: Tensor, raw: bool) -> tuple[pb2.ModelInferResponse.InferOutputTensor, bytes | None]:
    out = pb2.ModelInferResponse.InferOutputTensor(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    if raw:
        if tensor.datatype == "BYTES":
            return out, encode_bytes_tensor(tensor.data)
        dtype = {"INT64": "<i8", "FP32": "<f4"}[tensor.datatype]
        return out, np.asarray(tensor.data, dtype=dtype).tobytes()
    if tensor.datatype == "BYTES":
        out.contents.bytes_contents.extend(d.encode("utf-8") for d in tensor.data)
    elif tensor.datatype == "INT64":
        out.contents.int64_contents.extend(int(d) for d in tensor.data)
    elif tensor.datatype == "FP32":
        out.contents.fp32_contents.extend(float(d) for d in tensor.data)
    else:  # pragma: no cover - predict only produces the three above
        raise errors.InternalError(f"cannot encode an output of datatype {tensor.datatype}")
    return out, None


def _require_name(service: ModelService, name: str, field: str) -> None:
    if not name:
        raise errors.InvalidRequest(f"{field} is required; this server serves the model {service.name}", param=field)


# ---------------------------------------------------------------- servicer
class InferenceServicer(pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        service: ModelService,
        handling: ErrorHandling,
        admission: limits.Admission | None = None,
        api_key: str | None = None,
        request_timeout: float | None = None,
    ):
        self.service = service
        self.handling = handling
        self.admission = admission or limits.Admission()
        self.api_key = api_key
        self.request_timeout = request_timeout

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        """Model calls need the API key (``authorization: Bearer <key>`` metadata) when one is set."""
        if self.api_key:
            given = dict(context.invocation_metadata() or ()).get("authorization")
            limits.check_api_key(self.api_key, given)

    def _deadline(self, context: grpc.aio.ServicerContext) -> limits.Deadline | None:
        """The earlier of the client's gRPC deadline and the server's request timeout."""
        candidates = [t for t in (context.time_remaining(), self.request_timeout) if t is not None]
        return limits.Deadline(min(candidates)) if candidates else None

    async def _call(
        self, context: grpc.aio.ServicerContext, rid: str, work: Callable[[], Awaitable[T]]
    ) -> T:
        """Run ``work`` under the error contract; the request id goes out in the initial metadata."""
        metrics = self.handling.metrics
        started = time.perf_counter()
        status = "OK"
        metrics.child(metrics.in_flight, FAMILY).inc()
        try:
            await context.send_initial_metadata(((REQUEST_ID_KEY, rid),))
            try:
                return await work()
            except (asyncio.CancelledError, errors.ClientDisconnected) as exc:
                status = "CANCELLED"
                metrics.child(metrics.disconnects, FAMILY).inc()
                logger.info("request %s: gRPC call cancelled (client went away or its deadline passed); its work was cancelled", rid)
                if isinstance(exc, errors.ClientDisconnected):
                    raise asyncio.CancelledError() from None
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a contract error
                err = self.handling.contract_error(FAMILY, rid, exc)
            status = err.error_class.grpc_status or "INVALID_ARGUMENT"
            trailing: list[tuple[str, str]] = [("x-error-code", err.code)]
            if err.error_class.retry_after:
                trailing.append(("retry-after", str(err.retry_after or 1)))
            await context.abort(grpc.StatusCode[status], err.message, trailing_metadata=tuple(trailing))
            raise AssertionError("context.abort returned")  # pragma: no cover
        finally:
            metrics.child(metrics.in_flight, FAMILY).dec()
            metrics.child(metrics.requests, FAMILY, status).inc()
            metrics.child(metrics.latency, FAMILY).observe(time.perf_counter() - started)

    # -------------------------------------------------------------- health
    async def ServerLive(self, request: pb2.ServerLiveRequest, context: grpc.aio.ServicerContext) -> pb2.ServerLiveResponse:
        async def work() -> pb2.ServerLiveResponse:
            return pb2.ServerLiveResponse(live=self.service.live)

        return await self._call(context, request_id(context), work)

    async def ServerReady(self, request: pb2.ServerReadyRequest, context: grpc.aio.ServicerContext) -> pb2.ServerReadyResponse:
        async def work() -> pb2.ServerReadyResponse:
            return pb2.ServerReadyResponse(ready=self.service.ready)

        return await self._call(context, request_id(context), work)

    async def ModelReady(self, request: pb2.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb2.ModelReadyResponse:
        async def work() -> pb2.ModelReadyResponse:
            _require_name(self.service, request.name, "name")
            check_model(self.service, request.name, request.version)
            return pb2.ModelReadyResponse(ready=self.service.ready)

        return await self._call(context, request_id(context), work)

    # ------------------------------------------------------------ metadata
    async def ServerMetadata(
        self, request: pb2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ServerMetadataResponse:
        async def work() -> pb2.ServerMetadataResponse:
            return pb2.ServerMetadataResponse(name="hfserve", version=__version__, extensions=EXTENSIONS)

        return await self._call(context, request_id(context), work)

    async def ModelMetadata(
        self, request: pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ModelMetadataResponse:
        async def work() -> pb2.ModelMetadataResponse:
            self._authorize(context)
            _require_name(self.service, request.name, "name")
            check_model(self.service, request.name, request.version)
            self.service.check_ready()
            meta = model_metadata(self.service)
            tensor = pb2.ModelMetadataResponse.TensorMetadata
            return pb2.ModelMetadataResponse(
                name=meta["name"],
                versions=meta["versions"],
                platform=meta["platform"],
                inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
                outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]],
            )

        return await self._call(context, request_id(context), work)

    # --------------------------------------------------------------- infer
    async def ModelInfer(self, request: pb2.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb2.ModelInferResponse:
        rid = request_id(context, request.id)

        async def work() -> pb2.ModelInferResponse:
            service = self.service
            self._authorize(context)
            _require_name(service, request.model_name, "model_name")
            req, raw, is_raw = request_model(request)
            check_model(service, request.model_name, request.model_version)
            service.check_ready()
            texts = input_texts(req, raw)
            wants_binary(req)  # validates the requested outputs; binary_data is an HTTP notion
            params = {k: v for k, v in (req.parameters or {}).items() if k != "binary_data_output"}
            deadline = self._deadline(context)
            async with self.admission.slot(deadline):
                prediction = predict(service, texts, params or None, rid, param="inputs.0.data")
                result = await (deadline.run(prediction) if deadline is not None else prediction)
            out, raw_out = output_tensor(result.tensor, is_raw)
            response = pb2.ModelInferResponse(
                model_name=service.reported_name(request.model_name), model_version="1", id=request.id or rid, outputs=[out]
            )
            if raw_out is not None:
                response.raw_output_contents.append(raw_out)
            for tensor in result.extra:  # offset_mapping
                more, raw_more = output_tensor(tensor, is_raw)
                response.outputs.append(more)
                if raw_more is not None:
                    response.raw_output_contents.append(raw_more)
            return response

        return await self._call(context, rid, work)

    # ---------------------------------------------------------- repository
    async def _not_supported(self, rpc: str, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            raise errors.RouteNotFound(
                f"{rpc} is not supported: this server serves the one model {self.service.name}, loaded at startup"
            )

        return await self._call(context, request_id(context), work)

    async def RepositoryModelLoad(
        self, request: pb2.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb2.RepositoryModelLoadResponse:
        return await self._not_supported("RepositoryModelLoad", context)

    async def RepositoryModelUnload(
        self, request: pb2.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb2.RepositoryModelUnloadResponse:
        return await self._not_supported("RepositoryModelUnload", context)


# ------------------------------------------------------------------ server
def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


async def start_grpc_server(
    service: ModelService,
    host: str,
    port: int,
    handling: ErrorHandling,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_send_bytes: int | None = None,
    admission: limits.Admission | None = None,
    api_key: str | None = None,
    request_timeout: float | None = None,
) -> grpc.aio.Server:
    """Start the gRPC server in the running event loop and return it.

    Messages larger than ``max_message_bytes`` are refused by gRPC itself with
    RESOURCE_EXHAUSTED before they reach a handler; answers larger than ``max_send_bytes``
    (None: no limit) fail with RESOURCE_EXHAUSTED too.
    """
    options: list[tuple[str, int]] = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.so_reuseport", 0)]
    if max_send_bytes is not None:
        options.append(("grpc.max_send_message_length", max_send_bytes))
    server = grpc.aio.server(options=options)
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(service, handling, admission, api_key, request_timeout), server
    )
    address = _address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address}: {exc}") from None
    if not bound:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    logger.info("gRPC (Open Inference Protocol) listening on %s", _address(host, bound))
    return server
