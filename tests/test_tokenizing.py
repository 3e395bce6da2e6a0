"""The tokenizer shortcuts (hfserve.backends.tokenizing) give exactly transformers' ids and text, and the
incremental detokenization of generated sequences (TextStream) gives exactly tokenizer.decode's text."""

from __future__ import annotations

import random

import pytest
import transformers

from hfserve.backends.textstream import TextStream
from hfserve.backends.tokenizing import (
    FullDetokenizer,
    StreamDetokenizer,
    detokenizer_factory,
    fast_decoder,
    fast_encoder,
    slow_encoder,
)

TEXTS = [
    "The cat sat on the mat.",
    "  spaces   inside and around  ",
    "Tabs\tand\nnewlines\r\n",
    "Ünïcödé: 日本語のテキスト, Ελληνικά, emoji 🙂🚀",
    "word " * 600,  # longer than every model's context: never truncated here (the service refuses it)
    "",
]


@pytest.mark.parametrize("name", ["minilm", "llama", "t5", "bert_cls", "bert_mlm"])
def test_fast_encoder_equals_the_transformers_call(models, name):
    tok = transformers.AutoTokenizer.from_pretrained(models[name])
    fast, slow = fast_encoder(tok), slow_encoder(tok)
    assert fast.__name__ == "fast", "a plain fast tokenizer should take the shortcut"
    specials = " ".join(tok.all_special_tokens)
    for text in [*TEXTS, f"{specials} in the middle {specials}"]:
        for add in (True, False):
            assert fast(text, add) == slow(text, add), (name, text[:40], add)
    assert len(fast(TEXTS[4], True)) > 600


def test_transformers_configuring_its_own_tokenizer_does_not_leak_into_the_shortcut(models):
    tok = transformers.AutoTokenizer.from_pretrained(models["minilm"])
    fast = fast_encoder(tok)
    tok(["a", "b c"], truncation=True, max_length=3, padding="max_length")  # reconfigures tok's Rust tokenizer
    assert len(fast("one two three four five", True)) == 7


def test_a_tokenizer_with_its_own_encoding_keeps_the_transformers_call(models):
    base = transformers.AutoTokenizer.from_pretrained(models["llama"])

    class Custom(type(base)):
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    base.__class__ = Custom
    assert fast_encoder(base).__name__ == "encode"


@pytest.mark.parametrize("name", ["minilm", "llama", "t5", "bert_cls", "bert_mlm"])
def test_fast_decoder_equals_the_transformers_call(models, name):
    """Whichever path a tokenizer gets, every prefix of every text decodes as transformers
    decodes it (the decode thread decodes each sequence's growing prefix)."""
    tok = transformers.AutoTokenizer.from_pretrained(models[name])
    decode = fast_decoder(tok)
    specials = " ".join(tok.all_special_tokens)
    for text in [*TEXTS[:4], f"{specials} in the middle {specials}"]:
        ids = tok(text)["input_ids"]
        for end in range(len(ids) + 1):
            assert decode(ids[:end]) == tok.decode(ids[:end], skip_special_tokens=True), (name, text[:40], end)


# ------------------------------------------------------------ incremental decoding
FIXTURE_TOKENIZERS = ["minilm", "llama", "t5", "bert_cls", "bert_mlm"]


def generated_like(tok, count=300, seed=0):
    """Token ids as a random model generates them: any id, special ones included, multi-byte
    characters split anywhere (byte-level tokenizers)."""
    rng = random.Random(seed)
    return [rng.randrange(len(tok)) for _ in range(count)]


def sequences(tok):
    specials = " ".join(tok.all_special_tokens)
    texts = [*TEXTS[:4], f"{specials} in the middle {specials}"]
    return [tok(text)["input_ids"] for text in texts] + [generated_like(tok)]


def detokenizers(tok):
    """The detokenizer the tokenizer gets, and the full-decode fallback."""
    return {"chosen": detokenizer_factory(tok), "full": lambda: FullDetokenizer(fast_decoder(tok))}


@pytest.mark.parametrize("name", FIXTURE_TOKENIZERS)
def test_every_fixture_tokenizer_decodes_incrementally(models, name):
    """A plain fast tokenizer with a window-local Rust decoder gets DecodeStream; tokenization-space
    clean-up (transformers' pass over the whole text) or a decode override keeps the full decode."""
    tok = transformers.AutoTokenizer.from_pretrained(models[name])
    assert type(detokenizer_factory(tok)()) is StreamDetokenizer
    tok.clean_up_tokenization_spaces = True
    assert type(detokenizer_factory(tok)()) is FullDetokenizer

    base = transformers.AutoTokenizer.from_pretrained(models[name])

    class Custom(type(base)):
        def decode(self, *args, **kwargs):
            return super().decode(*args, **kwargs)

    base.__class__ = Custom
    assert type(detokenizer_factory(base)()) is FullDetokenizer


@pytest.mark.parametrize("name", FIXTURE_TOKENIZERS)
def test_every_prefix_streams_as_tokenizer_decode(models, name):
    """Token by token, the settled text and then what finish() adds is tokenizer.decode of the prefix."""
    tok = transformers.AutoTokenizer.from_pretrained(models[name])
    for kind, make in detokenizers(tok).items():
        for ids in sequences(tok):
            detok, text = make(), ""
            for end in range(1, len(ids) + 1):
                text += detok.step(ids[end - 1])
                full = tok.decode(ids[:end], skip_special_tokens=True)
                assert text + detok.finish() == full, (name, kind, end)
            assert text, (name, kind, ids[:8])


def stream_text(make, ids, stop):
    """Push ``ids`` through a TextStream; (the deltas, stopped_by), flushing at the end unless stopped."""
    stream = TextStream(make(), stop)
    deltas = []
    for tid in ids:
        deltas.append(stream.push(tid))
        if stream.stopped_by is not None:
            return deltas, stream.stopped_by
    deltas.append(stream.flush())
    return deltas, None


@pytest.mark.parametrize("name", FIXTURE_TOKENIZERS)
def test_text_stream_cuts_before_stop_strings_and_never_sends_them(models, name):
    tok = transformers.AutoTokenizer.from_pretrained(models[name])
    for kind, make in detokenizers(tok).items():
        for ids in sequences(tok):
            full = tok.decode(ids, skip_special_tokens=True)
            deltas, stopped = stream_text(make, ids, [])
            assert ("".join(deltas), stopped) == (full, None), (name, kind)
            middle = full.strip()[len(full.strip()) // 2 :][:3]
            assert len(middle) == 3, (name, full)
            stops = [middle, "never-in-the-text-at-all"]
            deltas, stopped = stream_text(make, ids, stops)
            sent = "".join(deltas)
            assert stopped == middle and sent == full[: full.index(middle)], (name, kind, middle)
            for end in range(1, len(deltas) + 1):  # what was sent at each step never changes afterwards
                assert full.startswith("".join(deltas[:end]))


def test_a_decoder_not_known_to_be_local_keeps_the_full_decode(models):
    from tokenizers import decoders

    tok = transformers.AutoTokenizer.from_pretrained(models["minilm"])
    tok._tokenizer.decoder = decoders.CTC()  # merges repeated tokens: the text of one depends on the ones before
    assert type(detokenizer_factory(tok)()) is FullDetokenizer


@pytest.mark.parametrize("failure", ["differs", "raises"])
def test_an_incremental_decoder_that_fails_a_probe_is_not_used(models, monkeypatch, failure):
    step = StreamDetokenizer.step

    def broken(self, token_id):
        if failure == "raises" and len(self.ids) == 3:
            raise Exception("Invalid prefix encountered")  # what DecodeStream raises when earlier text changed
        return step(self, token_id).upper()

    monkeypatch.setattr(StreamDetokenizer, "step", broken)
    tok = transformers.AutoTokenizer.from_pretrained(models["llama"])
    assert type(detokenizer_factory(tok)()) is FullDetokenizer


def test_an_incremental_decoder_that_fails_mid_sequence_falls_back_to_the_full_decode(models):
    """DecodeStream raising on a sequence the probes did not cover does not fail the request:
    that sequence is decoded in full from then on, and its text is still tokenizer.decode's."""
    tok = transformers.AutoTokenizer.from_pretrained(models["llama"])
    ids = next(s for s in sequences(tok) if len(s) > 12)
    detok = detokenizer_factory(tok)()
    assert type(detok) is StreamDetokenizer

    class Failing:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def step(self, raw, token_id):
            self.calls += 1
            if self.calls == 6:
                raise Exception("Invalid prefix encountered")
            return self.inner.step(raw, token_id)

    detok.stream = Failing(detok.stream)
    text = ""
    for end in range(1, len(ids) + 1):
        text += detok.step(ids[end - 1])
        assert text + detok.finish() == tok.decode(ids[:end], skip_special_tokens=True), end
    assert detok.stream is None
