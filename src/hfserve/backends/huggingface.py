"""The Hugging Face transformers backend: the facade over its parts.

Runs any supported task with plain transformers models on CPU or GPU. Model work
runs in worker threads and one decode thread, never on the event loop. This module
loads the model and tokenizer, reports readiness, translates torch / transformers
exceptions into contract errors, and delegates the task operations to its parts:

- encoder tasks (:mod:`.encoders`): concurrent requests are merged by a
  :class:`~hfserve.backends.batching.MicroBatcher` into forward passes of up to
  ``max_batch_size`` inputs (a batch forms for at most ``max_batch_wait_ms``, closing
  early once ``batch_idle_ms`` pass without a newcomer:
  :class:`~hfserve.backends.batching.BatchWindow`), which
  :class:`~.encoders.EncoderTasks` runs in a worker thread;
- generation (:mod:`.scheduler`): :class:`~.scheduler.GenerationScheduler` decodes
  every running request as rows of a shared batch with a KV cache (continuous
  batching: new requests join the running batch), each row sampled by the per-row
  sampler (:mod:`.sampler`) with its own request's parameters and seed, and turned into
  text by its own :class:`~.textstream.TextStream`.

How a generation request flows: the service calls :meth:`HuggingFaceBackend.generate`
on the event loop, which streams :meth:`GenerationScheduler.generate
<.scheduler.GenerationScheduler.generate>` (the request queued for the decode thread,
admitted, prefilled, sampled and detokenized step by step there; see
:mod:`.scheduler`) and yields its lists of :class:`SequenceDelta` as they arrive on the
event loop, with the request's own failure translated here (:meth:`translate`). An
encoder request flows from :meth:`HuggingFaceBackend.embed` (and its siblings) through
the batcher to :meth:`EncoderTasks.run <.encoders.EncoderTasks.run>` (see
:mod:`.encoders`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import transformers

from .. import errors
from ..config import BatchingConfig, EngineConfig, ModelConfig
from ..generation import Capabilities, SamplingParams, SequenceDelta, StructuredOutput
from ..tasks import (
    Task,
    TaskInferenceError,
    infer_task,
    sentence_transformers_max_len,
    sentence_transformers_pooling,
    text_generation_auto_class,
)
from . import bf16_kernel, cpu_linear, cpu_threads, kv_cache, mixed_step
from .base import Backend, resolve_dtype
from .batching import BatchWindow, MicroBatcher
from .compiled import CompiledDecode
from .encoders import EncoderTasks
from .grammar import GrammarEngine
from .lora import LoraWeights
from .scheduler import GenerationScheduler
from .stats import EngineStats
from .watchdog import StallWatchdog

logger = logging.getLogger("hfserve.backends.huggingface")

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


#: the vLLM engine arguments (``EngineConfig.engine_args``) this backend honours; the others
#: have no effect here (the server names them at start-up)
HONOURED_ENGINE_ARGS = ("max_num_seqs", "max_logprobs", "seed", "tokenizer")

#: vLLM's default ``max_logprobs``
DEFAULT_MAX_LOGPROBS = 20


class HuggingFaceBackend(Backend):
    """The transformers backend.

    Of the vLLM engine arguments in ``engine`` (:data:`HONOURED_ENGINE_ARGS`):

    - ``max_num_seqs``: the most sequences decoding at once in the generation scheduler. It
      replaces ``batching.max_batch_size`` for generation (as in vLLM, it is the generation
      limit); encoder batches keep ``max_batch_size``. A single request with more sequences
      (``n``) than that still runs, alone.
    - ``max_logprobs``: the most ``logprobs`` a request may ask for (default 20; -1: the
      vocabulary size); above it the request is refused (``invalid_request``).
    - ``seed``: the seed of every request that gives none. Unlike vLLM (which seeds its
      sampler once, so that only the whole sequence of requests since start-up repeats), each
      unseeded request here samples as if it had sent ``seed``: the same request gives the
      same output whatever ran before or beside it.
    - ``tokenizer``: the path or hub id the tokenizer loads from instead of the model's (at
      ``--tokenizer-revision`` when given).
    """

    name = "huggingface"
    #: read by the server, which names the other engine arguments as having no effect
    honoured_engine_args = HONOURED_ENGINE_ARGS

    def __init__(
        self,
        model: ModelConfig,
        batching: BatchingConfig | None = None,
        *,
        engine: EngineConfig | None = None,
        device: str | None = None,
    ):
        super().__init__()
        batching = batching or BatchingConfig()
        engine_args = (engine or EngineConfig()).engine_args
        self.model_config = model
        self.model_path = model.source
        self.requested_task = model.task
        self.revision = model.revision
        self.tokenizer_revision = model.tokenizer_revision
        self.dtype_name = model.dtype
        self.requested_max_len = model.max_model_len
        self.trust_remote_code = model.trust_remote_code
        self.device_name = device
        max_batch_size = batching.max_batch_size
        max_batch_wait_ms, batch_idle_ms = batching.max_batch_wait_ms, batching.batch_idle_ms
        self.tokenizer_path: str = str(engine_args.get("tokenizer") or self.model_path)
        self.default_seed: int | None = None if engine_args.get("seed") is None else int(engine_args["seed"])
        self.max_logprobs = int(engine_args.get("max_logprobs", DEFAULT_MAX_LOGPROBS))
        self.capabilities = Capabilities(
            max_logprobs=max(self.max_logprobs, 0), max_n=16, penalties=True, prompt_logprobs=True, min_tokens=True,
            structured_outputs=True,
        )
        # encoder batches, one at a time and always on this one thread: a second thread that ran
        # one would keep an OpenMP team of its own alive beside it, and every kernel of the next
        # forward pass would wait for a sleeping worker (see cpu_threads)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-model")
        self.model: Any = None
        self.config: Any = None
        self.device: torch.device | None = None
        self.max_batch_size = max(1, int(max_batch_size))
        max_num_seqs = engine_args.get("max_num_seqs")
        #: the most sequences decoding at once (``max_num_seqs``, else ``max_batch_size``)
        self.max_num_seqs = self.max_batch_size if max_num_seqs is None else max(1, int(max_num_seqs))
        self.window = BatchWindow.from_ms(max_batch_wait_ms, batch_idle_ms)
        #: counters for tests and benchmarks: encoder forward passes, generation prefills and decode steps
        self.stats: dict[str, int] = {"encoder_forwards": 0, "prefills": 0, "decode_steps": 0, "folded_prompts": 0, "max_rows": 0}
        # the parts, built once the model is loaded (the scheduler for generative models only)
        self.encoders: EncoderTasks | None = None
        self.scheduler: GenerationScheduler | None = None
        #: structured outputs: xgrammar over the tokenizer (generative models only, see :mod:`.grammar`)
        self.grammar: GrammarEngine | None = None
        #: LoRA adapters (``--enable-lora``), applied per row in the generation batch (see :mod:`.lora`)
        self.lora: LoraWeights | None = None
        #: vLLM-named engine statistics of the generation scheduler (see :mod:`.stats`), served on /metrics
        self.metrics_registry: Any = None
        #: the decode loop's stall watchdog (``--stall_timeout_seconds``; see :mod:`.watchdog`)
        self.stall_timeout = float(batching.stall_timeout_seconds)
        #: ``--compile``: the decode step compiled (see :mod:`.compiled`), before the backend is ready
        self.compile = batching.compile
        self.compiled: CompiledDecode | None = None
        self._engine_stats: EngineStats | None = None
        self.watchdog: StallWatchdog | None = None
        # encoder tasks: merged forward passes
        self.batcher = MicroBatcher(self._run_encoder, self._executor, max_batch_size=self.max_batch_size, window=self.window)

    # ------------------------------------------------------------------ load
    async def start(self) -> None:
        # on a thread that ends with the load: its OpenMP team would slow the decode thread's
        await cpu_threads.run_in_passing_thread(self._load, name="hf-load")
        if self.scheduler is not None:
            if self.compiled is not None:
                await self._compile_decode_step(self.scheduler, self.compiled)
            # counted from here: the compiler's warm-up requests are not the server's
            if self._engine_stats is not None:
                self.scheduler.attach_stats(self._engine_stats)
        if self.watchdog is not None:
            self.watchdog.start()

    async def _compile_decode_step(self, scheduler: GenerationScheduler, compiled: CompiledDecode) -> None:
        """Run the decode step in the states it compiles for, so that no request waits for the
        compiler: one row and several, prompts of one token and more, the first step after the
        rows change and later ones, and the steps that fill a KV cache buffer and reallocate it.
        Then nothing compiles any more (:meth:`CompiledDecode.ready`)."""
        started = time.monotonic()
        logger.info("compiling the decode step (--compile); the server is ready when it is done")
        prompt = list(self.tokenizer("Compiling the decode step", add_special_tokens=True)["input_ids"])
        prompt = (prompt + [prompt[-1]] if prompt else [0, 0])[:8]
        # through a buffer refill, where the context allows one (a shorter context never gets there)
        long = max(1, min(kv_cache.HEADROOM + 3, self.max_model_len - len(prompt)))

        async def run(ids: list[int], max_tokens: int = 3, n: int = 1) -> None:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, n=n)
            async for _ in scheduler.generate(ids, params, "compile-decode-step"):
                pass

        try:
            await run(prompt[:1])
            await run(prompt, long)
            await asyncio.gather(run(prompt, long), run(prompt[:-1], long))
            await run(prompt, n=3)
        except Exception as exc:  # noqa: BLE001 - the model is still served; what did not compile runs eagerly
            logger.warning("the decode step's warm-up stopped (%s: %s); what it did not compile runs eagerly", type(exc).__name__, exc)
        compiled.ready()
        state = "compiled" if compiled.active else "left eager (the compiler failed; see above)"
        logger.info("decode step %s in %.0f s", state, time.monotonic() - started)

    def _load(self) -> None:
        kwargs = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        try:
            self.config = transformers.AutoConfig.from_pretrained(self.model_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise BackendLoadError(f"cannot load the model config from {self.model_path}: {exc}") from None
        local_dir = Path(self.model_path) if Path(self.model_path).is_dir() else None
        try:
            self.task = self.requested_task or infer_task(self.config.to_dict(), local_dir)
        except TaskInferenceError as exc:
            raise BackendLoadError(str(exc)) from None
        own = self.tokenizer_path == str(self.model_path)
        tokenizer_revision = self.tokenizer_revision or (self.revision if own else None)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                self.tokenizer_path,
                revision=tokenizer_revision,
                trust_remote_code=self.trust_remote_code,
                **({"do_lower_case": False} if self.model_config.disable_lower_case else {}),  # --disable_lower_case
            )
        except (OSError, ValueError) as exc:
            if own:
                raise
            raise BackendLoadError(f"cannot load the tokenizer from {self.tokenizer_path}: {exc}") from None
        if self.max_logprobs < 0:  # vLLM's -1: no limit below the vocabulary
            self.capabilities = dataclasses.replace(self.capabilities, max_logprobs=len(self.tokenizer))
        device = self.device_name or ("cuda" if torch.cuda.is_available() else "cpu")
        cpu_threads.configure()  # before the model's first kernel starts PyTorch's thread pool
        dtype = self._resolve_dtype(device)
        cls_name = _MODEL_CLASSES[self.task]
        if self.task is Task.text_generation:  # decoder-only multimodal models (Qwen2-VL, ...) load text-only too
            cls_name = text_generation_auto_class(self.config.to_dict())
        model_cls = getattr(transformers, cls_name)
        try:
            self.model = model_cls.from_pretrained(self.model_path, dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise BackendLoadError(f"cannot load {self.task.label} weights from {self.model_path}: {exc}") from None
        self.model.to(device).eval()
        self.device = torch.device(device)

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

        pooling = ("mean", True)
        if self.task is Task.text_embedding:
            pooling = sentence_transformers_pooling(local_dir) or pooling
        pad_token_id = self.tokenizer.pad_token_id or 0
        self.encoders = EncoderTasks(
            self.model,
            device=self.device,
            pad_token_id=pad_token_id,
            mask_token_id=self.tokenizer.mask_token_id,
            pooling=pooling,
            stats=self.stats,
        )
        lora_config = self.model_config.lora
        if lora_config.enabled:
            if self.task is not Task.text_generation or self.config.is_encoder_decoder:
                raise BackendLoadError(
                    f"--enable-lora: LoRA adapters are served for text generation only, and this is a {self.task.label} model"
                )
            self.lora = LoraWeights(self.model)
        if self.task.is_generative and self.compile:
            if self.lora is not None or self.config.is_encoder_decoder:
                logger.warning("--compile: the decode step stays eager with LoRA adapters and for encoder-decoder models")
            else:
                self.compiled = CompiledDecode(self.model)
        if self.device.type == "cpu" and self.model.dtype == torch.bfloat16 and not cpu_linear.native_bfloat16():
            logger.warning(
                "--dtype bfloat16 on a CPU without native bfloat16 (no AMX, no AVX-512 BF16): its products are "
                "emulated and its weights not prepacked; each step reads half the memory of float32, but a product "
                "over several rows costs about one row's times the rows: bfloat16 can be faster for one request at "
                "a time and --dtype float32 (the default) under concurrency; compare the two under your load"
            )
        if self.task.is_generative and self.device.type == "cpu" and self.lora is None:
            cpu_linear.prepack(self.model)  # weights in oneDNN's layout where it pays (see cpu_linear)
        if self.task.is_generative:
            # hfserve's attention (SDPA's, with a faster decode step in bfloat16 on CPU and prompts
            # folded into decode steps); a compiled step keeps transformers' own
            attention = self.compiled is None and mixed_step.enable(self.model)
            if attention and self.device.type == "cpu" and self.model.dtype == torch.bfloat16:
                bf16_kernel.available()  # its decode attention built (or found missing) now, not in the first step
            self.scheduler = GenerationScheduler(
                self.model,
                device=self.device,
                eos_token_ids=self._model_eos_ids(),
                pad_token_id=pad_token_id,
                detokenizer=self.detokenizer_factory(),  # chosen now, on a worker thread, not on the decode thread
                token_text=self.token_text,
                max_batch_size=self.max_num_seqs,
                window=self.window,
                stats=self.stats,
                run_model=None if self.lora is None else self.lora.run,
                max_adapters=lora_config.max_loras if self.lora is not None else None,
                forward=self.compiled,
                # joining prompts ride in the running batch's decode step (not with per-row adapters or a compiled step)
                fold_prompts=self.lora is None and attention,
            )
            self.grammar = self._grammar_engine()
            engine_stats = EngineStats(
                self.model_config.name,
                max_num_seqs=self.max_num_seqs,
                max_model_len=self.max_model_len,
                max_lora=lora_config.max_loras if self.lora is not None else None,
            )
            self._engine_stats = engine_stats  # attached once started (see start)
            self.metrics_registry = engine_stats.registry
            self.watchdog = StallWatchdog(self.scheduler.busy_since, self.stall_timeout)
        logger.info(
            "loaded %s (%s) for %s on %s as %s, max_model_len %d",
            self.model_path,
            type(self.model).__name__,
            self.task.value,
            device,
            dtype,
            self.max_model_len,
        )

    def _grammar_engine(self) -> GrammarEngine | None:
        """xgrammar over the tokenizer, with the logits' width as the vocabulary size; None (and
        structured outputs refused) when xgrammar cannot read this tokenizer."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        width = getattr(getattr(head, "weight", None), "shape", (None,))[0]
        if not isinstance(width, int) or width <= 0:
            width = int(getattr(self.config.get_text_config(), "vocab_size", 0) or len(self.tokenizer))
        try:
            return GrammarEngine(self.tokenizer, max(width, len(self.tokenizer)))
        except Exception as exc:  # noqa: BLE001 - the model still serves, without structured outputs
            logger.warning("structured outputs are not available: xgrammar cannot read this tokenizer (%s)", exc)
            self.capabilities = dataclasses.replace(self.capabilities, structured_outputs=False)
            return None

    def _model_eos_ids(self) -> set[int]:
        """The generation config's and the tokenizer's end-of-sequence ids."""
        eos: set[int] = set()
        gen_cfg = getattr(self.model, "generation_config", None)
        for value in (getattr(gen_cfg, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        return eos

    def _resolve_dtype(self, device: str) -> torch.dtype:
        config_dtype = getattr(self.config, "dtype", None)  # transformers 5 reads a config's ``torch_dtype`` into it
        try:
            return getattr(torch, resolve_dtype(self.dtype_name, gpu=device != "cpu", config_dtype=config_dtype))
        except ValueError as exc:
            raise BackendLoadError(str(exc)) from None

    async def stop(self) -> None:
        """Stop the decode thread and the workers, and wait for them: a thread still inside
        torch while the interpreter exits aborts the process (exit code -6 instead of 0)."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.grammar is not None:
            self.grammar.shutdown()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    def healthy(self) -> bool:
        """False while the decode loop is stalled (see :mod:`.watchdog`)."""
        return self.watchdog is None or not self.watchdog.check()

    @property
    def eos_token_ids(self) -> set[int]:
        """The ids that end a sequence (the generation config's and the tokenizer's), read by the
        scheduler at every step."""
        return self.scheduler.eos_token_ids if self.scheduler is not None else set()

    @eos_token_ids.setter
    def eos_token_ids(self, ids: set[int]) -> None:
        self._generation().eos_token_ids = set(ids)

    def _generation(self) -> GenerationScheduler:
        if self.scheduler is None:
            if self.task is None:
                raise errors.ModelNotReady("The model is not loaded", retry_after=5)
            raise errors.UnsupportedTask(f"This is a {self.task.label} model; it does not generate text")
        return self.scheduler

    # ------------------------------------------------------------ boundary
    def translate(self, exc: Exception, request_id: str | None) -> errors.HFServeError:
        """torch / transformers / tokenizers exceptions -> contract classes."""
        if isinstance(exc, torch.OutOfMemoryError):
            logger.warning("request %s: out of memory", request_id or "-")
            return errors.Overloaded(
                "The model ran out of memory serving this request; retry later or send a shorter request"
            )
        return errors.classify(exc, request_id)

    # ------------------------------------------------------------ generation
    def _grammar(self) -> GrammarEngine:
        if self.grammar is None:
            raise errors.UnsupportedParameter("Structured outputs are not available for this model")
        return self.grammar

    async def prepare_structured(self, so: StructuredOutput) -> None:
        """Compile the grammar now (cached), so that its errors come before any output."""
        await self._grammar().compile(so)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[list[SequenceDelta]]:
        """The scheduler's deltas for this request; its own failure comes out as a contract error.
        A request without a seed gets the server's (``--seed``), if any."""
        if params.seed is None and self.default_seed is not None:
            params = dataclasses.replace(params, seed=self.default_seed)
        processors = []
        if params.structured is not None:  # a grammar mask on this request's rows (compiled before, so cached)
            engine = self._grammar()
            compiled = await engine.compile(params.structured)
            processors.append(engine.processor(compiled, self.eos_token_ids | set(params.stop_token_ids)))
        stream = self._generation().generate(prompt_ids, params, request_id, processors=processors, adapter=params.adapter)
        async with contextlib.aclosing(stream):
            with self.map_exceptions(request_id):
                async for deltas in stream:
                    yield deltas

    # ---------------------------------------------------------- LoRA adapters
    async def load_adapter(self, name: str, path: str) -> None:
        if self.lora is None:
            raise errors.InvalidRequest("LoRA adapters are not enabled on this server; start it with --enable-lora")
        await cpu_threads.run_in_passing_thread(self.lora.load, name, path, name="hf-lora")

    async def unload_adapter(self, name: str) -> None:
        if self.lora is not None:
            await cpu_threads.run_in_passing_thread(self.lora.unload, name, name="hf-lora")

    # ---------------------------------------------------------- encoder tasks
    async def _run(self, kind: str, inputs: list[list[int]], option: Any = None) -> Any:
        """Through the batcher: merged with concurrent requests of the same kind."""
        with self.map_exceptions():
            return await self.batcher.submit(kind, inputs, option)

    def _run_encoder(self, kind: str, inputs: list[list[int]], option: Any) -> list[Any]:
        """In a worker thread: one forward pass over a batch (the batcher's ``RunFn``)."""
        if self.encoders is None:
            raise errors.ModelNotReady("The model is not loaded", retry_after=5)
        return self.encoders.run(kind, inputs, option)

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        return await self._run("embed", inputs)

    async def classify(self, inputs: list[list[int]]) -> list[list[float]]:
        return await self._run("classify", inputs)

    async def classify_tokens(self, inputs: list[list[int]]) -> list[list[list[float]]]:
        return await self._run("classify_tokens", inputs)

    async def classify_pairs(self, inputs: list[list[int]], type_starts: list[int]) -> list[list[float]]:
        """Through the batcher as ``[type_start, *ids]`` rows (see :meth:`EncoderTasks.classify_pairs`)."""
        return await self._run("classify_pairs", [[start, *ids] for ids, start in zip(inputs, type_starts, strict=True)])

    async def fill_mask(self, inputs: list[list[int]], top_k: int) -> list[list[list[tuple[int, float]]]]:
        return await self._run("fill_mask", inputs, top_k)
