"""The transformers backend's per-row sampler (hfserve.backends.sampler) on tiny tensors, no model."""

from __future__ import annotations

import math

import pytest
import torch

from hfserve.backends import sampler
from hfserve.generation import SamplingParams
from tests.contract import assert_error
from tests.fakes import serving

INF = float("-inf")


def params(**kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=8, **kwargs)


def draw(logits, p, seed=0, step=0, **kwargs):
    counts = kwargs.pop("counts", torch.zeros_like(logits))
    gen = sampler.new_generator(seed, torch.device("cpu"))
    return sampler.sample(logits, p, generator=gen, counts=counts, step=step, **kwargs).tolist()


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.5, -1.0, 2.5, 0.0, 9.0]])
    out = sampler.top_k_mask(logits, 2)
    assert out.tolist() == [[INF, 5.0, INF, 4.0, INF], [INF, INF, 2.5, INF, 9.0]]
    assert torch.equal(sampler.top_k_mask(logits, 10), logits)  # k beyond the vocabulary keeps everything


def test_top_p_keeps_the_smallest_prefix_that_reaches_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.3, 0.15, 0.05, 0.5]])
    logits = probs.log()
    kept = sampler.top_p_mask(logits, 0.7) > INF
    assert kept.tolist() == [[False, True, False, True], [True, False, False, True]]  # 0.5 + 0.3 reaches 0.7
    kept = sampler.top_p_mask(logits, 0.85) > INF
    assert kept.tolist() == [[False, True, True, True], [True, True, False, True]]  # 0.8 does not reach 0.85
    kept = sampler.top_p_mask(logits, 0.3) > INF
    assert kept.tolist() == [[False, True, False, False], [False, False, False, True]]  # the top token alone


def test_repetition_penalty_covers_generated_and_prompt_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    prompt_seen = torch.tensor([False, False, True, False])
    out = sampler.penalize(logits, counts, params(repetition_penalty=2.0), prompt_seen)
    assert out.tolist() == [[1.0, -4.0, 0.5, 0.5]]  # positive divided, negative multiplied, unseen unchanged
    out = sampler.penalize(logits, counts, params(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]  # without the prompt (encoder-decoder)


def test_frequency_and_presence_penalties():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.5]])
    counts = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    assert sampler.penalize(logits, counts, params(frequency_penalty=0.5)).tolist() == [[1.0, 1.0, 0.5, 0.5]]
    assert sampler.penalize(logits, counts, params(presence_penalty=0.25)).tolist() == [[1.75, 1.0, 0.75, 0.5]]
    both = sampler.penalize(logits, counts, params(frequency_penalty=0.5, presence_penalty=0.25))
    assert both.tolist() == [[0.75, 1.0, 0.25, 0.5]]
    assert torch.equal(sampler.penalize(logits, counts, params()), logits)


def test_min_tokens_masks_end_and_stop_ids_until_reached():
    logits = torch.tensor([[1.0, 9.0, 8.0, 7.0, 2.0]])  # 1 is end of sequence, 2 a stop token id
    p = params(temperature=0.0, min_tokens=2, stop_token_ids=[2])
    end_ids = {1, 2}
    assert draw(logits, p, step=0, end_ids=end_ids) == [3]
    assert draw(logits, p, step=1, end_ids=end_ids) == [3]
    assert draw(logits, p, step=2, end_ids=end_ids) == [1]
    assert sampler.ban(logits, [1, 2]).tolist() == [[1.0, INF, INF, 7.0, 2.0]]


def test_greedy_is_the_argmax_of_each_row():
    logits = torch.tensor([[0.1, 0.3, 0.2], [5.0, -1.0, 4.9], [0.0, 0.0, 7.0]])
    assert draw(logits, params(temperature=0.0)) == [1, 0, 2]


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 1e-6, 0.009])
def test_a_temperature_below_the_minimum_samples_at_the_minimum(temperature):
    """As vLLM's SamplingParams (0 < temperature < 0.01 is raised to 0.01): dividing by 1e-300 would
    give inf - inf = NaN probabilities; temperature 0 stays greedy."""
    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0, 2.5, -1.0]] * 3)
    p, floor = params(temperature=temperature, top_p=0.9), params(temperature=sampler.MIN_TEMPERATURE, top_p=0.9)
    assert not p.greedy and not sampler.is_plain_greedy(p, step=0)
    assert [draw(logits, p, seed=seed) for seed in range(10)] == [draw(logits, floor, seed=seed) for seed in range(10)]
    near_ties = torch.tensor([[1.0, 1.005, 0.995]] * 200)  # far apart enough at 0.01 to sample, not to argmax
    drawn = set(draw(near_ties, p, seed=3))
    assert 1 in drawn and len(drawn) > 1


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token():
    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0, 2.5, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 9.0]])
    for p in (1e-300, 0.0):
        masked = sampler.top_p_mask(logits, p)
        assert (masked > INF).tolist() == [[False, False, False, True, False, False], [False] * 5 + [True]]
        assert not masked.isnan().any()
    tiny = params(temperature=1.0, top_p=1e-300)
    assert {tuple(draw(logits, tiny, seed=seed)) for seed in range(20)} == {(3, 5)}


def test_a_draw_is_the_multinomial_of_the_filtered_tempered_distribution():
    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0, 2.5, -1.0]] * 3)
    p = params(temperature=0.7, top_k=4, top_p=0.9)
    expected_logits = sampler.top_p_mask(sampler.top_k_mask(logits / 0.7, 4), 0.9)
    gen = torch.Generator().manual_seed(11)
    expected = torch.multinomial(torch.softmax(expected_logits, dim=-1), 1, generator=gen).view(-1).tolist()
    assert draw(logits, p, seed=11) == expected


def test_the_same_seed_gives_the_same_draws():
    logits = torch.zeros((4, 50))  # uniform: 50**4 outcomes per draw
    p = params(temperature=1.0)
    first = [draw(logits, p, seed=1234) for _ in range(2)]
    assert first[0] == first[1]
    assert draw(logits, p, seed=4321) != first[0]
    gen = sampler.new_generator(5, torch.device("cpu"))
    steps = [sampler.sample(logits, p, generator=gen, counts=torch.zeros_like(logits), step=i).tolist() for i in range(3)]
    assert steps[0] != steps[1]  # one generator per request: its draws advance step by step


def test_logprob_entry_is_log_softmax_with_the_top_k_in_order():
    logits = torch.tensor([2.0, 0.0, 3.0, 1.0])
    row = torch.log_softmax(logits, dim=0)
    norm = math.log(sum(math.exp(x) for x in (2.0, 0.0, 3.0, 1.0)))
    entry = sampler.logprob_entry(row, 1, 3, lambda i: f"<{i}>")
    assert (entry.token_id, entry.token) == (1, "<1>")
    assert math.isclose(entry.logprob, 0.0 - norm, rel_tol=1e-6)
    assert [(i, t) for i, t, _ in entry.top] == [(2, "<2>"), (0, "<0>"), (3, "<3>")]
    assert all(math.isclose(v, logits[i].item() - norm, rel_tol=1e-6) for i, _, v in entry.top)
    assert sampler.logprob_entry(row, 2, 0, str).top == []


def test_logits_processors_run_per_row_with_its_history_before_sampling():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0], [3.0, 0.0, 1.0, 2.0]])
    seen = []

    def ban_last(history, row):
        seen.append((list(history), row.tolist()))
        return row.index_fill(0, torch.tensor(history[-1:], dtype=torch.long), INF)

    def add_bias(history, row):
        return row + torch.tensor([0.0, 0.0, 0.0, 1.5])

    out = draw(logits, params(temperature=0.0), histories=[[1], [9, 0]], processors=[ban_last, add_bias])
    assert out == [2, 3]  # row 0: 1 banned, 2 next; row 1: 0 banned, 3 biased above 2
    assert seen == [([1], [0.0, 5.0, 4.0, 1.0]), ([9, 0], [3.0, 0.0, 1.0, 2.0])]
    assert logits.tolist() == [[0.0, 5.0, 4.0, 1.0], [3.0, 0.0, 1.0, 2.0]]  # the batch's logits are not changed
    assert draw(logits, params(temperature=0.0)) == [1, 0]


def test_plain_greedy_is_only_the_unprocessed_argmax():
    greedy = params(temperature=0.0)
    assert sampler.is_plain_greedy(greedy, step=0)
    assert not sampler.is_plain_greedy(greedy, step=0, processors=[lambda h, row: row])
    assert not sampler.is_plain_greedy(params(temperature=0.5), step=0)
    assert not sampler.is_plain_greedy(params(temperature=0.0, min_tokens=2), step=1)
    assert sampler.is_plain_greedy(params(temperature=0.0, min_tokens=2), step=2)
    for penalty in ({"repetition_penalty": 1.1}, {"frequency_penalty": 0.1}, {"presence_penalty": 0.1}):
        assert not sampler.is_plain_greedy(params(temperature=0.0, **penalty), step=0)
        assert sampler.counts_tokens(params(**penalty))
    assert not sampler.counts_tokens(params())


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_one():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.3, 0.2, 0.05, 0.45]])
    logits = probs.log()
    kept = sampler.min_p_mask(logits, 0.5) > INF
    assert kept.tolist() == [[False, True, False, True], [True, False, False, True]]  # >= 0.25, >= 0.225
    kept = sampler.min_p_mask(logits, 0.2) > INF
    assert kept.tolist() == [[False, True, True, True], [True, True, False, True]]  # >= 0.1, >= 0.09
    assert (sampler.min_p_mask(logits, 1.0) > INF).tolist() == [[False, True, False, False], [False, False, False, True]]
    assert torch.equal(sampler.min_p_mask(logits, 0.0), logits)
    assert sampler.min_p_mask(logits, 0.5)[0, 1] == logits[0, 1]  # kept logits unchanged


def test_min_p_applies_after_temperature_and_before_top_k_top_p():
    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0, 2.5, -1.0]] * 3)
    p = params(temperature=0.7, min_p=0.3, top_k=4, top_p=0.9)
    expected_logits = sampler.top_p_mask(sampler.top_k_mask(sampler.min_p_mask(logits / 0.7, 0.3), 4), 0.9)
    gen = torch.Generator().manual_seed(11)
    expected = torch.multinomial(torch.softmax(expected_logits, dim=-1), 1, generator=gen).view(-1).tolist()
    assert draw(logits, p, seed=11) == expected
    tight = params(temperature=1.0, min_p=0.9)  # only the top token survives
    assert {t for seed in range(20) for t in draw(logits, tight, seed=seed)} == {3}


@pytest.mark.anyio
@pytest.mark.parametrize("value", [-0.1, 1.5, "high"])
async def test_min_p_out_of_range_is_invalid_request(value):
    async with serving() as serve:
        s = await serve()
        body = {"model": "fake", "prompt": "hi", "max_tokens": 2, "min_p": value}
        msg = assert_error(await s.post("/openai/v1/completions", body), "invalid_request", param="min_p")
        assert "min_p" in msg
        r = await s.post("/v1/models/fake:predict", {"instances": ["hi"], "parameters": {"min_p": value}})
        assert_error(r, "invalid_request")


@pytest.mark.anyio
async def test_min_p_reaches_the_backend_on_every_family():
    async with serving() as serve:
        s = await serve()
        await s.post("/openai/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 2, "min_p": 0.2})
        assert s.backend.params[-1].min_p == 0.2
        await s.post("/openai/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}], "min_p": 1})
        assert s.backend.params[-1].min_p == 1.0
        await s.post("/v2/models/fake/generate", {"text_input": "hi", "parameters": {"min_p": 0.1, "max_tokens": 2}})
        assert s.backend.params[-1].min_p == 0.1
        await s.post("/openai/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 2})
        assert s.backend.params[-1].min_p == 0.0  # unset: no filter
