"""Text helpers shared by the streaming parsers: finding tags in a growing buffer, holding whitespace."""

from __future__ import annotations

from collections.abc import Sequence


def partial_overlap(text: str, tags: Sequence[str]) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``.

    That many trailing characters might still become a tag, so a streaming parser holds them back.
    """
    longest = max((len(tag) for tag in tags), default=1) - 1
    for k in range(min(len(text), longest), 0, -1):
        suffix = text[-k:]
        if any(tag.startswith(suffix) for tag in tags):
            return k
    return 0


def find_first(text: str, tags: Sequence[str], start: int = 0) -> tuple[int, str | None]:
    """The earliest occurrence of any of ``tags`` in ``text`` at or after ``start``: ``(index, tag)``.

    ``(-1, None)`` when none occurs. At equal positions the longer tag wins.
    """
    best, found = -1, None
    for tag in tags:
        i = text.find(tag, start)
        if i != -1 and (best == -1 or i < best or (i == best and found is not None and len(tag) > len(found))):
            best, found = i, tag
    return best, found


class WhitespaceHolder:
    """Streams text while holding back whitespace whose fate is not decided yet.

    ``drop_leading``: whitespace before the first non-whitespace character is dropped. Trailing
    whitespace is always held (a later non-whitespace character releases it, :meth:`drop` discards
    it, :meth:`release` emits it), so the streamed text never depends on how the input was split.
    """

    def __init__(self, *, drop_leading: bool) -> None:
        self._drop_leading = drop_leading
        self.started = False  # a non-whitespace character has been emitted
        self._held = ""

    def push(self, text: str) -> str:
        if not text:
            return ""
        if not self.started and self._drop_leading:
            text = text.lstrip()
            if not text:
                return ""
        body = text.rstrip()
        if not body:
            self._held += text
            return ""
        out = self._held + body
        self._held = text[len(body) :]
        self.started = True
        return out

    def drop(self) -> None:
        self._held = ""

    def release(self) -> str:
        out, self._held = self._held, ""
        if not self.started and self._drop_leading:
            return ""
        return out
