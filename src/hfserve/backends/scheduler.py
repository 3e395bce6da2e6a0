"""Continuous-batching generation for the transformers backend: the twin of
:mod:`.batching`'s encoder micro-batcher.

One decode thread runs every generation. It keeps *cohorts* of rows (a request with
``n=3`` is 3 rows) that share a KV cache, runs one forward step per cohort per
iteration, samples each row with its own request's parameters and
``torch.Generator``, and sends each request its own deltas. Requests that arrive while
a batch runs join it at the next step. transformers' own continuous batching
(``init_continuous_batching``) is not used: it samples with one global generator and
one ``do_sample`` for all requests, has no per-request ``n``, stop strings, penalties,
min_tokens or top-k / prompt log-probabilities, and serves decoder-only models only.

How a request flows
-------------------
1. ``HuggingFaceBackend.generate`` calls :meth:`GenerationScheduler.generate` on the
   event loop. It makes a :class:`_Job` (the prompt, the :class:`SamplingParams`, the
   request's logits processors and adapter key, an ``asyncio.Queue`` and the
   :class:`_Outbox` of its event loop), queues it for the decode thread, wakes it, and
   waits on the job's queue.
2. The decode thread (:meth:`_schedule`) takes the waiting requests
   (:meth:`_take_incoming`): when nothing runs it first waits for the batch window
   (:class:`~.batching.BatchWindow`) so a burst is admitted together (unless the last
   requests it admitted when idle came alone: concurrency 1 waits for nobody; and no longer
   than until as many have come as it admitted then), and it never runs more than
   ``max_batch_size`` rows.
3. Admission (:meth:`_admit`) gives each request its sampling state (generator,
   token counts) and its rows, each with a :class:`~.textstream.TextStream`.
   Decoder-only models: the requests admitted together share one left-padded prefill
   (a request that wants prompt log-probabilities needs every position's logits and
   prefills alone); the new rows' KV cache is left-padded and concatenated into the
   running cohort (:meth:`_merge`), when the model's cache allows it. While a cohort runs,
   requests that arrive get no prefill pass of their own when the model's attention can
   fold (:mod:`.mixed_step`): chunks of their prompts ride in the cohort's decode steps
   (:meth:`_forward_mixed`), and each joins the cohort once its last chunk ran. Encoder-decoder
   models: the admitted requests are encoded together and form a new cohort that runs
   beside the older ones (:meth:`_encode`).
4. Each step (:meth:`_step`), per cohort: every request's rows get their next token
   from the sampler's per-row logits step (:func:`.sampler.sample`; plain greedy rows
   share one argmax over the cohort); each row's text stream turns the token into text;
   each request's :class:`SequenceDelta` list is posted to its outbox; finished and
   cancelled rows leave the cohort (:meth:`_select`); and one forward pass
   (:meth:`_forward_step`) gives the next logits of the rows that remain.
5. After the sampling of every step the outboxes are flushed: each event loop gets the
   step's deltas with one ``call_soon_threadsafe`` (:class:`_Outbox`), and the
   request's ``generate`` yields them (several steps coalesced into one delta per
   sequence when the consumer fell behind); the backend passes them on to the service.
   A consumer that stops reading (client gone) sets the job's ``cancelled`` flag and its
   rows are dropped at the next step.

One request's failure never fails its batch-mates: a failing shared prefill is retried
request by request, and a failing decode step is undone and re-run with each request's
rows alone (:meth:`_split_after_failure`), so only the culprit gets the error.

Per-request logits processing
-----------------------------
Every job carries a list of :data:`~.sampler.LogitsProcessor` (empty by default), which
:func:`.sampler.sample` applies to each of its rows before penalties and sampling: a
grammar mask for structured outputs or a logit bias plugs in there, without touching
this loop. A job with processors never takes the shared-argmax fast path.

Rows with different weights (adapters)
--------------------------------------
Every job carries an ``adapter`` key (None: the base model). Rows of different adapters
share cohorts like any other rows, and every forward pass of the scheduler (prefills,
the encoder pass, decode steps) goes through :meth:`GenerationScheduler._run_model`,
which receives the adapter key of each row of the batch, in row order, and hands the pass
to ``run_with_adapters`` when the backend serves LoRA adapters (:mod:`.lora`: peft's
mixed-batch LoRA, each row with its own adapter's low-rank delta; without it any adapter key
is refused). ``max_adapters`` (``--max-loras``) bounds the different adapters among the
running rows: a request for another adapter waits at admission, keeping its place, while
requests behind it (the base model's, or a running adapter's) are admitted.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutput

from .. import errors
from ..generation import SamplingParams, SequenceDelta, TokenLogprob, coalesce
from . import kv_cache, mixed_step, sampler
from .batching import BatchWindow
from .padding import pad_batch
from .sampler import LogitsProcessor
from .stats import EngineStats, Snapshot
from .textstream import TextStream
from .tokenizing import Detokenizer

logger = logging.getLogger("hfserve.backends.scheduler")

_DONE = object()
_NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)  # see _forward_mixed


class _Layer:
    """One layer's keys and values, as :meth:`GenerationScheduler._merge` reads a cache layer."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values


class _Joining:
    """A started request whose prompt goes into the running cohort's decode steps, chunk by chunk."""

    __slots__ = ("job", "done", "kv")

    def __init__(self, job: _Job):
        self.job = job
        self.done = 0  # prompt tokens whose keys and values are in ``kv``
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, [1, heads, done, dim]

    @property
    def remaining(self) -> int:
        return len(self.job.prompt_ids) - self.done


class _Layers:
    """The per-layer keys and values of rows that join a cohort (a cache with ``layers``)."""

    __slots__ = ("layers",)

    def __init__(self, layers: list[_Layer]):
        self.layers = layers


class _Outbox:
    """Hands items from the decode thread to one event loop, with few cross-thread wake-ups.

    The decode thread calls :meth:`post` with every item of a step; :meth:`flush` then
    hands them over in order with one ``call_soon_threadsafe`` — and none at all while
    an earlier hand-over has not run yet (its callback takes everything posted since).
    Each request still receives exactly the items it was sent, in order.
    """

    __slots__ = ("loop", "_lock", "_ready", "_staged", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[_Job, Any]] = []  # guarded by _lock: waiting for the loop
        self._staged: list[tuple[_Job, Any]] = []  # decode thread only: not flushed yet
        self._scheduled = False

    def post(self, job: _Job, item: Any) -> None:
        self._staged.append((job, item))

    def flush(self) -> None:
        if not self._staged:
            return
        staged, self._staged = self._staged, []
        with self._lock:
            self._ready.extend(staged)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            with self._lock:
                self._ready.clear()
                self._scheduled = False

    def _deliver(self) -> None:
        with self._lock:
            items, self._ready = self._ready, []
            self._scheduled = False
        for job, item in items:
            job.queue.put_nowait(item)


class _Job:
    """One generation request: its ``n`` sequences live as rows of a shared batch."""

    def __init__(
        self,
        outbox: _Outbox,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        processors: Sequence[LogitsProcessor] = (),
        adapter: str | None = None,
    ):
        self.outbox = outbox
        self.prompt_ids = prompt_ids
        self.params = params
        self.request_id = request_id
        self.processors = list(processors)
        self.adapter = adapter
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.done = False
        self.arrived = time.monotonic()
        # set at admission, used only by the decode thread
        self.gen: torch.Generator | None = None  # this request's own generator
        self.counts: Any = None  # [n, vocab] generated-token counts (penalties)
        self.prompt_seen: torch.Tensor | None = None  # [vocab] bool: prompt tokens (repetition penalty, as vLLM and transformers)
        self.step = 0
        self.live = 0  # sequences still running
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        # engine statistics (see .stats): the times of the first and latest tokens, each row's finish reason
        self.engine_stats: EngineStats | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.reasons: list[str] = []
        self.held: list[SequenceDelta] = []  # params.whole: the deltas so far, sent when the request ends

    @property
    def rows(self) -> int:
        return self.params.n

    def emit(self, item: Any) -> None:
        """Queue ``item`` for this request (decode thread only; sent at the next outbox flush). A
        request whose result is read whole (``params.whole``) gets its deltas in one piece, when it
        ends: no hand-over to its event loop at every step."""
        if self.done:
            return
        if self.params.whole and isinstance(item, list):
            self.held.extend(item)
            return
        self.outbox.post(self, item)

    def finish(self, exc: BaseException | None = None) -> None:
        """End the request (with its own error, if any); later emits are dropped."""
        if self.done:
            return
        if self.held:
            self.outbox.post(self, coalesce(self.held))
            self.held = []
        if exc is not None:
            self.emit(exc)
        self.emit(_DONE)
        self.done = True
        if self.engine_stats is not None:
            self.engine_stats.finished(self.arrived, self.reasons, self.rows, exc is not None, time.monotonic())


class _Seq:
    """One row of a batch: one of a request's ``n`` sequences."""

    __slots__ = ("job", "index", "stream", "tokens", "finished")

    def __init__(self, job: _Job, index: int, stream: TextStream):
        self.job = job
        self.index = index
        self.stream = stream
        self.tokens: list[int] = []  # generated so far (the logits processors' history)
        self.finished = False


class _Cohort:
    """Rows that share one KV cache and advance together, one forward pass per step.

    Decoder-only models: prompts are left-padded in the cache; ``mask`` is the
    attention mask over the cache and ``positions`` each row's next position id.
    Encoder-decoder models: ``enc_hidden`` / ``enc_mask`` hold the (right-padded)
    encoder outputs; every row of a cohort started decoding at the same step.
    """

    def __init__(self, rows: list[_Seq], cache: Any, logits: torch.Tensor):
        self.rows = rows
        self.cache = cache
        self.logits = logits  # [rows, vocab] float32, the next token's logits
        self.mask: Any = None
        self.positions: Any = None
        self.enc_hidden: Any = None
        self.enc_mask: Any = None

    @property
    def jobs(self) -> list[_Job]:
        seen: dict[int, _Job] = {}
        for row in self.rows:
            seen.setdefault(id(row.job), row.job)
        return list(seen.values())

    @property
    def adapters(self) -> list[str | None]:
        return [row.job.adapter for row in self.rows]


class GenerationScheduler:
    """Runs every generation request of one model as rows of shared batches, in one decode thread.

    The backend builds it once the model is loaded and hands it what it needs: the
    model, its device, the end-of-sequence ids (read at every step), the pad id, the
    factory of each sequence's detokenizer, the token text of log-probabilities, the
    batch limits, and the backend's counters (``prefills``, ``decode_steps``,
    ``max_rows`` are counted here).
    """

    def __init__(
        self,
        model: Any,
        *,
        device: torch.device,
        eos_token_ids: set[int],
        pad_token_id: int,
        detokenizer: Callable[[], Detokenizer],
        token_text: Callable[[int], str],
        max_batch_size: int,
        window: BatchWindow,
        stats: dict[str, int],
        run_model: Callable[..., Any] | None = None,
        max_adapters: int | None = None,
        forward: Callable[..., Any] | None = None,
        fold_prompts: bool = False,
    ):
        self.model = model
        #: what runs the model's forward passes (``--compile``: a :class:`~.compiled.CompiledDecode`)
        self.forward: Callable[..., Any] = forward or model
        #: LoRA: runs a forward pass with per-row adapters (``run_model(adapters, encoder, inputs)``)
        self.run_with_adapters = run_model
        #: LoRA: the most different adapters among the running rows (None: no limit)
        self.max_adapters = max_adapters
        #: the model's attention can fold joining prompts into decode steps (see :mod:`.mixed_step`)
        self.fold_prompts = fold_prompts
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.detokenizer = detokenizer
        self.token_text = token_text
        self.max_batch_size = max_batch_size
        self.window = window
        self._last_group = 0  # requests admitted together when the scheduler was last idle (0: never)
        self.stats = stats
        self.encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self._cv = threading.Condition()
        self._incoming: deque[_Job] = deque()
        self._cohorts: list[_Cohort] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._mergeable: bool | None = None  # can KV caches of different requests be concatenated?
        self._outboxes: dict[asyncio.AbstractEventLoop, _Outbox] = {}  # one per event loop, see _Outbox
        #: vLLM-named statistics (None: not kept); see :meth:`attach_stats`
        self.engine_stats: EngineStats | None = None
        self._admitting: list[_Job] = []  # taken from the queue, being prefilled
        #: started requests whose prompts go into the running cohort's decode steps, chunk by chunk
        self._joining: list[_Joining] = []
        #: a decode step with prompts in it is filled to a multiple of this many tokens (see mixed_step)
        self.token_block, self.most_prompt_tokens = (16, 256) if device.type == "cpu" else (1, 2048)
        #: the decode loop's last sign of progress (monotonic), read by the stall watchdog
        self.progress_at = time.monotonic()

    # ------------------------------------------------------------ event loop side
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        *,
        processors: Sequence[LogitsProcessor] = (),
        adapter: str | None = None,
    ) -> AsyncGenerator[list[SequenceDelta], None]:
        """Stream the deltas of one request; its own error (untranslated) is raised after
        the deltas that came before it. Closing the iterator early cancels the request."""
        loop = asyncio.get_running_loop()
        with self._cv:
            outbox = self._outboxes.get(loop)
            if outbox is None:
                if len(self._outboxes) > 8:  # loops of earlier asyncio.run() calls (tests)
                    self._outboxes = {lp: ob for lp, ob in self._outboxes.items() if not lp.is_closed()}
                outbox = self._outboxes[loop] = _Outbox(loop)
        job = _Job(outbox, prompt_ids, params, request_id, processors, adapter)
        job.engine_stats = self.engine_stats
        self._ensure_thread()
        with self._cv:
            self._incoming.append(job)
            self._cv.notify_all()
        try:
            done = False
            while not done:
                # everything the decode thread has sent so far goes out as one list: under load a
                # consumer that fell a step behind catches up in one wake-up, not one per step
                deltas: list[SequenceDelta] = []
                item = await job.queue.get()
                while True:
                    if item is _DONE:
                        done = True
                        break
                    if isinstance(item, BaseException):
                        if deltas:
                            yield coalesce(deltas)
                        raise item
                    deltas.extend(item)
                    if job.queue.empty():
                        break
                    item = job.queue.get_nowait()
                if deltas:
                    yield deltas if len(deltas) <= 1 else coalesce(deltas)
        finally:
            if not job.done:
                job.cancelled.set()
                with self._cv:  # wake the decode thread so the rows are freed at once
                    self._cv.notify_all()

    def running(self) -> list[str]:
        """The request id of every row in the running batch (a snapshot, for tests)."""
        return [row.job.request_id for cohort in list(self._cohorts) for row in cohort.rows]

    def attach_stats(self, stats: EngineStats) -> None:
        """Keep vLLM-named statistics in ``stats`` (its gauges read :meth:`snapshot`)."""
        self.engine_stats = stats
        stats.snapshot = self.snapshot

    def snapshot(self) -> Snapshot:
        """Sequences running (decoding or being prefilled) and waiting, KV-cache positions held, adapters
        (any thread: a best-effort read of the decode thread's state)."""
        snap = Snapshot()
        for cohort in list(self._cohorts):
            rows = list(cohort.rows)
            live = [row for row in rows if not (row.finished or row.job.done or row.job.cancelled.is_set())]
            snap.running += len(live)
            snap.running_adapters.extend(row.job.adapter for row in live if row.job.adapter is not None)
            mask, enc = cohort.mask, cohort.enc_mask
            if mask is not None:
                length = int(mask.shape[1])
            else:  # encoder-decoder: the decoder's steps and the cross-attention's encoder length
                length = (rows[0].job.step if rows else 0) + (int(enc.shape[1]) if enc is not None else 0)
            snap.kv_positions += length * len(rows)
        for joining in list(self._joining):
            if not joining.job.done:
                snap.kv_positions += joining.done  # the prompt's keys and values computed so far
        for job in [*self._admitting, *(joining.job for joining in list(self._joining))]:
            if not job.done:
                snap.running += job.rows
                if job.adapter is not None:
                    snap.running_adapters.append(job.adapter)
        for job in list(self._incoming):
            if not job.done and not job.cancelled.is_set():
                snap.waiting += job.rows
                if job.adapter is not None:
                    snap.waiting_adapters.append(job.adapter)
        return snap

    def busy_since(self) -> float | None:
        """None when the decode loop has nothing to do; else the time since which it has made no
        progress (its last step, or the oldest waiting request's arrival if later)."""
        incoming = list(self._incoming)
        if not self._cohorts and not self._admitting and not self._joining and not incoming:
            return None
        since = self.progress_at
        if incoming:
            since = max(since, min(job.arrived for job in incoming))
        return since

    async def stop(self) -> None:
        """Fail what is waiting or running (the model is shutting down) and wait for the decode thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        thread = self._thread
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join, 30)

    def _ensure_thread(self) -> None:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._schedule, name="hf-decode", daemon=True)
                self._thread.start()

    # ------------------------------------------------------------- decode thread
    def _schedule(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            try:
                new = self._take_incoming()
                if new is None:
                    return
                self.progress_at = time.monotonic()
                with torch.inference_mode():
                    if new:
                        self._admitting = new
                        joining = self._foldable(new)
                        rest = [job for job in new if job not in joining]
                        if rest:
                            self._admit(rest)
                        self._joining.extend(_Joining(job) for job in self._start_jobs(joining))
                        self._admitting = []
                        self.progress_at = time.monotonic()
                    for i, cohort in enumerate(list(self._cohorts)):
                        self._step(cohort, fold=i == 0)
                        self.progress_at = time.monotonic()
            except Exception as exc:  # never let the scheduler die
                logger.exception("generation scheduler failed; failing the running requests")
                for cohort in self._cohorts:
                    for job in cohort.jobs:
                        job.finish(exc)
                self._cohorts = []
                for job in [*self._admitting, *(joining.job for joining in self._joining)]:
                    job.finish(exc)
                self._admitting, self._joining = [], []
            finally:
                self._flush_outboxes()

    def _flush_outboxes(self) -> None:
        """Decode thread: hand everything emitted so far to the event loops."""
        for outbox in list(self._outboxes.values()):
            outbox.flush()

    def _active_rows(self) -> int:
        return sum(len(c.rows) for c in self._cohorts) + sum(joining.job.rows for joining in self._joining)

    def _take_incoming(self) -> list[_Job] | None:
        """The requests to admit now (waiting for the batch window when idle); None to stop."""
        with self._cv:
            while not self._cohorts and not self._incoming and not self._stopping:
                self._cv.wait()
            if self._stopping:
                running = [job for cohort in self._cohorts for job in cohort.jobs] + [joining.job for joining in self._joining]
                for job in [*self._incoming, *running]:
                    job.finish(errors.ModelNotReady("The model is shutting down; retry on another replica", retry_after=1))
                self._incoming.clear()
                self._cohorts, self._joining = [], []
                return None
            idle = not self._cohorts
            if idle and self._incoming and self.window.expects_company(self._last_group):  # the batch window
                first = self._incoming[0].arrived
                while sum(j.rows for j in self._incoming) < self.max_batch_size and not self._stopping:
                    if self.window.regathered(len(self._incoming), self._last_group):
                        break
                    remaining = self.window.remaining(first, self._incoming[-1].arrived)
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
            taken: list[_Job] = []
            active = self._active_rows()
            adapters = {row.job.adapter for c in self._cohorts for row in c.rows} - {None}
            held: list[_Job] = []  # LoRA: their adapter would exceed max_adapters; they keep their place
            while self._incoming:
                job = self._incoming[0]
                if job.cancelled.is_set():
                    self._incoming.popleft()
                    job.finish()
                    continue
                if active and active + job.rows > self.max_batch_size:
                    break  # waits for rows to free up
                self._incoming.popleft()
                if self.max_adapters is not None and job.adapter is not None and job.adapter not in adapters:
                    if len(adapters) >= self.max_adapters:
                        held.append(job)
                        continue
                    adapters.add(job.adapter)
                taken.append(job)
                active += job.rows
            self._incoming.extendleft(reversed(held))
            if idle and taken:
                self._last_group = len(taken)
            return taken

    def _run_model(self, adapters: Sequence[str | None], *, encoder: bool = False, **inputs: Any) -> Any:
        """Every forward pass of the scheduler: the model (or, with ``encoder``, its encoder)
        on a batch whose row ``i`` runs with the weights of adapter ``adapters[i]`` (None:
        the base model). With LoRA adapters, ``run_with_adapters`` applies each row's own."""
        if self.run_with_adapters is not None:
            return self.run_with_adapters(adapters, encoder, inputs)
        if any(adapter is not None for adapter in adapters):
            raise NotImplementedError("adapters (LoRA) are not supported by this backend yet")
        return (self.model.get_encoder() if encoder else self.forward)(**inputs)

    # admission ------------------------------------------------------------
    def _start_job(self, job: _Job) -> None:
        job.gen = sampler.new_generator(job.params.seed, self.device)
        job.live = job.params.n
        if job.engine_stats is not None:
            job.engine_stats.admitted(job.arrived, len(job.prompt_ids), time.monotonic())

    def _new_rows(self, job: _Job) -> list[_Seq]:
        return [_Seq(job, i, TextStream(self.detokenizer(), job.params.stop)) for i in range(job.params.n)]

    def _admit(self, jobs: list[_Job]) -> None:
        if self.encoder_decoder:
            self._admit_encoder_decoder(jobs)
            return
        self._prefill_started(self._start_jobs(jobs))

    def _start_jobs(self, jobs: list[_Job]) -> list[_Job]:
        """Start each of ``jobs`` (see :meth:`_start_job`); those that could not are finished with their error."""
        started: list[_Job] = []
        for job in jobs:
            try:
                self._start_job(job)
            except Exception as exc:  # noqa: BLE001 - this request's own error
                job.finish(exc)
                continue
            started.append(job)
        return started

    def _prefill_started(self, started: list[_Job]) -> None:
        """Decoder-only: prefill the started ``jobs`` and add their rows to the running cohort."""
        # requests admitted together share one (left-padded) prefill, as a batched ``generate`` would;
        # prompt log-probabilities need every position's logits, so those requests prefill alone
        together = [j for j in started if j.params.prompt_logprobs is None] if self._mergeable else []
        alone = [j for j in started if j not in together] if len(together) > 1 else started
        if len(together) > 1:
            try:
                self._add_cohort(self._prefill_together(together))
            except Exception as exc:  # noqa: BLE001 - retried one by one below
                logger.warning("a batched prefill of %d requests failed (%s); running them one by one", len(together), type(exc).__name__)
                alone = started
        for job in alone:
            try:
                cohort = self._prefill(job)
            except Exception as exc:  # noqa: BLE001 - this request's own error
                job.finish(exc)
                continue
            self._add_cohort(cohort)

    def _foldable(self, jobs: list[_Job]) -> list[_Job]:
        """The requests among ``jobs`` whose prompts go into the running cohort's decode steps
        (:mod:`.mixed_step`) instead of taking a prefill pass of their own: all of them that do not
        want prompt log-probabilities (those need every position's logits), when the model can fold
        and a cohort of base-model rows is running."""
        if not (self.fold_prompts and self._mergeable and self._cohorts and not self.encoder_decoder):
            return []
        if any(row.job.adapter is not None for row in self._cohorts[0].rows):
            return []
        return [job for job in jobs if job.params.prompt_logprobs is None and job.adapter is None and not job.cancelled.is_set()]

    def _add_cohort(self, cohort: _Cohort) -> None:
        if self._mergeable and self._cohorts:
            self._cohorts[0] = self._merge(self._cohorts[0], cohort)
        else:
            self._cohorts.append(cohort)

    def _rows_of(self, jobs: list[_Job], vocab: int) -> list[_Seq]:
        """The new rows of ``jobs`` (``n`` each, in order), with their token counts set up."""
        seqs: list[_Seq] = []
        for job in jobs:
            job.counts = torch.zeros((job.rows, vocab), dtype=torch.float32, device=self.device)
            seqs.extend(self._new_rows(job))
        return seqs

    @staticmethod
    def _row_adapters(jobs: list[_Job]) -> list[str | None]:
        return [job.adapter for job in jobs for _ in range(job.rows)]

    def _prefill_together(self, jobs: list[_Job]) -> _Cohort:
        """Decoder-only: the prompts of several requests as one left-padded batch, ``n`` rows each."""
        ids, mask = pad_batch([job.prompt_ids for job in jobs], self.pad_token_id, self.device, left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        adapters = [job.adapter for job in jobs]  # one row per prompt until the n-fold repeat below
        out = self._run_model(adapters, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        self.stats["prefills"] += 1
        cache = out.past_key_values
        kv_cache.grow_in_place(cache)
        logits = out.logits[:, -1, :].float()
        if any(job.rows > 1 for job in jobs):  # n > 1: each request's row repeated n times
            rows = torch.tensor([job.rows for job in jobs], device=self.device)
            index = torch.repeat_interleave(torch.arange(len(jobs), device=self.device), rows)
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]
        cohort = _Cohort(self._rows_of(jobs, logits.shape[-1]), cache, logits.clone())
        cohort.mask = mask
        cohort.positions = mask.sum(dim=1)
        return cohort

    def _prefill(self, job: _Job) -> _Cohort:
        """Decoder-only: run one prompt alone (exactly as ``generate`` would), n rows."""
        params = job.params
        n = params.n
        prompt = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
        want_prompt = params.prompt_logprobs is not None
        kwargs: dict[str, Any] = {} if want_prompt else {"logits_to_keep": 1}
        out = self._run_model([job.adapter], input_ids=prompt, use_cache=True, **kwargs)
        self.stats["prefills"] += 1
        if want_prompt:
            prompt_lp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
            k = params.prompt_logprobs or 0
            job.prompt_logprobs = [None] + [
                sampler.logprob_entry(prompt_lp[i], job.prompt_ids[i + 1], k, self.token_text) for i in range(len(job.prompt_ids) - 1)
            ]
        cache = out.past_key_values
        if self._mergeable is None:
            layers = list(getattr(cache, "layers", None) or [])
            self._mergeable = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
            if not self._mergeable:
                logger.info("this model's KV cache cannot be merged; concurrent requests decode side by side")
        kv_cache.grow_in_place(cache)
        if n > 1:
            cache.batch_repeat_interleave(n)
        return self._prompt_cohort(job, cache, out.logits[0, -1, :])

    def _prompt_cohort(self, job: _Job, cache: Any, logits: torch.Tensor) -> _Cohort:
        """Decoder-only: the ``n`` rows of ``job`` after its whole prompt, unpadded, over ``cache``
        (already ``n`` rows), each with the prompt's next ``logits`` ([vocab])."""
        n, length = job.rows, len(job.prompt_ids)
        cohort = _Cohort(self._rows_of([job], logits.shape[-1]), cache, logits.float().expand(n, -1).clone())
        cohort.mask = torch.ones((n, length), dtype=torch.long, device=self.device)
        cohort.positions = torch.full((n,), length, dtype=torch.long, device=self.device)
        return cohort

    def _merge(self, a: _Cohort, b: _Cohort) -> _Cohort:
        """Decoder-only: one cohort from two, left-padding the shorter cache."""
        la, lb = a.mask.shape[1], b.mask.shape[1]
        width = max(la, lb)
        for layer_a, layer_b in zip(a.cache.layers, b.cache.layers):
            if isinstance(layer_a, kv_cache.GrowingLayer):
                layer_a.merge(layer_b, la, lb)  # one copy, into buffers with spare positions
                continue
            for attr in ("keys", "values"):
                ta = F.pad(getattr(layer_a, attr), (0, 0, width - la, 0))
                tb = F.pad(getattr(layer_b, attr), (0, 0, width - lb, 0))
                setattr(layer_a, attr, torch.cat([ta, tb], dim=0))
        a.mask = torch.cat([F.pad(a.mask, (width - la, 0)), F.pad(b.mask, (width - lb, 0))], dim=0)
        a.positions = torch.cat([a.positions, b.positions])
        a.logits = torch.cat([a.logits, b.logits], dim=0)
        a.rows = a.rows + b.rows
        return a

    def _admit_encoder_decoder(self, jobs: list[_Job]) -> None:
        started = []
        for job in jobs:
            try:
                self._start_job(job)
                started.append(job)
            except Exception as exc:  # noqa: BLE001
                job.finish(exc)
        if not started:
            return
        try:
            self._cohorts.append(self._encode(started))
        except Exception as exc:  # noqa: BLE001 - retry each request alone
            if len(started) == 1:
                started[0].finish(exc)
                return
            logger.warning("a batched encoder pass failed (%s); running the requests one by one", type(exc).__name__)
            for job in started:
                try:
                    self._cohorts.append(self._encode([job]))
                except Exception as exc1:  # noqa: BLE001
                    job.finish(exc1)

    def _encode(self, jobs: list[_Job]) -> _Cohort:
        """Encoder-decoder: encode the prompts as one (right-padded) batch, then the first decoder step."""
        ids, mask = pad_batch([job.prompt_ids for job in jobs], self.pad_token_id, self.device)
        hidden = self._run_model([job.adapter for job in jobs], encoder=True, input_ids=ids, attention_mask=mask).last_hidden_state
        repeats = torch.tensor([job.rows for job in jobs], device=self.device)
        hidden = hidden.repeat_interleave(repeats, dim=0)
        mask = mask.repeat_interleave(repeats, dim=0)
        start = self.model.generation_config.decoder_start_token_id
        if start is None:
            start = self.model.config.decoder_start_token_id
        rows = sum(job.rows for job in jobs)
        decoder_input = torch.full((rows, 1), int(start), dtype=torch.long, device=self.device)
        out = self._run_model(
            self._row_adapters(jobs),
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            decoder_input_ids=decoder_input,
            use_cache=True,
        )
        self.stats["prefills"] += 1
        cohort = _Cohort(self._rows_of(jobs, out.logits.shape[-1]), out.past_key_values, out.logits[:, -1, :].float())
        cohort.enc_hidden, cohort.enc_mask = hidden, mask
        return cohort

    # one step ---------------------------------------------------------------
    def _step(self, cohort: _Cohort, fold: bool = False) -> None:
        """Sample every row, send the deltas, drop finished rows, run the next forward pass (with
        ``fold``, chunks of the joining requests' prompts in it; see :meth:`_forward_mixed`)."""
        by_job: dict[int, list[int]] = {}
        for i, row in enumerate(cohort.rows):
            if row.job.done or row.job.cancelled.is_set():
                row.finished = True
                row.job.finish()
                continue
            by_job.setdefault(id(row.job), []).append(i)
        next_ids = [0] * len(cohort.rows)
        # plain greedy rows (no processors, penalties or min_tokens) share one argmax over the whole batch
        jobs = [(cohort.rows[idxs[0]].job, idxs) for idxs in by_job.values()]
        plain = {id(job) for job, _ in jobs if sampler.is_plain_greedy(job.params, job.step, job.processors)}
        argmax = cohort.logits.argmax(dim=-1).tolist() if plain else None
        # greedy rows under a grammar (and nothing else): one bitmask, one masked argmax over them all
        masked = self._masked_argmax(cohort, [(job, idxs) for job, idxs in jobs if id(job) not in plain])
        for job, idxs in jobs:
            try:
                chosen = [argmax[i] for i in idxs] if argmax is not None and id(job) in plain else masked.get(id(job))
                self._sample_job(job, [cohort.rows[i] for i in idxs], cohort.logits, next_ids, idxs, chosen)
            except Exception as exc:  # noqa: BLE001 - this request's own error
                job.finish(exc)
                for i in idxs:
                    cohort.rows[i].finished = True
        # hand this step's tokens to the event loop now, so it works on them during the forward pass
        self._flush_outboxes()
        keep = [i for i, row in enumerate(cohort.rows) if not row.finished]
        apart: list[_Job] = []  # joining requests that get a prefill of their own after this step
        if fold and self._joining:
            for joining in self._joining:
                if joining.job.cancelled.is_set():
                    joining.job.finish()
            self._joining = [joining for joining in self._joining if not joining.job.done]
            if not keep:  # nothing left to fold into
                apart, self._joining = [joining.job for joining in self._joining], []
        if not keep:
            self._cohorts.remove(cohort)
            if apart:
                self._prefill_started(apart)
            return
        if len(keep) < len(cohort.rows):
            self._select(cohort, keep)
        feed = torch.tensor([next_ids[i] for i in keep], dtype=torch.long, device=self.device).view(-1, 1)
        if fold and self._joining:
            try:
                self._forward_mixed(cohort, feed)
                return
            except Exception as exc:  # noqa: BLE001 - the step and the prompts are run apart below
                logger.warning(
                    "a decode step with %d prompts in it failed (%s); running them apart", len(self._joining), type(exc).__name__
                )
                kv_cache.truncate(self._self_attention_layers(cohort.cache), cohort.mask.shape[1])
                apart, self._joining = [joining.job for joining in self._joining], []
        try:
            self._forward_step(cohort, feed)
        except Exception as exc:  # noqa: BLE001
            self._split_after_failure(cohort, feed, exc)
        if apart:
            self._prefill_started(apart)

    def _masked_argmax(self, cohort: _Cohort, jobs: list[tuple[_Job, list[int]]]) -> dict[int, list[int]]:
        """The next tokens of the greedy jobs whose only processor is a :class:`~.sampler.RowMasker`
        (by job id): their rows' bitmasks filled into one tensor, applied to their rows at once, one
        argmax. A job whose masker fails is left to :meth:`_sample_job` (which reports it)."""
        maskable = [
            (job, idxs) for job, idxs in jobs if sampler.is_masked_greedy(job.params, job.step, job.processors)
        ]
        if not maskable:
            return {}
        rows = [i for _, idxs in maskable for i in idxs]
        bitmask = torch.full((len(rows), sampler.bitmask_words(cohort.logits.shape[-1])), -1, dtype=torch.int32)
        filled: list[tuple[_Job, list[int], int]] = []
        k = 0
        for job, idxs in maskable:
            masker = job.processors[0]
            assert isinstance(masker, sampler.RowMasker)
            try:
                for j, i in enumerate(idxs):
                    masker.fill_bitmask(cohort.rows[i].tokens, bitmask, k + j)
            except Exception:  # noqa: BLE001 - sampled alone, where its error is its own
                bitmask[k : k + len(idxs)] = -1
                k += len(idxs)
                continue
            filled.append((job, idxs, k))
            k += len(idxs)
        if not filled:
            return {}
        if rows == list(range(cohort.logits.shape[0])):  # every row, in order: no copy
            logits = cohort.logits
        else:  # index_select: much cheaper than advanced indexing on CPU
            logits = cohort.logits.index_select(0, torch.tensor(rows, dtype=torch.long, device=cohort.logits.device))
        best = sampler.apply_bitmask(logits, bitmask).argmax(dim=-1).tolist()
        return {id(job): best[start : start + len(idxs)] for job, idxs, start in filled}

    def _sample_job(
        self, job: _Job, rows: list[_Seq], logits: torch.Tensor, next_ids: list[int], idxs: list[int], chosen: list[int] | None
    ) -> None:
        """The next token of each of ``job``'s rows (``idxs`` in the cohort; ``chosen``: already
        picked by the shared argmax), turned into this step's deltas for the request."""
        params = job.params
        # ``logits`` are the cohort's; this request's rows are ``idxs`` (sliced only when needed)
        if params.logprobs is not None or chosen is None:
            logits = logits[idxs]
        raw_lp = torch.log_softmax(logits, dim=-1) if params.logprobs is not None else None
        if chosen is not None:
            ids = chosen
        else:
            if params.repetition_penalty != 1.0 and job.prompt_seen is None:
                job.prompt_seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device)
                if not self.encoder_decoder:
                    job.prompt_seen[torch.tensor(job.prompt_ids, dtype=torch.long, device=self.device)] = True
            seq_idx = torch.tensor([row.index for row in rows], dtype=torch.long, device=self.device)
            ids = sampler.sample(
                logits,
                params,
                generator=job.gen,
                counts=job.counts[seq_idx],
                step=job.step,
                prompt_seen=job.prompt_seen,
                end_ids=self.eos_token_ids | set(params.stop_token_ids) if job.step < params.min_tokens else (),
                histories=[row.tokens for row in rows],
                processors=job.processors,
            ).tolist()
        stop_ids = set(params.stop_token_ids)
        count = sampler.counts_tokens(params)  # without penalties, skip the per-token tensor update
        last = job.step + 1 >= params.max_tokens
        deltas: list[SequenceDelta] = []
        for k, (row, tid) in enumerate(zip(rows, ids)):
            next_ids[idxs[k]] = tid
            row.tokens.append(tid)
            if count:
                job.counts[row.index, tid] += 1
            delta = SequenceDelta(index=row.index, token_ids=[tid])
            if raw_lp is not None:
                delta.logprobs = [sampler.logprob_entry(raw_lp[k], tid, params.logprobs or 0, self.token_text)]
            is_eos = tid in self.eos_token_ids and not params.ignore_eos
            is_stop_id = tid in stop_ids
            stream = row.stream
            if not (is_eos or is_stop_id):  # the token that ends a sequence is not text
                delta.text = stream.push(tid)
            if stream.stopped_by is None and (is_eos or is_stop_id or last):
                delta.text += stream.flush()
            if stream.stopped_by is not None:
                delta.finish_reason, delta.stop_reason = "stop", stream.stopped_by
            elif is_eos or is_stop_id:
                delta.finish_reason = "stop"
                delta.stop_reason = tid if is_stop_id else None
            elif last:
                delta.finish_reason = "length"
            if delta.finish_reason:
                row.finished = True
                job.live -= 1
                job.reasons.append(delta.finish_reason)
            if job.step == 0 and job.prompt_logprobs is not None:
                delta.prompt_logprobs = job.prompt_logprobs
            deltas.append(delta)
        job.step += 1
        if job.engine_stats is not None:
            now = time.monotonic()
            job.engine_stats.tokens(len(ids), job.arrived, job.first_token, job.last_token, now)
            job.first_token = job.first_token or now
            job.last_token = now
        job.emit(deltas)
        if job.live <= 0:
            job.finish()

    def _select(self, cohort: _Cohort, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (finished and cancelled rows are freed here)."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        cohort.rows = [cohort.rows[i] for i in keep]
        cohort.logits = cohort.logits[idx]
        if self.encoder_decoder:
            cohort.cache.batch_select_indices(idx)
            cohort.enc_hidden = cohort.enc_hidden[idx]
            cohort.enc_mask = cohort.enc_mask[idx]
            return
        cohort.positions = cohort.positions[idx]
        mask = cohort.mask[idx]
        used = mask.sum(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0  # columns before it only padding uses any more
        for layer in cohort.cache.layers:
            kv_cache.keep(layer, keep, first)  # the rows and the trim at once: in place, or one copy
        cohort.mask = mask[:, first:]

    def _forward_step(self, cohort: _Cohort, feed: torch.Tensor) -> None:
        if self.encoder_decoder:
            out = self._run_model(
                cohort.adapters,
                encoder_outputs=BaseModelOutput(last_hidden_state=cohort.enc_hidden),
                attention_mask=cohort.enc_mask,
                decoder_input_ids=feed,
                past_key_values=cohort.cache,
                use_cache=True,
            )
        else:
            mask = torch.cat([cohort.mask, torch.ones_like(cohort.mask[:, :1])], dim=1)
            out = self._run_model(
                cohort.adapters,
                input_ids=feed,
                attention_mask=mask,
                position_ids=cohort.positions.view(-1, 1),
                past_key_values=cohort.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cohort.mask = mask
            cohort.positions = cohort.positions + 1
        cohort.cache = out.past_key_values
        cohort.logits = out.logits[:, -1, :].float()
        self.stats["decode_steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], feed.shape[0])

    def _forward_mixed(self, cohort: _Cohort, feed: torch.Tensor) -> None:
        """Decoder-only: the cohort's next decode step with the next chunk of each joining prompt in
        it, as one flat sequence (:mod:`.mixed_step`; as many prompt tokens as
        :func:`~.mixed_step.step_prompt_tokens` gives the step). A prompt whose last chunk ran joins
        the cohort, its next logits ready for the next step."""
        rows = feed.shape[0]
        budget = mixed_step.step_prompt_tokens(
            rows, sum(j.remaining for j in self._joining), block=self.token_block, most=self.most_prompt_tokens
        )
        chunks: list[tuple[_Joining, int]] = []
        for joining in self._joining:
            if budget <= 0:
                break
            length = min(joining.remaining, budget)
            chunks.append((joining, length))
            budget -= length
        ids = feed.view(-1).tolist()
        positions = [cohort.positions]
        keep = list(range(rows))
        for joining, length in chunks:
            ids.extend(joining.job.prompt_ids[joining.done : joining.done + length])
            positions.append(torch.arange(joining.done, joining.done + length, device=self.device))
            if joining.done + length == len(joining.job.prompt_ids):  # the prompt's last token: its next logits
                keep.append(len(ids) - 1)
        mask = torch.cat([cohort.mask, torch.ones_like(cohort.mask[:, :1])], dim=1)
        with mixed_step.MixedPass(cohort.cache, rows, [(length, joining.kv) for joining, length in chunks], mask) as step:
            out = self._run_model(
                [None],
                input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                position_ids=torch.cat(positions).view(1, -1),
                attention_mask=_NO_MASK,  # a 4D mask is taken as it is: the pass's attention makes its own
                past_key_values=step,
                use_cache=True,
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
            )
        logits = out.logits[0].float()
        cohort.mask, cohort.positions, cohort.logits = mask, cohort.positions + 1, logits[:rows]
        self.stats["decode_steps"] += 1
        finished = 0
        for i, (joining, length) in enumerate(chunks):
            joining.kv, joining.done = step.prompt_kv(i), joining.done + length
            if joining.remaining:
                continue
            n = joining.job.rows
            layers = _Layers([_Layer(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in joining.kv])
            self._merge(cohort, self._prompt_cohort(joining.job, layers, logits[rows + finished]))
            finished += 1
            self.stats["folded_prompts"] += 1
        self._joining = [joining for joining in self._joining if joining.remaining]
        self.stats["max_rows"] = max(self.stats["max_rows"], len(cohort.rows))

    @staticmethod
    def _self_attention_layers(cache: Any) -> list[Any]:
        inner = getattr(cache, "self_attention_cache", cache)
        return list(getattr(inner, "layers", []))

    def _split_after_failure(self, cohort: _Cohort, feed: torch.Tensor, exc: Exception) -> None:
        """A batched step raised: undo it, then run each request's rows alone so only the culprit fails."""
        jobs = cohort.jobs
        if len(jobs) == 1:
            jobs[0].finish(exc)
            self._cohorts.remove(cohort)
            return
        logger.warning("a batched decode step of %d requests failed (%s); running them one by one", len(jobs), type(exc).__name__)
        # encoder-decoder (no mask): every row has the same decoder length, the step count
        length = cohort.mask.shape[1] if cohort.mask is not None else cohort.rows[0].job.step
        kv_cache.truncate(self._self_attention_layers(cohort.cache), length)
        position = self._cohorts.index(cohort)
        self._cohorts.remove(cohort)
        for job in jobs:
            keep = [i for i, row in enumerate(cohort.rows) if row.job is job]
            part = _Cohort(cohort.rows, copy.deepcopy(cohort.cache), cohort.logits)
            part.mask, part.positions = cohort.mask, cohort.positions
            part.enc_hidden, part.enc_mask = cohort.enc_hidden, cohort.enc_mask
            self._select(part, keep)
            try:
                self._forward_step(part, feed[torch.tensor(keep, dtype=torch.long)])
            except Exception as exc1:  # noqa: BLE001 - this request's own error
                job.finish(exc1)
                continue
            self._cohorts.insert(position, part)
            position += 1
