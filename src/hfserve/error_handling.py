"""The error pipeline: which API family answers a request, and how its errors are counted,
logged and rendered.

A request's family is declared by the route that handles it (see ``RouteFacts`` in
:mod:`hfserve.api.routing`, recorded in the request's state as the route starts); a request
that no route takes (a 404) belongs to the family whose path prefix it starts with (:func:`family_prefixes`).
The app gives :class:`ErrorHandling` each family's renderer: this module knows no API family.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Literal

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import Scope

from . import errors
from .metrics import Metrics
from .validation import from_error_list

logger = logging.getLogger("hfserve.errors")

#: the HTTP API families: each renders its errors in its own shape; "other" (``/``, ``/metrics``)
#: uses the KServe shape
Family = Literal["openai", "v1", "v2", "other"]
#: a family's error response: the error, and the headers every family sends with it
Renderer = Callable[[errors.HFServeError, dict[str, str]], Response]

#: status logged for a request whose client went away (nginx's convention)
CLIENT_CLOSED = 499

#: the request-state key under which a route records its family
FAMILY_KEY = "family"


def family_prefixes(openai_prefix: str) -> tuple[tuple[str, Family], ...]:
    """The families of paths that no route takes, first match wins (a path ``p`` belongs to an
    entry ``e`` when ``p + "/"`` starts with ``e``); anything else is "other".

    With an empty OpenAI prefix OpenAI shares ``/v1`` with KServe v1: its own paths come first.
    """
    openai: tuple[str, ...] = (f"{openai_prefix}/",) if openai_prefix else ("/v1/completions", "/v1/chat/", "/v1/embeddings")
    return (*((p, "openai") for p in openai), ("/v1/", "v1"), ("/v2/", "v2"))


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or "unknown"


class ErrorHandling:
    """Picks the family of a request, classifies, counts, logs and renders errors."""

    def __init__(self, metrics: Metrics, prefixes: tuple[tuple[str, Family], ...], renderers: Mapping[Family, Renderer]):
        self.metrics = metrics
        self.prefixes = prefixes
        self.renderers = renderers

    def family(self, scope: Scope) -> Family:
        """The family of the route that took the request, else the one its path prefix names."""
        declared: Family | None = scope.get("state", {}).get(FAMILY_KEY)
        if declared is not None:
            return declared
        path = scope["path"] + "/"
        return next((family for prefix, family in self.prefixes if path.startswith(prefix)), "other")

    def contract_error(self, family: str, rid: str, exc: BaseException) -> errors.HFServeError:
        """``exc`` as its contract class, counted under ``family`` (an HTTP family, or "grpc") and logged."""
        err = errors.classify(exc, rid)
        self.metrics.child(self.metrics.errors, family, err.code).inc()
        # internal errors were logged with their traceback; the server's own refusals (overloaded,
        # timeout, not ready) are worth a line; a client's mistake went back to the client, and the
        # access log line has its code: its message is for debugging
        level = logging.INFO if err.http_status >= 500 else logging.DEBUG
        if err.code != errors.INTERNAL_ERROR.code and logger.isEnabledFor(level):
            logger.log(level, "request %s: %s: %s", rid, err.code, err.message)
        return err

    def render_for(self, scope: Scope, rid: str, exc: BaseException) -> Response:
        family = self.family(scope)
        err = self.contract_error(family, rid, exc)
        return self.renderers[family](err, {"x-error-code": err.code, **err.headers()})

    def render(self, request: Request, exc: BaseException) -> Response:
        return self.render_for(request.scope, request_id(request), exc)

    def in_stream(self, request: Request, exc: BaseException) -> errors.HFServeError:
        """Classify an error that happened after a stream started (it is sent in the stream)."""
        return self.contract_error(self.family(request.scope), request_id(request), exc)

    def disconnected(self, request: Request) -> None:
        self.metrics.child(self.metrics.disconnects, self.family(request.scope)).inc()
        logger.info("request %s: client disconnected (%d); its work was cancelled", request_id(request), CLIENT_CLOSED)

    # the app's exception handlers: what the framework raises, in the contract
    async def http_exception(self, request: Request, exc: HTTPException) -> Response:
        response = self.render(request, http_error(exc, request))
        allowed = (exc.headers or {}).get("Allow")
        if exc.status_code == 405 and allowed:
            response.headers["Allow"] = allowed
        return response

    async def validation_exception(self, request: Request, exc: RequestValidationError) -> Response:
        return self.render(request, from_error_list(list(exc.errors())))

    async def contract_exception(self, request: Request, exc: errors.HFServeError) -> Response:
        return self.render(request, exc)

    def install(self, app: FastAPI) -> None:
        """Register the handlers of framework and contract exceptions on ``app``."""
        app.exception_handler(HTTPException)(self.http_exception)
        app.exception_handler(RequestValidationError)(self.validation_exception)
        app.exception_handler(errors.HFServeError)(self.contract_exception)


def http_error(exc: HTTPException, request: Request) -> errors.HFServeError:
    """A framework HTTP exception (no route, wrong method, ...) as its contract class."""
    if exc.status_code == 404:
        return errors.RouteNotFound(f"No route {request.method} {errors.echo(request.url.path)}; see the README for the routes")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        hint = f"; use {allowed}" if allowed else ""
        return errors.MethodNotAllowed(f"Method {request.method} is not allowed on {errors.echo(request.url.path)}{hint}")
    if exc.status_code == 413:
        return errors.RequestTooLarge(str(exc.detail))
    if exc.status_code == 415:
        return errors.UnsupportedMediaType(str(exc.detail))
    if 400 <= exc.status_code < 500:
        return errors.InvalidRequest(str(exc.detail))
    return errors.InternalError(str(exc.detail))
