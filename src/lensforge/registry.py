"""One small registry class for every pluggable kind (sources, models, tasks, ...).

``@REG.register("name")`` adds a factory, ``REG.create(name, **kw)`` builds one,
``REG.list(pattern)`` lists names (shell-style wildcards). Duplicate names raise;
unknown names raise a :class:`UsageError` that suggests close matches.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lensforge.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> factory mapping for one kind of pluggable component."""

    def __init__(self, kind: str, *, listed: bool = True) -> None:
        self.kind = kind
        self.listed = listed  # `lensforge list <kind>s` shows it; otherwise errors name the known entries
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UsageError(self.unknown_message(name)) from None

    def unknown_message(self, name: str, extra: list[str] | None = None) -> str:
        candidates = list(self._entries) + list(extra or [])
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = f"see `lensforge list {self.kind}s`" if self.listed else f"known: {', '.join(sorted(candidates))}"
        return f"unknown {self.kind} {name!r}{hint} ({where})"

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
