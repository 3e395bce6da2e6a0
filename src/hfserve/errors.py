"""The error classification: the one place that knows the error contract.

Every error hfserve returns belongs to exactly one class below (see
``docs/errors.md`` and the project's error contract). A class fixes the HTTP
status, the OpenAI ``type``, the gRPC status and whether ``Retry-After`` is
sent; nothing else in the code base decides a status.

Layering, as in httpx's ``_exceptions.py``::

    HFServeError
    ├── ClientError                       (4xx: the request must change)
    │   ├── InvalidRequest                invalid_request          400
    │   ├── UnsupportedParameter          unsupported_parameter    400
    │   ├── ContextLengthExceeded         context_length_exceeded  400
    │   ├── UnsupportedTask               unsupported_task         400
    │   ├── InvalidApiKey                 invalid_api_key          401
    │   ├── ModelNotFound                 model_not_found          404
    │   ├── RouteNotFound                 not_found                404
    │   ├── MethodNotAllowed              method_not_allowed       405
    │   ├── RequestTooLarge               request_too_large        413
    │   └── UnsupportedMediaType          unsupported_media_type   415
    └── ServerError                       (5xx: retrying may help)
        ├── InternalError                 internal_error           500
        ├── ModelNotReady                 model_not_ready          503 + Retry-After
        ├── Overloaded                    overloaded               503 + Retry-After
        └── Timeout                       timeout                  504

Backends raise these (or have their own library's exceptions translated into
them once, at the backend boundary); API families render them, each in its own
shape, through :func:`classify`. A client going away is not an error response:
it is :class:`ClientDisconnected`, which is never rendered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

logger = logging.getLogger("hfserve.errors")

#: Longest piece of user input echoed back inside an error message.
MAX_ECHO_CHARS = 80


@dataclass(frozen=True)
class ErrorClass:
    """One row of the contract table."""

    code: str
    http_status: int
    openai_type: str
    grpc_status: str | None  # a ``grpc.StatusCode`` member name, or None
    retry_after: bool = False


INVALID_REQUEST = ErrorClass("invalid_request", 400, "invalid_request_error", "INVALID_ARGUMENT")
UNSUPPORTED_PARAMETER = ErrorClass("unsupported_parameter", 400, "invalid_request_error", "INVALID_ARGUMENT")
CONTEXT_LENGTH_EXCEEDED = ErrorClass("context_length_exceeded", 400, "invalid_request_error", "INVALID_ARGUMENT")
UNSUPPORTED_TASK = ErrorClass("unsupported_task", 400, "invalid_request_error", "INVALID_ARGUMENT")
INVALID_API_KEY = ErrorClass("invalid_api_key", 401, "invalid_request_error", "UNAUTHENTICATED")
MODEL_NOT_FOUND = ErrorClass("model_not_found", 404, "invalid_request_error", "NOT_FOUND")
NOT_FOUND = ErrorClass("not_found", 404, "invalid_request_error", "UNIMPLEMENTED")
METHOD_NOT_ALLOWED = ErrorClass("method_not_allowed", 405, "invalid_request_error", None)
REQUEST_TOO_LARGE = ErrorClass("request_too_large", 413, "invalid_request_error", "RESOURCE_EXHAUSTED")
UNSUPPORTED_MEDIA_TYPE = ErrorClass("unsupported_media_type", 415, "invalid_request_error", None)
INTERNAL_ERROR = ErrorClass("internal_error", 500, "server_error", "INTERNAL")
MODEL_NOT_READY = ErrorClass("model_not_ready", 503, "server_error", "UNAVAILABLE", retry_after=True)
OVERLOADED = ErrorClass("overloaded", 503, "server_error", "UNAVAILABLE", retry_after=True)
TIMEOUT = ErrorClass("timeout", 504, "server_error", "DEADLINE_EXCEEDED")

ALL_CLASSES: tuple[ErrorClass, ...] = (
    INVALID_REQUEST,
    UNSUPPORTED_PARAMETER,
    CONTEXT_LENGTH_EXCEEDED,
    UNSUPPORTED_TASK,
    INVALID_API_KEY,
    MODEL_NOT_FOUND,
    NOT_FOUND,
    METHOD_NOT_ALLOWED,
    REQUEST_TOO_LARGE,
    UNSUPPORTED_MEDIA_TYPE,
    INTERNAL_ERROR,
    MODEL_NOT_READY,
    OVERLOADED,
    TIMEOUT,
)
CODES: frozenset[str] = frozenset(c.code for c in ALL_CLASSES)


class HFServeError(Exception):
    """Base of every error that is rendered to a client.

    ``message`` says what was wrong and how to fix it; it is shown to the
    client as is, so it must never hold a traceback, a path or a class name.
    ``param`` is the offending request field as a dotted path, when there is one.
    """

    error_class: ClassVar[ErrorClass] = INTERNAL_ERROR
    default_retry_after: ClassVar[int | None] = None

    def __init__(self, message: str, *, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message or self.error_class.code.replace("_", " ")
        self.param = param
        ra = retry_after if retry_after is not None else self.default_retry_after
        self.retry_after = None if ra is None else max(1, min(60, int(ra)))

    @property
    def code(self) -> str:
        return self.error_class.code

    @property
    def http_status(self) -> int:
        return self.error_class.http_status

    def headers(self) -> dict[str, str]:
        """Headers every family sends with this error (besides its own)."""
        if self.error_class.retry_after:
            return {"Retry-After": str(self.retry_after or 1)}
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r})"


class ClientError(HFServeError):
    """The request has to change before it can succeed."""


class ServerError(HFServeError):
    """The server could not answer; the same request may succeed later."""


class InvalidRequest(ClientError):
    error_class = INVALID_REQUEST


class UnsupportedParameter(ClientError):
    error_class = UNSUPPORTED_PARAMETER


class ContextLengthExceeded(ClientError):
    error_class = CONTEXT_LENGTH_EXCEEDED


class UnsupportedTask(ClientError):
    error_class = UNSUPPORTED_TASK


class InvalidApiKey(ClientError):
    error_class = INVALID_API_KEY


class ModelNotFound(ClientError):
    error_class = MODEL_NOT_FOUND


class RouteNotFound(ClientError):
    error_class = NOT_FOUND


class MethodNotAllowed(ClientError):
    error_class = METHOD_NOT_ALLOWED


class RequestTooLarge(ClientError):
    error_class = REQUEST_TOO_LARGE


class UnsupportedMediaType(ClientError):
    error_class = UNSUPPORTED_MEDIA_TYPE


class InternalError(ServerError):
    error_class = INTERNAL_ERROR


class ModelNotReady(ServerError):
    error_class = MODEL_NOT_READY
    default_retry_after = 5


class Overloaded(ServerError):
    error_class = OVERLOADED
    default_retry_after = 1


class Timeout(ServerError):
    error_class = TIMEOUT


class ClientDisconnected(Exception):
    """The client went away; its work is cancelled and nothing is rendered."""


def internal_error(request_id: str | None) -> InternalError:
    rid = request_id or "unknown"
    return InternalError(f"Internal server error (request id {rid})")


def classify(exc: BaseException, request_id: str | None = None) -> HFServeError:
    """Return the contract error for any exception.

    An :class:`HFServeError` is returned as is. Anything else is unexpected:
    it is logged once with its traceback under the request id and becomes a
    generic ``internal_error`` whose message carries only that id.
    """
    if isinstance(exc, HFServeError):
        return exc
    logger.error(
        "request %s failed with an unexpected error",
        request_id or "-",
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return internal_error(request_id)


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """User input made safe to quote inside a message: bounded and escaped."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii", "replace")
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
