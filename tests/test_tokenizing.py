"""The event loop's tokenizer shortcut (hfserve.backends.tokenizing) gives exactly transformers' ids."""

from __future__ import annotations

import pytest
import transformers

from hfserve.backends.tokenizing import fast_decoder, fast_encoder, slow_encoder

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
