"""CPU cost of the HTTP request path inside the app, with an instant model.

    python benchmarks/app_path.py [--requests 5000] [--runs 5]

Drives the ASGI app (``create_app``: middleware, routing, validation, rendering) directly on
one event loop (uvloop where installed, as the server runs), one request after another, with
no server and no client: an embedding model whose backend answers at once (384 zeros per
input, the size of all-MiniLM-L6-v2's vectors) and tokenizes by splitting on spaces. Reports
microseconds of process CPU per request for a v2 infer, a v1 predict, an OpenAI embeddings
call, a 404, a readiness probe and a request of each family rejected by validation (400), the
best of ``--runs`` runs (noise on a shared machine only slows a run down).
The FastAPI version is printed with the figures: the route dispatch differs between versions.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections.abc import Callable
from typing import Any

import fastapi

from hfserve import errors
from hfserve.app import create_app
from hfserve.backends.base import Backend
from hfserve.config import Config, ModelConfig, ServerConfig
from hfserve.service import ModelService
from hfserve.tasks import Task

MODEL = "m"
DIM = 384

#: name -> (method, path, JSON body or None, expected status)
REQUESTS: dict[str, tuple[str, str, Any, int]] = {
    "v2 infer": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": ["hello world"]}]},
        200,
    ),
    "v1 predict": ("POST", f"/v1/models/{MODEL}:predict", {"instances": ["hello world"]}, 200),
    "openai embeddings": ("POST", "/openai/v1/embeddings", {"model": MODEL, "input": "hello world"}, 200),
    "404": ("GET", "/no/such/route", None, 404),
    # the error path (issue 16: a rejected request next to a readiness probe)
    "v2 ready": ("GET", "/v2/health/ready", None, 200),
    "v2 infer rejected": ("POST", f"/v2/models/{MODEL}/infer", {"inputs": 3}, 400),
    "v1 predict rejected": ("POST", f"/v1/models/{MODEL}:predict", {"instances": 3}, 400),
    "openai rejected": ("POST", "/openai/v1/embeddings", {"model": MODEL, "input": "hi", "dimensions": -1}, 400),
}


class InstantBackend(Backend):
    """An embedding model that takes no time."""

    name = "instant"

    async def start(self) -> None:
        self.task = Task.text_embedding
        self.max_model_len = 512

    def translate(self, exc: Exception, request_id: str | None) -> errors.HFServeError:
        return errors.classify(exc, request_id)

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(range(len(text.split()) + 2))

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        return [[0.0] * DIM for _ in inputs]


def request_call(app: Any, method: str, path: str, body: Any, expect: int) -> Callable[[], Any]:
    """A coroutine function that sends one request through ``app`` and checks its status."""
    raw = json.dumps(body).encode() if body is not None else b""
    headers = [(b"host", b"bench"), (b"content-length", str(len(raw)).encode())]
    if body is not None:
        headers.append((b"content-type", b"application/json"))
    scope_base = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    request_message = {"type": "http.request", "body": raw, "more_body": False}

    async def call() -> None:
        sent_request = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return request_message
            await asyncio.Event().wait()  # the client never leaves
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(dict(scope_base), receive, send)
        if status != expect:
            raise RuntimeError(f"{method} {path}: expected {expect}, got {status}")

    return call


async def measure(requests: int, runs: int) -> dict[str, float]:
    service = ModelService(MODEL, InstantBackend())
    await service.start()
    app = create_app(service, Config(model=ModelConfig(source=MODEL, name=MODEL), server=ServerConfig(log_requests=False)))
    gc.collect()
    gc.freeze()  # as the server does once the model is loaded (server.freeze_startup_heap)
    results: dict[str, float] = {}
    for name, (method, path, body, expect) in REQUESTS.items():
        call = request_call(app, method, path, body, expect)
        for _ in range(200):  # warm-up
            await call()
        best = float("inf")
        for _ in range(runs):
            started = time.process_time()
            for _ in range(requests):
                await call()
            best = min(best, (time.process_time() - started) / requests)
        results[name] = best * 1e6
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000, help="requests per run and kind")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per kind; the best counts")
    args = parser.parse_args()
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    results = loop.run_until_complete(measure(args.requests, args.runs))
    loop.close()
    print(f"FastAPI {fastapi.__version__}: CPU per request (best of {args.runs} runs of {args.requests})")
    for name, micros in results.items():
        print(f"  {name:<20} {micros:7.1f} µs")


if __name__ == "__main__":
    main()
