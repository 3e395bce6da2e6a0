"""Incremental detokenization with stop strings, for backends that decode themselves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, called once per token per sequence.

    For a plain fast tokenizer whose decode adds nothing to the Rust tokenizer's (no
    clean-up of tokenization spaces, no subclass override) this calls the Rust decoder
    directly, which gives the same string without transformers' per-call Python work.
    Cached on the tokenizer object.
    """
    fn = _DECODERS.get(id(tokenizer))
    if fn is not None and fn[0] is tokenizer:
        return fn[1]

    def slow(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    decoder: Callable[[list[int]], str] = slow
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

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

            def fast(ids: list[int]) -> str:
                return raw.decode(ids, skip_special_tokens=True)

            decoder = fast
    except Exception:  # noqa: BLE001 - another transformers layout: the plain call
        decoder = slow
    if len(_DECODERS) > 64:
        _DECODERS.clear()
    _DECODERS[id(tokenizer)] = (tokenizer, decoder)
    return decoder


_DECODERS: dict[int, tuple[Any, Callable[[list[int]], str]]] = {}


class TextStream:
    """Turns a growing list of generated token ids into text deltas.

    It holds back text that could still turn into a stop string (or an
    unfinished multi-byte character) so a stop string never reaches the client,
    and reports the stop string that ended the sequence.
    """

    def __init__(self, tokenizer: Any, stop: list[str], *, final_flush: bool = True):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # all text decoded so far (stop string cut off once found)
        self.sent = 0  # characters already handed out
        self.stopped_by: str | None = None

    def _decode(self) -> str:
        return _decoder(self.tokenizer)(self.token_ids)

    def push(self, token_id: int, *, emit_token: bool = True) -> str:
        """Add one token; return the text that is now safe to send."""
        if emit_token:
            self.token_ids.append(token_id)
        full = self._decode()
        if self.stop:
            # search only where a new stop string could have appeared
            start = max(0, len(self.text) - self.holdback - 1)
            hits = [(full.find(s, start), s) for s in self.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                self.text = full[:i]
                self.stopped_by = s
                return self.flush()
        self.text = full
        safe = len(full) - self.holdback if self.stop else len(full)
        if full.endswith("\ufffd"):  # an unfinished multi-byte character
            safe = min(safe, len(full) - 1)
        if safe <= self.sent:
            return ""
        delta = full[self.sent : safe]
        self.sent = safe
        return delta

    def flush(self) -> str:
        """At the end of the sequence: everything not yet sent."""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta
