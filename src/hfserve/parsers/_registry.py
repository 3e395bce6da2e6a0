"""A registry of parser classes by name (``--tool-call-parser NAME``, ``--reasoning-parser NAME``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Parser classes by name; ``kind`` names them in the error for an unknown name."""

    def __init__(self, kind: str, entries: Mapping[str, type[T]]):
        self.kind = kind
        self._entries: dict[str, type[T]] = dict(entries)
        #: a read-only view, for listing
        self.view: Mapping[str, type[T]] = MappingProxyType(self._entries)

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: make a parser available under ``name``."""

        def register(cls: type[T]) -> type[T]:
            self._entries[name] = cls
            return cls

        return register

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; ValueError naming the known ones otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None
