"""Dynamic batching of encoder requests (embeddings, classification, fill-mask).

Concurrent requests of the same kind are merged into one forward pass of up to
``max_batch_size`` inputs. A batch forms once it could start (its first request is
there and no batch is running) and closes when it is full, when the window's
``max_wait`` has passed, or when no new request has joined it for the window's
``idle`` time (:class:`BatchWindow`); a request that finds the batcher idle after a
batch of one starts at once (a lone client waits for nobody). Requests that queued behind a running batch
still wait for newcomers: the requests just answered often come back at once (a
client's next call), and a batch that leaves without them splits the load into two
half-size batches for good (measured with 32 concurrent clients: batches of 12 and
20 instead of 32). A batch that has as many requests as the one before it (when that
had company) closes at once: its clients are back, and the idle wait would only delay them.

One request's failure never fails its batch-mates: if a merged forward raises,
every request of that batch is run again on its own, so each gets its own
result or its own error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from ..config import DEFAULT_IDLE_MS, DEFAULT_MAX_WAIT_MS

logger = logging.getLogger("hfserve.backends.batching")


#: run(kind, inputs, option) -> one result per input
RunFn = Callable[[str, list[list[int]], Any], list[Any]]


@dataclass
class _Item:
    key: tuple[str, Any]
    inputs: list[list[int]]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchWindow:
    """How long a forming batch waits for company (encoder batches and the generation
    scheduler alike).

    It closes ``max_wait`` seconds after it opened at the latest, and earlier once
    ``idle`` seconds pass without a newcomer, so a lone request waits about ``idle``,
    not the whole window, while a burst (whose requests reach the batcher one by one,
    as the event loop gets through them) keeps it open until it is full.
    """

    max_wait: float  # seconds
    idle: float  # seconds

    @classmethod
    def from_ms(cls, max_wait_ms: float, idle_ms: float) -> BatchWindow:
        return cls(max(0.0, max_wait_ms) / 1000.0, max(0.0, idle_ms) / 1000.0)

    @staticmethod
    def expects_company(last_batch: int) -> bool:
        """Whether a request that finds the batcher idle should wait for others: only when the
        previous batch had more than one request. A lone client's next call then starts at once
        (no idle wait at concurrency 1), while clients that were answered together and call again
        one by one still meet in one batch."""
        return last_batch != 1

    def regathered(self, joined: int, last_batch: int) -> bool:
        """Whether a forming batch closes before its time: once as many requests have joined it as the
        previous batch had, when that one had company. Clients answered together call again within a
        moment of each other, and once they are all back, waiting ``idle`` longer only delays them (at
        concurrency 8 a 5 ms wait per batch of ~17 ms); a batch still short of them waits as before,
        and one that closes early takes every request then waiting, so batches grow with the load.
        Not when ``idle`` is the whole window: that asks for every batch to wait it out."""
        return self.idle < self.max_wait and last_batch > 1 and joined >= last_batch

    def remaining(self, opened: float, latest: float) -> float:
        """Seconds left to wait for a batch that opened at ``opened`` and whose latest
        request arrived at ``latest`` (``time.monotonic()``); zero or less: close it now."""
        return min(opened + self.max_wait, latest + self.idle) - time.monotonic()


@dataclass
class BatchStats:
    """What the batcher did (for tests and benchmarks)."""

    requests: int = 0
    batches: int = 0  # merged forward calls attempted
    fallbacks: int = 0  # batches that failed and were re-run request by request
    largest: int = 0  # most inputs in one batch


class MicroBatcher:
    """Merges concurrent ``submit`` calls into batched calls of ``run`` in an executor."""

    def __init__(self, run: RunFn, executor: Executor, *, max_batch_size: int = 32, window: BatchWindow | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.run = run
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.window = window or BatchWindow.from_ms(DEFAULT_MAX_WAIT_MS, DEFAULT_IDLE_MS)
        self.stats = BatchStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Item] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._free_since = 0.0  # when the last batch ended
        self._last_batch = 0  # requests in the last batch (0: none yet)

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._work(), name="hfserve-encoder-batcher")

    async def submit(self, kind: str, inputs: list[list[int]], option: Any = None) -> list[Any]:
        """Run ``inputs`` (one request) as part of a batch; returns its own results."""
        self._ensure_worker()
        assert self._loop is not None and self._wakeup is not None
        item = _Item((kind, option), inputs, self._loop.create_future())
        self._pending.append(item)
        self.stats.requests += 1
        self._wakeup.set()
        return await item.future

    def _joining(self, key: tuple[str, Any]) -> tuple[int, int, float]:
        """Requests and inputs waiting with ``key``, and when the latest of those requests arrived."""
        items = [i for i in self._pending if i.key == key and not i.future.done()]
        return len(items), sum(len(i.inputs) for i in items), max((i.arrived for i in items), default=0.0)

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            self._pending = [i for i in self._pending if not i.future.done()]  # drop cancelled requests
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self._pending[0]
            # the window opens when the batch could start: requests that queued behind a
            # running batch still give newcomers a chance to join them
            opened = max(first.arrived, self._free_since)
            # a request that found the batcher idle after a batch of one starts at once
            alone = first.arrived >= self._free_since and not self.window.expects_company(self._last_batch)
            while not alone:
                joined, size, latest = self._joining(first.key)
                if size >= self.max_batch_size or self.window.regathered(joined, self._last_batch):
                    break
                remaining = self.window.remaining(opened, max(latest, opened))
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch: list[_Item] = []
            size = 0
            for item in self._pending:
                if item.key != first.key or item.future.done():
                    continue
                if batch and size + len(item.inputs) > self.max_batch_size:
                    break
                batch.append(item)
                size += len(item.inputs)
            taken = set(map(id, batch))
            self._pending = [i for i in self._pending if id(i) not in taken]
            if not batch:
                continue
            self.stats.batches += 1
            self.stats.largest = max(self.stats.largest, size)
            self._last_batch = len(batch)
            try:
                outcomes = await asyncio.get_running_loop().run_in_executor(self.executor, self._run_batch, batch)
            except BaseException as exc:  # noqa: BLE001 - e.g. the executor shut down
                outcomes = [exc] * len(batch)
            self._free_since = time.monotonic()
            for item, outcome in zip(batch, outcomes):
                if item.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    item.future.set_exception(outcome)
                else:
                    item.future.set_result(outcome)

    def _run_batch(self, batch: list[_Item]) -> list[Any]:
        """In a worker thread: one merged call, or each request alone if that fails."""
        kind, option = batch[0].key
        if len(batch) > 1:
            merged = [x for item in batch for x in item.inputs]
            try:
                results = self.run(kind, merged, option)
            except Exception as exc:  # noqa: BLE001 - retried one by one below
                self.stats.fallbacks += 1
                logger.warning("a batch of %d %s requests failed (%s); running them one by one", len(batch), kind, type(exc).__name__)
            else:
                out: list[Any] = []
                pos = 0
                for item in batch:
                    out.append(results[pos : pos + len(item.inputs)])
                    pos += len(item.inputs)
                return out
        outcomes: list[Any] = []
        for item in batch:
            try:
                outcomes.append(self.run(kind, item.inputs, option))
            except Exception as exc:  # noqa: BLE001 - handed to that request alone
                outcomes.append(exc)
        return outcomes
