"""The app: wires the served model, the API families and the error contract together."""

from __future__ import annotations

import os

from fastapi import APIRouter, FastAPI

from .api import kserve_v1, kserve_v2, openai, scoring
from .api.routing import index_routes, tidy_openapi
from .config import Config
from .error_handling import ErrorHandling, family_prefixes
from .limits import Admission
from .metrics import Metrics
from .middleware import ContractMiddleware
from .service import ModelService


def openai_prefix(configured: str | None = None) -> str:
    """The OpenAI routes' prefix: the configured one, else ``$KSERVE_OPENAI_ROUTE_PREFIX``, else
    ``/openai``; empty when set empty."""
    value = configured if configured is not None else os.environ.get("KSERVE_OPENAI_ROUTE_PREFIX", "openai")
    value = value.strip("/")
    return f"/{value}" if value else ""


def create_app(service: ModelService, config: Config) -> FastAPI:
    prefix = openai_prefix(config.server.openai_prefix)
    metrics = Metrics()
    metrics.engine_registry = lambda: getattr(service.backend, "metrics_registry", None)
    handling = ErrorHandling(
        metrics,
        family_prefixes(prefix),
        {
            "openai": openai.render_error,
            "v1": kserve_v1.render_error,
            "v2": kserve_v2.render_error,
            "other": kserve_v2.render_error,
        },
    )

    app = FastAPI(
        title="hfserve",
        summary="KServe v1/v2 and OpenAI-compatible APIs for a Hugging Face model",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.admission = Admission(config.limits.max_concurrent_requests, config.limits.max_queue_size)
    app.state.limits = config.limits
    app.state.metrics = metrics
    app.state.errors = handling
    handling.install(app)

    # in this order: with an empty OpenAI prefix, GET /v1/models is KServe v1's
    includes: list[tuple[APIRouter, str]] = [
        (kserve_v1.router, ""),
        (kserve_v2.router, ""),
        (openai.router, f"{prefix}/v1"),
        (scoring.router, f"{prefix}/v1"),
        (kserve_v2.root_router, ""),
    ]
    for router, path_prefix in includes:
        app.include_router(router, prefix=path_prefix)
    index_routes(app.router, includes)

    generate_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = tidy_openapi(generate_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    app.add_middleware(
        ContractMiddleware,
        handling=handling,
        max_body_bytes=config.limits.max_request_body_bytes,
        log_requests=config.server.log_requests,
        access_log_format=config.server.access_log_format,
    )
    return app
