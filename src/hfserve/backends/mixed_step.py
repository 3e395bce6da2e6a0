"""Prompts folded into a decode step: a request that joins a running batch costs no pass of its own.

Without this, a request that arrives while others decode gets a prefill pass of its own
(its prompt alone through every weight) while the running rows wait; with requests arriving
one by one, as a server's clients do, that is one extra pass over the weights per request
(the bfloat16 ~110M Llama at 8 concurrent callers: 352 tokens/s with callers in step, 248
joining one by one). vLLM folds new prompts into the running step (chunked prefill); so
does this module, over the scheduler's padded KV cache:

- the pass's input is one flat sequence: the running rows' next tokens (one each), then
  each joining prompt's tokens, each token with its own position id, so every linear layer
  reads its weights once for all of them;
- :class:`MixedPass` stands in for the KV cache during that pass: it appends the running
  rows' keys and values to their cache (the cohort's, as a plain decode step does) and keeps
  the joining prompts' own;
- the attention function registered here as :data:`ATTENTION` computes, while a mixed pass
  runs on this thread, the running rows' attention over their cache (the decode step's
  padding mask) and each prompt's causal attention over itself, with the same SDPA call
  transformers makes; outside a mixed pass it is transformers' SDPA attention (and its mask
  function is transformers' SDPA mask). Decode steps in bfloat16 or float16 on CPU, in a mixed
  pass or not, take :mod:`.decode_attention` instead of SDPA's slow kernel for one query token.

The scheduler then merges the prompts' keys and values into the running cache as it merges
a separately prefilled request. Which models can: decoder-only models whose attention goes
through transformers' attention interface with SDPA (``_supports_attention_backend``), whose
KV cache is the plain per-layer one (checked by the scheduler), served without LoRA adapters
(rows of different adapters cannot share one flat sequence) and without ``--compile``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import decode_attention

#: the attention implementation a model gets when its scheduler folds prompts into decode steps
ATTENTION = "hfserve_mixed"

_current = threading.local()  # .step: the MixedPass running on this thread, if any


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    step: MixedPass | None = getattr(_current, "step", None)
    if step is None:
        return decode_attention.attend(module, query, key, value, attention_mask, **kwargs)
    return step.attend(module, query, kwargs)


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def enable(model: Any) -> bool:
    """Give ``model`` the attention that can fold prompts into decode steps, if it can take it
    (decoder-only, transformers' attention interface, SDPA attention); False when it cannot."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or not getattr(model, "_supports_attention_backend", False):
        return False
    if config._attn_implementation == ATTENTION:
        return True
    if config._attn_implementation != "sdpa":
        return False
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, ImportError, AttributeError):
        return False
    return bool(config._attn_implementation == ATTENTION)


def step_prompt_tokens(rows: int, waiting: int, *, block: int, most: int) -> int:
    """How many prompt tokens (of ``waiting``) a decode step of ``rows`` rows takes in.

    On a CPU a step's cost rises in blocks of ``block`` tokens (16: the rows of an AMX tile; a
    ~110M Llama's 768 x 2048 product in bfloat16 takes 148 us at 16 rows, 251 at 20), so the
    step is filled to the end of the rows' last block (to the next one when fewer than half a
    block is left), or with up to ``most`` prompt tokens cut at a block's end when that is more.
    With ``block`` 1 (a GPU, whose cost hardly depends on the token count) every waiting token
    up to ``most`` is taken."""
    room = -rows % block
    if room < block // 2:
        room += block
    big = (rows + min(waiting, most)) // block * block - rows
    return min(waiting, max(room, big))


class MixedPass:
    """The KV cache of one forward pass over ``rows`` running rows' next tokens followed by a
    chunk of each of some prompts (one flat sequence, batch 1).

    ``cache`` is the running rows' KV cache (a transformers ``Cache``, one row per running row);
    ``mask`` its attention mask *including* this step's position ([rows, width], 1: attend).
    ``chunks`` gives, per prompt, the chunk's length and the keys and values of the prompt's
    earlier chunks per layer (None for its first chunk). After the pass, :meth:`prompt_kv`
    gives each prompt's keys and values so far, per layer.
    """

    def __init__(self, cache: Any, rows: int, chunks: Sequence[tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]], mask: torch.Tensor):
        self.cache = cache
        self.rows = rows
        self.chunks = list(chunks)
        # a bool mask for SDPA ([rows, 1, 1, width]); none at all when no row has padding
        self.mask = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        # a later chunk's queries see the prompt's earlier tokens and, causally, their own
        self._chunk_masks: list[torch.Tensor | None] = []
        for length, past in self.chunks:
            done = 0 if past is None else past[0][0].shape[-2]
            if done == 0:
                self._chunk_masks.append(None)
            else:
                seen = torch.arange(done + length, device=mask.device)[None, :] <= (done + torch.arange(length, device=mask.device))[:, None]
                self._chunk_masks.append(seen[None, None])
        self._kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._layer: tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def __enter__(self) -> MixedPass:
        _current.step = self
        return self

    def __exit__(self, *exc: object) -> None:
        _current.step = None
        self._layer = None

    # what the model's attention layers call on their cache ---------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the running rows' keys and values to their cache and each chunk's to its
        prompt's (the layer's attention, which runs next, reads both)."""
        n = self.rows
        # [1, heads, n + chunk tokens, dim] -> the running rows' [n, heads, 1, dim]
        keys, values = self.cache.update(
            key_states[0, :, :n].transpose(0, 1).unsqueeze(2), value_states[0, :, :n].transpose(0, 1).unsqueeze(2), layer_idx
        )
        prompts: list[tuple[torch.Tensor, torch.Tensor]] = []
        start = n
        for length, past in self.chunks:
            k, v = key_states[:, :, start : start + length], value_states[:, :, start : start + length]
            if past is not None:
                k, v = torch.cat([past[layer_idx][0], k], dim=2), torch.cat([past[layer_idx][1], v], dim=2)
            prompts.append((k, v))
            start += length
        self._kv[layer_idx] = prompts
        self._layer = (keys, values, prompts)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # position ids are always given: nothing derives positions from this

    # the attention of one layer -------------------------------------------------------------
    def attend(self, module: torch.nn.Module, query: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
        """The running rows' attention over their cache and each chunk's over its prompt so far
        (causally), as one [1, tokens, heads, dim] output in the input's order."""
        assert self._layer is not None, "attention ran before its layer's cache update"
        keys, values, prompts = self._layer
        kwargs = {k: v for k, v in kwargs.items() if k != "is_causal"}
        n = self.rows
        out, _ = decode_attention.attend(module, query[0, :, :n].transpose(0, 1).unsqueeze(2), keys, values, self.mask, **kwargs)
        parts = [out.transpose(0, 1)]  # [n, 1, heads, dim] -> [1, n, heads, dim]
        start = n
        for (length, _), (k, v), mask in zip(self.chunks, prompts, self._chunk_masks):
            q = query[:, :, start : start + length]
            part, _ = sdpa_attention_forward(module, q, k, v, mask, is_causal=mask is None, **kwargs)
            parts.append(part)
            start += length
        return torch.cat(parts, dim=1), None

    def prompt_kv(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prompt ``index``'s keys and values so far ([1, heads, tokens, dim]) in every layer, in order."""
        return [self._kv[layer][index] for layer in sorted(self._kv)]
