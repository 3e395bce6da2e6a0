"""Rerank and score under the OpenAI prefix: ``/rerank`` (the body vLLM and KServe take) and
``/score`` (vLLM's), errors in the OpenAI shape. The work is :mod:`hfserve.scoring`'s."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from .. import errors
from ..scoring import score_pairs
from ..service import ModelService
from .openai import TruncatePromptTokens
from .routing import ContractRoute, JSONResponse, admit, json_schema_body, read_json, until_disconnect

router = APIRouter(route_class=ContractRoute, tags=["openai"])


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    query: str
    documents: list[str]
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool = True
    truncate_prompt_tokens: TruncatePromptTokens = None
    user: str | None = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: TruncatePromptTokens = None
    user: str | None = None


def _service(request: Request) -> ModelService:
    return request.app.state.service


def _usage(tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}


@router.post("/rerank", openapi_extra=json_schema_body(RerankRequest), response_model=None)
@ContractRoute.declare("openai", model_work=True)
async def rerank(request: Request) -> Response:
    """The documents ordered by their relevance to the query (highest first), the first ``top_n``."""
    service = _service(request)
    body = await read_json(request, RerankRequest)
    service.check_name(body.model, param="model")
    if not body.documents:
        raise errors.InvalidRequest("documents must contain at least one document", param="documents")
    await admit(request)
    keep = service.truncation(body.truncate_prompt_tokens, generative=False)
    n = len(body.documents)
    result = await until_disconnect(
        request,
        score_pairs(
            service, [body.query] * n, body.documents, keep=keep,
            param_first="query", param_second="documents", operation="the rerank route",
        ),
    )
    request.app.state.metrics.prompt_tokens.inc(result.tokens)
    order = sorted(range(n), key=lambda i: result.scores[i], reverse=True)
    if body.top_n is not None:
        order = order[: body.top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": result.scores[i]}
        if body.return_documents:
            item["document"] = {"text": body.documents[i]}
        results.append(item)
    return JSONResponse(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "model": service.name,
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens},
            "results": results,
        }
    )


@router.post("/score", openapi_extra=json_schema_body(ScoreRequest), response_model=None)
@ContractRoute.declare("openai", model_work=True)
async def score(request: Request) -> Response:
    """The score of ``text_1`` with each ``text_2`` (1:1, 1:N), or of each pair (N:N), as vLLM."""
    service = _service(request)
    body = await read_json(request, ScoreRequest)
    service.check_name(body.model, param="model")
    firsts = [body.text_1] if isinstance(body.text_1, str) else list(body.text_1)
    seconds = [body.text_2] if isinstance(body.text_2, str) else list(body.text_2)
    for name, texts in (("text_1", firsts), ("text_2", seconds)):
        if not texts:
            raise errors.InvalidRequest(f"{name} must contain at least one text", param=name)
    if len(firsts) > 1 and len(firsts) != len(seconds):
        raise errors.InvalidRequest(
            f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: send one text_1 for any number of text_2 (1:N), "
            "or as many of each (N:N)",
            param="text_2",
        )
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    await admit(request)
    keep = service.truncation(body.truncate_prompt_tokens, generative=False)
    result = await until_disconnect(
        request,
        score_pairs(
            service, firsts, seconds, keep=keep, param_first="text_1", param_second="text_2", operation="the score route"
        ),
    )
    request.app.state.metrics.prompt_tokens.inc(result.tokens)
    return JSONResponse(
        {
            "id": f"score-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": service.name,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(result.scores)],
            "usage": _usage(result.tokens),
        }
    )
