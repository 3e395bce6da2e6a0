"""What every family's routes share: route facts, contract error handling, the route index,
body parsing, SSE, disconnects."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import pydantic
from fastapi import APIRouter, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute
from starlette.convertors import Convertor, PathConvertor, StringConvertor, register_url_convertor
from starlette.datastructures import Headers
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import StreamingResponse
from starlette.routing import Router, compile_path
from starlette.types import Receive, Scope, Send

from .. import errors
from ..error_handling import CLIENT_CLOSED, FAMILY_KEY, Family
from ..error_handling import request_id as request_id  # re-exported: the families import it from here
from ..limits import TIMEOUT_HEADER, Admission, Deadline, check_api_key, deadline_of, parse_timeout
from ..validation import parse_body

logger = logging.getLogger("hfserve.api")

M = TypeVar("M", bound=pydantic.BaseModel)
T = TypeVar("T")
E = TypeVar("E", bound=Callable[..., Any])

_FACTS_ATTRIBUTE = "__hfserve_route_facts__"


class ModelNameConvertor(StringConvertor):
    """``{name:model}``: a model name, which holds no ``:`` (KServe v1 puts the verb after one:
    ``/v1/models/{name}:predict``), so ``GET /v1/models/m:predict`` is not the model status of ``m:predict``."""

    regex = "[^/:]+"


register_url_convertor("model", ModelNameConvertor())


@dataclass(frozen=True)
class RouteFacts:
    """What the server must know of a route before it runs it, declared on the endpoint with
    :meth:`ContractRoute.declare` and applied by :class:`ContractRoute`."""

    #: the API family that renders the route's errors (and labels its metrics)
    family: Family
    #: model work: takes a slot from the admission control (``--max_concurrent_requests``)
    model_work: bool = False
    #: answers without the API key (health, readiness, metrics)
    public: bool = False


class ContractRoute(APIRoute):
    """An APIRoute that applies its declared :class:`RouteFacts` and renders every failure with
    its family's renderer.

    When a request matches its path and method, the route records its family in the request's
    state, checks the API key (unless the route is public), sets the request's deadline and counts
    the request in flight. A model-work endpoint takes its admission slot with :func:`admit` once
    its request is known to be valid (a malformed request is answered at once, not queued behind
    the model's work or refused as ``overloaded``); the route holds the slot until the response
    (a stream too) is complete. A request with another method is answered 405 (with ``Allow``)
    before any of that.

    An endpoint that takes the request and string path parameters (every body is parsed by the
    route itself, see :func:`read_json`) is called directly: FastAPI's dependency solving would
    only copy strings, at a cost paid on every request (about 60 µs of a rejected v2 infer's 150).

    The facts are read from the endpoint (FastAPI's ``include_router`` may build the route
    again from it, and keeps the route class).
    """

    @staticmethod
    def declare(family: Family, *, model_work: bool = False, public: bool = False) -> Callable[[E], E]:
        """Declare the :class:`RouteFacts` of the endpoint it decorates (put it under the
        router's decorators): every endpoint of a ContractRoute declares them."""
        facts = RouteFacts(family, model_work, public)

        def declare(endpoint: E) -> E:
            setattr(endpoint, _FACTS_ATTRIBUTE, facts)
            return endpoint

        return declare

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        facts = getattr(endpoint, _FACTS_ATTRIBUTE, None)
        if not isinstance(facts, RouteFacts):
            raise TypeError(
                f"the endpoint {endpoint.__qualname__} of route {path} declares no route facts; decorate it "
                "with @ContractRoute.declare(family, model_work=..., public=...) under the router's decorator"
            )
        self.facts = facts
        super().__init__(path, endpoint, **kwargs)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        facts = self.facts
        state = scope.setdefault("state", {})
        state[FAMILY_KEY] = facts.family
        if scope["method"] not in self.methods:
            await super().handle(scope, receive, send)  # 405 method_not_allowed
            return
        app_state = scope["app"].state
        limits = app_state.limits
        # the middleware's one reading of the headers (Starlette's where the app runs without it)
        headers = state.get("headers") or Headers(scope=scope)
        if limits.api_key and not facts.public:
            check_api_key(limits.api_key, headers.get("authorization"))
        seconds = parse_timeout(headers.get(TIMEOUT_HEADER), limits.request_timeout_seconds)
        deadline = state["deadline"] = Deadline(seconds) if seconds else None
        metrics = app_state.metrics
        in_flight = metrics.child(metrics.in_flight, facts.family)
        in_flight.inc()
        ticket = state[_TICKET_KEY] = _Ticket(app_state.admission, deadline) if facts.model_work else None
        try:
            await super().handle(scope, receive, send)
        finally:
            in_flight.dec()
            if ticket is not None:
                ticket.release()

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
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
        """The endpoint itself when all it takes is the request (or not even it) and string parameters; else None
        (FastAPI's handler). A response model is allowed when it is plain JSON (a dict or list
        of JSON values, as the families' status routes return), which FastAPI's validation
        would give back as it is.

        A string parameter is a path parameter of the route (a ``str`` or ``path`` convertor),
        or, when the path has none of its name and it has a default, a query parameter, as
        FastAPI reads it (the last of repeated ones; the default when absent). Decided from the
        endpoint's own signature, not from FastAPI's internal models."""
        endpoint = self.endpoint
        if not inspect.iscoroutinefunction(endpoint) or self.dependencies or self.status_code is not None:
            return None
        if self.response_model is not None and not _plain_json(self.response_model):
            return None
        try:
            hints = typing.get_type_hints(endpoint)
        except Exception:  # noqa: BLE001 - an unresolvable annotation: leave it to FastAPI
            return None
        request_name: str | None = None
        path_names: list[str] = []
        query: list[tuple[str, Any]] = []
        for param in inspect.signature(endpoint).parameters.values():
            hint = hints.get(param.name)
            if param.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                return None
            if hint is Request and request_name is None:
                request_name = param.name
            elif hint not in _STRING_HINTS:
                return None
            elif isinstance(self.param_convertors.get(param.name), (StringConvertor, PathConvertor)):
                path_names.append(param.name)
            elif param.name not in self.param_convertors and param.default is not inspect.Parameter.empty:
                query.append((param.name, param.default))
            else:
                return None
        req = request_name

        async def direct(request: Request) -> Response:
            kwargs: dict[str, Any] = {req: request} if req is not None else {}
            if path_names:
                path_params = request.path_params
                for name in path_names:
                    kwargs[name] = path_params[name]
            if query:
                params = request.query_params
                for name, default in query:
                    kwargs[name] = params.get(name, default)
            result = await endpoint(**kwargs)
            if isinstance(result, Response):
                return result
            try:  # plain JSON (an embedding's floats: jsonable_encoder walks them in Python, ~10x slower)
                return JSONResponse(result)
            except TypeError:  # anything else as FastAPI renders it without a response model
                return JSONResponse(jsonable_encoder(result))

        return direct


_JSON_LEAVES: tuple[Any, ...] = (Any, str, int, float, bool, type(None))


def _plain_json(annotation: Any) -> bool:
    """Whether ``annotation`` is a dict or list of JSON values (``dict[str, Any]``, ``dict[str, list[str]]``)."""
    if typing.get_origin(annotation) not in (dict, list):
        return False
    return all(arg in _JSON_LEAVES or _plain_json(arg) for arg in typing.get_args(annotation))


#: the annotations of parameters a direct handler passes as strings
_STRING_HINTS: tuple[Any, ...] = (str, str | None)  # ``Optional[str]`` equals ``str | None``


_TICKET_KEY = "admission"


class _Ticket:
    """A model-work request's admission: taken by :func:`admit`, given back by its route."""

    __slots__ = ("admission", "deadline", "held")

    def __init__(self, admission: Admission, deadline: Deadline | None):
        self.admission = admission
        self.deadline = deadline
        self.held = False

    async def take(self) -> None:
        if not self.held:
            await self.admission.acquire(self.deadline)
            self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.admission.release()


async def admit(request: Request) -> None:
    """Take the request's admission slot (waiting in the queue within its deadline), or raise
    ``overloaded``: what a model-work endpoint calls once its request is valid, before it
    tokenizes or runs anything. The slot is held until the response is complete."""
    ticket: _Ticket | None = request.scope["state"].get(_TICKET_KEY)
    if ticket is None:
        raise RuntimeError(f"admit() on {request.url.path}, a route not declared as model work")
    await ticket.take()


@dataclass(frozen=True)
class _Indexed:
    path: str  # the full path: include prefix + route path
    head: str  # its literal start, up to its first parameter
    regex: re.Pattern[str]
    convertors: dict[str, Convertor[Any]]
    route: APIRoute


class RouteIndex:
    """The router's dispatch for the families' routes: one flat list, a cheap pre-filter.

    Starlette's router tries its routes one by one, and FastAPI since 0.165 keeps each included
    router whole (a request is matched through the included router, then again inside it), so
    the model routes are found after more than twenty regular-expression matches. The index holds
    every route of the included routers with its full path (include prefix + route path), in
    the order the app's router tries them, and matches a request only against the routes whose
    path starts the way the request's does (the literal part before the first parameter). The
    first route that matches fully (path and method) handles the request, as it would after the
    router's scan. Anything else goes through the router's own dispatch: no route (404), a
    route with another method (405), the app's own routes (``/openapi.json``, which share no
    path with the families), a request under a root path.
    """

    def __init__(self, router: Router, includes: Sequence[tuple[APIRouter, str]]):
        self.router = router
        self.dispatch = router.middleware_stack
        self.routes: list[_Indexed] = []
        for family_router, prefix in includes:
            for route in family_router.routes:
                if isinstance(route, APIRoute):
                    path = prefix + route.path
                    regex, _, convertors = compile_path(path)
                    self.routes.append(_Indexed(path, path.split("{", 1)[0], regex, convertors, route))

    def route_for(self, method: str, path: str) -> tuple[APIRoute, dict[str, Any]] | None:
        """The route that takes ``method`` on ``path``, with its path parameters; None if none does."""
        for entry in self.routes:
            if path.startswith(entry.head) and method in entry.route.methods:
                match = entry.regex.match(path)
                if match:
                    params = {key: entry.convertors[key].convert(value) for key, value in match.groupdict().items()}
                    return entry.route, params
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.route_for(scope["method"], scope["path"]) if scope["type"] == "http" and not scope.get("root_path") else None
        if found is None:
            await self.dispatch(scope, receive, send)
            return
        route, params = found
        scope.setdefault("router", self.router)
        scope.update(endpoint=route.endpoint, path_params=params, route=route)
        await route.handle(scope, receive, send)


def index_routes(router: Router, includes: Sequence[tuple[APIRouter, str]]) -> RouteIndex:
    """Install a :class:`RouteIndex` of the ``(router, prefix)`` pairs included in ``router``, in
    the order they were included; call it once they all are."""
    index = RouteIndex(router, includes)
    router.middleware_stack = index
    return index


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
        await _close(events)
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
            await _close(events)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _close(events: AsyncIterator[str]) -> None:
    """Close ``events`` when it can be closed (an async generator: its ``finally`` runs now)."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def sse(data: str) -> str:
    return f"data: {data}\n\n"
