"""Tokenizing request text on the event loop, and detokenizing generated tokens, cheaply.

``tokenizer(text)["input_ids"]`` spends most of its time in transformers' Python
(argument checks, truncation and padding set-up, ``BatchEncoding``), not in the
Rust tokenizer: about 30 us per short text, of which the Rust encode is 15. On the
event loop that is paid by every request. :func:`fast_encoder` calls a private,
configured copy of the Rust tokenizer directly, and only where that is provably
the same: the tokenizer must be a plain fast tokenizer (no Python override of its
encoding) and must give the same ids as the transformers call on probe texts,
special tokens included; otherwise the transformers call is used.

Decoding is the same story on the decode thread (once per token per sequence):
:func:`fast_decoder` calls the Rust decoder where transformers' ``decode`` adds
nothing to it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("hfserve.backends.tokenizing")

Encoder = Callable[[str, bool], list[int]]
Decoder = Callable[[list[int]], str]

_PROBES = (
    "Hello world",
    " leading space and trailing ",
    "line\nbreak\ttab  double  space",
    "ünïcödé, 日本語, emoji 🙂, and ../path/like.txt",
    "",
    "UPPER lower MiXeD 12345 3.14 -7",
)


def slow_encoder(tokenizer: Any) -> Encoder:
    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    return encode


def fast_encoder(tokenizer: Any) -> Encoder:
    """The fastest encoder that gives exactly ``tokenizer(text)["input_ids"]``."""
    slow = slow_encoder(tokenizer)
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: no shortcut
        return slow
    if not isinstance(tokenizer, TokenizersBackend) or type(tokenizer)._encode_plus is not TokenizersBackend._encode_plus:
        return slow
    try:
        rust = copy.deepcopy(tokenizer.backend_tokenizer)  # private: transformers reconfigures its own per call
        rust.no_truncation()
        rust.no_padding()
        rust.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    except Exception:  # noqa: BLE001 - no shortcut, not an error
        return slow

    def fast(text: str, add_special_tokens: bool = True) -> list[int]:
        return rust.encode(text, add_special_tokens=add_special_tokens).ids

    specials = " ".join(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    for probe in (*_PROBES, f"{specials} between {specials}"):
        for add in (True, False):
            if fast(probe, add) != slow(probe, add):
                logger.info("tokenizer %s: using the transformers call (its Rust tokenizer differs on %r)", type(tokenizer).__name__, probe)
                return slow
    return fast


def fast_decoder(tokenizer: Any) -> Decoder:
    """The fastest decoder that gives exactly ``tokenizer.decode(ids, skip_special_tokens=True)``.

    For a plain fast tokenizer whose decode adds nothing to the Rust tokenizer's (no
    clean-up of tokenization spaces, no subclass override) this calls the Rust decoder
    directly, which gives the same string without transformers' per-call Python work.
    """

    def slow(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: no shortcut
        return slow
    cls = type(tokenizer)
    raw = getattr(tokenizer, "_tokenizer", None)
    if not (
        isinstance(tokenizer, TokenizersBackend)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is TokenizersBackend._decode
        and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False
        and raw is not None
        and callable(getattr(raw, "decode", None))
    ):
        return slow

    def fast(ids: list[int]) -> str:
        return raw.decode(ids, skip_special_tokens=True)

    return fast
