"""Text helpers shared by the streaming parsers: finding tags in a growing buffer, holding whitespace."""

from __future__ import annotations

import re
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


class JsonEnd:
    """Finds where the JSON object or array at the start of a growing text ends, reading each character once.

    It counts brackets outside strings, so it also ends at invalid JSON that balances (``{"a": 1,}``):
    decoding that prefix then says whether it is a value. Text that never balances never ends.
    """

    _PLAIN = re.compile(r'[^"\\\[\]{}]+')
    _IN_STRING = re.compile(r'[^"\\]+')

    def __init__(self) -> None:
        self._pos = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def scan(self, text: str, start: int = 0, limit: int | None = None) -> int | None:
        """The index just past the end of the value that starts at ``start``, when it ends before ``limit``.

        ``text`` may only have grown (at its end) since the last call; ``start`` must stay the same.
        """
        n = len(text) if limit is None else min(limit, len(text))
        i = max(self._pos, start)
        while i < n:
            if self._escaped:
                self._escaped = False
                i += 1
                continue
            m = (self._IN_STRING if self._in_string else self._PLAIN).match(text, i, n)
            if m is not None:
                i = m.end()
                continue
            c = text[i]
            i += 1
            if c == "\\":
                self._escaped = self._in_string
            elif c == '"':
                self._in_string = not self._in_string
            elif c in "[{":
                self._depth += 1
            else:  # "]" or "}"
                self._depth -= 1
                if self._depth <= 0:
                    self._pos = i
                    return i
        self._pos = max(self._pos, i)
        return None


class PythonListEnd:
    """Finds the ``]`` that may close the Python list at the start of a growing text (brackets outside
    string literals, single- or triple-quoted, with escapes), reading each character once.

    Each candidate it returns is where the brackets balance; the caller checks it with :mod:`ast` and
    asks for the next one if it is not a list after all.
    """

    def __init__(self) -> None:
        self._pos = 0
        self._depth = 0
        self._quote = ""  # the open string's delimiter: ' " ''' or """
        self._escaped = False

    def scan(self, text: str, start: int = 0) -> int | None:
        """The index just past the next balancing ``]``, or None when there is none yet."""
        i = max(self._pos, start)
        n = len(text)
        while i < n:
            c = text[i]
            if self._quote:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif text.startswith(self._quote, i):
                    i += len(self._quote)
                    self._quote = ""
                    continue
                elif len(self._quote) == 3 and c == self._quote[0] and n - i < 3:
                    break  # might be the start of the closing triple quote: wait for more
                i += 1
                continue
            if c in "'\"":
                triple = c * 3
                if text.startswith(triple, i):
                    self._quote = triple
                    i += 3
                    continue
                if n - i < 3 and triple.startswith(text[i:]):
                    break  # one or two quotes at the edge: a triple quote may be coming
                self._quote = c
            elif c in "([{":
                self._depth += 1
            elif c in ")]}":
                self._depth -= 1
                if self._depth <= 0 and c == "]":
                    self._pos = i + 1
                    return i + 1
            i += 1
        self._pos = i
        return None


class BufferedSteps:
    """A streaming parser's intake: generated text is appended to ``_buf`` and ``_step`` decides
    what it can; subclasses define ``_step(final)`` (True to be called again)."""

    _buf: str
    _finished: bool

    def _step(self, final: bool) -> bool:
        raise NotImplementedError

    def _push(self, text: str) -> None:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        buf, self._buf = self._buf, ""
        buf += text  # in place when the buffer has no other reference: no quadratic copying
        self._buf = buf
        del buf
        while self._step(final=False):
            pass
