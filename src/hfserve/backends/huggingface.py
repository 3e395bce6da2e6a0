"""The Hugging Face transformers backend.

Runs any supported task with plain transformers models on CPU or GPU. Model
work runs in worker threads, never on the event loop. Generation is a
token-by-token decode loop with a KV cache, so that streaming, stop strings,
``n``, log-probabilities, seeds and cancellation are all per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import errors
from ..tasks import Task, TaskInferenceError, infer_task, sentence_transformers_pooling
from .base import Backend, Capabilities, SamplingParams, SequenceDelta, TokenLogprob
from .textstream import TextStream

logger = logging.getLogger("hfserve.backends.huggingface")

_DONE = object()

_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

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


class _Job:
    """One generation request running in a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], params: SamplingParams, request_id: str):
        self.loop = loop
        self.prompt_ids = prompt_ids
        self.params = params
        self.request_id = request_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class HuggingFaceBackend(Backend):
    name = "huggingface"

    def __init__(
        self,
        model_path: str,
        *,
        task: Task | None = None,
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        max_workers: int = 4,
    ):
        super().__init__()
        self.model_path = model_path
        self.requested_task = task
        self.revision = revision
        self.tokenizer_revision = tokenizer_revision
        self.dtype_name = dtype
        self.requested_max_len = max_model_len
        self.trust_remote_code = trust_remote_code
        self.device_name = device
        self.capabilities = Capabilities(max_logprobs=20, max_n=16, penalties=True, prompt_logprobs=True, min_tokens=True)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="hf-model")
        self.model: Any = None
        self.config: Any = None
        self.eos_token_ids: set[int] = set()
        self.pooling: tuple[str, bool] = ("mean", True)
        self._token_text: dict[int, str] = {}

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

        limit = _config_max_len(self.config, self.tokenizer)
        if self.requested_max_len:
            if limit and self.requested_max_len > limit and not self.config.is_encoder_decoder:
                raise BackendLoadError(
                    f"--max_model_len {self.requested_max_len} exceeds the model's maximum of {limit} positions"
                )
            self.max_model_len = self.requested_max_len
        else:
            self.max_model_len = limit or 2048
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
        name = (self.dtype_name or "auto").lower()
        if name == "auto":
            if device == "cpu":
                return torch.float32
            cfg_dtype = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
            if isinstance(cfg_dtype, str):
                cfg_dtype = getattr(torch, cfg_dtype, None)
            return cfg_dtype if cfg_dtype in (torch.float16, torch.bfloat16) else torch.float16
        if name not in _DTYPES:
            raise BackendLoadError(f"unsupported --dtype {self.dtype_name!r}; use auto, float32, float16 or bfloat16")
        return getattr(torch, _DTYPES[name])

    async def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ boundary
    @contextlib.contextmanager
    def map_exceptions(self, request_id: str | None = None) -> Iterator[None]:
        """torch / transformers / tokenizers exceptions -> contract classes."""
        try:
            yield
        except errors.HFServeError:
            raise
        except (asyncio.CancelledError, GeneratorExit, errors.ClientDisconnected):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the translation point
            import torch

            if isinstance(exc, torch.OutOfMemoryError):
                logger.warning("request %s: out of memory", request_id or "-")
                raise errors.Overloaded(
                    "The model ran out of memory serving this request; retry later or send a shorter request"
                ) from exc
            raise errors.classify(exc, request_id) from exc

    # ----------------------------------------------------------- generation
    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[list[SequenceDelta]]:
        loop = asyncio.get_running_loop()
        job = _Job(loop, prompt_ids, params, request_id)
        future = loop.run_in_executor(self._executor, self._run_job, job)
        try:
            while True:
                item = await job.queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    with self.map_exceptions(request_id):
                        raise item
                yield item
        finally:
            job.cancelled.set()
            if not future.done():
                future.add_done_callback(lambda f: f.exception())

    def _run_job(self, job: _Job) -> None:
        try:
            if not job.cancelled.is_set():
                self._decode_loop(job)
        except BaseException as exc:  # handed to the request's coroutine, translated there
            job.emit(exc)
        finally:
            job.emit(_DONE)

    def _token_str(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    def _logprob_entries(self, logprobs_row: Any, token_id: int, k: int) -> TokenLogprob:
        import torch

        top: list[tuple[int, str, float]] = []
        if k > 0:
            values, ids = torch.topk(logprobs_row, k)
            top = [(int(i), self._token_str(int(i)), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        return TokenLogprob(token_id, self._token_str(token_id), float(logprobs_row[token_id]), top)

    def _decode_loop(self, job: _Job) -> None:
        import torch

        params = job.params
        model = self.model
        n = params.n
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        gen = torch.Generator(device=self.device).manual_seed(seed)
        prompt = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
        encoder_decoder = bool(getattr(self.config, "is_encoder_decoder", False))
        prompt_logprobs = None

        with torch.inference_mode():
            if encoder_decoder:
                encoder_outputs = model.get_encoder()(input_ids=prompt)
                hidden = encoder_outputs.last_hidden_state.expand(n, -1, -1)
                encoder_outputs.last_hidden_state = hidden
                start = self.model.generation_config.decoder_start_token_id
                if start is None:
                    start = self.config.decoder_start_token_id
                decoder_input = torch.full((n, 1), int(start), dtype=torch.long, device=self.device)
                out = model(encoder_outputs=encoder_outputs, decoder_input_ids=decoder_input, use_cache=True)
            else:
                want_prompt = params.prompt_logprobs is not None
                kwargs = {} if want_prompt else {"logits_to_keep": 1}
                out = model(input_ids=prompt.expand(n, -1), use_cache=True, **kwargs)
                if want_prompt:
                    prompt_lp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
                    prompt_logprobs = [None] + [
                        self._logprob_entries(prompt_lp[i], job.prompt_ids[i + 1], params.prompt_logprobs or 0)
                        for i in range(len(job.prompt_ids) - 1)
                    ]
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            del out

            streams = [TextStream(self.tokenizer, params.stop) for _ in range(n)]
            finished = [False] * n
            counts = torch.zeros((n, logits.shape[-1]), dtype=torch.float32, device=self.device)
            stop_ids = set(params.stop_token_ids)
            first = True
            for step in range(params.max_tokens):
                if job.cancelled.is_set():
                    return
                raw_lp = torch.log_softmax(logits, dim=-1) if params.logprobs is not None else None
                next_ids = self._sample(logits, params, gen, counts, step)
                deltas: list[SequenceDelta] = []
                ids_list = next_ids.tolist()
                for i, tid in enumerate(ids_list):
                    if finished[i]:
                        continue
                    counts[i, tid] += 1
                    delta = SequenceDelta(index=i, token_ids=[tid])
                    if raw_lp is not None:
                        delta.logprobs = [self._logprob_entries(raw_lp[i], tid, params.logprobs or 0)]
                    is_eos = tid in self.eos_token_ids and not params.ignore_eos
                    is_stop_id = tid in stop_ids
                    stream = streams[i]
                    delta.text = stream.push(tid, emit_token=not (is_eos or is_stop_id))
                    if stream.stopped_by is not None:
                        delta.finish_reason, delta.stop_reason = "stop", stream.stopped_by
                    elif is_eos or is_stop_id:
                        delta.text += stream.flush()
                        delta.finish_reason = "stop"
                        delta.stop_reason = tid if is_stop_id else None
                    elif step + 1 >= params.max_tokens:
                        delta.text += stream.flush()
                        delta.finish_reason = "length"
                    if delta.finish_reason:
                        finished[i] = True
                    if first and prompt_logprobs is not None:
                        delta.prompt_logprobs = prompt_logprobs
                    deltas.append(delta)
                first = False
                job.emit(deltas)
                if all(finished):
                    return
                feed = next_ids.view(n, 1)
                if encoder_decoder:
                    out = model(
                        encoder_outputs=encoder_outputs, decoder_input_ids=feed, past_key_values=past, use_cache=True
                    )
                else:
                    out = model(input_ids=feed, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                del out

    def _sample(self, logits: Any, params: SamplingParams, gen: Any, counts: Any, step: int) -> Any:
        import torch

        logits = logits.clone()
        if params.repetition_penalty != 1.0:
            seen = counts > 0
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
    def _batch(self, inputs: list[list[int]]) -> tuple[Any, Any]:
        import torch

        pad = self.tokenizer.pad_token_id or 0
        width = max(len(x) for x in inputs)
        ids = torch.full((len(inputs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, seq in enumerate(inputs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids.to(self.device), mask.to(self.device)

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        with self.map_exceptions():
            return await loop.run_in_executor(self._executor, fn, *args)

    def _forward(self, inputs: list[list[int]]) -> tuple[Any, Any]:
        import torch

        ids, mask = self._batch(inputs)
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
        return await self._run(self._embed_sync, inputs)

    def _classify_sync(self, inputs: list[list[int]]) -> list[list[float]]:
        out, _ = self._forward(inputs)
        return out.logits.float().tolist()

    async def classify(self, inputs: list[list[int]]) -> list[list[float]]:
        return await self._run(self._classify_sync, inputs)

    def _classify_tokens_sync(self, inputs: list[list[int]]) -> list[list[list[float]]]:
        out, _ = self._forward(inputs)
        logits = out.logits.float()
        return [logits[row, : len(seq)].tolist() for row, seq in enumerate(inputs)]

    async def classify_tokens(self, inputs: list[list[int]]) -> list[list[list[float]]]:
        return await self._run(self._classify_tokens_sync, inputs)

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
        return await self._run(self._fill_mask_sync, inputs, top_k)
