"""Admission control, deadlines and API keys: what protects the model from its clients.

Model work (every HTTP route that declares it, see ``RouteFacts`` in :mod:`hfserve.api.routing`;
every gRPC ModelInfer) takes a slot from :class:`Admission` before it runs (an HTTP request once
it is known to be valid: a malformed one is answered at once, even when every slot is busy): at most
``max_concurrent`` run, at most ``max_queue`` wait, the rest are ``overloaded``. A request's
deadline (``--request_timeout_seconds`` or the client's ``x-request-timeout`` header) bounds its
wait and its work; when it passes, the work is cancelled and the client gets ``timeout``. Routes
that are not declared public need the API key (:func:`check_api_key`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from . import errors

T = TypeVar("T")

TIMEOUT_HEADER = "x-request-timeout"
MAX_TIMEOUT_SECONDS = 3600.0


class Admission:
    def __init__(self, max_concurrent: int | None = None, max_queue: int = 0):
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._sem = asyncio.Semaphore(max_concurrent) if max_concurrent else None
        self.active = 0
        self.waiting = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def slot(self, deadline: Deadline | None = None) -> AsyncIterator[None]:
        await self.acquire(deadline)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, deadline: Deadline | None = None) -> None:
        """Take a slot (wait in the queue, within ``deadline``), or raise ``overloaded``; give it
        back with :meth:`release`."""
        if self._sem is not None:
            if self._sem.locked() and self.waiting >= self.max_queue:
                raise errors.Overloaded(
                    f"The server is at its limit of {self.max_concurrent} concurrent requests and "
                    f"{self.max_queue} queued; retry after a moment",
                    retry_after=1,
                )
            self.waiting += 1
            try:
                if deadline is not None:
                    await deadline.run(self._sem.acquire())
                else:
                    await self._sem.acquire()
            finally:
                self.waiting -= 1
        self.active += 1
        self._idle.clear()

    def release(self) -> None:
        self.active -= 1
        if self._sem is not None:
            self._sem.release()
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request holds a slot; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class Deadline:
    """A point in time (monotonic) by which a request must be done."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def error(self) -> errors.Timeout:
        return errors.Timeout(
            f"The request did not finish within its deadline of {self.seconds:.3g} seconds; "
            f"raise it with the {TIMEOUT_HEADER} header or ask for less work (fewer tokens)"
        )

    async def run(self, work: Awaitable[T]) -> T:
        """Await ``work``; cancel it and raise ``timeout`` when the deadline passes."""
        remaining = self.remaining()
        if remaining <= 0:
            if asyncio.iscoroutine(work):
                work.close()
            raise self.error()
        try:
            return await asyncio.wait_for(work, remaining)
        except asyncio.TimeoutError:
            raise self.error() from None


def parse_timeout(header: str | None, default: float | None) -> float | None:
    """The request's timeout: its header (bounded, validated) or the server default."""
    if header is None:
        return default
    try:
        value = float(header)
    except ValueError:
        value = math.nan
    if not (0 < value <= MAX_TIMEOUT_SECONDS):
        raise errors.InvalidRequest(
            f"{TIMEOUT_HEADER} must be a number of seconds between 0 and {MAX_TIMEOUT_SECONDS:g}, "
            f"got {errors.echo(header)}"
        )
    return value


def deadline_of(scope_or_request: Any) -> Deadline | None:
    scope = getattr(scope_or_request, "scope", scope_or_request)
    return scope.get("state", {}).get("deadline")


def check_api_key(expected: str, authorization: str | None) -> None:
    """Constant-time check of ``Authorization: Bearer <key>``."""
    given = ""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        what = "is missing" if not authorization else "is not valid"
        raise errors.InvalidApiKey(
            f"The API key {what}; send it as 'Authorization: Bearer <key>'"
        )
