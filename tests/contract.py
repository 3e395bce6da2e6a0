"""Assertions shared by the contract tests: the shape of an error in each family."""

from __future__ import annotations

import re

import httpx

CODES = {
    "invalid_request": 400,
    "unsupported_parameter": 400,
    "context_length_exceeded": 400,
    "unsupported_task": 400,
    "invalid_api_key": 401,
    "model_not_found": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_too_large": 413,
    "unsupported_media_type": 415,
    "internal_error": 500,
    "model_not_ready": 503,
    "overloaded": 503,
    "timeout": 504,
}
OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                500: "server_error", 503: "server_error", 504: "server_error"}

# what a message must never contain: tracebacks, file paths, internal class names
LEAKS = re.compile(r"Traceback|File \"|\.py\b|site-packages|/work/|/usr/|Error\(|ValidationError|ValueError|"
                   r"RuntimeError|KeyError|TypeError|AttributeError|pydantic|torch\.|transformers\.|vllm\.")


def family_of(path: str) -> str:
    if path.startswith("/openai/"):
        return "openai"
    return "kserve"


def assert_error(resp: httpx.Response, code: str, *, param: str | None | type = type, family: str | None = None) -> str:
    """Check status, headers and body shape of a contract error; return its message."""
    family = family or family_of(resp.request.url.path)
    status = CODES[code]
    body_text = resp.text
    assert resp.status_code == status, f"{resp.request.method} {resp.request.url}: {resp.status_code} {body_text}"
    assert resp.headers.get("x-request-id"), "every response carries x-request-id"
    assert resp.headers.get("x-error-code") == code
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert "detail" not in body
    if family == "openai":
        assert set(body) == {"error"}
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["code"] == code
        assert err["type"] == OPENAI_TYPES[status]
        if param is not type:
            assert err["param"] == param, err
        message = err["message"]
    else:
        assert set(body) == {"error"}, body
        assert isinstance(body["error"], str)
        message = body["error"]
    assert isinstance(message, str) and message.strip()
    assert not LEAKS.search(message), f"message leaks internals: {message!r}"
    if status == 503:
        retry = resp.headers.get("retry-after")
        assert retry is not None and retry.isdigit() and 1 <= int(retry) <= 60
    return message
