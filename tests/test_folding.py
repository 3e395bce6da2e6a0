"""Prompts folded into decode steps on the transformers backend (backends/mixed_step.py, issue 16).

A request that arrives while others decode does not get a prefill pass of its own: chunks of
its prompt ride in the running batch's decode steps. Each test compares what a request gets
when it joins that way with what it gets alone (and with transformers' own ``generate``), and
reads the backend's counters to see that the prompts were folded (``folded_prompts``) and not
prefilled (``prefills``).
"""

from __future__ import annotations

import asyncio
import logging
import shutil

import pytest
import torch
import transformers

from hfserve import errors
from hfserve.backends import mixed_step
from hfserve.backends.huggingface import HuggingFaceBackend
from hfserve.config import BatchingConfig, ModelConfig
from hfserve.generation import SamplingParams
from tests.test_batching import PROMPTS, collect, greedy, run, started_backend

LONG = "a much longer prompt with many words in it, so long that it cannot fit in one step beside the others, " * 2


@pytest.fixture(scope="module")
def backend(models):
    yield from started_backend(models["llama"])


@pytest.fixture(scope="module")
def gqa_backend(models, tmp_path_factory):
    """A random Llama whose attention has fewer key/value heads than query heads (grouped-query
    attention, as most current models), with the llama fixture's tokenizer."""
    path = tmp_path_factory.mktemp("gqa")
    source = models["llama"]
    config = transformers.AutoConfig.from_pretrained(source)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 64
    config.hidden_size = 256
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    yield from started_backend(path)


def ids(backend, text):
    return backend.tokenizer(text)["input_ids"]


async def joined(backend, running_prompt, requests):
    """Run ``requests`` ((prompt ids, params) pairs) while a long request is decoding; their results,
    and the counters' changes while they ran."""
    first = backend.generate(running_prompt, greedy(400), "running")
    await first.__anext__()  # it is decoding now
    before = dict(backend.stats)
    try:
        results = await asyncio.gather(*(collect(backend, p, params) for p, params in requests), return_exceptions=True)
    finally:
        await first.aclose()
    return results, {key: backend.stats.get(key, 0) - before.get(key, 0) for key in ("prefills", "folded_prompts")}


@pytest.mark.parametrize(
    ("rows", "waiting", "block", "most", "expected"),
    [
        (8, 17, 16, 256, 8),  # to the end of the rows' block
        (7, 17, 16, 256, 9),
        (8, 5, 16, 256, 5),  # all that waits fits
        (14, 17, 16, 256, 17),  # two left in the block: to the end of the next (18 places)
        (16, 17, 16, 256, 16),  # a full block of rows: one more block of prompt
        (16, 40, 16, 256, 32),  # more waiting: as much as ends at a block's end
        (8, 500, 16, 256, 248),  # a long prompt: most tokens, cut at a block's end
        (8, 500, 1, 2048, 500),  # no blocks (a GPU): everything, up to most
        (8, 5000, 1, 2048, 2048),
    ],
)
def test_a_step_takes_prompt_tokens_to_a_block_boundary(rows, waiting, block, most, expected):
    assert mixed_step.step_prompt_tokens(rows, waiting, block=block, most=most) == expected


def test_prompts_joining_a_running_batch_ride_in_its_decode_steps(backend):
    b = backend
    assert b.scheduler.fold_prompts and b.model.config._attn_implementation == mixed_step.ATTENTION
    prompts = [ids(b, p) for p in (*PROMPTS[1:], LONG)]
    assert len(prompts[-1]) > 2 * b.scheduler.token_block  # this one joins over several steps
    alone = [run(collect(b, p, greedy(12)))[0][0] for p in prompts]
    results, counted = run(joined(b, ids(b, PROMPTS[0]), [(p, greedy(12)) for p in prompts]))
    assert [r[0][0] for r in results] == alone
    assert counted == {"prefills": 0, "folded_prompts": len(prompts)}
    for p, got in zip(prompts, alone):
        with torch.inference_mode():
            ref = b.model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=b.tokenizer.pad_token_id)
        assert got == ref[0, len(p) :].tolist()


@pytest.mark.parametrize("block", [1, 3])
def test_a_prompt_in_small_chunks_gets_what_it_gets_alone(backend, gqa_backend, block):
    """One token (or a few) of the prompt per step: each chunk attends to the prompt's earlier chunks."""
    for b in (backend, gqa_backend):
        prompts = [ids(b, LONG), ids(b, PROMPTS[3])]
        alone = [run(collect(b, p, greedy(10)))[0][0] for p in prompts]
        b.scheduler.token_block, b.scheduler.most_prompt_tokens = block, block
        try:
            results, counted = run(joined(b, ids(b, PROMPTS[0]), [(p, greedy(10)) for p in prompts]))
        finally:
            b.scheduler.token_block, b.scheduler.most_prompt_tokens = 16, 256
        assert [r[0][0] for r in results] == alone
        assert counted == {"prefills": 0, "folded_prompts": 2}


def test_seeded_sampling_with_several_sequences_joins_as_alone(backend):
    b = backend
    prompt = ids(b, LONG)
    seeded = SamplingParams(max_tokens=15, temperature=1.0, top_p=0.9, top_k=40, seed=99, n=3, repetition_penalty=1.2, presence_penalty=0.3)
    alone = run(collect(b, prompt, seeded))
    results, counted = run(joined(b, ids(b, PROMPTS[0]), [(prompt, seeded), (ids(b, PROMPTS[2]), greedy(5))]))
    assert results[0] == alone
    assert counted["folded_prompts"] == 2


def test_a_bad_prompt_joining_fails_alone(backend, caplog):
    """A prompt the model cannot run (a token outside its vocabulary) makes the folded step fail:
    the step runs again without it, the prompts are prefilled apart, and only that request fails."""
    b = backend
    good = [ids(b, PROMPTS[1]), ids(b, LONG)]
    alone = [run(collect(b, p, greedy(8)))[0][0] for p in good]
    running = ids(b, PROMPTS[0])
    running_alone = run(collect(b, running, greedy(200)))[0][0]

    async def scenario():
        decoding = asyncio.Event()

        async def running_request():
            tokens = []
            async for deltas in b.generate(running, greedy(200), "running"):
                tokens += [t for d in deltas for t in d.token_ids]
                decoding.set()  # its first token came: it is decoding, the others join it
            return [tokens], None  # the shape of collect(): (token ids per sequence, text)

        first = asyncio.ensure_future(running_request())
        await decoding.wait()
        rest = await asyncio.gather(
            collect(b, good[0], greedy(8)), collect(b, [1, 10**7, 5], greedy(8), "bad"), collect(b, good[1], greedy(8)), return_exceptions=True
        )
        return await first, rest

    with caplog.at_level(logging.WARNING, logger="hfserve.backends.scheduler"):
        first, rest = run(scenario())
    assert first[0][0] == running_alone
    assert isinstance(rest[1], errors.InternalError)
    assert [rest[0][0][0], rest[2][0][0]] == alone
    assert "prompts in it failed" in caplog.text


def test_a_request_cancelled_while_joining_leaves_at_once(backend):
    b = backend
    b.scheduler.token_block, b.scheduler.most_prompt_tokens = 1, 1  # one prompt token per step: a long join
    other_prompt = ids(b, PROMPTS[2])
    other_alone = run(collect(b, other_prompt, greedy(20)))[0][0]
    try:

        async def scenario():
            first = b.generate(ids(b, PROMPTS[0]), greedy(400), "running")
            await first.__anext__()
            joining = asyncio.ensure_future(collect(b, ids(b, LONG), greedy(5), "leaving"))
            while not b.scheduler._joining:
                await asyncio.sleep(0.001)
            counted = b.scheduler.snapshot().running  # the joining request's row counts as running
            joining.cancel()
            other = await collect(b, other_prompt, greedy(20))
            left = not any(j.job.request_id == "leaving" for j in b.scheduler._joining) and "leaving" not in b.scheduler.running()
            await first.aclose()
            return counted, left, other

        counted, left, other = run(scenario())
    finally:
        b.scheduler.token_block, b.scheduler.most_prompt_tokens = 16, 256
    assert counted == 2
    assert left
    assert other[0][0] == other_alone


def test_a_joining_prompts_keys_and_values_count_in_the_kv_cache_usage(backend, monkeypatch):
    """While a prompt joins chunk by chunk, the positions it already holds count in the KV-cache
    usage (vllm:kv_cache_usage_perc) beside the running rows'."""
    b = backend
    seen = []  # (snapshot's positions, the running rows' positions, the joining prompts' positions)
    forward = b.scheduler._forward_mixed

    def observed(cohort, feed):  # on the decode thread, between steps: nothing moves meanwhile
        rows = sum(int(c.mask.shape[1]) * len(c.rows) for c in b.scheduler._cohorts)
        seen.append((b.scheduler.snapshot().kv_positions, rows, sum(j.done for j in b.scheduler._joining)))
        return forward(cohort, feed)

    monkeypatch.setattr(b.scheduler, "_forward_mixed", observed)
    monkeypatch.setattr(b.scheduler, "token_block", 1)
    monkeypatch.setattr(b.scheduler, "most_prompt_tokens", 4)
    run(joined(b, ids(b, PROMPTS[0]), [(ids(b, LONG), greedy(2))]))
    partial = [(total, rows, done) for total, rows, done in seen if done]
    assert partial, "the prompt never stood half-joined"
    assert all(total == rows + done for total, rows, done in partial)


def test_prompt_logprobs_are_prefilled_apart(backend):
    """Prompt log-probabilities need every position's logits: such a request gets its own prefill."""
    b = backend
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=1, prompt_logprobs=2)
    prompt = ids(b, PROMPTS[3])

    async def one():
        return [d for deltas in [x async for x in b.generate(prompt, params, "lp")] for d in deltas]

    alone = run(one())

    async def scenario():
        first = b.generate(ids(b, PROMPTS[0]), greedy(400), "running")
        await first.__anext__()
        before = b.stats["prefills"]
        got = await one()
        await first.aclose()
        return got, b.stats["prefills"] - before

    got, prefills = run(scenario())
    assert prefills == 1
    flat = lambda ds: [(d.token_ids, [(x.token_id, round(x.logprob, 4)) for x in d.logprobs]) for d in ds]  # noqa: E731
    assert flat(got) == flat(alone)
    assert [None if e is None else e.token_id for e in got[0].prompt_logprobs] == [None if e is None else e.token_id for e in alone[0].prompt_logprobs]


def test_models_that_cannot_fold_are_left_as_they_are(models):
    t5 = HuggingFaceBackend(ModelConfig.local(models["t5"]), BatchingConfig())
    run(t5.start())
    try:
        assert not t5.scheduler.fold_prompts  # encoder-decoder
        assert t5.model.config._attn_implementation != mixed_step.ATTENTION
    finally:
        run(t5.stop())
    eager = transformers.AutoModelForCausalLM.from_pretrained(models["llama"], attn_implementation="eager")
    assert not mixed_step.enable(eager)  # its own attention, not SDPA's
    assert eager.config._attn_implementation == "eager"
