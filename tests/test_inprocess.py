"""The app in this process, on a fake backend (tests/fakes.py): routing, validation, the error
contract on every family, response shapes, and that a request's work stops with the request.

No model, no server process: what is checked here is the serving layer's own behaviour, which
does not depend on what a real model computes. The end-to-end tests with real clients and real
models are in test_openai, test_kserve, test_grpc, test_faults and test_limits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.contract import assert_error
from tests.fakes import FAIL_BEFORE, FAIL_MID, FAIL_MID_STEP, HANG, FakeServer, Serve, serving

pytestmark = pytest.mark.anyio

LONG_TOKENS = 200
STEP_SECONDS = 0.01  # a long generation runs LONG_TOKENS * STEP_SECONDS = 2 s unless it is stopped


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def fake() -> AsyncIterator[Serve]:
    """``await fake(task, **options)``: the app on a fake backend, for this test."""
    async with serving() as serve:
        yield serve


# -------------------------------------------------- several generations in one request
MULTI_ROUTES = ["completions", "v1", "v2"]


def multi_request(route: str, prompts: list[str], max_tokens: int) -> tuple[str, dict[str, Any]]:
    """A request with one generation per prompt on the routes that take several."""
    if route == "completions":
        return "/openai/v1/completions", {"model": "fake", "prompt": prompts, "max_tokens": max_tokens}
    if route == "v1":
        return "/v1/models/fake:predict", {"instances": prompts, "parameters": {"max_tokens": max_tokens}}
    inputs = [{"name": "input-0", "shape": [len(prompts)], "datatype": "BYTES", "data": prompts}]
    return "/v2/models/fake/infer", {"inputs": inputs, "parameters": {"max_tokens": max_tokens}}


def assert_all_stopped(srv: FakeServer, sibling: str) -> None:
    """No generation runs any more, and ``sibling`` was cancelled long before its end."""
    assert srv.backend.running == 0, f"{srv.backend.running} generation(s) still running after the answer"
    (ended,) = [e for e in srv.backend.ended if e.prompt == sibling]
    assert ended.how == "cancelled", ended
    assert ended.steps < LONG_TOKENS // 2, ended


@pytest.mark.parametrize("fault", [FAIL_BEFORE, FAIL_MID])
@pytest.mark.parametrize("route", MULTI_ROUTES)
async def test_a_failing_generation_stops_its_siblings(fake, route, fault):
    srv = await fake(step_seconds=STEP_SECONDS)
    path, body = multi_request(route, [fault, "a long one"], LONG_TOKENS)
    resp = await srv.post(path, body)
    assert_error(resp, "internal_error", param=None)
    assert_all_stopped(srv, "a long one")


@pytest.mark.parametrize("route", MULTI_ROUTES)
async def test_a_deadline_stops_every_generation(fake, route):
    srv = await fake(step_seconds=STEP_SECONDS)
    path, body = multi_request(route, [HANG, "a long one"], LONG_TOKENS)
    resp = await srv.post(path, body, headers={"x-request-timeout": "0.3"})
    assert_error(resp, "timeout", param=None)
    assert_all_stopped(srv, "a long one")


async def call_and_disconnect(srv: FakeServer, path: str, body: dict[str, Any], after: float) -> list[dict[str, Any]]:
    """Call the app as a server would, with a client that goes away ``after`` seconds in; what it sent."""
    loop = asyncio.get_running_loop()
    gone_at = loop.time() + after
    pending = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        if loop.time() < gone_at:  # the app polls with a cancelled scope: nothing to await after this
            await asyncio.sleep(gone_at - loop.time())
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("fake", 80),
    }  # fmt: skip
    await srv.app(scope, receive, send)
    return sent


@pytest.mark.parametrize("route", MULTI_ROUTES)
async def test_a_client_that_goes_away_stops_every_generation(fake, route):
    srv = await fake(step_seconds=STEP_SECONDS)
    path, body = multi_request(route, ["a long one", "another long one"], LONG_TOKENS)
    sent = await call_and_disconnect(srv, path, body, after=0.2)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] in ([], [499])
    assert_all_stopped(srv, "a long one")
    assert_all_stopped(srv, "another long one")
    assert srv.metric('hfserve_client_disconnects_total{family=') == 1


async def test_a_failing_stream_stops_its_siblings(fake):
    srv = await fake(step_seconds=STEP_SECONDS)
    body = {"model": "fake", "prompt": [FAIL_MID, "a long one"], "max_tokens": LONG_TOKENS, "stream": True}
    resp = await srv.post("/openai/v1/completions", body)
    assert resp.status_code == 200
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "internal_error"
    assert_all_stopped(srv, "a long one")
    (failed,) = [e for e in srv.backend.ended if e.prompt == FAIL_MID]
    assert (failed.how, failed.steps) == ("failed", FAIL_MID_STEP)


# ------------------------------------------------------------------ stream options
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "fake", "prompt": "hi"}


@pytest.mark.parametrize("path,body", [("/openai/v1/completions", COMPLETION), ("/openai/v1/chat/completions", CHAT)])
async def test_continuous_usage_stats_needs_include_usage(fake, path, body):
    """vLLM ignores continuous_usage_stats without include_usage; here nothing is silently ignored."""
    srv = await fake()
    options = {"continuous_usage_stats": True}
    resp = await srv.post(path, {**body, "stream": True, "stream_options": options})
    msg = assert_error(resp, "invalid_request", param="stream_options.continuous_usage_stats")
    assert "include_usage" in msg
