"""What every family's routes share: contract error handling, body parsing, SSE, disconnects."""

from __future__ import annotations

import asyncio
import inspect
import logging
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
import pydantic
from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import StreamingResponse
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from .. import errors
from ..limits import deadline_of
from ..validation import parse_body

logger = logging.getLogger("hfserve.api")

M = TypeVar("M", bound=pydantic.BaseModel)
T = TypeVar("T")

#: status logged for a request whose client went away (nginx's convention)
CLIENT_CLOSED = 499


class ContractRoute(APIRoute):
    """An APIRoute whose every failure is rendered by the route's family renderer.

    An endpoint whose only parameter is the request (every body is parsed by the route
    itself, see :func:`read_json`) is called directly: FastAPI's dependency solving would
    find nothing to solve, at a cost paid on every request.
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = self._direct_handler() or super().get_route_handler()

        async def contract_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except errors.ClientDisconnected:
                return disconnected(request)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a contract error
                return request.app.state.errors.render(request, exc)

        return contract_handler

    def _direct_handler(self) -> Callable[[Request], Awaitable[Response]] | None:
        """The endpoint itself when all it takes is the request; else None (FastAPI's handler).

        Decided from the endpoint's own signature, not from FastAPI's internal models."""
        endpoint = self.endpoint
        if not inspect.iscoroutinefunction(endpoint) or self.dependencies or self.response_model is not None or self.status_code is not None:
            return None
        params = list(inspect.signature(endpoint).parameters.values())
        try:
            hints = typing.get_type_hints(endpoint)
        except Exception:  # noqa: BLE001 - an unresolvable annotation: leave it to FastAPI
            return None
        if len(params) != 1 or params[0].kind is inspect.Parameter.VAR_KEYWORD or hints.get(params[0].name) is not Request:
            return None
        name = params[0].name

        async def direct(request: Request) -> Response:
            result = await endpoint(**{name: request})
            # a plain value is rendered as FastAPI renders it without a response model
            return result if isinstance(result, Response) else JSONResponse(jsonable_encoder(result))

        return direct


class RouteIndex:
    """The router's dispatch, with a shortcut for requests to a fixed path.

    Starlette tries every route in order until one matches; the model routes come after
    twenty others. For each path of a route without path parameters, the index keeps the
    routes (in their order) whose pattern matches that path: the first of them to match
    fully is the route the full scan would choose. A path not in the index, no full match
    (a wrong method: 405), or a request under a root path goes through the router's own
    dispatch.
    """

    def __init__(self, router: Any):
        self.router = router
        self.dispatch = router.middleware_stack
        routes = list(router.routes)
        self.index: dict[str, list[Any]] = {}
        for route in routes:
            if isinstance(route, Route) and not route.param_convertors:
                self.index.setdefault(
                    route.path, [r for r in routes if not isinstance(r, Route) or r.path_regex.match(route.path)]
                )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):  # the path is the route path
            for route in self.index.get(scope["path"], ()):
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.setdefault("router", self.router)
                    scope["route"] = route
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await self.dispatch(scope, receive, send)


def index_routes(router: Any) -> None:
    """Install :class:`RouteIndex` on ``router`` once its routes are all added."""
    router.middleware_stack = RouteIndex(router)


def dump_json(content: Any) -> bytes:
    """Compact JSON, as every family's responses are rendered (orjson: an embedding's floats
    cost about a twentieth of what ``json.dumps`` takes). Non-finite floats become ``null``."""
    return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


class JSONResponse(_StarletteJSONResponse):
    """Starlette's JSONResponse, rendered by :func:`dump_json`."""

    def render(self, content: Any) -> bytes:
        return dump_json(content)


def tidy_openapi(doc: dict[str, Any]) -> dict[str, Any]:
    """Make the generated OpenAPI document true to what the server does.

    Bodies documented with :func:`json_schema_body` carry their nested models in
    ``$defs``; they move to ``components/schemas`` where their ``$ref``s point. FastAPI's
    422 responses are removed: validation failures are 400 ``invalid_request`` here.
    """
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path_item in doc.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            operation.get("responses", {}).pop("422", None)
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if isinstance(body, dict):
                schemas.update(body.pop("$defs", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return doc


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or "unknown"


def disconnected(request: Request) -> Response:
    request.app.state.errors.disconnected(request)
    return Response(status_code=CLIENT_CLOSED)


async def read_json(request: Request, model: type[M], prefix: str = "") -> M:
    body = await request.body()
    return parse_body(body, request.headers.get("content-type"), model, prefix)


def json_schema_body(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a body that the route parses itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}},
        }
    }


async def until_disconnect(request: Request, work: Awaitable[T], poll: float = 0.25) -> T:
    """Await ``work``; if the client goes away first, or the request's deadline passes,
    cancel it and raise ClientDisconnected or ``timeout``."""
    deadline = deadline_of(request)
    task = asyncio.ensure_future(work)
    try:
        while True:
            wait = poll if deadline is None else max(0.0, min(poll, deadline.remaining()))
            done, _ = await asyncio.wait({task}, timeout=wait)
            if done:
                return task.result()
            if deadline is not None and deadline.remaining() <= 0:
                raise deadline.error()
            if await request.is_disconnected():
                raise errors.ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def sse_response(
    request: Request,
    events: AsyncIterator[str],
    error_event: Callable[[errors.HFServeError], str],
    done_event: str | None = None,
) -> StreamingResponse:
    """An SSE response whose first event is computed before the 200 goes out.

    Errors raised while computing the first event are normal error responses
    (the caller sees them raised here). Errors after that are sent in the
    stream with ``error_event`` (followed by ``done_event``), never by
    dropping the connection.
    """
    deadline = deadline_of(request)

    async def next_event() -> str:
        if deadline is None:
            return await events.__anext__()
        return await deadline.run(events.__anext__())

    try:
        first = await next_event()
    except StopAsyncIteration:
        first = ""
    except BaseException:
        await events.aclose()
        raise

    async def body() -> AsyncIterator[str]:
        try:
            if first:
                yield first
            try:
                while True:
                    try:
                        event = await next_event()
                    except StopAsyncIteration:
                        break
                    yield event
            except errors.ClientDisconnected:
                request.app.state.errors.disconnected(request)
                return
            except Exception as exc:  # noqa: BLE001 - reported in the stream
                err = request.app.state.errors.in_stream(request, exc)
                yield error_event(err)
            if done_event:
                yield done_event
        except (asyncio.CancelledError, GeneratorExit):
            request.app.state.errors.disconnected(request)
            raise
        finally:
            await events.aclose()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def sse(data: str) -> str:
    return f"data: {data}\n\n"
