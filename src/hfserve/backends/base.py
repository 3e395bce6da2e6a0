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
from typing import TYPE_CHECKING, Any

from .. import errors
from ..generation import Capabilities, SamplingParams, SequenceDelta, StructuredOutput
from ..tasks import Task

if TYPE_CHECKING:
    from .tokenizing import Detokenizer


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
    """The weight dtype for ``--dtype`` as the transformers backend loads it (the vLLM backend
    passes ``auto`` on to vLLM, which picks, and resolves only explicit names here).

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

    async def stop(self) -> None:  # noqa: B027 - optional: a backend with nothing to release keeps it
        """Release the model (called once, at shutdown)."""

    def healthy(self) -> bool:
        """False once the runtime has died; the server then reports not ready."""
        return True

    def engine_dead(self) -> bool:
        """True once the runtime has died for good (not a stall): liveness then fails and the server exits."""
        return False

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
        except Exception as exc:  # this is the translation point
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

    def detokenizer_factory(self) -> Callable[[], Detokenizer]:
        """Makes one incremental decoder per generated sequence: its texts add up to exactly
        ``tokenizer.decode(ids, skip_special_tokens=True)`` of the sequence's tokens, O(1) per
        token where the tokenizer allows it (chosen once per tokenizer, see
        :func:`.tokenizing.detokenizer_factory`)."""
        from .tokenizing import detokenizer_factory

        return self._tokenizer_shortcut("_detokenizers", detokenizer_factory)

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

    async def prepare_structured(self, so: StructuredOutput) -> None:
        """Check (and compile, where the backend compiles) a request's constraint before its
        generation starts, off the event loop and within the time limit, so that an invalid or
        unsupported one is refused before any output (``invalid_request`` /
        ``unsupported_parameter``, with ``so.param``). This default builds the
        vocabulary-independent grammar (:func:`hfserve.structured.validate`)."""
        from ..structured import validate

        await validate(so)

    # LoRA adapters -----------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        """Load the LoRA adapter in directory ``path`` (checked by :mod:`hfserve.lora`) under
        ``name``; generation requests whose params name it then run with it, batched with others."""
        raise errors.UnsupportedParameter(f"The {self.name} backend does not serve LoRA adapters")

    async def unload_adapter(self, name: str) -> None:
        """Release adapter ``name`` (loaded by :meth:`load_adapter`)."""
        raise errors.UnsupportedParameter(f"The {self.name} backend does not serve LoRA adapters")

    # encoder tasks -----------------------------------------------------
    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        raise NotImplementedError

    async def classify(self, inputs: list[list[int]]) -> list[list[float]]:
        """Per input: the class logits."""
        raise NotImplementedError

    async def classify_tokens(self, inputs: list[list[int]]) -> list[list[list[float]]]:
        """Per input, per token: the class logits."""
        raise NotImplementedError

    async def classify_pairs(self, inputs: list[list[int]], type_starts: list[int]) -> list[list[float]]:
        """Per text pair (a cross-encoder's input, tokenized as a pair): the class logits.
        ``type_starts[i]``: where token type 1 (the second text) starts in ``inputs[i]``
        (``len(inputs[i])`` for a model without token types)."""
        raise NotImplementedError

    async def fill_mask(self, inputs: list[list[int]], top_k: int) -> list[list[list[tuple[int, float]]]]:
        """Per input, per mask token: the ``top_k`` (token id, probability) pairs."""
        raise NotImplementedError
