"""--access_log_format: the access-log line in gunicorn's format, as KServe's model server takes it."""

from __future__ import annotations

import logging
import re

import pytest

from hfserve.config import ServerConfig
from hfserve.tasks import Task

pytestmark = pytest.mark.anyio

FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(B)s "%(a)s" %(M)s %({x-request-id}o)s %({x-trace}i)s %(nope)s'
LINE = re.compile(
    r'^(?P<h>\S+) - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "(?P<r>[^"]+)" (?P<s>\d+) (?P<B>\d+) '
    r'"(?P<a>[^"]*)" (?P<M>\d+) (?P<rid>\S+) (?P<trace>\S+) -$'
)


async def test_custom_format(fake, caplog):
    server = await fake(Task.text_embedding, server=ServerConfig(access_log_format=FORMAT))
    with caplog.at_level(logging.INFO, logger="hfserve.access"):
        ok = await server.client.get("/v1/models?x=1", headers={"user-agent": "probe/1", "x-trace": "t-1"})
        bad = await server.post("/openai/v1/embeddings", {"model": "fake", "input": ""})
    lines = [r.getMessage() for r in caplog.records if r.name == "hfserve.access"]
    assert len(lines) == 2, lines
    first, second = (LINE.match(line) for line in lines)
    assert first is not None and second is not None, lines
    assert first["r"] == "GET /v1/models?x=1 HTTP/1.1" and first["s"] == "200"
    assert int(first["B"]) == len(ok.content)  # the body's bytes as sent
    assert first["a"] == "probe/1" and first["trace"] == "t-1"
    assert first["rid"] == ok.headers["x-request-id"]  # a response header
    assert second["r"] == "POST /openai/v1/embeddings HTTP/1.1" and second["s"] == str(bad.status_code) == "400"
    assert second["trace"] == "-"  # a header the request did not send


async def test_default_line_keeps_request_id_and_error(fake, caplog):
    server = await fake(Task.text_embedding, server=ServerConfig())
    with caplog.at_level(logging.INFO, logger="hfserve.access"):
        bad = await server.post("/openai/v1/embeddings", {"model": "fake", "input": ""})
    (line,) = [r.getMessage() for r in caplog.records if r.name == "hfserve.access"]
    assert f"request_id={bad.headers['x-request-id']}" in line and "error=invalid_request" in line
