"""The app: wires the served model, the API families and the error contract together."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import errors
from .api import kserve_v1, kserve_v2, openai
from .api.routing import CLIENT_CLOSED, index_routes, request_id, tidy_openapi
from .config import Config
from .limits import Admission
from .metrics import Metrics
from .middleware import ContractMiddleware
from .service import ModelService
from .validation import from_error_list

logger = logging.getLogger("hfserve.app")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

OPENAI_ONLY_PATHS = ("/v1/completions", "/v1/chat/", "/v1/embeddings")

Renderer = Callable[[errors.HFServeError], Response]


@dataclass
class AppConfig:
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_requests: bool = True
    openai_prefix: str | None = None  # default: $KSERVE_OPENAI_ROUTE_PREFIX or "openai"
    max_concurrent_requests: int | None = None
    max_queue_size: int = 0
    request_timeout_seconds: float | None = None
    api_key: str | None = None


def openai_prefix(configured: str | None = None) -> str:
    value = configured if configured is not None else os.environ.get("KSERVE_OPENAI_ROUTE_PREFIX", "openai")
    value = value.strip("/")
    return f"/{value}" if value else ""


class ErrorHandling:
    """Picks the family of a request, classifies, counts, logs and renders errors."""

    def __init__(self, metrics: Metrics, openai_prefix: str):
        self.metrics = metrics
        self.openai_prefix = openai_prefix
        self.renderers: dict[str, Renderer] = {
            "openai": openai.render_error,
            "v1": kserve_v1.render_error,
            "v2": kserve_v2.render_error,
            "other": kserve_v2.render_error,
        }

    def family(self, path: str) -> str:
        if self.openai_prefix:
            if path.startswith(f"{self.openai_prefix}/") or path == self.openai_prefix:
                return "openai"
        elif path.startswith(OPENAI_ONLY_PATHS):  # an empty prefix shares /v1 with KServe v1
            return "openai"
        if path.startswith("/v1/") or path == "/v1":
            return "v1"
        if path.startswith("/v2/") or path == "/v2":
            return "v2"
        return "other"

    def contract_error(self, family: str, rid: str, exc: BaseException) -> errors.HFServeError:
        err = errors.classify(exc, rid)
        self.metrics.child(self.metrics.errors, family, err.code).inc()
        # internal errors were logged with their traceback; the server's own refusals (overloaded,
        # timeout, not ready) are worth a line; a client's mistake went back to the client, and the
        # access log line has its code: its message is for debugging
        level = logging.INFO if err.http_status >= 500 else logging.DEBUG
        if err.code != errors.INTERNAL_ERROR.code and logger.isEnabledFor(level):
            logger.log(level, "request %s: %s: %s", rid, err.code, err.message)
        return err

    def render_for(self, path: str, rid: str, exc: BaseException) -> Response:
        family = self.family(path)
        err = self.contract_error(family, rid, exc)
        response = self.renderers[family](err)
        response.headers["x-error-code"] = err.code
        for name, value in err.headers().items():
            response.headers[name] = value
        return response

    def render(self, request: Request, exc: BaseException) -> Response:
        return self.render_for(request.scope["path"], request_id(request), exc)

    def in_stream(self, request: Request, exc: BaseException) -> errors.HFServeError:
        """Classify an error that happened after a stream started (it is sent in the stream)."""
        return self.contract_error(self.family(request.scope["path"]), request_id(request), exc)

    def disconnected(self, request: Request) -> None:
        self.metrics.child(self.metrics.disconnects, self.family(request.scope["path"])).inc()
        logger.info("request %s: client disconnected (%d); its work was cancelled", request_id(request), CLIENT_CLOSED)


def _http_exception(exc: StarletteHTTPException, request: Request) -> errors.HFServeError:
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


def create_app(service: ModelService, config: AppConfig | Config | None = None) -> FastAPI:
    if isinstance(config, Config):  # interim, until AppConfig is replaced by the typed configuration
        config = AppConfig(
            max_request_body_bytes=config.limits.max_request_body_bytes,
            log_requests=config.server.log_requests,
            openai_prefix=config.server.openai_prefix,
            max_concurrent_requests=config.limits.max_concurrent_requests,
            max_queue_size=config.limits.max_queue_size,
            request_timeout_seconds=config.limits.request_timeout_seconds,
            api_key=config.limits.api_key,
        )
    config = config or AppConfig()
    prefix = openai_prefix(config.openai_prefix)
    metrics = Metrics()
    handling = ErrorHandling(metrics, prefix)

    app = FastAPI(
        title="hfserve",
        summary="KServe v1/v2 and OpenAI-compatible APIs for a Hugging Face model",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
    )
    admission = Admission(config.max_concurrent_requests, config.max_queue_size)
    app.state.service = service
    app.state.admission = admission
    app.state.metrics = metrics
    app.state.errors = handling

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        response = handling.render(request, _http_exception(exc, request))
        if exc.status_code == 405 and exc.headers and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_exception(request: Request, exc: RequestValidationError) -> Response:
        return handling.render(request, from_error_list(list(exc.errors())))

    @app.exception_handler(errors.HFServeError)
    async def contract_exception(request: Request, exc: errors.HFServeError) -> Response:
        return handling.render(request, exc)

    app.include_router(kserve_v1.router)
    app.include_router(kserve_v2.router)
    app.include_router(openai.router, prefix=f"{prefix}/v1")
    app.include_router(kserve_v2.root_router)
    index_routes(app.router)

    generate_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = tidy_openapi(generate_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    app.add_middleware(
        ContractMiddleware,
        handling=handling,
        max_body_bytes=config.max_request_body_bytes,
        admission=admission,
        log_requests=config.log_requests,
        api_key=config.api_key,
        request_timeout=config.request_timeout_seconds,
    )
    return app
