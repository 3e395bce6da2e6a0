"""The grammar engine of the transformers backend: constrained decoding with xgrammar.

:class:`GrammarEngine` holds an ``xgrammar.GrammarCompiler`` over the model tokenizer's
``TokenizerInfo`` (its vocabulary size is the width of the model's logits, which can exceed
``len(tokenizer)``: the ids past the tokenizer are never allowed). A constraint
(:class:`~hfserve.generation.StructuredOutput`) is built into the same grammar vLLM's xgrammar
backend builds (:func:`hfserve.structured.build_grammar`) and compiled in a worker thread within
the time limit; compiled grammars are cached by ``(kind, source, disable_any_whitespace)``
(:class:`hfserve.structured.GrammarCache`).

:meth:`GrammarEngine.processor` gives a request's logits processor
(:data:`~.sampler.LogitsProcessor`), which the scheduler applies to each of the request's rows
in the shared batch: each row (each of ``n`` sequences) has its own ``GrammarMatcher``, which
accepts the row's tokens sampled since the last step, fills the row's token bitmask and masks
the row's logits (disallowed tokens -inf). The matcher's stop tokens are the model's
end-of-sequence ids and the request's ``stop_token_ids`` (as vLLM's ``all_stop_token_ids``): once
the grammar is complete, only they remain. A grammar that has ended (its stop token sampled, so
the row ends too unless ``ignore_eos``) constrains no more, as in vLLM. Rows of other requests in
the batch are not touched; log-probabilities stay those of the raw logits (the scheduler takes
them before any processor), as vLLM reports them by default.

The vLLM backend uses the engine too, only to compile (and so check, within the same time
limit and with the same errors) each constraint before handing it to vLLM.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from typing import Any

import torch

from ..generation import StructuredOutput
from ..structured import GrammarCache, build_grammar

logger = logging.getLogger("hfserve.backends.grammar")

#: the most memory the compiled grammars of one engine may hold (vLLM's default xgrammar cache size)
CACHE_BYTES = 512 * 1024 * 1024


class GrammarEngine:
    """Compiles constraints for one tokenizer and makes the per-request logits processors."""

    def __init__(self, tokenizer: Any, vocab_size: int, *, timeout: float | None = None):
        import xgrammar as xgr

        self.vocab_size = int(vocab_size)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
        threads = max(1, min(8, os.cpu_count() or 1))
        # hfserve keeps its own cache (by constraint), so xgrammar's is off
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.grammars: GrammarCache[Any] = GrammarCache(
            self._compile, timeout=timeout, entries=256, max_bytes=CACHE_BYTES, size=lambda c: c.memory_size_bytes,
            name="grammar",
        )

    def _compile(self, so: StructuredOutput) -> Any:
        return self.compiler.compile_grammar(build_grammar(so))

    async def compile(self, so: StructuredOutput) -> Any:
        """The compiled grammar of ``so`` (cached), compiled off the event loop within the time limit."""
        return await self.grammars.get(so)

    def compile_sync(self, so: StructuredOutput) -> Any:
        return self.grammars.get_sync(so)

    def processor(self, compiled: Any, stop_token_ids: Collection[int]) -> GrammarProcessor:
        return GrammarProcessor(compiled, stop_token_ids, self.vocab_size)

    def shutdown(self) -> None:
        self.grammars.shutdown()


class _Row:
    __slots__ = ("history", "matcher", "seen", "active")

    def __init__(self, history: list[int], matcher: Any):
        self.history = history  # kept: the row's identity is this list (see GrammarProcessor)
        self.matcher = matcher
        self.seen = 0
        self.active = True


class GrammarProcessor:
    """One request's grammar mask, a :data:`~.sampler.LogitsProcessor`: ``(row's generated ids,
    row's logits) -> masked logits``.

    The scheduler calls it for each of the request's rows at each step, with that row's own list
    of generated ids; a row is known by that list (the scheduler keeps one list per row for the
    row's life), so each of ``n`` sequences gets its own matcher."""

    def __init__(self, compiled: Any, stop_token_ids: Collection[int], vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.compiled = compiled
        self.stop_token_ids = sorted({int(t) for t in stop_token_ids})
        self.vocab_size = vocab_size
        self.rows: dict[int, _Row] = {}
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def _row(self, history: list[int]) -> _Row:
        row = self.rows.get(id(history))
        if row is None:
            matcher = self._xgr.GrammarMatcher(self.compiled, override_stop_tokens=self.stop_token_ids or None)
            row = self.rows[id(history)] = _Row(history, matcher)
        return row

    def allowed(self, history: list[int]) -> torch.Tensor:
        """The ``[vocab]`` bool mask of the tokens the grammar allows next (after ``history``)."""
        row = self._advance(history)
        if not row.active or row.matcher.is_terminated():
            return torch.ones(self.vocab_size, dtype=torch.bool)
        row.matcher.fill_next_token_bitmask(self.bitmask, 0)
        scores = torch.zeros((1, self.vocab_size), dtype=torch.float32)
        self._xgr.apply_token_bitmask_inplace(scores, self.bitmask, vocab_size=self.vocab_size)
        return scores[0] == 0

    def _advance(self, history: list[int]) -> _Row:
        row = self._row(history)
        if row.seen < len(history):
            for tid in history[row.seen :]:
                if not row.active or row.matcher.is_terminated():
                    break
                if not row.matcher.accept_token(int(tid)):
                    # only when nothing the grammar allows could be sampled (e.g. min_tokens banned the stop token)
                    logger.warning("token %d is outside the grammar; the rest of this sequence is not constrained", tid)
                    row.active = False
            row.seen = len(history)
        return row

    def fill_bitmask(self, history: list[int], bitmask: torch.Tensor, index: int) -> bool:
        """The :class:`~.sampler.RowMasker` side: the row's allowed tokens into ``bitmask[index]``
        (the scheduler masks the greedy rows of all constrained requests at once)."""
        row = self._advance(history)
        if not row.active or row.matcher.is_terminated():
            return False
        row.matcher.fill_next_token_bitmask(bitmask, index)
        return True

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        row = self._advance(history)
        if not row.active or row.matcher.is_terminated():
            return logits
        row.matcher.fill_next_token_bitmask(self.bitmask, 0)
        out = logits.float().clone().view(1, -1)
        bitmask = self.bitmask if out.device.type == "cpu" else self.bitmask.to(out.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(out, bitmask, vocab_size=self.vocab_size)
        return out.view(-1)
