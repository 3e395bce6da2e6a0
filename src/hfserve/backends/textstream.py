"""Incremental detokenization with stop strings, for backends that decode themselves."""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Turns a growing list of generated token ids into text deltas.

    It holds back text that could still turn into a stop string (or an
    unfinished multi-byte character) so a stop string never reaches the client,
    and reports the stop string that ended the sequence.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str], *, final_flush: bool = True):
        self.decode = decode  # token ids -> text, special tokens skipped
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # all text decoded so far (stop string cut off once found)
        self.sent = 0  # characters already handed out
        self.stopped_by: str | None = None

    def _decode(self) -> str:
        return self.decode(self.token_ids)

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
