"""vLLM engine flags honoured by the transformers backend (issue 12 part 2): ``max_num_seqs``,
``max_logprobs``, ``seed`` and ``tokenizer``, observed on a backend in this process."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from hfserve import errors
from hfserve.backends import create_backend
from hfserve.backends.huggingface import HONOURED_ENGINE_ARGS, HuggingFaceBackend
from hfserve.config import BatchingConfig, Config, EngineConfig, ModelConfig
from hfserve.generation import SamplingParams
from hfserve.sampling import SamplingOptions, build_params


def run(coro):
    return asyncio.run(coro)


async def collect(backend, prompt_ids, params, request_id="r"):
    ids: list[int] = []
    async for deltas in backend.generate(prompt_ids, params, request_id):
        for d in deltas:
            ids += d.token_ids
    return ids


def started(model_dir, **engine_args):
    b = HuggingFaceBackend(
        ModelConfig.local(model_dir),
        BatchingConfig(max_batch_size=32, max_batch_wait_ms=50),
        engine=EngineConfig(backend="huggingface", engine_args=engine_args),
    )
    run(b.start())
    return b


@pytest.fixture(scope="module")
def flagged(models):
    b = started(models["llama"], max_num_seqs=2, max_logprobs=3, seed=1234)
    yield b
    run(b.stop())


def test_create_backend_passes_the_engine_section(models):
    config = Config(
        model=ModelConfig.local(models["llama"]),
        engine=EngineConfig(backend="huggingface", engine_args={"max_num_seqs": 3, "seed": 7}),
    )
    backend = create_backend(config)
    assert isinstance(backend, HuggingFaceBackend)
    assert backend.max_num_seqs == 3 and backend.default_seed == 7
    assert set(HONOURED_ENGINE_ARGS) == {"max_num_seqs", "max_logprobs", "seed", "tokenizer"}


def test_max_logprobs_refuses_above_the_limit(flagged):
    assert flagged.capabilities.max_logprobs == 3
    opts = SamplingOptions()
    common = dict(prompt_tokens=3, max_model_len=64, capabilities=flagged.capabilities, default_max_tokens=4)
    build_params(opts, logprobs=3, **common)  # at the limit: fine
    with pytest.raises(errors.InvalidRequest) as info:
        build_params(opts, logprobs=4, **common)
    assert "limit of 3" in str(info.value) and info.value.param == "logprobs"


def test_max_num_seqs_limits_the_decoding_rows(flagged):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    async def many():
        return await asyncio.gather(*(collect(flagged, [1, 5 + i, 9], params, f"r{i}") for i in range(6)))

    flagged.stats["max_rows"] = 0
    results = run(many())
    assert all(len(r) == 6 for r in results)
    assert flagged.stats["max_rows"] == 2
    assert flagged.scheduler.max_batch_size == 2 and flagged.max_batch_size == 32  # encoders keep theirs


def test_seed_makes_unseeded_requests_repeat(flagged):
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    first = run(collect(flagged, [1, 5, 9], params))
    second = run(collect(flagged, [1, 5, 9], params))
    assert first == second
    seeded = run(collect(flagged, [1, 5, 9], SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True, seed=1234)))
    assert seeded == first  # the unseeded request sampled as if it had sent seed 1234
    assert params.seed is None  # the request's own params are not changed


def test_without_seed_unseeded_requests_differ(models):
    b = started(models["llama"])
    try:
        params = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)
        outs = {tuple(run(collect(b, [1, 5, 9], params))) for _ in range(3)}
        assert len(outs) > 1
        assert b.capabilities.max_logprobs == 20 and b.max_num_seqs == 32
    finally:
        run(b.stop())


def test_tokenizer_path_is_used(models, tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    src = models["llama"]
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tok_dir / f.name)
    b = HuggingFaceBackend(ModelConfig.local(src), BatchingConfig(), engine=EngineConfig(engine_args={"tokenizer": str(tok_dir)}))
    assert b.tokenizer_path == str(tok_dir)
    run(b.start())
    try:
        assert b.tokenizer.name_or_path == str(tok_dir)
    finally:
        run(b.stop())


def test_a_missing_tokenizer_path_fails_to_load(models, tmp_path):
    from hfserve.backends.huggingface import BackendLoadError

    missing = tmp_path / "nowhere"
    missing.mkdir()
    b = HuggingFaceBackend(ModelConfig.local(models["llama"]), engine=EngineConfig(engine_args={"tokenizer": str(missing)}))
    with pytest.raises(BackendLoadError, match="tokenizer"):
        run(b.start())
    run(b.stop())
