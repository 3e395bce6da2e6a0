"""The decode step compiled with ``torch.compile`` (``--compile``, the transformers backend).

A decode step runs the whole model for one token per row. In eager mode every operator of it is
a separate dispatch from Python (on a small model most of the step), and the element-wise ones
(normalisation, rotary embeddings, activations) each read and write their tensors once more.
Inductor fuses them into a few generated kernels and, with ``freezing``, treats the weights as
constants. On CPU the large linear layers keep the weights :mod:`.cpu_linear` prepacked for
oneDNN (or blocked for :mod:`.bf16_kernel`), each one call of its product in the graph
(inductor's own frozen bfloat16 products were slower: a 12-layer stack of the ~110M Llama's
linear layers, one row, 28.5 ms against 15.8 packed). Measured on 2 cores (docs/benchmarks.md):
the scheduler alone, the test-fixture Llama at 8 requests, 4553 -> 5427 tokens/s; through the
server beside its peers, 3832 -> 4585 at concurrency 8 (1.6-1.8x vLLM's own server and
``transformers serve``), and a ~110M Llama in float32 at concurrency 1, 43 -> 49. Where a step
is mostly weights streaming from memory (the ~110M Llama in bfloat16) it gains at one row
(41 -> 47 tokens/s at concurrency 1) and little at several (the compiled step keeps SDPA's
attention, which the eager bfloat16 step replaces).

:class:`CompiledDecode` stands where the scheduler calls the model. A decode step (one new token
per row over a KV cache) goes to the compiled model; everything else (prefills, whose lengths
vary far more) stays eager. Shapes are dynamic (rows and cached positions are symbols), so a
handful of graphs serve every batch: one row or several, and the first step after a change of
rows (the KV cache's buffers are reallocated) or a later one. The backend compiles them before
it reports ready (:meth:`hfserve.backends.huggingface.HuggingFaceBackend.start`), so no request
waits for the compiler. Where the compiler fails, the step is run eagerly and the model stays
eager from then on (logged once): ``--compile`` never costs an answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch._dynamo.exc import TorchDynamoException

from . import kv_cache

logger = logging.getLogger("hfserve.backends.compiled")


class CompiledDecode:
    """Calls ``model`` with its decode steps compiled (see the module's docstring)."""

    def __init__(self, model: Any, *, backend: Any = "inductor"):
        self.model = model
        # freezing: the weights are constants of the graph (inference only)
        options: dict[str, str | int | bool | Callable[..., Any]] | None = {"freezing": True} if backend == "inductor" else None
        self._compiled = torch.compile(model, dynamic=True, backend=backend, options=options)
        #: False once the compiler has failed: every step runs eagerly
        self.active = True
        #: decode steps the compiled model has run
        self.steps = 0
        #: torch.compile's stance: while warming up it compiles what its graphs do not cover yet;
        #: once ready (:meth:`ready`) such a step runs eagerly instead of stopping every running
        #: request for the compiler (seconds to minutes)
        self.stance = "default"

    def ready(self) -> None:
        """The warm-up is over: from now on, nothing compiles."""
        self.stance = "eager_on_recompile"

    @staticmethod
    def is_decode_step(inputs: dict[str, Any]) -> bool:
        ids = inputs.get("input_ids")
        return (
            isinstance(ids, torch.Tensor)
            and ids.dim() == 2
            and ids.shape[1] == 1
            and inputs.get("past_key_values") is not None
            and isinstance(inputs.get("attention_mask"), torch.Tensor)
        )

    def __call__(self, **inputs: Any) -> Any:
        if self.active and self.is_decode_step(inputs):
            try:
                with torch.compiler.set_stance(self.stance):
                    out = self._compiled(**inputs)
                self.steps += 1
                return out
            except TorchDynamoException as exc:
                self.active = False
                logger.warning(
                    "torch.compile failed on a decode step (%s: %s); the model runs eagerly from now on",
                    type(exc).__name__,
                    next(iter(str(exc).splitlines()), ""),
                )
                # a step compiled in pieces may have run some layers before the failure: their
                # cache holds this step's keys already; drop them before running it again
                kv_cache.truncate(getattr(inputs["past_key_values"], "layers", None), inputs["attention_mask"].shape[1] - 1)
        return self.model(**inputs)

