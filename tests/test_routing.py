"""Routes, their declared facts and the route index (api/routing.py), in this process.

The app is built here; no model is loaded. The index must pick, for every request, the route the
router's own dispatch picks (compared on every route's path with every method, with the default
and with an empty OpenAI prefix), and it must be what actually dispatches the model routes.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from unittest import mock

import pytest
from fastapi import APIRouter, Request
from fastapi.routing import request_response as fastapi_request_response

from hfserve.api import kserve_v1, kserve_v2, openai, scoring
from hfserve.api.routing import ContractRoute, RouteFacts, RouteIndex
from hfserve.app import create_app
from hfserve.config import Config, ModelConfig, ServerConfig
from hfserve.error_handling import ErrorHandling, family_prefixes
from hfserve.metrics import Metrics

METHODS = ("GET", "POST", "PUT", "DELETE", "HEAD")
PARAM = re.compile(r"\{[^}]+\}")

# what every route declares: (method, path with parameters as "m") -> facts
FACTS = {
    ("GET", "/"): RouteFacts("other", public=True),
    ("GET", "/metrics"): RouteFacts("other", public=True),
    ("GET", "/v1/models"): RouteFacts("v1"),
    ("GET", "/v1/models/m"): RouteFacts("v1", public=True),
    ("POST", "/v1/models/m:predict"): RouteFacts("v1", model_work=True),
    ("POST", "/v1/models/m:explain"): RouteFacts("v1"),
    ("GET", "/v2"): RouteFacts("v2"),
    ("GET", "/v2/health/live"): RouteFacts("v2", public=True),
    ("GET", "/v2/health/ready"): RouteFacts("v2", public=True),
    ("GET", "/v2/models"): RouteFacts("v2"),
    ("GET", "/v2/models/m"): RouteFacts("v2"),
    ("GET", "/v2/models/m/versions/m"): RouteFacts("v2"),
    ("GET", "/v2/models/m/ready"): RouteFacts("v2", public=True),
    ("GET", "/v2/models/m/versions/m/ready"): RouteFacts("v2", public=True),
    ("POST", "/v2/models/m/infer"): RouteFacts("v2", model_work=True),
    ("POST", "/v2/models/m/versions/m/infer"): RouteFacts("v2", model_work=True),
    ("POST", "/v2/models/m/generate"): RouteFacts("v2", model_work=True),
    ("POST", "/v2/models/m/versions/m/generate"): RouteFacts("v2", model_work=True),
    ("POST", "/v2/models/m/generate_stream"): RouteFacts("v2", model_work=True),
    ("POST", "/v2/models/m/versions/m/generate_stream"): RouteFacts("v2", model_work=True),
    ("POST", "/openai/v1/completions"): RouteFacts("openai", model_work=True),
    ("POST", "/openai/v1/chat/completions"): RouteFacts("openai", model_work=True),
    ("POST", "/openai/v1/embeddings"): RouteFacts("openai", model_work=True),
    ("POST", "/openai/v1/rerank"): RouteFacts("openai", model_work=True),
    ("POST", "/openai/v1/score"): RouteFacts("openai", model_work=True),
    # vLLM's dynamic LoRA routes (answering not_found unless VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)
    ("POST", "/openai/v1/load_lora_adapter"): RouteFacts("openai"),
    ("POST", "/openai/v1/unload_lora_adapter"): RouteFacts("openai"),
    ("GET", "/openai/v1/models"): RouteFacts("openai"),
    ("GET", "/openai/v1/models/m"): RouteFacts("openai"),
}
# paths that no route (or only a route with another method) takes, and overlapping ones
EXTRA_PATHS = ["/nothing", "/openapi.json", "/v2/models/m/nothing", "/v1/models/m:nothing", "/v1/models/m/x",
               "/openai/v1/models/org/m", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models/m:predict/x",
               "/v2/health/ready/"]


def make_app(prefix: str = "openai") -> Any:
    service = mock.MagicMock()
    service.name = "m"
    return create_app(service, Config(model=ModelConfig(source="m", name="m"), server=ServerConfig(openai_prefix=prefix)))


def scope(app: Any, method: str, path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "app": app}


def sample_path(path: str) -> str:
    return PARAM.sub("m", path)


def dispatch(app: Any, method: str, path: str) -> tuple[int, list[tuple[Any, bool]]]:
    """(status, [(endpoint, method matched)] of the routes whose handle ran) for a request sent
    through the app, with every route's work replaced by a 204."""
    reached: list[tuple[Any, bool]] = []
    status: list[int] = []
    original = ContractRoute.handle

    async def recorded(route: ContractRoute, scope: dict, receive: Any, send: Any) -> None:
        matched = scope["method"] in route.methods
        reached.append((route.endpoint, matched))
        if not matched:
            await original(route, scope, receive, send)  # the real 405
            return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    with mock.patch.object(ContractRoute, "handle", recorded):
        asyncio.run(app(scope(app, method, path), receive, send))
    return status[0], reached


@pytest.mark.parametrize("prefix", ["openai", ""])
def test_index_dispatches_as_the_router(prefix):
    """Every route's path and some others, with every method: the index reaches the same route
    (or leaves the request to the router), with the default OpenAI prefix and with an empty one
    (where /v1/models belongs to both KServe v1 and OpenAI, and the first included wins)."""
    app = make_app(prefix)
    index = app.router.middleware_stack
    assert isinstance(index, RouteIndex)
    paths = sorted({sample_path(entry.path) for entry in index.routes} | set(EXTRA_PATHS))
    compared = 0
    for path in paths:
        for method in METHODS:
            with_index = dispatch(app, method, path)
            app.router.middleware_stack = index.dispatch
            try:
                by_router = dispatch(app, method, path)
            finally:
                app.router.middleware_stack = index
            assert with_index == by_router, (method, path)
            compared += 1
    assert compared == len(paths) * len(METHODS) and len(paths) >= len(FACTS)


@pytest.mark.parametrize("prefix", ["openai", ""])
def test_index_dispatches_every_route_itself(prefix):
    """Every route, the model routes first of all, is reached through the index alone: the
    router's own dispatch is never called for them."""
    app = make_app(prefix)
    index = app.router.middleware_stack

    async def router_dispatch(scope: dict, receive: Any, send: Any) -> None:
        raise AssertionError(f"the router dispatched {scope['method']} {scope['path']}")

    index.dispatch = router_dispatch
    model_work = [key for key, facts in FACTS.items() if facts.model_work]
    assert len(model_work) == 12
    for method, path in sorted(FACTS, key=lambda key: key not in model_work):
        path = path.replace("/openai", f"/{prefix}" if prefix else "")
        status, reached = dispatch(app, method, path)
        assert status == 204 and len(reached) == 1 and reached[0][1], (method, path)


def test_every_route_declares_its_facts():
    """Family, model work (an admission slot) and public (no API key) of every route, exactly."""
    index = make_app().router.middleware_stack
    declared = {}
    for entry in index.routes:
        for method in entry.route.methods:
            declared[(method, sample_path(entry.path))] = entry.route.facts
    assert declared == FACTS


def test_a_route_without_facts_is_refused():
    router = APIRouter(route_class=ContractRoute)
    with pytest.raises(TypeError, match="declares no route facts"):

        @router.get("/undeclared")
        async def undeclared() -> dict:
            return {}


def test_empty_prefix_keeps_kserve_v1_model_list():
    """With an empty OpenAI prefix GET /v1/models stays KServe v1's route (it is included first),
    and a path of OpenAI's only is OpenAI's."""
    index = make_app("").router.middleware_stack
    route, _ = index.route_for("GET", "/v1/models")
    assert route.endpoint is kserve_v1.list_models
    route, params = index.route_for("GET", "/v1/models/org/m")
    assert route.endpoint is openai.retrieve_model and params == {"model_id": "org/m"}
    assert index.route_for("POST", "/v1/embeddings")[0].endpoint is openai.create_embeddings


@pytest.mark.parametrize(
    ("prefix", "path", "family"),
    [
        ("/openai", "/openai/v1/nothing", "openai"),
        ("/openai", "/openai", "openai"),
        ("/openai", "/openaix", "other"),
        ("/openai", "/v1/completions", "v1"),
        ("/openai", "/v1", "v1"),
        ("/openai", "/v2/nothing", "v2"),
        ("/openai", "/", "other"),
        ("/openai", "/metricsx", "other"),
        ("/ai", "/ai/v1/nothing", "openai"),
        ("/ai", "/openai/v1/nothing", "other"),
        ("", "/v1/completions", "openai"),
        ("", "/v1/chat/completions", "openai"),
        ("", "/v1/embeddings", "openai"),
        ("", "/v1/models/nothing/here", "v1"),
        ("", "/v1/nothing", "v1"),
    ],
)
def test_family_of_a_path_no_route_takes(prefix, path, family):
    """A 404's family comes from one table of path prefixes."""
    handling = ErrorHandling(Metrics(), family_prefixes(prefix), {})
    assert handling.family({"path": path, "state": {}}) == family


def test_request_and_string_parameter_endpoints_are_called_directly():
    """The model routes take the request and string path parameters: they skip FastAPI's
    dependency solving. A route with a response model keeps FastAPI's handler."""

    def direct(router):
        return {r.path for r in router.routes if r._direct_handler()}

    assert {"/completions", "/chat/completions", "/embeddings", "/models/{model_id:path}"} <= direct(openai.router)
    assert {"/rerank", "/score"} <= direct(scoring.router)
    assert {"/models/{name}/infer", "/models/{name}/versions/{version}/infer", "/models/{name}",
            "/models/{name}/ready", "/health/ready", ""} <= {p.removeprefix("/v2") for p in direct(kserve_v2.router)}
    assert {"/v1/models/{name:model}", "/v1/models/{name:model}:predict"} <= direct(kserve_v1.router)


def test_direct_handler_is_refused_what_it_cannot_pass():
    """Parameters that are not strings of the path (or defaulted strings of the query) leave the
    route to FastAPI."""
    router = APIRouter(route_class=ContractRoute)

    @router.get("/a/{n:int}")
    @ContractRoute.declare("v2")
    async def typed(request: Request, n: int) -> dict:
        return {}

    @router.get("/b")
    @ContractRoute.declare("v2")
    async def required_query(request: Request, q: str) -> dict:
        return {}

    @router.get("/c/{n}")
    @ContractRoute.declare("v2")
    async def variadic(request: Request, *n: str) -> dict:
        return {}

    @router.get("/d", response_model=RouteFacts)
    @ContractRoute.declare("v2")
    async def modelled(request: Request) -> Any:
        return {}

    assert not [r.path for r in router.routes if r._direct_handler()]


# requests whose answers must not depend on who calls the endpoint
SAME_ANSWER = [
    ("GET", "/v2", None),
    ("GET", "/v2/models", None),
    ("GET", "/v1/models", None),
    ("GET", "/v2/models/fake", None),
    ("GET", "/v2/models/fake?version=1", None),
    ("GET", "/v2/models/fake?version=7", None),
    ("GET", "/v2/models/fake?version=7&version=1", None),
    ("GET", "/v2/models/fake/versions/1", None),
    ("GET", "/v2/models/fake/versions/7/ready", None),
    ("GET", "/v2/models/nope/ready", None),
    ("GET", "/v2/models/fa%20ke/ready", None),
    ("GET", "/v1/models/fake", None),
    ("GET", "/v1/models/nope", None),
    ("GET", "/openai/v1/models/fake", None),
    ("GET", "/openai/v1/models/org/fake", None),
    ("POST", "/v2/models/fake/infer", {"inputs": 3}),
    ("POST", "/v2/models/fake/versions/2/infer", {"inputs": []}),
    ("POST", "/v2/models/fake/generate", {"text_input": "hi", "parameters": {"max_tokens": 2}}),
    ("POST", "/v1/models/fake:predict", {"instances": 3}),
    ("POST", "/v1/models/nope:predict", {"instances": ["x"]}),
    ("POST", "/v1/models/fake:predict", {"instances": ["hi"], "parameters": {"max_tokens": 3}}),
]
# the same on an embedding model: answers made of many floats
SAME_ANSWER_EMBEDDING = [
    ("POST", "/v1/models/fake:predict", {"instances": ["a b", "c"]}),
    ("POST", "/v2/models/fake/infer", {"inputs": [{"name": "input-0", "shape": [2], "datatype": "BYTES", "data": ["a", "b c"]}]}),
    ("POST", "/openai/v1/embeddings", {"model": "fake", "input": ["a", "b"]}),
]


@pytest.mark.anyio
async def test_direct_handlers_answer_as_fastapi_does():
    """Every request above gets the same status and body from the direct handlers as from
    FastAPI's own handler (the direct one switched off)."""
    from hfserve.tasks import Task
    from tests.fakes import fake_server

    async def answers():
        out = []
        for task, requests in ((Task.text_generation, SAME_ANSWER), (Task.text_embedding, SAME_ANSWER_EMBEDDING)):
            async with fake_server(task) as srv:
                for method, path, body in requests:
                    resp = await srv.client.request(method, path, json=body)
                    answer = resp.json()
                    for key in ("created", "id"):  # the time of the request, a fresh id
                        answer.pop(key, None)
                    out.append((method, path, resp.status_code, resp.headers.get("x-error-code"), answer))
        return out

    direct = await answers()
    routes = [r for module in (kserve_v1, kserve_v2, openai) for r in module.router.routes if isinstance(r, ContractRoute)]
    apps = [r.app for r in routes]
    try:
        with mock.patch.object(ContractRoute, "_direct_handler", lambda self: None):
            for route in routes:  # as APIRoute builds it, with FastAPI's handler
                route.app = fastapi_request_response(route.get_route_handler())
        reference = await answers()
    finally:
        for route, app in zip(routes, apps):
            route.app = app
    assert direct == reference
    assert {status for *_, status, _, _ in direct} >= {200, 400, 404}
