"""``--compile``: the transformers backend's decode step compiled with torch.compile (issue 16).

Compiled before the backend is ready, its answers are transformers' own (greedy tokens against
an independently loaded model's ``generate``), nothing compiles after ready whatever the batch
does, and a compiler that fails leaves the model eager without costing an answer."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from hfserve.backends import compiled as compiled_module
from hfserve.backends import huggingface
from hfserve.backends.compiled import CompiledDecode
from hfserve.backends.huggingface import HuggingFaceBackend
from hfserve.backends.kv_cache import HEADROOM, GrowingLayer, truncate
from hfserve.cli import build_parser, resolve
from hfserve.config import BatchingConfig, ModelConfig
from hfserve.generation import SamplingParams

PROMPTS = [[5], [6, 9, 6, 9], [7, 9, 13, 7, 9, 13, 7, 9, 13], [8, 8, 8, 8], [9] * 10, [11, 12] * 7]


def start(path, **batching) -> HuggingFaceBackend:
    backend = HuggingFaceBackend(ModelConfig.local(str(path)), BatchingConfig(**batching))
    asyncio.run(backend.start())
    return backend


async def _tokens(backend: HuggingFaceBackend, prompt: list[int], max_tokens: int, n: int = 1) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in range(n)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, n=n)
    async for deltas in backend.generate(prompt, params, "t"):
        for delta in deltas:
            rows[delta.index] += delta.token_ids
    return rows


def generate_all(backend: HuggingFaceBackend, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    async def run():
        return await asyncio.gather(*[_tokens(backend, p, max_tokens) for p in prompts])

    return [rows[0] for rows in asyncio.run(run())]


@functools.cache
def reference(path: str, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    """transformers' own greedy continuation, from a model loaded apart from the server's."""
    model = _reference_model(path)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


@functools.cache
def _reference_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def compiled_backend(models):
    counters.clear()
    backend = start(models["llama"], compile=True)
    backend.graph_breaks = dict(counters["graph_break"])
    registry = backend.scheduler.engine_stats.registry
    backend.at_ready = {s.name: s.value for m in registry.collect() for s in m.samples if s.name.endswith("_tokens_total")}
    backend.at_ready["compiled_steps"] = backend.scheduler.forward.steps
    yield backend
    asyncio.run(backend.stop())


def test_decode_steps_run_compiled_and_give_transformers_tokens(compiled_backend, models):
    forward = compiled_backend.scheduler.forward
    assert isinstance(forward, CompiledDecode) and forward.active
    before = forward.steps
    got = generate_all(compiled_backend, PROMPTS)
    assert forward.steps > before  # the steps above ran in the compiled model
    # each graph is a whole step: a break splits a step into a graph per layer, specialised on the
    # layer's index, until the recompile limit leaves the rest of the layers eager
    assert compiled_backend.graph_breaks == {}
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == reference(str(models["llama"]), tuple(prompt), 12), prompt


def test_nothing_compiles_after_ready(compiled_backend, models, monkeypatch):
    """The warm-up compiled every state these requests reach: compiling one more would raise
    (and, caught, leave the model eager)."""
    forward = compiled_backend.scheduler.forward
    assert forward.stance == "eager_on_recompile"  # as served: a state not compiled runs eagerly
    monkeypatch.setattr(forward, "stance", "fail_on_recompile")
    graphs, steps = counters["stats"]["unique_graphs"], forward.steps
    generate_all(compiled_backend, PROMPTS[:1])  # one row
    generate_all(compiled_backend, PROMPTS * 2)  # twelve rows of six lengths, joining and leaving
    long = asyncio.run(_tokens(compiled_backend, [5, 6, 7], HEADROOM + 20))[0]  # past a cache reallocation
    asyncio.run(_tokens(compiled_backend, [5, 6, 7], 5, n=4))  # one request's several rows
    assert counters["stats"]["unique_graphs"] == graphs
    assert forward.active and forward.steps > steps
    assert long == reference(str(models["llama"]), (5, 6, 7), HEADROOM + 20)


def test_the_warm_up_is_not_counted_as_the_servers_requests(compiled_backend):
    # at ready, the compiler's warm-up had run its requests (compiled steps), and none was counted
    assert compiled_backend.at_ready["compiled_steps"] > 0
    assert compiled_backend.at_ready["vllm:prompt_tokens_total"] == 0
    assert compiled_backend.at_ready["vllm:generation_tokens_total"] == 0


def test_a_failing_compiler_leaves_the_model_eager(models, monkeypatch, caplog):
    def refuse(graph, example_inputs):
        raise RuntimeError("this compiler compiles nothing")

    monkeypatch.setattr(huggingface, "CompiledDecode", functools.partial(CompiledDecode, backend=refuse))
    caplog.set_level(logging.WARNING, logger=compiled_module.logger.name)
    backend = start(models["llama"], compile=True)
    try:
        forward = backend.scheduler.forward
        assert isinstance(forward, CompiledDecode) and not forward.active and forward.steps == 0
        assert "the model runs eagerly from now on" in caplog.text
        got = generate_all(backend, PROMPTS[:3])
        for prompt, tokens in zip(PROMPTS[:3], got):
            assert tokens == reference(str(models["llama"]), tuple(prompt), 12), prompt
    finally:
        asyncio.run(backend.stop())


def test_rewind_drops_what_a_failed_step_appended():
    layer = GrowingLayer()
    keys = torch.randn(2, 1, 5, 4)
    layer.update(keys, keys + 1)
    layer.update(keys[..., :1, :] * 3, keys[..., :1, :] * 3)  # the step that failed half-way
    truncate([layer], 5)
    assert torch.equal(layer.keys, keys) and torch.equal(layer.values, keys + 1)
    layer.update(keys[..., :1, :], keys[..., :1, :])  # the step again: appended once
    assert layer.keys.shape[-2] == 6 and torch.equal(layer.keys[..., 5:, :], keys[..., :1, :])


def test_compile_flag(models):
    parse = build_parser().parse_args
    assert resolve(parse(["--model_dir", str(models["llama"])])).batching.compile is False
    assert resolve(parse(["--model_dir", str(models["llama"]), "--compile"])).batching.compile is True


def test_without_the_flag_nothing_is_compiled(models):
    backend = start(models["llama"])
    try:
        assert not isinstance(backend.scheduler.forward, CompiledDecode)
    finally:
        asyncio.run(backend.stop())


def test_the_warm_up_stays_within_the_context_length(models, monkeypatch):
    """A model served with a short context is not warmed up past it (a model with learned positions
    would fail there); the warm-up's requests stay within ``max_model_len``."""
    from hfserve.backends.scheduler import GenerationScheduler

    seen: list[int] = []
    generate = GenerationScheduler.generate

    def recording(self, prompt_ids, params, request_id, **kwargs):
        seen.append(len(prompt_ids) + params.max_tokens)
        return generate(self, prompt_ids, params, request_id, **kwargs)

    monkeypatch.setattr(GenerationScheduler, "generate", recording)
    monkeypatch.setattr(huggingface, "CompiledDecode", functools.partial(CompiledDecode, backend="eager"))
    model = dataclasses.replace(ModelConfig.local(str(models["llama"])), max_model_len=24)
    backend = HuggingFaceBackend(model, BatchingConfig(compile=True))
    asyncio.run(backend.start())
    try:
        assert seen and max(seen) <= 24, seen
        assert backend.compiled is not None and backend.compiled.active and backend.compiled.steps > 0
    finally:
        asyncio.run(backend.stop())


def test_a_failing_warm_up_still_serves(models, monkeypatch, caplog):
    from hfserve.backends.scheduler import GenerationScheduler

    def broken(self, prompt_ids, params, request_id, **kwargs):
        raise RuntimeError("no warm-up today")

    monkeypatch.setattr(huggingface, "CompiledDecode", functools.partial(CompiledDecode, backend="eager"))
    with monkeypatch.context() as patch:
        patch.setattr(GenerationScheduler, "generate", broken)
        caplog.set_level(logging.WARNING, logger="hfserve.backends.huggingface")
        backend = start(models["llama"], compile=True)
    try:
        assert "the decode step's warm-up stopped (RuntimeError: no warm-up today)" in caplog.text
        assert backend.compiled is not None and backend.compiled.stance == "eager_on_recompile"
        assert generate_all(backend, PROMPTS[:2]) == [reference(str(models["llama"]), tuple(p), 12) for p in PROMPTS[:2]]
    finally:
        asyncio.run(backend.stop())
