"""A decode step's attention in bfloat16 on CPU (src/hfserve/backends/decode_attention.py), by
hfserve's kernel (bf16_kernel, on a CPU with AVX-512 BF16) or by batched products over the KV
cache's whole buffers (kv_cache.whole_buffer): the same attention as SDPA, checked against SDPA in
float32, for padded rows, additive masks, grouped-query heads and the growing cache's buffers,
on both paths; every other pass is SDPA's own. Also: work before the decode loop runs
on a thread that ends (cpu_threads.run_in_passing_thread)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hfserve.backends import bf16_kernel, cpu_threads, decode_attention, kv_cache, mixed_step
from hfserve.backends.huggingface import HuggingFaceBackend
from hfserve.config import BatchingConfig, LoraConfig, ModelConfig
from hfserve.generation import SamplingParams
from tests.test_cpu_linear import _build


class _Layer(torch.nn.Module):
    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.num_key_value_groups = heads // kv_heads


def _growing(keys: torch.Tensor, values: torch.Tensor, steps: int) -> tuple[DynamicLayer, torch.Tensor, torch.Tensor]:
    """A growing cache layer holding ``keys``/``values``, then ``steps`` more positions appended
    one by one (as decode steps do); returns it and the last update's views."""
    layer = DynamicLayer()
    layer.update(keys, values)

    class _Cache:
        layers = [layer]

    kv_cache.grow_in_place(_Cache)
    rows, heads, _, dim = keys.shape
    for _ in range(steps):
        k, v = layer.update(torch.randn(rows, heads, 1, dim, dtype=keys.dtype), torch.randn(rows, heads, 1, dim, dtype=keys.dtype))
    return layer, k, v


def _masks(rows: int, length: int, kind: str, dtype: torch.dtype) -> torch.Tensor | None:
    if kind == "none":
        return None
    attend = torch.ones(rows, 1, 1, length, dtype=torch.bool)
    attend[0, ..., : length // 2] = False  # row 0 left-padded
    if kind == "bool":
        return attend
    return torch.zeros(rows, 1, 1, length, dtype=dtype).masked_fill(~attend, torch.finfo(dtype).min)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("cache", ["growing", "plain"])
@pytest.mark.parametrize("kernel", [True, False])
def test_same_attention_as_sdpa(dtype, heads, kv_heads, mask_kind, cache, kernel, monkeypatch):
    """Against SDPA over the same inputs in float32: no further off than SDPA's own kernel in
    ``dtype`` (a wrong mask, head grouping or spare position would be off by far more). With
    ``kernel``, hfserve's kernel takes a bfloat16 step with no mask or a bool one where it is
    available; without, the batched products take every one."""
    torch.manual_seed(0)
    calls = _count_kernel_calls(monkeypatch, available=kernel and bf16_kernel.available())
    rows, dim = 3, 64
    query = torch.randn(rows, heads, 1, dim, dtype=dtype)
    if cache == "growing":
        _, key, value = _growing(torch.randn(rows, kv_heads, 90, dim, dtype=dtype), torch.randn(rows, kv_heads, 90, dim, dtype=dtype), 5)
        assert kv_cache.whole_buffer(key).shape[2] > key.shape[2]  # the products run over the whole buffer
    else:
        key, value = torch.randn(rows, kv_heads, 95, dim, dtype=dtype), torch.randn(rows, kv_heads, 95, dim, dtype=dtype)
    mask = _masks(rows, key.shape[2], mask_kind, dtype)
    layer = _Layer(heads, kv_heads)
    assert decode_attention.applies(query, key, value, mask, {"scaling": 0.1})
    got, _ = decode_attention.attend(layer, query, key, value, mask, scaling=0.1)
    fmask = mask if mask is None or mask.dtype == torch.bool else mask.float()
    reference, _ = sdpa_attention_forward(layer, query.float(), key.float(), value.float(), fmask, scaling=0.1)
    sdpa, _ = sdpa_attention_forward(layer, query, key, value, mask, scaling=0.1)
    assert got.shape == reference.shape == (rows, 1, heads, dim)
    ours, theirs = (got.float() - reference).abs().max().item(), (sdpa.float() - reference).abs().max().item()
    assert ours <= max(2 * theirs, 1e-2), (ours, theirs)
    by_kernel = kernel and bf16_kernel.available() and dtype == torch.bfloat16 and mask_kind != "additive"
    assert calls == [1] * by_kernel


def _count_kernel_calls(monkeypatch, available: bool) -> list[int]:
    """Make the kernel available or not to the decode attention; the list gets a 1 per call of it."""
    calls: list[int] = []
    kernel = bf16_kernel.attention

    def counting(*args):
        calls.append(1)
        return kernel(*args)

    monkeypatch.setattr(bf16_kernel, "attention", counting)
    monkeypatch.setattr(bf16_kernel, "available", lambda: available)
    return calls


@pytest.mark.parametrize("inference_mode", [True, False])
def test_spare_positions_get_no_weight(inference_mode):
    """The buffer's spare positions hold zeros (never uninitialised memory) and their scores are
    dropped: the attention over the whole buffer equals the one over the filled view copied.
    Under ``torch.inference_mode`` too, where the decode loop runs and views keep no base."""
    torch.manual_seed(1)
    with torch.inference_mode(inference_mode):
        _spare_positions_get_no_weight()


def _spare_positions_get_no_weight():
    layer, key, value = _growing(torch.randn(2, 2, 137, 64, dtype=torch.bfloat16), torch.randn(2, 2, 137, 64, dtype=torch.bfloat16), 3)
    buffer = kv_cache.whole_buffer(value)
    assert buffer.is_contiguous() and buffer.shape[2] == 138 + kv_cache.HEADROOM  # grown at the first step: 137 + 1 and the headroom
    assert torch.equal(buffer[..., :140, :], value) and not buffer[..., 140:, :].any()
    query = torch.randn(2, 2, 1, 64, dtype=torch.bfloat16)
    assert decode_attention.applies(query, key, value, None, {})
    got, _ = decode_attention.attend(_Layer(2, 2), query, key, value, None)
    copied, _ = decode_attention.attend(_Layer(2, 2), query, key.contiguous(), value.contiguous(), None)
    assert torch.allclose(got.float(), copied.float(), atol=1e-2, rtol=0)


def test_only_a_growing_layers_own_buffer_is_widened():
    """A tensor that is not the filled part of a growing layer's buffer is used as it is, even
    when it is a view of a larger tensor (whose other positions may hold anything)."""
    big = torch.full((2, 2, 300, 64), float("nan"), dtype=torch.bfloat16)
    big[..., :200, :] = torch.randn(2, 2, 200, 64, dtype=torch.bfloat16)
    view = big[..., :200, :]
    assert kv_cache.whole_buffer(view) is view
    query = torch.randn(2, 2, 1, 64, dtype=torch.bfloat16)
    assert decode_attention.applies(query, view, view, None, {})
    got, _ = decode_attention.attend(_Layer(2, 2), query, view, view, None)
    assert torch.isfinite(got).all()
    layer, key, _ = _growing(torch.randn(1, 2, 5, 64, dtype=torch.bfloat16), torch.randn(1, 2, 5, 64, dtype=torch.bfloat16), 2)
    assert kv_cache.whole_buffer(key[..., 1:, :]).shape == key[..., 1:, :].shape  # not from the buffer's start
    assert kv_cache.whole_buffer(key.contiguous()).shape == key.shape


@pytest.mark.parametrize(
    "case",
    ["float32", "prompt", "position_bias", "attention_weights", "one_row_short_context"],
)
def test_every_other_pass_is_sdpas_own(case, monkeypatch):
    """Passes neither the kernel nor the batched products take (one short row: without the
    kernel) are SDPA's, bit for bit."""
    torch.manual_seed(2)
    calls = _count_kernel_calls(monkeypatch, available=case != "one_row_short_context" and bf16_kernel.available())
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    tokens = 3 if case == "prompt" else 1
    rows = 1 if case == "one_row_short_context" else 2
    positions = decode_attention.MIN_ROW_POSITIONS - 1 if case == "one_row_short_context" else 200
    query = torch.randn(rows, 4, tokens, 64, dtype=dtype)
    key, value = torch.randn(rows, 4, positions, 64, dtype=dtype), torch.randn(rows, 4, positions, 64, dtype=dtype)
    kwargs = {}
    if case == "position_bias":
        kwargs["position_bias"] = torch.randn(1, 4, 1, positions, dtype=dtype)
    if case == "attention_weights":
        kwargs["output_attentions"] = True
    assert not decode_attention.applies(query, key, value, None, kwargs)
    got, _ = decode_attention.attend(_Layer(4, 4), query, key, value, None, **kwargs)
    expected, _ = sdpa_attention_forward(_Layer(4, 4), query, key, value, None, **kwargs)
    assert torch.equal(got, expected)
    assert not calls


def test_a_passing_thread_returns_raises_and_ends():
    caller = threading.get_ident()

    async def scenario():
        where = await cpu_threads.run_in_passing_thread(threading.get_ident, name="hf-test-passing")
        with pytest.raises(ZeroDivisionError):
            await cpu_threads.run_in_passing_thread(lambda: 1 / 0, name="hf-test-passing")
        return where

    assert asyncio.run(scenario()) != caller
    assert not [t for t in threading.enumerate() if t.name.startswith("hf-test-passing")]


@pytest.fixture(scope="module")
def medium(models, tmp_path_factory):
    return _build(tmp_path_factory.mktemp("medium-llama-attn"), models["llama"], tied=False)


def test_bfloat16_backend_decodes_as_the_model_in_float32(medium, monkeypatch):
    """Requests decoding side by side (padded rows, contexts past a buffer reallocation) through
    the decode attention: each greedy token is the float32 model's choice (SDPA, plain weights:
    the independent reference) or within rounding of it, with its log-probability; the model
    loaded on a thread that has ended. (Token-for-token equality with a bfloat16 ``generate``
    is not a fair test: on this random model SDPA's own bfloat16 kernel on the backend's padded
    batch leaves ``generate``'s answer sooner than the decode attention does.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(medium)
    long = " ".join(["The quick brown fox jumps over the lazy dog again"] * 12)
    prompts = [tokenizer(p)["input_ids"] for p in ("Hello world", long, "a " + long[:200])]
    tokens = kv_cache.HEADROOM + 8
    taken = []

    def counting(module, query, key, value, mask, **kwargs):
        taken.append(decode_attention.applies(query, key, value, mask, kwargs))
        return attend(module, query, key, value, mask, **kwargs)

    attend = decode_attention.attend
    monkeypatch.setattr(decode_attention, "attend", counting)
    backend = HuggingFaceBackend(dataclasses.replace(ModelConfig.local(medium), dtype="bfloat16"), BatchingConfig())
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, logprobs=0)

    async def one(ids):
        got: list[tuple[int, float]] = []
        async for deltas in backend.generate(ids, params, "r"):
            got += [(lp.token_id, lp.logprob) for d in deltas for lp in d.logprobs or []]
        return got

    async def scenario():
        await backend.start()
        try:
            assert not [t for t in threading.enumerate() if t.name.startswith("hf-load")]
            assert backend.model.config._attn_implementation == mixed_step.ATTENTION
            return await asyncio.gather(*(one(ids) for ids in prompts))
        finally:
            await backend.stop()

    answers = asyncio.run(scenario())
    assert sum(taken) >= tokens  # the decode steps over the long contexts took it (every layer of most steps)
    reference = AutoModelForCausalLM.from_pretrained(medium, dtype=torch.float32).eval()
    worst_choice, worst_logprob = 0.0, 0.0
    for ids, answer in zip(prompts, answers):
        assert len(answer) == tokens
        chosen = [t for t, _ in answer]
        with torch.inference_mode():
            logits = reference(torch.tensor([ids + chosen])).logits[0, len(ids) - 1 : -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for step, (token, logprob) in enumerate(answer):
            worst_choice = max(worst_choice, (logprobs[step].max() - logprobs[step, token]).item())
            worst_logprob = max(worst_logprob, abs(logprob - logprobs[step, token].item()))
    print(f"worst choice gap {worst_choice:.4f}, worst logprob error {worst_logprob:.4f}")
    # bfloat16 rounding: SDPA's own kernel here gives gaps up to ~0.1, errors up to ~0.08
    assert worst_choice <= 0.25 and worst_logprob <= 0.15


def test_a_lora_model_gets_the_decode_attention_without_folding(medium):
    lora = HuggingFaceBackend(
        dataclasses.replace(ModelConfig.local(medium), dtype="bfloat16", lora=LoraConfig(enabled=True)), BatchingConfig()
    )
    asyncio.run(lora.start())
    try:
        assert lora.model.config._attn_implementation == mixed_step.ATTENTION and not lora.scheduler.fold_prompts
    finally:
        asyncio.run(lora.stop())
