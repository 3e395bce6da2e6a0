"""Attention of a decode step (one query token per row) in bfloat16 or float16 on CPU.

PyTorch's CPU SDPA kernel for reduced precision is a flash-attention kernel: it splits the
work by query blocks and walks the keys block by block, converting as it goes. With one query
token per row there is one query block per row and head, and the kernel is several times slower
than two plain products and a softmax. Measured on 2 cores (AMD EPYC with AVX-512 BF16), 8
rows, 12 heads of 64, bfloat16: 273 against 81 us over 64 cached positions, 2.4 ms against
0.30 ms over 512, 9.9 ms against 2.3 ms over 2048; for a 12-layer model at 512 positions that
is 25 ms of every decode step. In float32 the two are even (50 / 53 us at 64), so float32
keeps SDPA.

On a CPU with AVX-512 BF16, :func:`attend` hands a bfloat16 decode step (no mask, or a bool
one per row and key position) to hfserve's kernel (:func:`.bf16_kernel.attention`): one call per
layer, reading the cache's filled positions in place, float32 scores and softmax. The batched
products below took a dozen operators a layer: on the ~110M Llama, 8 rows over ~50 positions, 259
against 54 us a layer (16 rows: 363 against 71; 8 rows over 520 positions: 895 against 404), a
fifth of the decode step before; in process, 8 and 16 callers joining one by one, 1.16x and 1.12x
the tokens/s (three alternating pairs each; docs/benchmarks.md, tenth sitting). It is quicker than
SDPA's one kernel at one row too (12 against 60 us over 40 positions), so no row threshold applies.

Elsewhere (no kernel, float16, an additive mask), :func:`attend` computes a decode step's
attention as transformers' eager attention does: the scores ``q @ k^T`` in the model's dtype
(accumulated in float32 inside the product), scaled, masked and soft-maxed in float32, the
probabilities back in the model's dtype times ``v``.
The keys and values a growing KV cache hands out (:mod:`.kv_cache`) are the filled positions
of a longer buffer, a strided view that PyTorch's batched product copies before multiplying
(at 512 positions, 1.1 ms against 0.12 for a contiguous one), and whose length changes every
step (a new shape costs oneDNN a new kernel: 0.5 ms against 0.04 for the probabilities times
the values). So both products run over the whole buffer (:func:`.kv_cache.whole_buffer`):
the spare positions' scores are dropped before the softmax and their probabilities are zeros
(the buffer's spare positions hold zeros, never uninitialised memory). In process on the
~110M Llama, bfloat16, the model's step alternating between the two, 8 rows: 16.3 against 13.9
ms a step at 80-104 cached positions, 22.3 against 16.8 at 200-224, 43.6 against 22.2 at 500-524;
16 rows at 200-224: 36.5 against 21.2. One row over a short context is quicker with SDPA's one
kernel than with the few small ones here, so such steps keep it (:data:`MIN_ROW_POSITIONS`).
Grouped-query attention needs no repeated keys: a row's query heads are viewed as
``[kv_heads, group]`` against its ``kv_heads`` keys. Every other pass (prompts, float32, a GPU,
a position bias, attention weights asked for) goes to transformers' SDPA attention unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import bf16_kernel, kv_cache

#: the dtypes whose CPU SDPA kernel is slow for one query token
_REDUCED = (torch.bfloat16, torch.float16)
#: a step attends over fewer row-positions than this with SDPA's kernel: one row over a short context
#: is as quick or quicker there (the ~110M Llama, one row: 8.9 against 9.8 ms a step at 16-40 cached
#: positions, even at ~210, 11.9 against 10.1 at ~510; eight rows over 16-40: 12.8 against 12.5)
MIN_ROW_POSITIONS = 256
#: keyword arguments that need SDPA's own handling (a paged cache, a position bias, weights out)
_SDPA_ONLY = ("cache", "position_bias", "output_attentions")


def _decode_step(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, kwargs: dict[str, Any]
) -> bool:
    """What both of :func:`attend`'s own ways need: one query token per row, on CPU, keys and
    values in the query's dtype, a mask (if any) per row and key position only, no dropout and
    nothing only SDPA handles."""
    return (
        query.shape[2] == 1
        and query.device.type == "cpu"
        and key.dtype == value.dtype == query.dtype
        and not float(kwargs.get("dropout") or 0.0)
        and not any(kwargs.get(name) is not None and kwargs.get(name) is not False for name in _SDPA_ONLY)
        and (mask is None or (mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1 and mask.shape[3] == key.shape[2]))
    )


def applies(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, kwargs: dict[str, Any]
) -> bool:
    """Whether :func:`attend` computes this attention by its batched products: a decode step
    (:func:`_decode_step`) in bfloat16 or float16 over at least :data:`MIN_ROW_POSITIONS` rows
    times cached positions."""
    return (
        _decode_step(query, key, value, mask, kwargs)
        and query.dtype in _REDUCED
        and query.shape[0] * key.shape[2] >= MIN_ROW_POSITIONS
    )


def _kernel_applies(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, kwargs: dict[str, Any]
) -> bool:
    """Whether hfserve's kernel (:func:`.bf16_kernel.attention`) computes this attention: a
    decode step (:func:`_decode_step`) in bfloat16, a bool mask for each row or one for all rows
    (or none), the head dimension contiguous, query heads a multiple of key heads, and the kernel
    built and checked on this machine."""
    return (
        query.dtype == torch.bfloat16
        and _decode_step(query, key, value, mask, kwargs)
        and (mask is None or (mask.dtype == torch.bool and mask.shape[0] in (1, query.shape[0])))
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and key.shape[1] > 0
        and query.shape[1] % key.shape[1] == 0
        and bf16_kernel.available()
    )


def attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query`` [rows, heads, q, dim], ``key`` and
    ``value`` [rows, kv_heads, kv, dim], ``attention_mask`` (bool, True: attend; or additive)
    broadcastable to [rows, 1, q, kv] or None; returns [rows, q, heads, dim]."""
    scaling = kwargs.get("scaling")
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if _kernel_applies(query, key, value, attention_mask, kwargs):
        mask = None if attention_mask is None else attention_mask.reshape(attention_mask.shape[0], -1)
        return bf16_kernel.attention(query, key, value, mask, scale), None
    if not applies(query, key, value, attention_mask, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # [rows, kv_heads, group, dim]: the query heads that share a key head, side by side
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    length = key.shape[2]
    # both products over the cache's whole buffers when they are one's (the filled positions are
    # a strided view the product would copy first): the spare positions' scores are dropped and
    # their probabilities are zeros
    keys, values = kv_cache.whole_buffer(key), kv_cache.whole_buffer(value)
    scores = torch.matmul(q, keys.transpose(-1, -2))[..., :length].float().mul_(scale)  # [rows, kv_heads, group, kv]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # [rows or 1, 1, 1, kv] against [rows, kv_heads, group, kv]
            scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores.add_(attention_mask)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if values.shape[2] > length:
        probs = torch.nn.functional.pad(probs, (0, values.shape[2] - length))
    out = torch.matmul(probs, values)  # [rows, kv_heads, group, dim]
    return out.reshape(rows, 1, heads, value.shape[-1]), None
