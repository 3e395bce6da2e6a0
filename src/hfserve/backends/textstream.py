"""Incremental detokenization with stop strings, for backends that decode themselves.

The generation scheduler gives each sequence a :class:`TextStream` and pushes every
generated token into it (not the end-of-sequence or stop token that ends it); what
``push`` returns is the sequence's next text delta. The stream's
:class:`~hfserve.backends.tokenizing.Detokenizer` turns tokens into settled text, O(1)
per token where the tokenizer allows it (see :func:`~.tokenizing.detokenizer_factory`);
the stream holds back the settled text that could still be the start of a stop string,
and at the end of the sequence (:meth:`TextStream.flush`) adds the text that was never
settled (an unfinished multi-byte character, as U+FFFD). The deltas of a sequence add
up to exactly ``tokenizer.decode(ids, skip_special_tokens=True)`` of its tokens, cut
before the first stop string.
"""

from __future__ import annotations

from .tokenizing import Detokenizer


class TextStream:
    """Turns a sequence's generated token ids into text deltas.

    It holds back text that could still turn into a stop string (and, through its
    detokenizer, an unfinished multi-byte character) so a stop string never reaches the
    client, and reports the stop string that ended the sequence (``stopped_by``).
    Each push costs the detokenizer's step plus O(longest stop string), not O(sequence).
    """

    def __init__(self, detokenizer: Detokenizer, stop: list[str]):
        self.detokenizer = detokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.unsent = ""  # settled text not handed out yet (shorter than the longest stop string)
        self.stopped_by: str | None = None

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to send."""
        self.unsent += self.detokenizer.step(token_id)
        if self._cut_at_stop():
            return self._take(len(self.unsent))
        return self._take(len(self.unsent) - self.holdback)

    def flush(self) -> str:
        """At the end of the sequence (once): everything not yet sent."""
        if self.stopped_by is None:
            self.unsent += self.detokenizer.finish()
            self._cut_at_stop()
        return self._take(len(self.unsent))

    def _cut_at_stop(self) -> bool:
        """Cut the unsent text before the earliest stop string in it, if any.

        Only the unsent text is searched: a stop string that ends in the newest text
        starts at most ``holdback`` characters before it, and those were held back.
        """
        hits = [(self.unsent.find(s), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.unsent = self.unsent[:i]
        self.stopped_by = s
        return True

    def _take(self, count: int) -> str:
        if count <= 0:
            return ""
        delta, self.unsent = self.unsent[:count], self.unsent[count:]
        return delta
