"""The per-row sampler of the transformers backend: plain tensor functions.

The generation scheduler (:mod:`.scheduler`) holds a step's next-token logits as a
``[rows, vocab]`` float32 tensor, one row per running sequence. For the rows of one
request it calls :func:`sample`, which is the one place where logits become tokens:

1. **logits processors** (:data:`LogitsProcessor`): each request may carry a list of
   ``(generated_token_ids, logits_row) -> logits_row`` functions, applied row by row
   before anything else. This is where per-request logits processing plugs in (a
   grammar mask for structured outputs, a logit bias) without touching the
   scheduler's loop; the scheduler's shared-argmax fast path
   (:func:`is_plain_greedy`) is off for a request that has any;
2. **penalties** (:func:`penalize`): repetition (over prompt and generated tokens, as
   vLLM and transformers), frequency and presence (over generated tokens);
3. **min_tokens** (:func:`ban`): end-of-sequence and stop token ids are masked until
   the request has generated ``min_tokens`` tokens;
4. **greedy** (temperature 0): the argmax; else temperature (at least :data:`MIN_TEMPERATURE`,
   as vLLM), min-p (:func:`min_p_mask`, after temperature and before top-k / top-p, as vLLM's
   sampler), top-k (:func:`top_k_mask`), top-p (:func:`top_p_mask`, which always keeps the most
   likely token) and one multinomial draw per row from the request's own ``torch.Generator``
   (:func:`new_generator`), so a seeded request gets the same tokens alone or batched with others.

Log-probabilities (:func:`logprob_entry`) are those of the model's raw logits, before
any of the above, as vLLM reports them by default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from typing import Protocol, runtime_checkable

import torch

from ..generation import SamplingParams, TokenLogprob

#: the least temperature a sampling (not greedy) request is sampled at: a smaller one is raised to
#: this, as vLLM's SamplingParams does (its ``_MAX_TEMP``), since dividing the logits by, say, 1e-300
#: gives inf and NaN probabilities
MIN_TEMPERATURE = 1e-2

#: per-request logits processing: (the row's generated token ids, its [vocab] logits) -> new logits
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@runtime_checkable
class RowMasker(Protocol):
    """A logits processor that only allows some tokens (a grammar), and can say which as a packed
    bitmask instead of masking a row itself: then the scheduler masks the rows of several requests
    at once and takes one argmax over them (:func:`is_masked_greedy`), as vLLM applies its grammar
    bitmasks to the whole batch."""

    def __call__(self, history: list[int], logits: torch.Tensor) -> torch.Tensor: ...

    def fill_bitmask(self, history: list[int], bitmask: torch.Tensor, index: int) -> bool:
        """Write the allowed next tokens of the row that generated ``history`` into row ``index`` of
        ``bitmask`` (``[rows, ceil(vocab / 32)]`` int32: token ``t`` allowed when bit ``t % 32`` of
        word ``t // 32`` is set); False (row left as it was) when the row is not constrained now."""
        ...


def bitmask_words(vocab: int) -> int:
    return (vocab + 31) // 32


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` (``[rows, vocab]``) with the tokens ``bitmask`` (``[rows, words]``, see
    :class:`RowMasker`) does not allow made -inf."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).view(bitmask.shape[0], -1)[:, : logits.shape[-1]].bool()
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own random generator (a random seed when it gave none)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


def counts_tokens(params: SamplingParams) -> bool:
    """Whether sampling reads the generated-token counts (only the penalties do)."""
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty) or bool(params.presence_penalty)


def is_plain_greedy(params: SamplingParams, step: int, processors: Sequence[LogitsProcessor] = ()) -> bool:
    """Whether this step's token is the argmax of the raw logits (no processors, penalties or
    min_tokens masking), so that the scheduler may take it from one argmax over the batch."""
    return params.greedy and not processors and step >= params.min_tokens and not counts_tokens(params)


def is_masked_greedy(params: SamplingParams, step: int, processors: Sequence[LogitsProcessor]) -> bool:
    """Whether this step's token is the argmax of the raw logits under one :class:`RowMasker`'s
    mask (and nothing else), so that the scheduler may mask and argmax the rows of several such
    requests together."""
    return (
        params.greedy
        and len(processors) == 1
        and isinstance(processors[0], RowMasker)
        and step >= params.min_tokens
        and not counts_tokens(params)
    )


def process(logits: torch.Tensor, histories: Sequence[list[int]], processors: Sequence[LogitsProcessor]) -> torch.Tensor:
    """Apply the request's logits processors to each row (row ``i`` generated ``histories[i]``)."""
    if not processors:
        return logits
    rows = []
    for history, row in zip(histories, logits):
        for processor in processors:
            row = processor(history, row)
        rows.append(row)
    return torch.stack(rows)


def penalize(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams, prompt_seen: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition, frequency and presence penalties.

    ``counts`` is ``[rows, vocab]``: how often each row generated each token; ``prompt_seen``
    (``[vocab]`` bool) marks the prompt's tokens, which the repetition penalty also covers.
    Repetition divides a positive logit by the penalty and multiplies a negative one;
    frequency subtracts ``penalty * count``, presence ``penalty`` once per generated token.
    """
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        if prompt_seen is not None:
            seen = seen | prompt_seen
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if params.frequency_penalty:
        logits = logits - params.frequency_penalty * counts
    if params.presence_penalty:
        logits = logits - params.presence_penalty * (counts > 0).float()
    return logits


def ban(logits: torch.Tensor, token_ids: Collection[int]) -> torch.Tensor:
    """``token_ids`` made impossible in every row."""
    if not token_ids:
        return logits
    index = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=logits.device)
    return logits.index_fill(-1, index, float("-inf"))


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Every row keeps its ``k`` largest logits (and any tied with the k-th); the rest become -inf."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def min_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Every row keeps the tokens whose probability is at least ``p`` times its top token's
    (vLLM's ``min_p``); the rest become -inf."""
    probs = torch.softmax(logits, dim=-1)
    threshold = p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Every row keeps the smallest set of its most likely tokens whose probability reaches ``p``, and
    always its most likely one (as vLLM's: a ``p`` that rounds to 0 in float32 still keeps it)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= p  # the mass before this token already reaches p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    generator: torch.Generator | None,
    counts: torch.Tensor,
    step: int,
    prompt_seen: torch.Tensor | None = None,
    end_ids: Collection[int] = (),
    histories: Sequence[list[int]] = (),
    processors: Sequence[LogitsProcessor] = (),
) -> torch.Tensor:
    """The next token of each row of one request: ``[rows]`` token ids.

    ``logits`` are the rows' next-token logits (not changed); ``counts`` their generated-token
    counts; ``step`` how many tokens the request has generated; ``end_ids`` the ids that
    ``min_tokens`` keeps out (end of sequence and stop token ids); ``histories`` each row's
    generated token ids, for the ``processors``.
    """
    logits = process(logits, histories, processors)
    logits = penalize(logits, counts, params, prompt_seen)
    if step < params.min_tokens:
        logits = ban(logits, end_ids)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    logits = logits / max(params.temperature, MIN_TEMPERATURE)
    if params.min_p > 0.0:
        logits = min_p_mask(logits, params.min_p)
    if params.top_k and params.top_k > 0:
        logits = top_k_mask(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_mask(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def logprob_entry(logprobs_row: torch.Tensor, token_id: int, k: int, token_text: Callable[[int], str]) -> TokenLogprob:
    """The chosen token's log-probability and the ``k`` most likely tokens', from one row of log-probabilities."""
    top: list[tuple[int, str, float]] = []
    if k > 0:
        values, ids = torch.topk(logprobs_row, k)
        top = [(int(i), token_text(int(i)), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
    return TokenLogprob(token_id, token_text(token_id), float(logprobs_row[token_id]), top)
