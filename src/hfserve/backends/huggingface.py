"""The Hugging Face transformers backend.

Runs any supported task with plain transformers models on CPU or GPU. Model
work runs in worker threads, never on the event loop.

Concurrent requests share forward passes:

- encoder tasks go through a :class:`~hfserve.backends.batching.MicroBatcher`
  (up to ``max_batch_size`` inputs per forward; a batch forms for at most
  ``max_batch_wait_ms``, closing early once ``batch_idle_ms`` pass without a
  newcomer: :class:`~hfserve.backends.batching.BatchWindow`);
- generation runs in one scheduler thread that decodes every running request
  as rows of a shared batch with a KV cache (continuous batching: new requests
  join the running batch), so streaming, stop strings, ``n``,
  log-probabilities, seeds, penalties and cancellation stay per request.

transformers' own continuous batching (``init_continuous_batching``) is not
used: it samples with one global generator and one ``do_sample`` for all
requests, has no per-request ``n``, stop strings, penalties, min_tokens or
top-k / prompt log-probabilities, and serves decoder-only models only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import errors
from ..tasks import Task, TaskInferenceError, infer_task, sentence_transformers_max_len, sentence_transformers_pooling
from ..config import BatchingConfig, ModelConfig
from .batching import BatchWindow, MicroBatcher
from ..generation import Capabilities, SamplingParams, SequenceDelta, TokenLogprob, coalesce
from .base import Backend, resolve_dtype
from .textstream import TextStream

logger = logging.getLogger("hfserve.backends.huggingface")

_DONE = object()

_MODEL_CLASSES = {
    Task.text_generation: "AutoModelForCausalLM",
    Task.text2text_generation: "AutoModelForSeq2SeqLM",
    Task.text_embedding: "AutoModel",
    Task.sequence_classification: "AutoModelForSequenceClassification",
    Task.token_classification: "AutoModelForTokenClassification",
    Task.fill_mask: "AutoModelForMaskedLM",
}

_LENGTH_ATTRS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


class BackendLoadError(Exception):
    """The model cannot be served; the message says why (shown at startup)."""


def _config_max_len(config: Any, tokenizer: Any) -> int | None:
    for cfg in (getattr(config, "text_config", None), config):
        for attr in _LENGTH_ATTRS:
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    tmax = getattr(tokenizer, "model_max_length", None)
    if isinstance(tmax, int) and 0 < tmax < 1_000_000:
        return tmax
    return None


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
        loop: asyncio.AbstractEventLoop,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        outbox: _Outbox | None = None,
    ):
        self.loop = loop
        self.outbox = outbox if outbox is not None else _Outbox(loop)
        self.prompt_ids = prompt_ids
        self.params = params
        self.request_id = request_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.done = False
        self.arrived = time.monotonic()
        # set at admission, used only by the scheduler thread
        self.gen: Any = None  # this request's own torch.Generator
        self.counts: Any = None  # [n, vocab] generated-token counts (penalties)
        self.prompt_seen: Any = None  # [vocab] bool: prompt tokens (repetition penalty, as vLLM and transformers)
        self.step = 0
        self.live = 0  # sequences still running
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def rows(self) -> int:
        return self.params.n

    def emit(self, item: Any) -> None:
        """Queue ``item`` for this request (decode thread only; sent at the next outbox flush)."""
        if not self.done:
            self.outbox.post(self, item)

    def finish(self, exc: BaseException | None = None) -> None:
        """End the request (with its own error, if any); later emits are dropped."""
        if self.done:
            return
        if exc is not None:
            self.emit(exc)
        self.emit(_DONE)
        self.done = True


class _Seq:
    """One row of a batch: one of a request's ``n`` sequences."""

    __slots__ = ("job", "index", "stream", "finished")

    def __init__(self, job: _Job, index: int, stream: TextStream):
        self.job = job
        self.index = index
        self.stream = stream
        self.finished = False


class _Cohort:
    """Rows that share one KV cache and advance together, one forward pass per step.

    Decoder-only models: prompts are left-padded in the cache; ``mask`` is the
    attention mask over the cache and ``positions`` each row's next position id.
    Encoder-decoder models: ``enc_hidden`` / ``enc_mask`` hold the (right-padded)
    encoder outputs; every row of a cohort started decoding at the same step.
    """

    def __init__(self, rows: list[_Seq], cache: Any, logits: Any):
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

class HuggingFaceBackend(Backend):
    name = "huggingface"

    def __init__(self, model: ModelConfig, batching: BatchingConfig | None = None, *, device: str | None = None):
        super().__init__()
        batching = batching or BatchingConfig()
        self.model_config = model
        self.model_path = model.source
        self.requested_task = model.task
        self.revision = model.revision
        self.tokenizer_revision = model.tokenizer_revision
        self.dtype_name = model.dtype
        self.requested_max_len = model.max_model_len
        self.trust_remote_code = model.trust_remote_code
        self.device_name = device
        max_workers = max(1, batching.max_threads)
        max_batch_size = batching.max_batch_size
        max_batch_wait_ms, batch_idle_ms = batching.max_batch_wait_ms, batching.batch_idle_ms
        self.capabilities = Capabilities(max_logprobs=20, max_n=16, penalties=True, prompt_logprobs=True, min_tokens=True)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hf-model")
        self.model: Any = None
        self.config: Any = None
        self.eos_token_ids: set[int] = set()
        self.pooling: tuple[str, bool] = ("mean", True)
        self.max_batch_size = max(1, int(max_batch_size))
        self.window = BatchWindow.from_ms(max_batch_wait_ms, batch_idle_ms)
        # encoder tasks: merged forward passes
        self.batcher = MicroBatcher(self._run_encoder, self._executor, max_batch_size=self.max_batch_size, window=self.window)
        # generation: one scheduler thread, requests as rows of shared batches
        self._cv = threading.Condition()
        self._incoming: deque[_Job] = deque()
        self._cohorts: list[_Cohort] = []
        self._scheduler: threading.Thread | None = None
        self._stopping = False
        self._encoder_decoder = False
        self._mergeable: bool | None = None  # can KV caches of different requests be concatenated?
        self._outboxes: dict[asyncio.AbstractEventLoop, _Outbox] = {}  # one per event loop, see _Outbox
        #: counters for tests and benchmarks: encoder forward passes, generation prefills and decode steps
        self.stats: dict[str, int] = {"encoder_forwards": 0, "prefills": 0, "decode_steps": 0, "max_rows": 0}

    # ------------------------------------------------------------------ load
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        import torch
        import transformers

        kwargs = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        try:
            self.config = transformers.AutoConfig.from_pretrained(self.model_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise BackendLoadError(f"cannot load the model config from {self.model_path}: {exc}") from None
        local_dir = Path(self.model_path) if Path(self.model_path).is_dir() else None
        try:
            self.task = self.requested_task or infer_task(getattr(self.config, "architectures", None), local_dir)
        except TaskInferenceError as exc:
            raise BackendLoadError(str(exc)) from None
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            self.model_path, revision=self.tokenizer_revision or self.revision, trust_remote_code=self.trust_remote_code
        )
        device = self.device_name or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self._resolve_dtype(torch, device)
        model_cls = getattr(transformers, _MODEL_CLASSES[self.task])
        try:
            self.model = model_cls.from_pretrained(self.model_path, dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise BackendLoadError(f"cannot load {self.task.label} weights from {self.model_path}: {exc}") from None
        self.model.to(device).eval()
        self.device = torch.device(device)
        self._encoder_decoder = bool(getattr(self.config, "is_encoder_decoder", False))

        limit = _config_max_len(self.config, self.tokenizer)
        if self.requested_max_len:
            if limit and self.requested_max_len > limit and not self.config.is_encoder_decoder:
                raise BackendLoadError(
                    f"--max_model_len {self.requested_max_len} exceeds the model's maximum of {limit} positions"
                )
            self.max_model_len = self.requested_max_len
        else:
            self.max_model_len = limit or 2048
            st_limit = sentence_transformers_max_len(local_dir)
            if st_limit and st_limit < self.max_model_len:
                self.max_model_len = st_limit  # what the model was trained to embed (and what vLLM serves)
        self.labels = {int(k): str(v) for k, v in (getattr(self.config, "id2label", None) or {}).items()}

        eos: set[int] = set()
        gen_cfg = getattr(self.model, "generation_config", None)
        for value in (getattr(gen_cfg, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        self.eos_token_ids = eos
        if self.task is Task.text_embedding:
            self.pooling = sentence_transformers_pooling(local_dir) or ("mean", True)
        logger.info(
            "loaded %s (%s) for %s on %s as %s, max_model_len %d",
            self.model_path,
            type(self.model).__name__,
            self.task.value,
            device,
            dtype,
            self.max_model_len,
        )

    def _resolve_dtype(self, torch: Any, device: str) -> Any:
        config_dtype = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        try:
            return getattr(torch, resolve_dtype(self.dtype_name, gpu=device != "cpu", config_dtype=config_dtype))
        except ValueError as exc:
            raise BackendLoadError(str(exc)) from None

    async def stop(self) -> None:
        """Stop the decode thread and the workers, and wait for them: a thread still inside
        torch while the interpreter exits aborts the process (exit code -6 instead of 0)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        scheduler = self._scheduler
        if scheduler is not None and scheduler.is_alive():
            await asyncio.to_thread(scheduler.join, 30)
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # ------------------------------------------------------------ boundary
    def translate(self, exc: Exception, request_id: str | None) -> errors.HFServeError:
        """torch / transformers / tokenizers exceptions -> contract classes."""
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            logger.warning("request %s: out of memory", request_id or "-")
            return errors.Overloaded(
                "The model ran out of memory serving this request; retry later or send a shorter request"
            )
        return errors.classify(exc, request_id)

    # ----------------------------------------------------------- generation
    #
    # One scheduler thread runs every generation. It keeps "cohorts" of rows
    # (a request with n=3 is 3 rows) that share a KV cache, runs one forward
    # step per cohort per iteration, samples each row with its own request's
    # parameters and torch.Generator, and sends each request its own deltas.
    # Requests that arrive while a batch runs join it at the next step
    # (decoder-only models: the new prompt is prefilled on its own, then its
    # cache is left-padded and concatenated into the running batch). For
    # encoder-decoder models the requests admitted together form a new cohort
    # that runs beside the older ones.

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[list[SequenceDelta]]:
        loop = asyncio.get_running_loop()
        with self._cv:
            outbox = self._outboxes.get(loop)
            if outbox is None:
                if len(self._outboxes) > 8:  # loops of earlier asyncio.run() calls (tests)
                    self._outboxes = {lp: ob for lp, ob in self._outboxes.items() if not lp.is_closed()}
                outbox = self._outboxes[loop] = _Outbox(loop)
        job = _Job(loop, prompt_ids, params, request_id, outbox)
        self._ensure_scheduler()
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
                        with self.map_exceptions(request_id):
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
                with self._cv:  # wake the scheduler so the rows are freed at once
                    self._cv.notify_all()

    def _ensure_scheduler(self) -> None:
        with self._cv:
            if self._scheduler is None or not self._scheduler.is_alive():
                self._stopping = False
                self._scheduler = threading.Thread(target=self._schedule, name="hf-decode", daemon=True)
                self._scheduler.start()

    def _active_rows(self) -> int:
        return sum(len(c.rows) for c in self._cohorts)

    def _schedule(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while True:
            try:
                new = self._take_incoming()
                if new is None:
                    return
                with torch.inference_mode():
                    if new:
                        self._admit(new)
                    for cohort in list(self._cohorts):
                        self._step(cohort)
            except Exception as exc:  # noqa: BLE001 - never let the scheduler die
                logger.exception("generation scheduler failed; failing the running requests")
                for cohort in self._cohorts:
                    for job in cohort.jobs:
                        job.finish(exc)
                self._cohorts = []
            finally:
                self._flush_outboxes()

    def _flush_outboxes(self) -> None:
        """Decode thread: hand everything emitted so far to the event loops."""
        for outbox in list(self._outboxes.values()):
            outbox.flush()

    def _take_incoming(self) -> list[_Job] | None:
        """The requests to admit now (waiting for the batch window when idle); None to stop."""
        with self._cv:
            while not self._cohorts and not self._incoming and not self._stopping:
                self._cv.wait()
            if self._stopping:
                for job in self._incoming:
                    job.finish(errors.ModelNotReady("The model is shutting down; retry on another replica", retry_after=1))
                for cohort in self._cohorts:
                    for job in cohort.jobs:
                        job.finish(errors.ModelNotReady("The model is shutting down; retry on another replica", retry_after=1))
                self._incoming.clear()
                self._cohorts = []
                return None
            if not self._cohorts and self._incoming:  # idle: the batch window
                first = self._incoming[0].arrived
                while sum(j.rows for j in self._incoming) < self.max_batch_size and not self._stopping:
                    remaining = self.window.remaining(first, self._incoming[-1].arrived)
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
            taken: list[_Job] = []
            active = self._active_rows()
            while self._incoming:
                job = self._incoming[0]
                if job.cancelled.is_set():
                    self._incoming.popleft()
                    job.finish()
                    continue
                if active and active + job.rows > self.max_batch_size:
                    break  # waits for rows to free up
                self._incoming.popleft()
                taken.append(job)
                active += job.rows
            return taken

    # admission ------------------------------------------------------------
    def _start_job(self, job: _Job) -> None:
        import torch

        params = job.params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        job.gen = torch.Generator(device=self.device).manual_seed(seed)
        job.live = params.n

    def _new_rows(self, job: _Job) -> list[_Seq]:
        return [_Seq(job, i, TextStream(self.decode_text, job.params.stop)) for i in range(job.params.n)]

    def _admit(self, jobs: list[_Job]) -> None:
        if self._encoder_decoder:
            self._admit_encoder_decoder(jobs)
            return
        started: list[_Job] = []
        for job in jobs:
            try:
                self._start_job(job)
            except Exception as exc:  # noqa: BLE001 - this request's own error
                job.finish(exc)
                continue
            started.append(job)
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

    def _add_cohort(self, cohort: _Cohort) -> None:
        if self._mergeable and self._cohorts:
            self._cohorts[0] = self._merge(self._cohorts[0], cohort)
        else:
            self._cohorts.append(cohort)

    def _prefill_together(self, jobs: list[_Job]) -> _Cohort:
        """Decoder-only: the prompts of several requests as one left-padded batch, ``n`` rows each."""
        import torch

        ids, mask = self._batch([job.prompt_ids for job in jobs], left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        self.stats["prefills"] += 1
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        if any(job.rows > 1 for job in jobs):  # n > 1: each request's row repeated n times
            rows = torch.tensor([job.rows for job in jobs], device=self.device)
            index = torch.repeat_interleave(torch.arange(len(jobs), device=self.device), rows)
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]
        seqs: list[_Seq] = []
        for job in jobs:
            job.counts = torch.zeros((job.rows, logits.shape[-1]), dtype=torch.float32, device=self.device)
            seqs.extend(self._new_rows(job))
        cohort = _Cohort(seqs, cache, logits.clone())
        cohort.mask = mask
        cohort.positions = mask.sum(dim=1)
        return cohort

    def _prefill(self, job: _Job) -> _Cohort:
        """Decoder-only: run one prompt alone (exactly as ``generate`` would), n rows."""
        import torch

        params = job.params
        n = params.n
        prompt = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
        want_prompt = params.prompt_logprobs is not None
        kwargs = {} if want_prompt else {"logits_to_keep": 1}
        out = self.model(input_ids=prompt, use_cache=True, **kwargs)
        self.stats["prefills"] += 1
        if want_prompt:
            prompt_lp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
            job.prompt_logprobs = [None] + [
                self._logprob_entries(prompt_lp[i], job.prompt_ids[i + 1], params.prompt_logprobs or 0)
                for i in range(len(job.prompt_ids) - 1)
            ]
        cache = out.past_key_values
        if self._mergeable is None:
            from transformers.cache_utils import DynamicLayer

            layers = getattr(cache, "layers", None)
            self._mergeable = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
            if not self._mergeable:
                logger.info("this model's KV cache cannot be merged; concurrent requests decode side by side")
        if n > 1:
            cache.batch_repeat_interleave(n)
        job.counts = torch.zeros((n, out.logits.shape[-1]), dtype=torch.float32, device=self.device)
        logits = out.logits[:, -1, :].float().expand(n, -1).clone()
        cohort = _Cohort(self._new_rows(job), cache, logits)
        length = len(job.prompt_ids)
        cohort.mask = torch.ones((n, length), dtype=torch.long, device=self.device)
        cohort.positions = torch.full((n,), length, dtype=torch.long, device=self.device)
        return cohort

    def _merge(self, a: _Cohort, b: _Cohort) -> _Cohort:
        """Decoder-only: one cohort from two, left-padding the shorter cache."""
        import torch
        import torch.nn.functional as F

        la, lb = a.mask.shape[1], b.mask.shape[1]
        width = max(la, lb)
        for layer_a, layer_b in zip(a.cache.layers, b.cache.layers):
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
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        ids, mask = self._batch([job.prompt_ids for job in jobs])
        hidden = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        repeats = torch.tensor([job.rows for job in jobs], device=self.device)
        hidden = hidden.repeat_interleave(repeats, dim=0)
        mask = mask.repeat_interleave(repeats, dim=0)
        start = self.model.generation_config.decoder_start_token_id
        if start is None:
            start = self.config.decoder_start_token_id
        rows = sum(job.rows for job in jobs)
        decoder_input = torch.full((rows, 1), int(start), dtype=torch.long, device=self.device)
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            decoder_input_ids=decoder_input,
            use_cache=True,
        )
        self.stats["prefills"] += 1
        vocab = out.logits.shape[-1]
        seqs: list[_Seq] = []
        for job in jobs:
            job.counts = torch.zeros((job.rows, vocab), dtype=torch.float32, device=self.device)
            seqs.extend(self._new_rows(job))
        cohort = _Cohort(seqs, out.past_key_values, out.logits[:, -1, :].float())
        cohort.enc_hidden, cohort.enc_mask = hidden, mask
        return cohort

    # one step ---------------------------------------------------------------
    def _step(self, cohort: _Cohort) -> None:
        """Sample every row, send the deltas, drop finished rows, run the next forward pass."""
        import torch

        by_job: dict[int, list[int]] = {}
        for i, row in enumerate(cohort.rows):
            if row.job.done or row.job.cancelled.is_set():
                row.finished = True
                row.job.finish()
                continue
            by_job.setdefault(id(row.job), []).append(i)
        next_ids = [0] * len(cohort.rows)
        # plain greedy rows (no penalties, no min_tokens) share one argmax over the whole batch
        plain = [cohort.rows[idxs[0]].job for idxs in by_job.values()]
        argmax = cohort.logits.argmax(dim=-1).tolist() if any(self._plain_greedy(j) for j in plain) else None
        for idxs in by_job.values():
            job = cohort.rows[idxs[0]].job
            try:
                chosen = [argmax[i] for i in idxs] if argmax is not None and self._plain_greedy(job) else None
                self._sample_job(job, [cohort.rows[i] for i in idxs], cohort.logits, next_ids, idxs, chosen)
            except Exception as exc:  # noqa: BLE001 - this request's own error
                job.finish(exc)
                for i in idxs:
                    cohort.rows[i].finished = True
        # hand this step's tokens to the event loop now, so it works on them during the forward pass
        self._flush_outboxes()
        keep = [i for i, row in enumerate(cohort.rows) if not row.finished]
        if not keep:
            self._cohorts.remove(cohort)
            return
        if len(keep) < len(cohort.rows):
            self._select(cohort, keep)
        feed = torch.tensor([next_ids[i] for i in keep], dtype=torch.long, device=self.device).view(-1, 1)
        try:
            self._forward_step(cohort, feed)
        except Exception as exc:  # noqa: BLE001
            self._split_after_failure(cohort, feed, exc)

    @staticmethod
    def _plain_greedy(job: _Job) -> bool:
        p = job.params
        return (
            p.greedy
            and job.step >= p.min_tokens
            and p.repetition_penalty == 1.0
            and not p.frequency_penalty
            and not p.presence_penalty
        )

    def _sample_job(
        self, job: _Job, rows: list[_Seq], logits: Any, next_ids: list[int], idxs: list[int], chosen: list[int] | None = None
    ) -> None:
        import torch

        params = job.params
        # ``logits`` are the cohort's; this request's rows are ``idxs`` (sliced only when needed)
        if params.logprobs is not None or chosen is None:
            logits = logits[idxs]
        raw_lp = torch.log_softmax(logits, dim=-1) if params.logprobs is not None else None
        if chosen is not None:
            ids = chosen
        else:
            seq_idx = torch.tensor([row.index for row in rows], dtype=torch.long, device=self.device)
            if params.repetition_penalty != 1.0 and job.prompt_seen is None:
                job.prompt_seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self.device)
                if not self.config.is_encoder_decoder:
                    job.prompt_seen[torch.tensor(job.prompt_ids, dtype=torch.long, device=self.device)] = True
            ids = self._sample(logits, params, job.gen, job.counts[seq_idx], job.step, job.prompt_seen).tolist()
        stop_ids = set(params.stop_token_ids)
        # the counts are read only by the penalties: without them, skip the per-token tensor update
        count = params.repetition_penalty != 1.0 or bool(params.frequency_penalty) or bool(params.presence_penalty)
        deltas: list[SequenceDelta] = []
        for k, (row, tid) in enumerate(zip(rows, ids)):
            next_ids[idxs[k]] = tid
            if count:
                job.counts[row.index, tid] += 1
            delta = SequenceDelta(index=row.index, token_ids=[tid])
            if raw_lp is not None:
                delta.logprobs = [self._logprob_entries(raw_lp[k], tid, params.logprobs or 0)]
            is_eos = tid in self.eos_token_ids and not params.ignore_eos
            is_stop_id = tid in stop_ids
            stream = row.stream
            delta.text = stream.push(tid, emit_token=not (is_eos or is_stop_id))
            if stream.stopped_by is not None:
                delta.finish_reason, delta.stop_reason = "stop", stream.stopped_by
            elif is_eos or is_stop_id:
                delta.text += stream.flush()
                delta.finish_reason = "stop"
                delta.stop_reason = tid if is_stop_id else None
            elif job.step + 1 >= params.max_tokens:
                delta.text += stream.flush()
                delta.finish_reason = "length"
            if delta.finish_reason:
                row.finished = True
                job.live -= 1
            if job.step == 0 and job.prompt_logprobs is not None:
                delta.prompt_logprobs = job.prompt_logprobs
            deltas.append(delta)
        job.step += 1
        job.emit(deltas)
        if job.live <= 0:
            job.finish()

    def _select(self, cohort: _Cohort, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (finished and cancelled rows are freed here)."""
        import torch

        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        cohort.cache.batch_select_indices(idx)
        cohort.rows = [cohort.rows[i] for i in keep]
        cohort.logits = cohort.logits[idx]
        if self._encoder_decoder:
            cohort.enc_hidden = cohort.enc_hidden[idx]
            cohort.enc_mask = cohort.enc_mask[idx]
            return
        cohort.positions = cohort.positions[idx]
        mask = cohort.mask[idx]
        used = mask.sum(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        if first > 0:  # columns that only padding uses any more
            for layer in cohort.cache.layers:
                layer.keys = layer.keys[..., first:, :]
                layer.values = layer.values[..., first:, :]
            mask = mask[:, first:]
        cohort.mask = mask

    def _forward_step(self, cohort: _Cohort, feed: Any) -> None:
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        if self._encoder_decoder:
            out = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=cohort.enc_hidden),
                attention_mask=cohort.enc_mask,
                decoder_input_ids=feed,
                past_key_values=cohort.cache,
                use_cache=True,
            )
        else:
            mask = torch.cat([cohort.mask, torch.ones_like(cohort.mask[:, :1])], dim=1)
            out = self.model(
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

    def _self_attention_layers(self, cache: Any) -> list[Any]:
        inner = getattr(cache, "self_attention_cache", cache)
        return list(getattr(inner, "layers", []))

    def _split_after_failure(self, cohort: _Cohort, feed: Any, exc: Exception) -> None:
        """A batched step raised: undo it, then run each request's rows alone so only the culprit fails."""
        import copy

        import torch

        jobs = cohort.jobs
        if len(jobs) == 1:
            jobs[0].finish(exc)
            self._cohorts.remove(cohort)
            return
        logger.warning("a batched decode step of %d requests failed (%s); running them one by one", len(jobs), type(exc).__name__)
        length = cohort.mask.shape[1] if cohort.mask is not None else None
        for layer in self._self_attention_layers(cohort.cache):
            seq = layer.get_seq_length()
            if length is None:
                # encoder-decoder: every row has the same decoder length, the step count
                length = cohort.rows[0].job.step
            if seq > length:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
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

    def _logprob_entries(self, logprobs_row: Any, token_id: int, k: int) -> TokenLogprob:
        import torch

        top: list[tuple[int, str, float]] = []
        if k > 0:
            values, ids = torch.topk(logprobs_row, k)
            top = [(int(i), self.token_text(int(i)), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        return TokenLogprob(token_id, self.token_text(token_id), float(logprobs_row[token_id]), top)

    def _sample(
        self, logits: Any, params: SamplingParams, gen: Any, counts: Any, step: int, prompt_seen: Any = None
    ) -> Any:
        import torch

        logits = logits.clone()
        if params.repetition_penalty != 1.0:
            seen = counts > 0
            if prompt_seen is not None:
                seen = seen | prompt_seen
            penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
            logits = torch.where(seen, penalized, logits)
        if params.frequency_penalty:
            logits -= params.frequency_penalty * counts
        if params.presence_penalty:
            logits -= params.presence_penalty * (counts > 0).float()
        if step < params.min_tokens:
            for tid in self.eos_token_ids | set(params.stop_token_ids):
                logits[:, tid] = float("-inf")
        if params.greedy:
            return torch.argmax(logits, dim=-1)
        logits = logits / params.temperature
        if params.top_k and params.top_k > 0:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=gen).view(-1)

    # ---------------------------------------------------------- encoder tasks
    def _batch(self, inputs: list[list[int]], *, left: bool = False) -> tuple[Any, Any]:
        """Padded token ids and their attention mask (right-padded; ``left`` for decoder prompts)."""
        import torch

        pad = self.tokenizer.pad_token_id or 0
        width = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, seq in enumerate(inputs):
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
        return ids.to(self.device), mask.to(self.device)

    async def _run(self, kind: str, inputs: list[list[int]], option: Any = None) -> Any:
        """Through the batcher: merged with concurrent requests of the same kind."""
        with self.map_exceptions():
            return await self.batcher.submit(kind, inputs, option)

    def _run_encoder(self, kind: str, inputs: list[list[int]], option: Any) -> list[Any]:
        """In a worker thread: one forward pass over ``inputs``, one result per input."""
        if kind == "embed":
            return self._embed_sync(inputs)
        if kind == "classify":
            return self._classify_sync(inputs)
        if kind == "classify_tokens":
            return self._classify_tokens_sync(inputs)
        if kind == "fill_mask":
            return self._fill_mask_sync(inputs, option)
        raise ValueError(f"unknown encoder operation {kind}")

    def _forward(self, inputs: list[list[int]]) -> tuple[Any, Any]:
        """Right-padded batch with an attention mask; positions and token types start at 0 per row."""
        import torch

        ids, mask = self._batch(inputs)
        self.stats["encoder_forwards"] += 1
        with torch.inference_mode():
            return self.model(input_ids=ids, attention_mask=mask), mask

    def _embed_sync(self, inputs: list[list[int]]) -> list[list[float]]:
        import torch

        out, mask = self._forward(inputs)
        hidden = out.last_hidden_state.float()
        mode, normalize = self.pooling
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if mode == "cls":
            pooled = hidden[:, 0]
        elif mode == "max":
            pooled = hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
        elif mode == "lasttoken":
            last = mask.sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        else:
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.tolist()

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        return await self._run("embed", inputs)

    def _classify_sync(self, inputs: list[list[int]]) -> list[list[float]]:
        out, _ = self._forward(inputs)
        return out.logits.float().tolist()

    async def classify(self, inputs: list[list[int]]) -> list[list[float]]:
        return await self._run("classify", inputs)

    def _classify_tokens_sync(self, inputs: list[list[int]]) -> list[list[list[float]]]:
        out, _ = self._forward(inputs)
        logits = out.logits.float()
        return [logits[row, : len(seq)].tolist() for row, seq in enumerate(inputs)]

    async def classify_tokens(self, inputs: list[list[int]]) -> list[list[list[float]]]:
        return await self._run("classify_tokens", inputs)

    def _fill_mask_sync(self, inputs: list[list[int]], top_k: int) -> list[list[list[tuple[int, float]]]]:
        import torch

        out, _ = self._forward(inputs)
        mask_id = self.tokenizer.mask_token_id
        results = []
        for row, seq in enumerate(inputs):
            per_mask = []
            for pos, tid in enumerate(seq):
                if tid == mask_id:
                    probs = torch.softmax(out.logits[row, pos].float(), dim=-1)
                    values, ids = torch.topk(probs, top_k)
                    per_mask.append(list(zip(ids.tolist(), values.tolist())))
            results.append(per_mask)
        return results

    async def fill_mask(self, inputs: list[list[int]], top_k: int) -> list[list[list[tuple[int, float]]]]:
        return await self._run("fill_mask", inputs, top_k)
