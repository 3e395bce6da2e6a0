"""Prepacked oneDNN linear weights for bfloat16 on CPU (src/hfserve/backends/cpu_linear.py; on an
AVX-512 BF16 CPU the bfloat16 layers may be hfserve's own kernel's, tests/test_bf16_kernel.py): the
packed model computes what the plain one does, releases the plain weights it no longer reads,
keeps tied ones, float32 weights are packed only for the shapes where it pays on this CPU, and the transformers backend's answers equal
transformers' own ``generate``."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import shutil
import time

import pytest
import torch

from hfserve.backends import bf16_kernel, cpu_linear
from hfserve.backends.huggingface import HuggingFaceBackend
from hfserve.config import BatchingConfig, LoraConfig, ModelConfig
from hfserve.generation import SamplingParams
from tests.fixtures.build_models import _llama_config_and_gen

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="this PyTorch has no oneDNN packed linear operators")
#: for the tests that need packed weights: oneDNN's bfloat16 kernels need AVX-512 BW/VL/DQ or AVX-NE-CONVERT
needs_bf16_kernels = pytest.mark.skipif(not cpu_linear.supported(), reason="oneDNN has no bfloat16 kernels for this CPU")

PROMPTS = ["Hello world", "The quick brown fox jumps over", "a"]


def _build(dest, tokenizer_dir, *, tied: bool):
    """A Llama whose layers are large enough to be packed (hidden 512), random weights, the
    fixture Llama's tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config, _ = _llama_config_and_gen(tokenizer)
    config.update(
        {"hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 8, "tie_word_embeddings": tied}
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # spread the logits apart: greedy answers do not hinge on rounding
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(dest)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dest / f.name)
    return dest


@pytest.fixture(scope="module")
def medium(models, tmp_path_factory):
    return _build(tmp_path_factory.mktemp("medium-llama"), models["llama"], tied=False)


@pytest.fixture(scope="module")
def medium_tied(models, tmp_path_factory):
    return _build(tmp_path_factory.mktemp("medium-llama-tied"), models["llama"], tied=True)


def _load(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _greedy_steps(model, tokenizer, steps=8):
    """Left-padded batch prefill, then ``steps`` greedy decode steps: every step's logits."""
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    logits = []
    with torch.inference_mode():
        out = model(**batch, use_cache=True, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        for _ in range(steps):
            last = out.logits[:, -1].float()
            logits.append(last)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                last.argmax(-1, keepdim=True),
                attention_mask=mask,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    return torch.stack(logits)


@needs_bf16_kernels
def test_packed_model_computes_what_the_plain_one_does(medium):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(medium)
    plain, packed = _load(medium, torch.bfloat16), _load(medium, torch.bfloat16)
    # per decoder layer q, k, v, o, gate, up, down, and the output layer
    assert cpu_linear.prepack(packed) == 2 * 7 + 1
    assert all(isinstance(m, cpu_linear.PackedLinear) for m in packed.modules() if isinstance(m, torch.nn.Linear))
    expected, got = _greedy_steps(plain, tokenizer), _greedy_steps(packed, tokenizer)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert torch.allclose(got, expected, atol=5e-2 * expected.abs().max().item(), rtol=0)


def test_float32_is_packed_only_for_the_shapes_where_it_pays(medium, monkeypatch, caplog):
    """float32 weights: each distinct shape is timed both ways at load; only the shapes whose packed
    product is FLOAT32_GAIN times faster (geometric mean over 1 and BATCH_HINT rows) are packed."""
    timed = []

    def speedup(weight, packed, rows):  # the down projections (512 x 1024) pay, nothing else
        timed.append((tuple(weight.shape), rows))
        return {1: 0.9, cpu_linear.BATCH_HINT: 2.0}[rows] if tuple(weight.shape) == (512, 1024) else 1.0

    monkeypatch.setattr(cpu_linear, "speedup", speedup)
    model = _load(medium, torch.float32)
    with caplog.at_level("INFO", logger="hfserve.backends.cpu_linear"):
        assert cpu_linear.prepack(model) == 2  # one per decoder layer
    packed = {name for name, m in model.named_modules() if isinstance(m, cpu_linear.PackedLinear)}
    assert packed == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    shapes = {tuple(m.weight.shape) for m in model.modules() if type(m) is torch.nn.Linear} | {(512, 1024)}
    assert sorted(timed) == sorted((shape, rows) for shape in shapes for rows in (1, cpu_linear.BATCH_HINT))  # each shape once
    assert "float32 1024x512 weights: oneDNN's packed product 0.90x the plain one at 1 row, 2.00x at 8 rows: packed" in caplog.text

    monkeypatch.setattr(cpu_linear, "speedup", lambda weight, packed, rows: 1.0)  # nothing pays
    model = _load(medium, torch.float32)
    assert cpu_linear.prepack(model) == 0
    assert not any(isinstance(m, cpu_linear.PackedLinear) for m in model.modules())


def test_speedup_times_the_two_products(medium, monkeypatch):
    """The timing itself: a positive, finite ratio for a real weight, at one row and at a batch,
    timed on one thread (the process's thread count restored after)."""
    model = _load(medium, torch.float32)
    weight = model.model.layers[0].mlp.down_proj.weight.detach()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, cpu_linear.BATCH_HINT)
    threads_seen, linear = set(), torch.nn.functional.linear

    def counting_linear(*args, **kwargs):
        threads_seen.add(torch.get_num_threads())
        return linear(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows in (1, cpu_linear.BATCH_HINT):
            assert 0 < cpu_linear.speedup(weight, packed, rows) < math.inf
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert threads_seen == {1}


def test_the_timing_alternates_and_runs_quick_products_longer():
    """Each round times the two products back to back; a quick product is timed until the budget
    is spent (its fastest call settles), a slow one the minimum number of rounds."""
    calls: list[str] = []
    first, second = cpu_linear._fastest_pair_us(lambda: calls.append("a"), lambda: time.sleep(0.002) or calls.append("b"), rounds=3, budget_s=0.0)
    assert calls == ["a", "b"] * 4  # one untimed pair, then 3 timed rounds
    assert 0 <= first < second and second >= 2000
    calls.clear()
    cpu_linear._fastest_pair_us(lambda: calls.append("a"), lambda: time.sleep(0.002) or calls.append("b"), rounds=3, budget_s=0.03)
    assert 1 + 3 < len(calls) // 2 < 1 + 30  # ~15 rounds of 2 ms
    calls.clear()
    cpu_linear._fastest_pair_us(lambda: calls.append("a"), lambda: calls.append("b"), rounds=3, budget_s=10.0, most=40)
    assert calls == ["a", "b"] * 41  # a budget never reached stops at ``most`` rounds


def test_packed_float32_model_computes_what_the_plain_one_does(medium, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(cpu_linear, "FLOAT32_GAIN", 0.0)  # every float32 shape pays
    tokenizer = AutoTokenizer.from_pretrained(medium)
    plain, packed = _load(medium, torch.float32), _load(medium, torch.float32)
    assert cpu_linear.prepack(packed) == 2 * 7 + 1
    expected, got = _greedy_steps(plain, tokenizer), _greedy_steps(packed, tokenizer)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_kernels)])
def test_a_compiled_graph_calls_the_packed_product(dtype, monkeypatch):
    """``--compile`` keeps the packed weights: under torch.compile (with freezing, as
    backends/compiled.py compiles) a packed layer is one call of the packed product in the
    generated code, with no graph break, and the compiled module computes what the plain one does."""
    monkeypatch.setattr(cpu_linear, "FLOAT32_GAIN", 0.0)  # every float32 shape pays
    monkeypatch.setattr(cpu_linear, "KERNEL_GAIN", math.inf)  # bfloat16 with oneDNN (the kernel: test_bf16_kernel.py)
    plain = two_linear_layers(dtype)
    packed = copy.deepcopy(plain)
    assert cpu_linear.prepack(packed) == 2
    x = torch.randn(3, 512, dtype=dtype)
    got, code = compiled_run(packed, x)
    assert sum(c.count("torch.ops.hfserve.packed_linear.default(") for c in code) == 2, code
    with torch.inference_mode():
        expected = plain(x)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, expected, atol=tolerance * expected.abs().max().item(), rtol=0)


def two_linear_layers(dtype: torch.dtype) -> torch.nn.Sequential:
    """Two 512 x 512 linear layers (one with a bias) around an activation, seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False), torch.nn.SiLU(), torch.nn.Linear(512, 512)).to(dtype).eval()


def compiled_run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """``model(x)`` compiled as backends/compiled.py compiles (freezing, one whole graph), with the
    generated code; fails on a graph break."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    counters.clear()
    compiled = torch.compile(model, fullgraph=True, options={"freezing": True})
    with torch.inference_mode():
        got, code = run_and_get_code(compiled, x)
    assert not counters["graph_break"]
    return got, code


@needs_bf16_kernels
def test_plain_weights_are_released_and_tied_ones_kept(medium_tied):
    model = _load(medium_tied, torch.bfloat16)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight is embedding
    cpu_linear.prepack(model)
    assert {name: tuple(p.shape) for name, p in model.named_parameters()} == shapes  # what others read stays
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.untyped_storage().nbytes() == q_proj.weight.element_size()  # released
    assert isinstance(model.lm_head, cpu_linear.PackedLinear)
    assert model.lm_head.weight is embedding and embedding.untyped_storage().nbytes() == embedding.numel() * 2
    with torch.inference_mode():  # the embedding still looks tokens up
        assert torch.equal(model.get_input_embeddings()(torch.tensor([3])), embedding[3:4])


def test_small_layers_are_left_alone(models):
    model = _load(models["llama"], torch.bfloat16)  # hidden 128: nothing to gain
    assert cpu_linear.prepack(model) == 0
    assert not any(isinstance(m, cpu_linear.PackedLinear) for m in model.modules())


async def _complete(backend, prompt_ids, max_tokens):
    ids: list[int] = []
    async for deltas in backend.generate(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), "r"):
        for delta in deltas:
            ids += delta.token_ids
    return ids


@pytest.mark.parametrize(("dtype", "float32_gain"), [("float32", math.inf), ("float32", 0.0), ("bfloat16", math.inf)])
def test_backend_packs_and_answers_as_generate(medium, dtype, float32_gain, caplog, monkeypatch):
    """Concurrent greedy requests on the transformers backend (packed) equal transformers' own
    ``generate`` of each prompt alone on the unpacked model (the independent reference). In
    bfloat16 on a CPU with hfserve's kernel, whose decode attention keeps the softmax and the
    weighted values in float32 where ``generate``'s SDPA rounds them to bfloat16, each token is
    instead the float32 model's choice or within bfloat16's rounding of it (as in
    tests/test_decode_attention.py). Asked for bfloat16 on a CPU that only emulates it, the
    backend says float32 is faster there."""
    monkeypatch.setattr(cpu_linear, "FLOAT32_GAIN", float32_gain)  # float32: packed never (inf) or always (0)
    backend = HuggingFaceBackend(dataclasses.replace(ModelConfig.local(medium), dtype=dtype), BatchingConfig())

    async def scenario():
        await backend.start()
        try:
            prompts = [backend.tokenizer(p)["input_ids"] for p in PROMPTS]
            if dtype == "bfloat16" and not cpu_linear.supported():
                # plain bfloat16 products emulated on this CPU round differently at each batch size
                # (a batch's greedy answer can part from a lone one's): one request at a time
                return prompts, [await _complete(backend, p, 12) for p in prompts]
            return prompts, await asyncio.gather(*(_complete(backend, p, 12) for p in prompts))
        finally:
            await backend.stop()

    with caplog.at_level("WARNING", logger="hfserve.backends.huggingface"):
        prompts, answers = asyncio.run(scenario())
    assert ("bfloat16 on a CPU without native bfloat16" in caplog.text) == (dtype == "bfloat16" and not cpu_linear.native_bfloat16())
    packed = any(isinstance(m, cpu_linear.PackedLinear) for m in backend.model.modules())
    assert packed == (cpu_linear.supported() if dtype == "bfloat16" else float32_gain == 0.0)  # else plain weights, same answers
    if dtype == "bfloat16" and bf16_kernel.available():
        reference = _load(medium, torch.float32)
        with torch.inference_mode():
            for prompt, answer in zip(prompts, answers):
                logits = reference(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                gaps = logprobs.max(dim=-1).values - logprobs[torch.arange(len(answer)), torch.tensor(answer)]
                assert len(answer) == 12 and gaps.max().item() <= 0.25, gaps
        return
    reference = _load(medium, getattr(torch, dtype))
    with torch.inference_mode():
        for prompt, answer in zip(prompts, answers):
            ids = torch.tensor([prompt])
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False)
            assert answer == out[0, len(prompt) :].tolist()


def test_a_cpu_without_bfloat16_kernels_keeps_plain_weights(medium, monkeypatch):
    """Where oneDNN cannot pack bfloat16 weights (an AVX2-only CPU: its reorder raises), the model
    loads with its plain weights instead of failing, and still computes."""

    def no_kernels(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", no_kernels)
    cpu_linear.supported.cache_clear()
    try:
        model = _load(medium, torch.bfloat16)
        assert cpu_linear.prepack(model) == 0
        assert not any(isinstance(m, cpu_linear.PackedLinear) for m in model.modules())
        with torch.inference_mode():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    finally:
        monkeypatch.undo()
        cpu_linear.supported.cache_clear()


def test_not_packed_with_lora(medium):
    """peft wraps the plain linear layers of a LoRA-enabled model: they stay as they are."""
    config = dataclasses.replace(ModelConfig.local(medium), dtype="bfloat16", lora=LoraConfig(enabled=True))
    backend = HuggingFaceBackend(config, BatchingConfig())
    asyncio.run(backend.start())
    try:
        assert not any(isinstance(m, cpu_linear.PackedLinear) for m in backend.model.modules())
    finally:
        asyncio.run(backend.stop())
