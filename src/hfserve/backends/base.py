"""What a backend is: the interface between the serving layer and a model runtime.

A backend knows nothing about HTTP, gRPC or any API family's format. It takes
backend-neutral inputs (token ids, texts, :class:`SamplingParams`) and returns
backend-neutral outputs (:class:`SequenceDelta`, arrays). Its own library's
exceptions never cross this boundary: each backend translates them, once, into
:mod:`hfserve.errors` classes (see each backend's ``map_exceptions``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import errors
from ..tasks import Task


#: ``--dtype`` spellings -> the dtype they name
DTYPE_ALIASES = {
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_dtype(name: str | None, *, gpu: bool, config_dtype: Any = None) -> str:
    """The weight dtype for ``--dtype``, the same on every backend.

    ``auto`` is float32 on CPU and, on a GPU, the model config's half type (else float16).
    Raises ValueError for a name that is no dtype.
    """
    name = (name or "auto").lower()
    if name == "auto":
        if not gpu:
            return "float32"
        configured = str(config_dtype or "").removeprefix("torch.")
        return configured if configured in ("float16", "bfloat16") else "float16"
    if name not in DTYPE_ALIASES:
        raise ValueError(f"unsupported --dtype {name!r}; use auto, float32, float16 or bfloat16")
    return DTYPE_ALIASES[name]


@dataclass
class SamplingParams:
    """Validated generation parameters, the same for every backend."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    prompt_logprobs: int | None = None  # for echo with logprobs
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenLogprob:
    """A generated (or prompt) token with its log-probability and the top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class SequenceDelta:
    """What one step added to one of the ``n`` sequences of a request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | None while running
    stop_reason: str | int | None = None  # the stop string or token that ended it
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first delta only, when asked


def coalesce(deltas: list[SequenceDelta]) -> list[SequenceDelta]:
    """Several steps' deltas as one delta per sequence (consumers render one choice per index)."""
    merged: dict[int, SequenceDelta] = {}
    for d in deltas:
        into = merged.get(d.index)
        if into is None:
            merged[d.index] = SequenceDelta(
                d.index, d.text, list(d.token_ids), list(d.logprobs) if d.logprobs is not None else None,
                d.finish_reason, d.stop_reason, d.prompt_logprobs,
            )  # fmt: skip
            continue
        into.text += d.text
        into.token_ids += d.token_ids
        if d.logprobs is not None:
            into.logprobs = (into.logprobs or []) + d.logprobs
        into.finish_reason, into.stop_reason = d.finish_reason, d.stop_reason
        if into.prompt_logprobs is None:
            into.prompt_logprobs = d.prompt_logprobs
    return list(merged.values())


@dataclass
class Capabilities:
    """What a backend can honour; the serving layer rejects the rest up front."""

    max_logprobs: int = 20
    max_n: int = 16
    penalties: bool = False  # presence/frequency/repetition penalties
    prompt_logprobs: bool = True
    min_tokens: bool = False


class Backend(abc.ABC):
    """A loaded model that can run one task."""

    #: short name shown in logs and metadata ("huggingface", "vllm")
    name: str = "backend"

    def __init__(self) -> None:
        self.task: Task | None = None
        self.tokenizer: Any = None
        self.max_model_len: int = 0
        self.capabilities = Capabilities()
        self.labels: dict[int, str] = {}

    # lifecycle -------------------------------------------------------
    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; raise an hfserve error if it cannot be served."""

    async def stop(self) -> None:
        """Release the model (called once, at shutdown)."""

    def healthy(self) -> bool:
        """False once the runtime has died; the server then reports not ready."""
        return True

    @contextlib.contextmanager
    def map_exceptions(self, request_id: str | None = None) -> Iterator[None]:
        """Run a call into the backend; its library's exceptions come out as contract errors.

        Every call from the serving layer into the backend (tokenizer included)
        runs inside it. Contract errors and cancellation pass through untouched;
        anything else goes through :meth:`translate`, once.
        """
        try:
            yield
        except errors.HFServeError:
            raise
        except (asyncio.CancelledError, GeneratorExit, errors.ClientDisconnected):
            raise
        except Exception as exc:  # noqa: BLE001 - this is the translation point
            raise self.translate(exc, request_id) from exc

    @abc.abstractmethod
    def translate(self, exc: Exception, request_id: str | None) -> errors.HFServeError:
        """This backend's library exception -> the contract class it belongs to.

        The one place where the runtime's exception types are known; what is not
        recognised goes to :func:`hfserve.errors.classify` (logged, internal_error).
        """

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, exactly as ``tokenizer(text)["input_ids"]`` (see :mod:`.tokenizing`)."""
        from .tokenizing import fast_encoder

        return self._tokenizer_shortcut("_encoder", fast_encoder)(text, add_special_tokens)

    def decode_text(self, token_ids: list[int]) -> str:
        """Text of ``token_ids``, exactly as ``tokenizer.decode(ids, skip_special_tokens=True)``."""
        from .tokenizing import fast_decoder

        return self._tokenizer_shortcut("_decoder", fast_decoder)(token_ids)

    def _tokenizer_shortcut(self, key: str, build: Callable[[Any], Any]) -> Any:
        """``build(self.tokenizer)``, built at first use (the tokenizer is loaded by ``start``) and kept."""
        fn = self.__dict__.get(key)
        if fn is None:
            fn = self.__dict__[key] = build(self.tokenizer)
        return fn

    def token_text(self, token_id: int) -> str:
        """The text of one token, as shown in log-probabilities (cached: the vocabulary is fixed)."""
        cache = self.__dict__.setdefault("_token_text_cache", {})
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = self.tokenizer.decode([token_id])
        return text

    # generation ------------------------------------------------------
    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[list[SequenceDelta]]:
        """Stream the generation of ``params.n`` sequences for one prompt.

        Each item lists the deltas of the sequences that advanced. Closing the
        iterator early (client gone) must cancel the work.
        """
        raise NotImplementedError

    # encoder tasks -----------------------------------------------------
    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        raise NotImplementedError

    async def classify(self, inputs: list[list[int]]) -> list[list[float]]:
        """Per input: the class logits."""
        raise NotImplementedError

    async def classify_tokens(self, inputs: list[list[int]]) -> list[list[list[float]]]:
        """Per input, per token: the class logits."""
        raise NotImplementedError

    async def fill_mask(self, inputs: list[list[int]], top_k: int) -> list[list[list[tuple[int, float]]]]:
        """Per input, per mask token: the ``top_k`` (token id, probability) pairs."""
        raise NotImplementedError
