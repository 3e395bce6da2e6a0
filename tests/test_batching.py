"""Batching on the transformers backend (issue 5).

Most tests run the backend in this process, so that merging is observed
honestly through the backend's own counters (``backend.stats``: encoder forward
passes, decode steps and the largest batch; ``backend.batcher.stats``), and the
results are compared with the same requests run one at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest
import torch

from hfserve import errors
from hfserve.backends.batching import BatchWindow, MicroBatcher
from hfserve.backends.huggingface import HuggingFaceBackend
from hfserve.config import BatchingConfig, ModelConfig
from hfserve.generation import SamplingParams, coalesce

SENTENCES = [f"sentence number {i} is " + "quite " * (i % 7) + "short" for i in range(24)]
PROMPTS = ["The cat sat on", "Once upon a time", "hello", "a much longer prompt with many words in it, to pad the others"]


def run(coro):
    return asyncio.run(coro)


async def collect(backend, prompt_ids, params, request_id="r", **scheduler_options):
    """All deltas of one request: (token ids per sequence, text per sequence).

    With ``scheduler_options`` (logits ``processors``, an ``adapter`` key) the request goes to
    the backend's scheduler directly, whose errors are not translated."""
    ids = {i: [] for i in range(params.n)}
    text = {i: "" for i in range(params.n)}
    if scheduler_options:
        stream = backend.scheduler.generate(prompt_ids, params, request_id, **scheduler_options)
    else:
        stream = backend.generate(prompt_ids, params, request_id)
    async for deltas in stream:
        for d in deltas:
            ids[d.index] += d.token_ids
            text[d.index] += d.text
    return [ids[i] for i in range(params.n)], [text[i] for i in range(params.n)]


def greedy(max_tokens=16):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def started_backend(model_dir):
    """A loaded backend in this process (a 50 ms batch window, so concurrent test calls always meet)."""
    b = HuggingFaceBackend(ModelConfig.local(model_dir), BatchingConfig(max_batch_size=32, max_batch_wait_ms=50))
    run(b.start())
    yield b
    run(b.stop())


@pytest.fixture(scope="module")
def minilm_backend(models):
    yield from started_backend(models["minilm"])


@pytest.fixture(scope="module")
def llama_backend(models):
    yield from started_backend(models["llama"])


@pytest.fixture(scope="module")
def t5_backend(models):
    yield from started_backend(models["t5"])


# ------------------------------------------------------------------ encoders
def test_concurrent_embeddings_are_merged_and_equal_sequential(minilm_backend):
    b = minilm_backend
    ids = [b.tokenizer(s)["input_ids"] for s in SENTENCES]
    sequential = [run(b.embed([x]))[0] for x in ids]
    before = b.stats["encoder_forwards"]

    async def concurrent():
        return await asyncio.gather(*(b.embed([x]) for x in ids))

    merged = [r[0] for r in run(concurrent())]
    forwards = b.stats["encoder_forwards"] - before
    assert forwards < len(ids) / 4, f"{len(ids)} concurrent requests took {forwards} forward passes"
    assert b.batcher.stats.largest > 1
    assert np.allclose(np.array(merged), np.array(sequential), atol=1e-5)


def test_every_encoder_batch_runs_on_one_thread(minilm_backend, monkeypatch):
    """Consecutive batches, one after another and several at once, all run on the same thread:
    a second thread that ran one would keep a second OpenMP team alive (cpu_threads), and on a
    pool of threads the next batch often lands on another one while the last is still
    returning (the loop hears of the result before the worker is idle again)."""
    b = minilm_backend
    ids = [b.tokenizer(s)["input_ids"] for s in SENTENCES]
    where: list[int] = []
    run_batch = b.encoders.run

    def recording(*args):
        where.append(threading.get_ident())
        return run_batch(*args)

    monkeypatch.setattr(b.encoders, "run", recording)

    async def batches():
        for _ in range(20):
            await b.embed(ids[:2])
        for _ in range(5):
            await asyncio.gather(*(b.embed([x]) for x in ids))

    run(batches())
    assert len(where) >= 25
    assert len(set(where)) == 1, f"{len(where)} encoder batches ran on {len(set(where))} threads"
    assert where[0] != threading.get_ident()  # not on the event loop's


def test_batch_never_exceeds_max_batch_size(models):
    b = HuggingFaceBackend(ModelConfig.local(models["minilm"]), BatchingConfig(max_batch_size=4, max_batch_wait_ms=50))
    run(b.start())
    try:
        ids = [b.tokenizer(s)["input_ids"] for s in SENTENCES[:12]]

        async def concurrent():
            return await asyncio.gather(*(b.embed([x]) for x in ids))

        out = run(concurrent())
        assert len(out) == 12
        assert b.batcher.stats.largest == 4
        assert b.stats["encoder_forwards"] == 3
    finally:
        run(b.stop())


def test_a_bad_encoder_request_fails_alone(minilm_backend):
    b = minilm_backend
    good = [b.tokenizer(s)["input_ids"] for s in SENTENCES[:5]]
    alone = [run(b.embed([x]))[0] for x in good]
    bad = [101, 10**7, 102]  # outside the vocabulary: the merged forward raises
    fallbacks = b.batcher.stats.fallbacks

    async def concurrent():
        tasks = [b.embed([x]) for x in good[:2]] + [b.embed([bad])] + [b.embed([x]) for x in good[2:]]
        return await asyncio.gather(*tasks, return_exceptions=True)

    out = run(concurrent())
    assert isinstance(out[2], errors.InternalError)
    results = [r[0] for i, r in enumerate(out) if i != 2]
    assert np.allclose(np.array(results), np.array(alone), atol=1e-5)
    assert b.batcher.stats.fallbacks == fallbacks + 1


def test_an_encoder_model_gets_no_generation_scheduler(minilm_backend):
    async def attempt():
        async for _ in minilm_backend.generate([101, 102], greedy(2), "r"):
            pass

    assert minilm_backend.scheduler is None
    with pytest.raises(errors.UnsupportedTask):
        run(attempt())


def test_concurrent_embeddings_over_http(minilm):
    client = openai.OpenAI(base_url=minilm.openai_url, api_key="x", max_retries=0)
    one = [client.embeddings.create(model="minilm", input=s).data[0].embedding for s in SENTENCES[:8]]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        many = list(pool.map(lambda s: client.embeddings.create(model="minilm", input=s).data[0].embedding, SENTENCES[:8]))
    assert np.allclose(np.array(many), np.array(one), atol=1e-5)


# ----------------------------------------------------------------- generation
def test_concurrent_greedy_equals_sequential_and_generate(llama_backend):
    b = llama_backend
    prompts = [b.tokenizer(p)["input_ids"] for p in PROMPTS]
    sequential = [run(collect(b, p, greedy()))[0][0] for p in prompts]
    steps, prefills = b.stats["decode_steps"], b.stats["prefills"]
    b.stats["max_rows"] = 0
    b.scheduler._last_group = 0  # after lone requests a new one starts at once; this burst is to wait for its peers

    async def concurrent():
        return await asyncio.gather(*(collect(b, p, greedy()) for p in prompts))

    batched = [r[0][0] for r in run(concurrent())]
    assert batched == sequential
    # the four requests shared forward passes: 15 decode steps each, not 60 in all,
    # and their prompts (of different lengths) went through one left-padded prefill
    assert b.stats["decode_steps"] - steps < 2 * 15
    assert b.stats["prefills"] - prefills == 1
    assert b.stats["max_rows"] == len(prompts)
    assert [len(got) for got in sequential] == [16] * len(prompts)
    for p, got in zip(prompts, sequential):
        with torch.inference_mode():
            ref = b.model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=b.tokenizer.pad_token_id)
        assert got == ref[0, len(p) :].tolist()


def test_requests_join_a_running_batch(llama_backend):
    """A request that arrives while others decode joins their batch (continuous batching)."""
    b = llama_backend
    p_long, p_late = (b.tokenizer(p)["input_ids"] for p in PROMPTS[:2])
    alone = run(collect(b, p_late, greedy(8)))[0][0]

    async def staggered():
        first = b.generate(p_long, greedy(200), "first")
        await first.__anext__()  # it is decoding now
        steps = b.stats["decode_steps"]
        late = await collect(b, p_late, greedy(8))
        shared = b.stats["decode_steps"] - steps
        overlapped = "first" in b.scheduler.running()
        await first.aclose()
        return late, shared, overlapped

    late, shared, overlapped = run(staggered())
    assert late[0][0] == alone
    assert overlapped, "the first request was no longer running when the late one finished"
    assert shared < 12, "the late request ran its own decode steps instead of joining the batch"


def test_seeded_sample_same_alone_and_batched(llama_backend):
    b = llama_backend
    prompts = [b.tokenizer(p)["input_ids"] for p in PROMPTS]
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=1234, n=2, repetition_penalty=1.1)
    alone = run(collect(b, prompts[1], seeded))

    async def with_others():
        others = [
            collect(b, prompts[0], SamplingParams(max_tokens=25, temperature=0.8)),
            collect(b, prompts[2], greedy(30)),
            collect(b, prompts[3], SamplingParams(max_tokens=10, temperature=1.3, n=3, presence_penalty=0.5)),
        ]
        return await asyncio.gather(others[0], collect(b, prompts[1], seeded), *others[1:])

    together = run(with_others())
    assert together[1] == alone
    again = run(collect(b, prompts[1], SamplingParams(**{**seeded.__dict__, "seed": 99})))
    assert again != alone


def test_a_bad_generation_request_fails_alone(llama_backend):
    b = llama_backend
    prompts = [b.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    alone = [run(collect(b, p, greedy(10)))[0][0] for p in prompts]

    async def mixed():
        return await asyncio.gather(
            collect(b, prompts[0], greedy(10)),
            collect(b, [1, 10**7, 5], greedy(10), "bad"),  # outside the vocabulary
            collect(b, prompts[1], greedy(10)),
            collect(b, prompts[2], greedy(10)),
            return_exceptions=True,
        )

    out = run(mixed())
    assert isinstance(out[1], errors.InternalError)
    assert [out[0][0][0], out[2][0][0], out[3][0][0]] == alone


def poison(scheduler):
    """Make a decode step fail whenever the request "poison" is in it, after two steps."""
    forward_step = scheduler._forward_step

    def poisoned(cohort, feed):
        if any(row.job.request_id == "poison" and row.job.step >= 2 for row in cohort.rows):
            raise RuntimeError("injected decode failure")
        return forward_step(cohort, feed)

    scheduler._forward_step = poisoned


def test_a_failing_decode_step_fails_only_its_request(models):
    b = HuggingFaceBackend(ModelConfig.local(models["llama"]), BatchingConfig(max_batch_wait_ms=50))
    run(b.start())
    poison(b.scheduler)
    try:
        prompts = [b.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
        alone = [run(collect(b, p, greedy(12)))[0][0] for p in prompts]

        async def mixed():
            return await asyncio.gather(
                collect(b, prompts[0], greedy(12)),
                collect(b, prompts[1], greedy(12), "poison"),
                collect(b, prompts[2], greedy(12)),
                return_exceptions=True,
            )

        out = run(mixed())
        assert isinstance(out[1], errors.InternalError)
        assert [out[0][0][0], out[2][0][0]] == [alone[0], alone[2]]
    finally:
        run(b.stop())


def test_cancelled_stream_frees_its_row(llama_backend):
    b = llama_backend
    prompts = [b.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    alone = [run(collect(b, p, greedy(40)))[0][0] for p in prompts[1:]]

    async def scenario():
        stream = b.generate(prompts[0], greedy(200), "cancel-me")
        others = [asyncio.ensure_future(collect(b, p, greedy(40))) for p in prompts[1:]]
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        running = "cancel-me" in b.scheduler.running()
        await stream.aclose()
        # the row is gone from the running batch at the next step
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and "cancel-me" in b.scheduler.running():
            await asyncio.sleep(0.01)
        freed = "cancel-me" not in b.scheduler.running()
        return running, freed, [(await o)[0][0] for o in others]

    running, freed, results = run(scenario())
    assert running and freed
    assert results == alone


def test_n_rows_and_logprobs_in_a_batch(llama_backend):
    b = llama_backend
    prompts = [b.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    params = SamplingParams(max_tokens=6, temperature=0.0, n=2, logprobs=2, prompt_logprobs=1)

    async def one():
        out = []
        async for deltas in b.generate(prompts[0], params, "lp"):
            out.append(deltas)
        return out

    alone = run(one())

    async def together():
        return (await asyncio.gather(one(), collect(b, prompts[1], greedy(20))))[0]

    batched = run(together())
    assert len(batched[0][0].prompt_logprobs) == len(prompts[0])
    flat = lambda steps: [(d.index, d.token_ids, [(x.token_id, round(x.logprob, 4)) for x in d.logprobs]) for s in steps for d in s]  # noqa: E731
    assert sum(len(token_ids) for _, token_ids, _ in flat(alone)) == 2 * 6  # n=2, 6 tokens each
    assert all(len(entries) == len(token_ids) for _, token_ids, entries in flat(alone))
    assert flat(batched) == flat(alone)


def test_a_result_read_whole_comes_in_one_piece(llama_backend):
    """A request whose result is not streamed (``whole``) gets its deltas in one hand-over when it
    ends, with what the streamed request gets step by step: text, tokens, log-probabilities, finish."""
    b = llama_backend
    prompt = b.tokenizer(PROMPTS[1])["input_ids"]
    params = SamplingParams(max_tokens=9, temperature=1.0, seed=5, n=2, logprobs=2, prompt_logprobs=1, stop=["zz"])

    async def pieces(p):
        return [deltas async for deltas in b.generate(prompt, p, "whole")]

    streamed = run(pieces(params))
    whole = run(pieces(SamplingParams(**{**params.__dict__, "whole": True})))
    assert len(streamed) > 1 and len(whole) == 1
    flat = lambda ds: {  # noqa: E731
        d.index: (d.text, d.token_ids, [(x.token_id, round(x.logprob, 4)) for x in d.logprobs], d.finish_reason)
        for d in coalesce([d for deltas in ds for d in deltas])
    }
    assert flat(whole) == flat(streamed)
    assert len(whole[0][0].prompt_logprobs) == len(prompt)


def test_a_logits_processor_runs_on_its_request_rows_only(llama_backend):
    """A request's logits processors see each row's generated tokens and its logits before
    sampling; a greedy request with one leaves the shared argmax, its batch-mate keeps it."""
    b = llama_backend
    prompt, other = (b.tokenizer(p)["input_ids"] for p in PROMPTS[:2])
    plain = run(collect(b, prompt, greedy(4)))[0][0]
    other_alone = run(collect(b, other, greedy(4)))[0][0]
    with torch.inference_mode():
        runner_up = int(torch.topk(b.model(torch.tensor([prompt])).logits[0, -1], 2).indices[1])
    histories = []

    def ban_the_first_choice(history, logits):
        histories.append(list(history))
        return logits.index_fill(0, torch.tensor([plain[0]]), float("-inf")) if not history else logits

    async def together():
        return await asyncio.gather(
            collect(b, prompt, greedy(4), processors=[ban_the_first_choice]), collect(b, other, greedy(4))
        )

    banned, other_batched = (r[0][0] for r in run(together()))
    assert banned[0] == runner_up != plain[0]
    assert histories == [banned[:i] for i in range(4)]
    assert other_batched == other_alone


def test_rows_with_different_adapters_share_forward_passes(llama_backend):
    """Every forward pass gets each row's adapter key (the seam for per-row LoRA weights);
    no adapter is implemented yet, so a request naming one fails alone."""
    b = llama_backend
    prompts = [b.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    alone = [run(collect(b, p, greedy(6)))[0][0] for p in prompts]
    run_model = b.scheduler._run_model
    calls = []

    def base_weights_for_every_adapter(adapters, **inputs):
        calls.append(list(adapters))
        return run_model([None] * len(adapters), **inputs)

    async def base_and_adapter():
        return await asyncio.gather(
            collect(b, prompts[0], greedy(6)), collect(b, prompts[1], greedy(6), adapter="a"), return_exceptions=True
        )

    b.scheduler._run_model = base_weights_for_every_adapter
    try:
        shared = run(base_and_adapter())
    finally:
        del b.scheduler._run_model
    assert [r[0][0] for r in shared] == alone
    assert calls.count([None, "a"]) == 6  # the shared prefill and 5 decode steps, both rows in each
    refused = run(base_and_adapter())
    assert refused[0][0][0] == alone[0]
    assert isinstance(refused[1], NotImplementedError)


def test_t5_concurrent_greedy_equals_sequential(t5_backend):
    b = t5_backend
    prompts = [b.tokenizer(p)["input_ids"] for p in ["translate the cat sat on the mat", "hello", "a longer input with more words"]]
    sequential = [run(collect(b, p, greedy(10)))[0][0] for p in prompts]
    steps = b.stats["decode_steps"]

    async def concurrent():
        return await asyncio.gather(*(collect(b, p, greedy(10)) for p in prompts))

    assert [r[0][0] for r in run(concurrent())] == sequential
    assert b.stats["decode_steps"] - steps < 2 * 10
    for p, got in zip(prompts, sequential):
        with torch.inference_mode():
            ref = b.model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, 1:].tolist()
        assert len(got) == 10 and got == ref


def test_concurrent_completions_over_http_equal_sequential(llama):
    client = openai.OpenAI(base_url=llama.openai_url, api_key="x", max_retries=0)

    def complete(prompt):
        return client.completions.create(model="llama", prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    sequential = [complete(p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(complete, PROMPTS)) == sequential


# --------------------------------------------------------------- batch window
def windowed(max_wait_ms, idle_ms):
    """A MicroBatcher whose forward pass records its batch sizes and echoes its inputs."""
    sizes = []

    def forward(kind, inputs, option):
        sizes.append(len(inputs))
        return list(inputs)

    pool = concurrent.futures.ThreadPoolExecutor(1)
    return MicroBatcher(forward, pool, window=BatchWindow.from_ms(max_wait_ms, idle_ms)), sizes


async def arrivals(batcher, count, gap_s):
    """``count`` requests, one every ``gap_s`` seconds; their results in order."""
    tasks = []
    for i in range(count):
        tasks.append(asyncio.ensure_future(batcher.submit("embed", [[i]])))
        await asyncio.sleep(gap_s)
    return await asyncio.gather(*tasks)


async def together(batcher, *values):
    """Submit one request per value at once; the seconds until all are answered."""
    started = time.monotonic()
    await asyncio.gather(*(batcher.submit("embed", [[v]]) for v in values))
    return time.monotonic() - started


def test_a_lone_request_waits_the_idle_time_not_the_window():
    batcher, sizes = windowed(max_wait_ms=10_000, idle_ms=30)
    started = time.monotonic()
    assert run(batcher.submit("embed", [[7]])) == [[7]]
    assert time.monotonic() - started < 5, "waited for the 10 s window instead of closing after 30 ms idle"
    assert sizes == [1]


def test_after_a_batch_of_one_a_lone_request_starts_at_once():
    """Concurrency 1: the client's next call finds the batcher idle after a batch of one and does
    not wait the idle time; once a batch had company, a lone request waits for company again."""
    batcher, sizes = windowed(max_wait_ms=10_000, idle_ms=1500)

    async def scenario():
        first = await together(batcher, 1)  # nothing before it: waits for company
        second = await together(batcher, 2)  # after a batch of one: at once
        pair = await together(batcher, 3, 4)  # a batch of two (both arrive within the idle time)
        after_pair = await together(batcher, 5)  # company expected again: waits
        return first, second, pair, after_pair

    first, second, _, after_pair = run(scenario())
    assert sizes == [1, 1, 2, 1]
    assert first >= 1.4 and after_pair >= 1.4, "a lone request after a batch with company waits the idle time"
    assert second < 1.0, "a lone request after a batch of one waited the idle time"


def test_a_batch_closes_once_as_many_requests_as_the_last_one_have_joined():
    """Concurrency 4: the four clients answered together call again; once all four are back the
    batch closes without waiting the idle time. Three of them back (one client gone) still wait it;
    the next three, after that batch of three, do not."""
    batcher, sizes = windowed(max_wait_ms=10_000, idle_ms=1500)

    async def scenario():
        return [await together(batcher, *group) for group in ((1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11), (12, 13, 14))]

    first, again, fewer, same_as_fewer = run(scenario())
    assert sizes == [4, 4, 3, 3]
    assert first >= 1.4, "the first batch did not wait for company"
    assert again < 1.0, "four requests after a batch of four waited the idle time"
    assert fewer >= 1.4, "three requests after a batch of four did not wait for the fourth"
    assert same_as_fewer < 1.0, "three requests after a batch of three waited the idle time"


def test_a_batch_that_closes_early_takes_every_request_waiting():
    """Six requests at once after a batch of two: the batch closes when the second arrives, and it
    takes the four beyond (all of them there by then), so batches grow with the load."""
    batcher, sizes = windowed(max_wait_ms=10_000, idle_ms=1500)

    async def scenario():
        await asyncio.gather(*(batcher.submit("embed", [[v]]) for v in (1, 2)))
        started = time.monotonic()
        results = await asyncio.gather(*(batcher.submit("embed", [[v]]) for v in range(3, 9)))
        return results, time.monotonic() - started

    results, took = run(scenario())
    assert results == [[[v]] for v in range(3, 9)]
    assert sizes == [2, 6]
    assert took < 1.0


def test_an_idle_time_of_the_whole_window_always_waits_it_out():
    """--batch_idle_ms equal to --max_batch_wait_ms asks for full windows: a batch that has regained
    the previous batch's size still waits."""
    batcher, sizes = windowed(max_wait_ms=1200, idle_ms=1200)

    async def scenario():
        await together(batcher, 1, 2)
        return await together(batcher, 3, 4)

    assert run(scenario()) >= 1.1
    assert sizes == [2, 2]


def test_requests_that_keep_coming_keep_the_batch_open():
    """Twelve arrivals 50 ms apart span 550 ms, longer than the 400 ms idle time, yet each
    comes within it of the one before: one batch."""
    batcher, sizes = windowed(max_wait_ms=10_000, idle_ms=400)
    assert run(arrivals(batcher, 12, 0.05)) == [[[i]] for i in range(12)]
    assert sizes == [12]


def test_the_window_caps_a_batch_that_keeps_growing():
    batcher, sizes = windowed(max_wait_ms=200, idle_ms=10_000)
    assert run(arrivals(batcher, 12, 0.05)) == [[[i]] for i in range(12)]
    assert len(sizes) >= 2 and sum(sizes) == 12


def test_requests_queued_behind_a_batch_wait_for_newcomers():
    """B queues while A's forward runs (600 ms, longer than the 250 ms idle time). When A is
    answered its client calls again (C) 50 ms later: C joins B (the window opens when B could
    start, not when B arrived; else B would have left alone the moment A was done)."""
    sizes = []

    def forward(kind, inputs, option):
        sizes.append(len(inputs))
        time.sleep(0.6)
        return list(inputs)

    pool = concurrent.futures.ThreadPoolExecutor(1)
    batcher = MicroBatcher(forward, pool, window=BatchWindow.from_ms(10_000, 250))

    async def scenario():
        a = asyncio.ensure_future(batcher.submit("embed", [["a"]]))
        while not sizes:  # A's batch has started (after its 250 ms of idle waiting)
            await asyncio.sleep(0.01)
        b = asyncio.ensure_future(batcher.submit("embed", [["b"]]))
        await a
        await asyncio.sleep(0.05)
        c = asyncio.ensure_future(batcher.submit("embed", [["c"]]))
        return await asyncio.gather(b, c)

    assert run(scenario()) == [[["b"]], [["c"]]]
    assert sizes == [1, 2]


def test_a_lone_generation_request_waits_the_idle_time_not_the_window(models):
    b = HuggingFaceBackend(ModelConfig.local(models["llama"]), BatchingConfig(max_batch_wait_ms=10_000, batch_idle_ms=30))
    run(b.start())
    try:
        started = time.monotonic()
        ids, _ = run(collect(b, [5, 6, 7], greedy(2)))
        assert len(ids[0]) == 2
        assert time.monotonic() - started < 5, "waited for the 10 s window instead of closing after 30 ms idle"
    finally:
        run(b.stop())


def test_a_lone_generation_request_after_a_lone_one_starts_at_once(models):
    b = HuggingFaceBackend(ModelConfig.local(models["llama"]), BatchingConfig(max_batch_wait_ms=10_000, batch_idle_ms=1500))
    run(b.start())
    try:
        times = []
        for _ in range(2):
            started = time.monotonic()
            ids, _ = run(collect(b, [5, 6, 7], greedy(2)))
            times.append(time.monotonic() - started)
            assert len(ids[0]) == 2
        assert times[0] >= 1.4, "the first request did not wait for company"
        assert times[1] < 1.0, "a lone request after a lone one waited the idle time"
    finally:
        run(b.stop())


def test_a_generation_batch_closes_once_as_many_requests_as_the_last_one_have_come(models):
    b = HuggingFaceBackend(ModelConfig.local(models["llama"]), BatchingConfig(max_batch_wait_ms=10_000, batch_idle_ms=1500))
    run(b.start())
    try:

        async def group(size):
            started = time.monotonic()
            done = await asyncio.gather(*(collect(b, [5, 6, 7 + i], greedy(2)) for i in range(size)))
            assert all(len(ids[0]) == 2 for ids, _ in done)
            return time.monotonic() - started

        async def scenario():
            return [await group(n) for n in (3, 3, 2)]

        first, again, fewer = run(scenario())
        assert first >= 1.4, "the first requests did not wait for company"
        assert again < 1.0, "three requests after three admitted together waited the idle time"
        assert fewer >= 1.4, "two requests after three admitted together did not wait for the third"
    finally:
        run(b.stop())


# ------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--max_batch_size", "0", "must be positive"),
        ("--max_batch_wait_ms", "-1", "zero or positive"),
        ("--batch_idle_ms", "-1", "zero or positive"),
    ],
)
def test_batch_flags_are_validated(models, flag, value, words):
    proc = subprocess.run(
        [sys.executable, "-m", "hfserve", "--model_dir", str(models["minilm"]), flag, value],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"hfserve: error: {flag}") and words in proc.stderr


def test_transformers_backend_shortens_openmp_spinning_unless_set(models, monkeypatch):
    from hfserve.backends import OPENMP_SPIN, create_backend
    from hfserve.cli import build_parser, resolve

    config = resolve(build_parser().parse_args(["--model_dir", str(models["llama"]), "--backend", "huggingface"]))
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    create_backend(config)
    assert os.environ["GOMP_SPINCOUNT"] == OPENMP_SPIN
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    create_backend(config)
    assert os.environ["GOMP_SPINCOUNT"] == "7"


def test_deltas_handed_over_together_are_one_delta_per_sequence():
    """A consumer that fell behind gets several steps at once, still as one delta per sequence."""
    from hfserve.generation import SequenceDelta, TokenLogprob, coalesce

    lp = [TokenLogprob(i, f"t{i}", -0.1 * i) for i in range(4)]
    steps = [
        SequenceDelta(0, "a", [1], [lp[0]], prompt_logprobs=[None]),
        SequenceDelta(1, "x", [7], [lp[1]]),
        SequenceDelta(0, "b", [2], [lp[2]]),
        SequenceDelta(0, "c", [3], [lp[3]], finish_reason="stop", stop_reason="c"),
        SequenceDelta(1, "y", [8], None, finish_reason="length"),
    ]
    out = coalesce(steps)
    assert [d.index for d in out] == [0, 1]
    assert (out[0].text, out[0].token_ids, out[0].logprobs) == ("abc", [1, 2, 3], [lp[0], lp[2], lp[3]])
    assert (out[0].finish_reason, out[0].stop_reason, out[0].prompt_logprobs) == ("stop", "c", [None])
    assert (out[1].text, out[1].token_ids, out[1].finish_reason) == ("xy", [7, 8], "length")
    assert steps[0].text == "a" and steps[0].token_ids == [1]  # the inputs are not changed
