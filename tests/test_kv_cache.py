"""The in-place KV cache layer (src/hfserve/backends/kv_cache.py): the same attention as
transformers' concatenating ``DynamicLayer`` through everything the scheduler does to a cache
(rows leaving, trimmed columns, n-fold rows, two batches merged), without copying the cache at
each step, nor again at the step after rows left or joined."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hfserve.backends import kv_cache


@pytest.fixture(scope="module")
def llama(models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).eval()


def _decode(model, grow: bool, steps: int = 12, keep_at_once: bool = False):
    """Prefill 3 left-padded rows, repeat them 2-fold, decode ``steps`` greedy steps; midway drop
    rows and trim the columns only padding uses (with ``keep_at_once``, by ``GrowingLayer.keep``,
    as the scheduler's ``_select`` does; else by transformers' selection and a trim)."""
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [0, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]])
    mask = (ids != 0).long()
    logits, caches = [], []
    with torch.inference_mode():
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        cache = out.past_key_values
        if grow:
            kv_cache.grow_in_place(cache)
            assert all(type(layer) is kv_cache.GrowingLayer for layer in cache.layers)
        cache.batch_repeat_interleave(2)
        mask = mask.repeat_interleave(2, dim=0)
        last = out.logits[:, -1].repeat_interleave(2, dim=0)
        for step in range(steps):
            if step == steps // 2:  # rows 0 and 1 (the shortest prompt) leave: columns 0-2 hold padding only
                keep = torch.tensor([2, 3, 4, 5])
                mask, last = mask[keep], last[keep]
                if keep_at_once:
                    for layer in cache.layers:
                        layer.keep(keep.tolist(), 1)
                else:
                    cache.batch_select_indices(keep)
                    for layer in cache.layers:
                        layer.keys = layer.keys[..., 1:, :]
                        layer.values = layer.values[..., 1:, :]
                mask = mask[:, 1:]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                last.argmax(-1, keepdim=True),
                attention_mask=mask,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                past_key_values=cache,
                use_cache=True,
            )
            last = out.logits[:, -1]
            logits.append(F.pad(last, (0, 0, 0, 6 - last.shape[0])))
            caches.append([layer.keys.data_ptr() for layer in cache.layers])
    return torch.stack(logits), caches


@pytest.mark.parametrize("headroom", [1, 3, 128])
@pytest.mark.parametrize("keep_at_once", [False, True])
def test_same_logits_as_the_concatenating_layer(llama, monkeypatch, headroom, keep_at_once):
    monkeypatch.setattr(kv_cache, "HEADROOM", headroom)  # 1 and 3: a reallocation every step or every few
    expected, _ = _decode(llama, grow=False)
    got, _ = _decode(llama, grow=True, keep_at_once=keep_at_once)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_a_decode_step_writes_in_place(llama):
    """Between the reallocations (the first step, and after rows left) the keys stay in one buffer;
    transformers' layer makes a new tensor at every step."""
    _, grown = _decode(llama, grow=True)
    _, plain = _decode(llama, grow=False)
    assert grown[1:6] == [grown[1]] * 5 and grown[7:] == [grown[7]] * 5
    assert all(a[0] != b[0] for a, b in zip(plain, plain[1:]))  # each step's keys: a new tensor (the old alive till then)
    _, kept = _decode(llama, grow=True, keep_at_once=True)  # rows left and columns trimmed in one copy: spare positions kept
    assert kept[1:6] == [kept[1]] * 5 and kept[6:] == [kept[6]] * 6 and kept[6][0] != kept[5][0]


def _prefill(model, ids: list[int], grow: bool):
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
    if grow:
        kv_cache.grow_in_place(out.past_key_values)
    return out.past_key_values, out.logits[:, -1]


@pytest.mark.parametrize("longer_first", [False, True])
def test_merged_batches_decode_as_padded_and_concatenated_ones(llama, longer_first):
    """Three requests prefilled apart, merged one after the other as the scheduler merges joining
    requests (the shorter left-padded): ``GrowingLayer.merge`` decodes as transformers' layers
    padded and concatenated. The first merge copies both into new allocations with spare rows;
    the third request (a shorter prompt) is written into a spare row, in place; decode steps
    then write into the merged buffers in place."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [9, 10]]
    if longer_first:
        prompts[:2] = prompts[1::-1]
    results = []
    for grow in (False, True):
        prefilled = [_prefill(llama, ids, grow) for ids in prompts]
        cache, length, storages = prefilled[0][0], len(prompts[0]), []
        for (other, _), ids in zip(prefilled[1:], prompts[1:]):
            width = max(length, len(ids))
            for mine, theirs in zip(cache.layers, other.layers):
                if grow:
                    mine.merge(theirs, length, len(ids))
                    whole = kv_cache.whole_buffer(mine.values)  # spare positions, zeros (what the decode attention may multiply over)
                    assert whole.shape[2] >= width + 1 and not whole[..., width:, :].any()
                else:
                    for attr in ("keys", "values"):
                        padded = [F.pad(getattr(layer, attr), (0, 0, width - n, 0)) for layer, n in ((mine, length), (theirs, len(ids)))]
                        setattr(mine, attr, torch.cat(padded))
            length = width
            storages.append(cache.layers[0].keys.untyped_storage().data_ptr())
        assert cache.layers[0].keys.shape[:3] == (3, cache.layers[0].keys.shape[1], length)
        mask = torch.cat([F.pad(torch.ones(1, len(ids), dtype=torch.long), (length - len(ids), 0)) for ids in prompts])
        last, logits, pointers = torch.cat([lg for _, lg in prefilled]), [], []
        with torch.inference_mode():
            for _ in range(4):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = llama(last.argmax(-1, keepdim=True), attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                            past_key_values=cache, use_cache=True)  # fmt: skip
                last = out.logits[:, -1]
                logits.append(last)
                pointers.append(cache.layers[0].keys.data_ptr())
        results.append((torch.stack(logits), pointers, storages))
    (expected, _, _), (got, pointers, storages) = results
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert storages[1] == storages[0]  # the third request went into a spare row
    assert pointers == [pointers[0]] * 4


@pytest.mark.parametrize("kept", [[1, 2], [0, 1], [0, 2], [1]])
def test_rows_kept_in_place_or_copied_once(llama, kept):
    """Rows next to each other stay where they are (the same allocation); others are copied once.
    Either way the next decode step gives the logits of transformers' layers selected alike."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15, 16]]
    results = []
    for grow in (False, True):
        prefilled = [_prefill(llama, ids, grow) for ids in prompts[:1]]
        cache, length = prefilled[0][0], len(prompts[0])
        for ids in prompts[1:]:  # merged in (as test_merged_batches_...), so that the grown layers have allocations
            other, _ = _prefill(llama, ids, grow)
            width = max(length, len(ids))
            for mine, theirs in zip(cache.layers, other.layers):
                if grow:
                    mine.merge(theirs, length, len(ids))
                else:
                    for attr in ("keys", "values"):
                        padded = [F.pad(getattr(layer, attr), (0, 0, width - n, 0)) for layer, n in ((mine, length), (theirs, len(ids)))]
                        setattr(mine, attr, torch.cat(padded))
            length = width
        storage = cache.layers[0].keys.untyped_storage().data_ptr()
        mask = torch.cat([F.pad(torch.ones(1, len(ids), dtype=torch.long), (length - len(ids), 0)) for ids in prompts])[kept]
        first = int((mask.sum(0) > 0).nonzero()[0])
        for layer in cache.layers:
            if grow:
                layer.keep(kept, first)
            else:
                layer.batch_select_indices(torch.tensor(kept))
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        mask = torch.cat([mask[:, first:], torch.ones_like(mask[:, :1])], dim=1)
        ids = torch.tensor([[prompts[r][-1]] for r in kept])
        with torch.inference_mode():
            out = llama(ids, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1, past_key_values=cache, use_cache=True)
        results.append((out.logits[:, -1], storage, cache.layers[0].keys.untyped_storage().data_ptr()))
    (expected, _, _), (got, before, after) = results
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert (after == before) == (kept == list(range(kept[0], kept[0] + len(kept))))
