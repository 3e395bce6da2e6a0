"""The outermost ASGI layer: what applies to every request, whether a route takes it or not.

Request ids, the body size limit, request metrics, the access log. It sits outside FastAPI, so
even failures that never reach a route (an oversized body, an exception escaping the framework)
are answered in the family's error shape and carry ``x-request-id``. What depends on the route
(the API key, the deadline, an admission slot for model work) is applied by the route itself
(:class:`hfserve.api.routing.ContractRoute`), from the facts it declares.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import access_log as access_format
from . import errors
from .error_handling import CLIENT_CLOSED, ErrorHandling

access_log = logging.getLogger("hfserve.access")

_MAX_ID_LEN = 128


def valid_request_id(value: object) -> str | None:
    """A client's request id if it can be echoed back: ASCII, printable, 1-128 characters,
    no surrounding space (HTTP header and gRPC metadata alike); else None."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_ID_LEN
        and value.isascii()
        and value.isprintable()
        and value.strip() == value
    ):
        return value
    return None


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers, read once (the first of repeated headers wins)."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return headers


def _content_length(headers: dict[str, str]) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


class ContractMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        handling: ErrorHandling,
        max_body_bytes: int,
        log_requests: bool = True,
        access_log_format: str | None = None,
    ):
        self.app = app
        self.handling = handling
        self.max_body_bytes = max_body_bytes
        self.log_requests = log_requests
        #: gunicorn's access-log format (``--access_log_format``); None: hfserve's own line
        self.access_log_format = access_log_format

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        rid = valid_request_id(headers.get("x-request-id")) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["headers"] = headers  # read once: the route reads its API key and timeout from here
        metrics = self.handling.metrics
        started = time.perf_counter()
        status: dict[str, Any] = {"code": None, "sent_body_end": False, "error": None, "headers": (), "bytes": 0}
        rid_header = (b"x-request-id", rid.encode("ascii"))
        custom_line = self.log_requests and self.access_log_format is not None

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), rid_header]
                if custom_line:
                    status["headers"] = message["headers"]
                if status["code"] >= 400:
                    status["error"] = next((v for k, v in message["headers"] if k == b"x-error-code"), None)
            elif message["type"] == "http.response.body":
                if custom_line:
                    status["bytes"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    status["sent_body_end"] = True
            await send(message)

        limit = self.max_body_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise errors.RequestTooLarge(_too_large(limit))
            return message

        try:
            try:
                declared = _content_length(headers)
                if declared is not None and declared > limit:
                    raise errors.RequestTooLarge(_too_large(limit))
                await self.app(scope, limited_receive, send_with_id)
            except Exception as exc:  # noqa: BLE001 - nothing escapes without a contract body
                if status["code"] is None:
                    await self._respond(scope, receive, send_with_id, rid, exc)
                else:
                    errors.classify(exc, rid)
        finally:
            code = status["code"] or CLIENT_CLOSED
            if not status["sent_body_end"]:
                code = CLIENT_CLOSED  # the client left before the body was complete
            elapsed = time.perf_counter() - started
            family = self.handling.family(scope)
            metrics.child(metrics.requests, family, str(code)).inc()
            metrics.child(metrics.latency, family).observe(elapsed)
            if custom_line:
                access_log.info("%s", self._custom_line(scope, headers, status, code, elapsed))
            elif self.log_requests:
                access_log.info(
                    '%s "%s %s" %d %.1fms request_id=%s%s',
                    _client(scope),
                    scope.get("method", "-"),
                    scope.get("path", ""),
                    code,
                    elapsed * 1000,
                    rid,
                    f" error={status['error'].decode('latin-1')}" if status["error"] else "",
                )

    def _custom_line(self, scope: Scope, headers: dict[str, str], status: dict[str, Any], code: int, elapsed: float) -> str:
        assert self.access_log_format is not None
        record = access_format.AccessRecord(
            client=_client(scope),
            method=scope.get("method", "-"),
            path=scope.get("path", ""),
            query=scope.get("query_string", b"").decode("latin-1"),
            http_version=scope.get("http_version", "1.1"),
            status=code,
            request_headers=headers,
            response_headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in status["headers"]},
            body_bytes=status["bytes"],
            seconds=elapsed,
            finished_at=time.time(),
        )
        return access_format.render(self.access_log_format, record)

    async def _respond(self, scope: Scope, receive: Receive, send: Send, rid: str, exc: BaseException) -> None:
        response = self.handling.render_for(scope, rid, exc)
        await response(scope, receive, send)


def _too_large(limit: int) -> str:
    return f"The request body is larger than the limit of {limit} bytes; send a smaller request"


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"
