"""KServe v1 protocol: ``/v1/models`` and ``:predict``.

Errors use the KServe shape ``{"error": "<message>"}``, the same renderer as v2.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from .. import errors
from ..predict import predict
from ..service import ModelService
from .kserve_v2 import render_error
from .routing import ContractRoute, admit, json_schema_body, read_json, request_id, until_disconnect

__all__ = ["router", "render_error"]

router = APIRouter(prefix="/v1", route_class=ContractRoute, tags=["v1"])


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    instances: list[Any] | None = None
    inputs: list[Any] | None = None  # accepted as a synonym, as KServe does
    parameters: dict[str, Any] | None = None


def _service(request: Request) -> ModelService:
    return request.app.state.service


def _texts(body: PredictRequest) -> tuple[list[str], str]:
    if body.instances is not None and body.inputs is not None:
        raise errors.InvalidRequest("give either instances or inputs, not both", param="inputs")
    key = "instances" if body.instances is not None else "inputs"
    items = body.instances if body.instances is not None else body.inputs
    if items is None:
        raise errors.InvalidRequest("Missing required parameter: instances (a list of input texts)", param="instances")
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and set(item) == {"text"}:
            item = item["text"]
        if not isinstance(item, str):
            raise errors.InvalidRequest(
                f"{key}.{i} must be a string (the input text), got {errors.echo(item)}", param=f"{key}.{i}"
            )
        texts.append(item)
    return texts, key


@router.get("/models")
@ContractRoute.declare("v1")
async def list_models(request: Request) -> dict[str, list[str]]:
    service = _service(request)
    return {"models": [service.name, *service.adapters]}


@router.get("/models/{name:model}")
@ContractRoute.declare("v1", public=True)
async def model_status(request: Request, name: str) -> dict[str, Any]:
    service = _service(request)
    service.check_name(name)
    service.check_ready()
    return {"name": name, "ready": True}


@router.post("/models/{name:model}:predict", openapi_extra=json_schema_body(PredictRequest))
@ContractRoute.declare("v1", model_work=True)
async def predict_route(request: Request, name: str) -> dict[str, Any]:
    service = _service(request)
    body = await read_json(request, PredictRequest)
    service.check_name(name)
    service.check_ready()
    texts, key = _texts(body)
    await admit(request)
    result = await until_disconnect(request, predict(service, texts, body.parameters, request_id(request), param=key))
    return {"predictions": result.predictions, **result.v1_extra}


@router.post("/models/{name:model}:explain")
@ContractRoute.declare("v1")
async def explain_route(request: Request, name: str) -> dict[str, Any]:
    _service(request).check_name(name)
    raise errors.RouteNotFound(
        f"Model {errors.echo(name)} has no explainer: this server does not implement :explain; use :predict for its predictions"
    )
