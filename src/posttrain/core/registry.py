"""Small name -> function registries, one per family (DESIGN.md §4).

A failed lookup raises `KeyError`-compatible `ConfigError` listing the valid names and
the closest match, so a typo in a config is a one-line fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from posttrain.errors import ConfigError

F = TypeVar("F", bound=Callable)


class UnknownNameError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[F]):
    """A named family of functions sharing one signature.

    >>> LOSSES = Registry("policy loss")
    >>> @LOSSES.register("ppo")
    ... def ppo(...): ...
    >>> LOSSES["ppo"]
    """

    def __init__(self, family: str):
        self.family = family
        self._items: dict[str, F] = {}

    def register(self, name: str, *aliases: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            for key in (name, *aliases):
                if key in self._items:
                    raise ValueError(f"{self.family} {key!r} registered twice")
                self._items[key] = fn
            return fn

        return deco

    def __getitem__(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        valid = sorted(self._items)
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.family} {name!r}.{hint} Valid: {', '.join(valid)}"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
