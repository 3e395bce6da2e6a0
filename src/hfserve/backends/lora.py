"""LoRA adapters on the transformers backend: peft's multi-adapter model, one adapter per row.

Every adapter is loaded into the one model with peft (``PeftModel.from_pretrained`` for the
first, ``load_adapter`` for the others): its LoRA layers wrap the model's linear layers and hold
every adapter's A and B matrices side by side. Each forward pass of the generation scheduler
(:meth:`GenerationScheduler._run_model <.scheduler.GenerationScheduler._run_model>`, prefills and
decode steps alike) comes here with the adapter of each row, and runs with peft's mixed-batch
inference (``adapter_names``, one per row; ``__base__`` for the base model's rows): every LoRA
layer computes the base output for the whole batch, then adds each adapter's low-rank product to
its own rows only. The rows' names reach the LoRA layers through forward pre-hooks installed once
per load (what ``PeftModel.forward(adapter_names=...)`` does by registering and removing a hook on
every layer at each call), so a forward pass costs no module walk. So rows of different adapters, and base rows, share one batch, one KV cache
and one forward pass; nothing is merged into the base weights.

Loading and unloading change the model's modules, so they take the same lock as the forward
passes (between two decode steps, never during one). A row whose adapter was unloaded while it
ran fails alone (the scheduler reruns its batch-mates without it).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from .. import errors

#: peft's name for the rows that run without an adapter
BASE = "__base__"


class LoraWeights:
    """The adapters loaded into one transformers model, and the forward pass that applies them per row."""

    def __init__(self, model: Any):
        self.model = model
        self.peft: Any = None  # the PeftModel, once an adapter is loaded
        self.names: set[str] = set()
        self._lock = threading.Lock()
        self._rows: list[str] = []  # the adapter of each row of the running forward pass
        self._hooks: list[Any] = []

    def load(self, name: str, path: str) -> None:
        """Load the adapter in ``path`` as ``name`` (a worker thread; waits for the running step)."""
        from peft import PeftModel

        with self._lock:
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
                    self.peft.eval()
                else:
                    self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise errors.InvalidRequest(
                    f"LoRA adapter {name!r} ({path}) cannot be loaded into this model: {_reason(exc)}", param="lora_path"
                ) from None
            self.names.add(name)
            self._install_hooks()

    def unload(self, name: str) -> None:
        with self._lock:
            self.names.discard(name)
            if self.peft is not None and name in self.peft.peft_config:
                self.peft.delete_adapter(name)
            self._install_hooks()

    def _install_hooks(self) -> None:
        """A pre-hook on every LoRA layer that hands it the rows' adapter names (``adapter_names``)."""
        from peft.tuners.lora import LoraLayer

        for hook in self._hooks:
            hook.remove()
        layers: list[Any] = [module for module in self.model.modules() if isinstance(module, LoraLayer)]
        self._hooks = [layer.register_forward_pre_hook(self._inject, with_kwargs=True) for layer in layers]

    def _inject(self, module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if self._rows:
            kwargs["adapter_names"] = self._rows
        return args, kwargs

    def run(self, adapters: Sequence[str | None], encoder: bool, inputs: dict[str, Any]) -> Any:
        """One forward pass; row ``i`` with adapter ``adapters[i]`` (None: the base model)."""
        if encoder:
            raise errors.UnsupportedParameter("LoRA adapters are served for decoder-only generation models only")
        with self._lock:
            if self.peft is None or not self.names:
                if any(a is not None for a in adapters):
                    raise errors.ModelNotFound(f"Model with name {errors.echo(_first(adapters))} does not exist.")
                return self.model(**inputs)
            names = []
            for adapter in adapters:
                if adapter is None:
                    names.append(BASE)
                elif adapter in self.names:
                    names.append(adapter)
                else:  # unloaded while the request ran
                    raise errors.ModelNotFound(f"Model with name {errors.echo(adapter)} does not exist.")
            # all-base batches too: without adapter_names peft would apply its active adapter to every row
            self._rows = names
            try:
                return self.model(**inputs)
            finally:
                self._rows = []


def _first(adapters: Sequence[str | None]) -> str:
    return next(a for a in adapters if a is not None) or ""


def _reason(exc: BaseException) -> str:
    """The first line of a library error, without file paths or tensor dumps."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "its weights do not fit the model"
    if "size mismatch" in text or "shape" in text:
        return "its weights' shapes do not fit the model's (an adapter made for another base model)"
    return text[:300]
