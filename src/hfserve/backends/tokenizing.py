"""Tokenizing request text on the event loop, and detokenizing generated tokens, cheaply.

``tokenizer(text)["input_ids"]`` spends most of its time in transformers' Python
(argument checks, truncation and padding set-up, ``BatchEncoding``), not in the
Rust tokenizer: about 30 us per short text, of which the Rust encode is 15. On the
event loop that is paid by every request. :func:`fast_encoder` calls a private,
configured copy of the Rust tokenizer directly, and only where that is provably
the same: the tokenizer must be a plain fast tokenizer (no Python override of its
encoding) and must give the same ids as the transformers call on probe texts,
special tokens included; otherwise the transformers call is used.

Decoding is the same story on the decode thread: :func:`fast_decoder` calls the Rust
decoder where transformers' ``decode`` adds nothing to it. A generated sequence is
decoded as it grows, and decoding the whole sequence again at every token is O(n²)
work on the thread that also runs the model; :func:`detokenizer_factory` gives each
sequence a :class:`Detokenizer` that does O(1) work per token with the tokenizers
library's incremental decoder (``tokenizers.decoders.DecodeStream``) where that gives
exactly ``tokenizer.decode(ids, skip_special_tokens=True)``, and decodes the whole
sequence otherwise.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from collections.abc import Callable
from typing import Any, Protocol

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


def _plain_rust_decoder(tokenizer: Any) -> Any:
    """The Rust tokenizer whose ``decode(ids, skip_special_tokens=True)`` is exactly the
    transformers call (a plain fast tokenizer: no clean-up of tokenization spaces, no
    subclass override of decoding), or None."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: no shortcut
        return None
    cls = type(tokenizer)
    raw = getattr(tokenizer, "_tokenizer", None)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is TokenizersBackend._decode
        and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False
        and raw is not None
        and callable(getattr(raw, "decode", None))
    ):
        return raw
    return None


def fast_decoder(tokenizer: Any) -> Decoder:
    """The fastest decoder that gives exactly ``tokenizer.decode(ids, skip_special_tokens=True)``.

    For a plain fast tokenizer whose decode adds nothing to the Rust tokenizer's (no
    clean-up of tokenization spaces, no subclass override) this calls the Rust decoder
    directly, which gives the same string without transformers' per-call Python work.
    """
    raw = _plain_rust_decoder(tokenizer)
    if raw is None:

        def slow(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        return slow

    def fast(ids: list[int]) -> str:
        return raw.decode(ids, skip_special_tokens=True)

    return fast


# ------------------------------------------------------------ incremental decoding
class Detokenizer(Protocol):
    """One generated sequence's text, token by token.

    The text :meth:`step` returns is settled: it never changes whatever tokens follow.
    What is not settled yet (the bytes of an unfinished multi-byte character) is held
    back, and :meth:`finish` returns it at the end of the sequence, so that the steps'
    texts and then ``finish()`` add up to exactly
    ``tokenizer.decode(ids, skip_special_tokens=True)`` of all the ids stepped.
    """

    def step(self, token_id: int) -> str:
        """Add one generated token; the text it settled (often empty while a character is unfinished)."""
        ...

    def finish(self) -> str:
        """At the end of the sequence (once): the text not settled yet, as the full decode gives it."""
        ...


class FullDetokenizer:
    """Decodes the whole sequence again at every token (O(n) per token): for tokenizers
    whose incremental decoding cannot be shown to give the full decode's text.

    The settled text is the full decode without its trailing U+FFFD characters (an
    unfinished multi-byte character decodes to one or more of them until it is complete).
    """

    def __init__(self, decode: Decoder):
        self.decode = decode
        self.ids: list[int] = []
        self.settled = 0  # characters settled so far

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids).rstrip("\ufffd")
        new = text[self.settled :]
        self.settled = max(self.settled, len(text))
        return new

    def finish(self) -> str:
        return self.decode(self.ids)[self.settled :]


class StreamDetokenizer:
    """O(1) decoding per token with ``tokenizers.decoders.DecodeStream``, which decodes only
    a short window of recent tokens and hands out the text the newest token added.

    DecodeStream holds a token back (returns None) while the window's text ends in an
    unfinished character; :meth:`finish` then decodes the whole sequence once.
    """

    def __init__(self, raw: Any, decode: Decoder):
        from tokenizers.decoders import DecodeStream

        self.raw = raw
        self.decode = decode
        self.stream: Any = DecodeStream(skip_special_tokens=True)  # None once it has failed
        self.ids: list[int] = []
        self.settled = 0  # characters settled so far
        self.pending = False  # tokens since the last settled text

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.stream is not None:
            try:
                chunk = self.stream.step(self.raw, token_id)
            except Exception as exc:  # noqa: BLE001 - a sequence the probes did not cover: decode it whole from now on
                logger.warning("incremental decoding failed (%s); this sequence is decoded in full from here", exc)
                self.stream = None
            else:
                self.pending = chunk is None
                if chunk is None:
                    return ""
                self.settled += len(chunk)
                return chunk
        text = self.decode(self.ids)
        self.pending = text.endswith("\ufffd")  # an unfinished character: wait for its next byte
        if self.pending:
            return ""
        chunk, self.settled = text[self.settled :], len(text)
        return chunk

    def finish(self) -> str:
        return self.decode(self.ids)[self.settled :] if self.pending else ""


#: the Rust decoders whose text for a token depends only on that token and the tokens just
#: before it (DecodeStream's window always starts at a token whose text was already handed out)
_WINDOW_LOCAL_DECODERS = frozenset({"ByteLevel", "Metaspace", "WordPiece", "BPEDecoder", "ByteFallback", "Fuse", "Strip", "Replace"})


def _decoder_types(raw: Any) -> set[str] | None:
    """The types of the Rust tokenizer's decoder and of its parts (None: not readable)."""
    try:
        spec = json.loads(raw.to_str()).get("decoder")
    except Exception:  # noqa: BLE001 - e.g. a custom decoder that cannot be serialized
        return None
    types: set[str] = set()
    todo = [spec] if spec else []
    while todo:
        part = todo.pop()
        if not isinstance(part, dict) or "type" not in part:
            return None
        if part["type"] == "Sequence":
            todo.extend(part.get("decoders") or [])
        else:
            types.add(part["type"])
    return types


def _probe_sequences(tokenizer: Any, raw: Any) -> list[list[int]]:
    """Token id sequences to check incremental decoding on: the probe texts (and special
    tokens in the middle of text), and 2,000 random ids of the whole vocabulary (a fixed
    seed), which split multi-byte characters and put special tokens anywhere."""
    specials = " ".join(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    sequences = [raw.encode(text, add_special_tokens=True).ids for text in (*_PROBES, f"{specials} between {specials}")]
    vocab = raw.get_vocab_size(with_added_tokens=True)
    rng = random.Random(0)
    sequences.append([rng.randrange(vocab) for _ in range(2000)])
    return sequences


def _streams_exactly(tokenizer: Any, raw: Any, decode: Decoder) -> bool:
    """Whether :class:`StreamDetokenizer` gives the full decode's text on the probe sequences,
    at every step (settled text a prefix of the full decode) and at the end (all of it)."""
    for ids in _probe_sequences(tokenizer, raw):
        detok = StreamDetokenizer(raw, decode)
        text = ""
        try:
            for end, token_id in enumerate(ids, 1):
                text += detok.step(token_id)
                if (end % 50 == 0 or end < 50) and not decode(ids[:end]).startswith(text):
                    return False
        except Exception:  # noqa: BLE001 - DecodeStream refuses text that changed before its window: not exact
            return False
        if text + detok.finish() != decode(ids):
            return False
    return True


def detokenizer_factory(tokenizer: Any) -> Callable[[], Detokenizer]:
    """Makes each generated sequence's :class:`Detokenizer`, the fastest exact one for this tokenizer.

    Incremental (:class:`StreamDetokenizer`) where that is provably the full decode: the
    tokenizer's decode is the Rust tokenizer's (:func:`fast_decoder`'s condition: a plain
    fast tokenizer, no clean-up of tokenization spaces, which looks at the whole text), the
    installed tokenizers has ``DecodeStream``, every part of the Rust decoder is one whose
    text is local to a window of tokens, and the probe sequences stream exactly. Otherwise
    (slow tokenizers, tokenization-space clean-up, other decoders, special-token handling
    that differs): :class:`FullDetokenizer`, the old O(n) decode per token.
    """
    decode = fast_decoder(tokenizer)
    raw = _plain_rust_decoder(tokenizer)
    why = None
    if raw is None:
        why = "its decode is not the Rust tokenizer's alone: a slow tokenizer, tokenization-space clean-up or an override"
    else:
        try:
            from tokenizers.decoders import DecodeStream  # noqa: F401 - only whether it exists
        except ImportError:
            why = "the installed tokenizers has no DecodeStream"
    if why is None:
        types = _decoder_types(raw)
        if types is None or not types <= _WINDOW_LOCAL_DECODERS:
            why = f"its decoder ({', '.join(sorted(types or {'unreadable'}))}) is not known to be local"
        elif not _streams_exactly(tokenizer, raw, decode):
            why = "incremental decoding differs from the full decode on a probe"
    if why is not None:
        logger.info("tokenizer %s: decoding each generated sequence in full at every token (%s)", type(tokenizer).__name__, why)
        return lambda: FullDetokenizer(decode)
    return lambda: StreamDetokenizer(raw, decode)
