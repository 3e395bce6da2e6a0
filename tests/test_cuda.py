"""The transformers backend on a CUDA GPU (skipped where there is none, as in CI).

Runs the backend in-process (no server), so it needs only torch and transformers: batched greedy
decoding must give exactly `model.generate`'s tokens on the GPU in float32, `--dtype auto` must
pick half precision there, and encoder batching must work on the device.
"""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["The cat sat on", "Once upon a time", "hello", "a b c d e f g h"]


async def _collect(backend, prompt_ids, params):
    tokens: list[int] = []
    finish = None
    async for deltas in backend.generate(prompt_ids, params, "cuda-test"):
        for d in deltas:
            tokens.extend(d.token_ids)
            finish = d.finish_reason or finish
    return tokens, finish


def _backend(path, dtype="auto"):
    from hfserve.backends.huggingface import HuggingFaceBackend
    from hfserve.config import BatchingConfig, ModelConfig

    backend = HuggingFaceBackend(ModelConfig.local(path, dtype=dtype), BatchingConfig(), device="cuda")
    asyncio.run(backend.start())
    return backend


def test_batched_greedy_on_cuda_matches_generate(models):
    from hfserve.generation import SamplingParams

    backend = _backend(models["llama"], dtype="float32")
    try:
        assert next(backend.model.parameters()).device.type == "cuda"
        tok, model = backend.tokenizer, backend.model
        prompts = [tok(p)["input_ids"] for p in PROMPTS]

        async def run_all():
            params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
            return await asyncio.gather(*(_collect(backend, ids, params) for ids in prompts))

        results = asyncio.run(run_all())
        with torch.inference_mode():
            for ids, (tokens, finish) in zip(prompts, results):
                ref = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=16, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=None)
                assert tokens == ref[0, len(ids):].tolist()
                assert finish == "length"
    finally:
        asyncio.run(backend.stop())


def test_auto_dtype_is_half_on_gpu_and_sampling_runs(models):
    from hfserve.generation import SamplingParams

    backend = _backend(models["llama"])
    try:
        assert next(backend.model.parameters()).dtype in (torch.float16, torch.bfloat16)
        ids = backend.tokenizer("hello")["input_ids"]
        tokens, finish = asyncio.run(_collect(backend, ids, SamplingParams(max_tokens=8, temperature=0.8, seed=3, n=2,
                                                                           logprobs=2, ignore_eos=True)))
        assert len(tokens) == 16 and finish == "length"
    finally:
        asyncio.run(backend.stop())


def test_encoder_batching_on_cuda(models):
    backend = _backend(models["bert_cls"], dtype="float32")
    try:
        tok = backend.tokenizer
        inputs = [tok(t)["input_ids"] for t in ["a good movie", "the cat sat on the mat", "x"]]

        async def both():
            merged = await asyncio.gather(*(backend.classify([ids]) for ids in inputs))
            alone = [await backend.classify([ids]) for ids in inputs]
            return merged, alone

        merged, alone = asyncio.run(both())
        for a, b in zip(merged, alone):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    finally:
        asyncio.run(backend.stop())
