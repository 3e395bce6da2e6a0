"""The access-log line in a format the deployment chooses (``--access_log_format``).

KServe's model server takes gunicorn's access-log format (through ``asgi-logger``); so does
hfserve, with gunicorn's atoms, written as ``%(atom)s``:

====================  ==========================================================
``h``                 the client's address
``l``, ``u``          ``-`` (no identd, no user)
``t``                 the time, ``[30/Nov/2026:13:55:36 +0000]``
``r``                 the request line, ``GET /v1/models HTTP/1.1``
``m``, ``U``, ``q``   the method, the path, the query string
``H``                 the protocol, ``HTTP/1.1``
``s``                 the status code
``B``, ``b``          the response body's length in bytes (``b``: ``-`` for none)
``f``, ``a``          the Referer and User-Agent headers
``T``, ``M``, ``D``   the time taken in whole seconds, milliseconds, microseconds
``L``                 the time taken in seconds, with decimals
``p``                 the process id
``{name}i``           a request header (``%({x-request-id}i)s``)
``{name}o``           a response header
``{name}e``           an environment variable
====================  ==========================================================

An unknown atom, header or variable is ``-``, as in gunicorn. Without a format, hfserve's own
line is logged (with the request id and the error class of a failed request).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass
class AccessRecord:
    """What one HTTP exchange leaves for its access-log line."""

    client: str
    method: str
    path: str
    query: str
    http_version: str
    status: int
    request_headers: Mapping[str, str]
    response_headers: Mapping[str, str]
    body_bytes: int
    seconds: float
    finished_at: float


class _Atoms(dict[str, Any]):
    """The atoms of one line; ``{name}i`` / ``{name}o`` / ``{name}e`` and unknown atoms looked up lazily."""

    def __init__(self, record: AccessRecord):
        query = f"?{record.query}" if record.query else ""
        protocol = f"HTTP/{record.http_version}"
        super().__init__(
            h=record.client.rsplit(":", 1)[0] if record.client != "-" else "-",
            l="-",
            u="-",
            t=time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(record.finished_at)),
            r=f"{record.method} {record.path}{query} {protocol}",
            m=record.method,
            U=record.path,
            q=record.query,
            H=protocol,
            s=record.status,
            B=record.body_bytes,
            b=record.body_bytes or "-",
            f=record.request_headers.get("referer", "-"),
            a=record.request_headers.get("user-agent", "-"),
            T=int(record.seconds),
            M=int(record.seconds * 1000),
            D=int(record.seconds * 1_000_000),
            L=f"{record.seconds:.6f}",
            p=f"<{os.getpid()}>",
        )
        self.record = record

    def __missing__(self, key: str) -> str:
        if key.startswith("{") and "}" in key:
            name, _, kind = key[1:].partition("}")
            name = name.lower()
            if kind == "i":
                return self.record.request_headers.get(name, "-")
            if kind == "o":
                return self.record.response_headers.get(name, "-")
            if kind == "e":
                return os.environ.get(name.upper(), os.environ.get(name, "-"))
        return "-"


def check_format(fmt: str) -> None:
    """A ``ValueError`` saying what is wrong when ``fmt`` is not a usable %-format."""
    sample = AccessRecord("127.0.0.1:1", "GET", "/", "", "1.1", 200, {}, {}, 0, 0.0, time.time())
    try:
        fmt % _Atoms(sample)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a %(atom)s format ({exc})") from None


def render(fmt: str, record: AccessRecord) -> str:
    return fmt % _Atoms(record)
