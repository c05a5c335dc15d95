"""Small name -> function registries, one per family (DESIGN.md §4), with metadata.

Each entry carries what validation and the spec-level callers need to know without calling
it or reflecting on its signature:

- `needs`: the named inputs the entry reads beyond the family's fixed arguments (for an
  advantage estimator e.g. {"scores", "group_id"}); a subset of the family's `inputs`.
  Callers pass an entry exactly these (`Registry.inputs`), and validation asks them ("does
  this estimator compare samples of one prompt?" is `"group_id" in needs`).
- `options`: a frozen dataclass of the entry's own tunables, each field documented with its
  default (None: the entry has none). `Registry.options` builds it from a config dict and
  refuses an unknown key or a value of the wrong type with a one-line ConfigError naming
  the key and suggesting the near match; the function receives the fields as keywords.
- `info`: any other family-specific record (e.g. a reward's `RewardInfo`).

A failed lookup raises a `KeyError`-compatible `ConfigError` listing the valid names and
the closest match, so a typo in a config is a one-line fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from posttrain.errors import ConfigError

F = TypeVar("F", bound=Callable)


class UnknownNameError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Entry:
    """The metadata of one registered name (see the module doc)."""

    needs: frozenset[str]
    options: type | None
    info: Any


def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether `value` is a `hint`: float (int accepted), int, bool, str, Literal, X | None."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not model: the entry checks the value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _literal_none(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Literal and "none" in typing.get_args(hint)


class Registry(Generic[F]):
    """A named family of functions sharing one calling convention.

    >>> LOSSES = Registry("policy loss", inputs=("ref_logprobs",))
    >>> @LOSSES.register("kimi", needs={"ref_logprobs"}, options=KimiOptions)
    ... def kimi(logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, beta=1.0): ...
    >>> LOSSES["kimi"], LOSSES.needs("kimi"), LOSSES.options("kimi", {"beta": 0.5}, "algo.x")

    inputs: the names an entry of this family may declare in `needs`.
    """

    def __init__(self, family: str, inputs: Iterable[str] = ()):
        self.family = family
        self.inputs_vocabulary = frozenset(inputs)
        self._items: dict[str, F] = {}
        self._meta: dict[str, Entry] = {}

    def register(
        self,
        name: str,
        *aliases: str,
        needs: Iterable[str] = (),
        options: type | None = None,
        info: Any = None,
    ) -> Callable[[F], F]:
        needs = frozenset(needs)
        unknown = needs - self.inputs_vocabulary
        if unknown:
            raise ValueError(f"{self.family} {name!r} needs unknown inputs {sorted(unknown)}")
        if options is not None and not (
            dataclasses.is_dataclass(options) and options.__dataclass_params__.frozen
        ):
            raise ValueError(f"{self.family} {name!r}: options must be a frozen dataclass")

        def deco(fn: F) -> F:
            for key in (name, *aliases):
                if key in self._items:
                    raise ValueError(f"{self.family} {key!r} registered twice")
                self._items[key] = fn
                self._meta[key] = Entry(needs, options, info)
            return fn

        return deco

    def _entry(self, name: str) -> Entry:
        try:
            return self._meta[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def __getitem__(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def needs(self, name: str) -> frozenset[str]:
        """The named inputs entry `name` reads (a subset of the family's inputs)."""
        return self._entry(name).needs

    def options_type(self, name: str) -> type | None:
        """The options dataclass of entry `name` (None: it takes no options)."""
        return self._entry(name).options

    def info(self, name: str) -> Any:
        """The family-specific record registered with `name` (None if none was)."""
        return self._entry(name).info

    def options(self, name: str, given: dict[str, Any] | None, where: str) -> Any:
        """Entry `name`'s options dataclass built from `given` (key -> value), or None when
        the entry takes no options and none are given.

        Raises a one-line ConfigError `<where>.<key>: ...` for an unknown key (with the near
        match and the valid keys) or a value of the wrong type. A field typed as a Literal
        that includes the word "none" reads a null as "none" (YAML and the CLI read `none`
        as null).
        """
        cls = self._entry(name).options
        given = dict(given or {})
        hints = typing.get_type_hints(cls) if cls is not None else {}
        valid = [f.name for f in dataclasses.fields(cls)] if cls is not None else []
        for key, value in given.items():
            if key not in hints:
                raise ConfigError(
                    f"{where}.{key}: unknown option for {self.family} {name!r}.{_suggest(key, valid)} "
                    f"Valid: {', '.join(valid) or '(none: it takes no options)'}"
                )
            if value is None and _literal_none(hints[key]):
                given[key] = value = "none"
            if not _type_ok(value, hints[key]):
                raise ConfigError(
                    f"{where}.{key}: {self.family} {name!r} wants {_describe(hints[key])}, got {value!r}"
                )
        return None if cls is None else cls(**given)

    def inputs(self, name: str, available: dict[str, Any]) -> dict[str, Any]:
        """The subset of `available` (input name -> value) that entry `name` declares it reads.

        `available` must offer every input of the family's vocabulary the entry needs; a
        missing one is a wiring error in the caller (ValueError naming it).
        """
        needs = self._entry(name).needs
        missing = needs - set(available)
        if missing:
            raise ValueError(
                f"{self.family} {name!r} needs {sorted(missing)}, which the caller did not offer"
            )
        return {key: available[key] for key in sorted(needs)}

    def option_kwargs(self, name: str, options: Any) -> dict[str, Any]:
        """Entry `name`'s options as keyword arguments: the fields of `options` (an instance
        of its options dataclass, or None for the defaults)."""
        cls = self._entry(name).options
        if options is None:
            return {}
        if cls is None or not isinstance(options, cls):
            want = cls.__name__ if cls is not None else "no options"
            raise TypeError(f"{self.family} {name!r} takes {want}, got {type(options).__name__}")
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}

    def unknown_message(self, name: str) -> str:
        valid = sorted(self._items)
        return f"unknown {self.family} {name!r}.{_suggest(name, valid)} Valid: {', '.join(valid)}"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
