"""Command configs: one dataclass per command, loaded from YAML plus dotted CLI overrides.

DESIGN.md §5.3. A command config is a dataclass whose fields are either plain values or
nested *section* dataclasses (``model``, ``optim``, ``run``, ``algo``, ...). Every field
carries its documentation in ``field(metadata={"help": ...})`` so that ``--help`` is
generated from the same place the default lives.

Loading order: dataclass defaults < YAML file < CLI overrides. Every key is checked
against the dataclass: an unknown key is a ``ConfigError`` that names it and suggests the
closest valid dotted names; a value of the wrong type is a ``ConfigError`` naming the key
and the expected type. Supported field types: ``bool``, ``int``, ``float``, ``str``,
``Literal[...]`` (choice validated), ``X | None``, ``list[X]``, ``tuple[X, ...]`` /
``tuple[X, Y]``, ``dict[str, X]``, ``Any`` and nested dataclasses. A section given in YAML
or by overrides is merged key by key onto the command's default for that section (dict
options too), so a recipe only lists what it changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from posttrain.errors import ConfigError
from posttrain.train.config.checks import load_recipe_yaml
from posttrain.train.config.sections import (  # noqa: F401  (re-exported: commands import them from here)
    InferenceModelSection,
    ModelSection,
    OptimSection,
    RunSection,
    ValueModelSection,
)

C = TypeVar("C")

_MISSING_HELP = "(undocumented)"


# --------------------------------------------------------------------------- introspection


def _hints(cls: type) -> dict[str, Any]:
    # Resolves `from __future__ import annotations` strings into real types.
    return typing.get_type_hints(cls, include_extras=False)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted keys a config class accepts, sections expanded (``algo.clip_eps_high``)."""
    keys = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            keys.extend(valid_keys(tp, name + "."))
        else:
            keys.append(name)
    return keys


def _unknown_key_error(key: str, cls: type) -> ConfigError:
    valid = valid_keys(cls)
    ratio = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in valid}
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    # Only near-ties of the best match: a list of loosely similar keys is noise.
    close = [c for c in close if ratio[c] >= ratio[close[0]] - 0.05]
    leaf = key.rsplit(".", 1)[-1]
    # A right name in the wrong section ("clip_eps_high" instead of "algo.clip_eps_high").
    close += [k for k in valid if k.rsplit(".", 1)[-1] == leaf and k not in close]
    if close:
        hint = " — did you mean " + " or ".join(repr(c) for c in close[:3]) + "?"
    else:
        sections = sorted({k.split(".", 1)[0] for k in valid})
        hint = f" — valid top-level keys: {', '.join(sections)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


# --------------------------------------------------------------------------- coercion


def _bad(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert a YAML / CLI value to field type `tp`, or raise a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise _bad(key, tp, value)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                continue  # try the next member of the union
        raise _bad(key, tp, value)
    if value is None:
        raise _bad(key, tp, value)
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(choice, str) and str(value) == choice):
                return choice
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if _is_dataclass_type(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} is a section; expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _bad(key, tp, value)
    if tp in (int, float) and isinstance(value, bool):  # YAML's true is not the number 1
        raise _bad(key, tp, value)
    if tp is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise _bad(key, tp, value) from None
            if math.isfinite(f) and f.is_integer():
                return int(f)
        raise _bad(key, tp, value)
    if tp is float:
        if isinstance(value, str):
            try:
                # YAML 1.1 reads "1e-5" (no dot) as a string; float() reads it as meant.
                value = float(value)
            except ValueError:
                raise _bad(key, tp, value) from None
        if not isinstance(value, (int, float)):
            raise _bad(key, tp, value)
        if math.isnan(value):  # never a setting: it would only poison the run later
            raise ConfigError(f"config key {key!r}: expected a number, got NaN")
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `--run.output_dir 2024` is meant as text
        raise _bad(key, tp, value)
    if origin in (list, tuple):
        if isinstance(value, str):
            # `--model.lora_target q_proj,v_proj` as shorthand for a YAML list.
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _bad(key, tp, value)
        if origin is list:
            (item,) = args or (Any,)
            return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
        if args and len(value) != len(args):
            raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(
            _coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args or [Any] * len(value), value))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(key, tp, value)
        kt, vt = args or (Any, Any)
        return {_coerce(key, kt, k): _coerce(f"{key}.{k}", vt, v) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _bad(key, tp, value)


def _build(cls: type[C], data: dict, prefix: str = "", root: type | None = None) -> C:
    root = root or cls
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise _unknown_key_error(prefix + str(k), root)
        tp = hints[k]
        if _is_dataclass_type(tp) and v is None:
            continue  # an empty YAML section (`scorer:` with every key commented out)
        if _is_dataclass_type(tp) and isinstance(v, dict):
            # Merge onto the section's default (which a command may customise via
            # default_factory) rather than onto the section class's bare defaults.
            base = _default_of(names[k])
            merged = config_to_dict(base) if base is not None else {}
            _deep_merge(merged, v)
            kwargs[k] = _build(tp, merged, prefix + k + ".", root)
        else:
            kwargs[k] = _coerce(prefix + k, tp, v)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # __post_init__ validation in a command config
        raise ConfigError(f"config section {prefix.rstrip('.') or cls.__name__}: {e}") from None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _deep_merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


# --------------------------------------------------------------------------- overrides


_KEY_ASSIGN = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")


def _is_key_token(tok: str) -> bool:
    return tok.startswith("--") or bool(_KEY_ASSIGN.match(tok))


def parse_overrides(overrides: list[str]) -> list[tuple[str, str | None]]:
    """Split CLI tokens into (dotted_key, raw_value) pairs.

    Accepts ``--a.b 1``, ``--a.b=1``, ``a.b=1`` and a bare ``--flag`` (value None, read as
    true for a bool field). After ``--flag`` a token shaped ``key.path=...`` starts the next
    override rather than being taken as the flag's value.
    """
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(overrides):
        tok = overrides[i]
        if tok.startswith("--"):
            body = tok[2:]
            if "=" in body:
                k, v = body.split("=", 1)
                pairs.append((k, v))
            elif i + 1 < len(overrides) and not _is_key_token(overrides[i + 1]):
                pairs.append((body, overrides[i + 1]))
                i += 1
            else:
                pairs.append((body, None))
        elif "=" in tok:
            k, v = tok.split("=", 1)
            pairs.append((k, v))
        else:
            raise ConfigError(f"cannot parse override {tok!r}; use --section.key VALUE or section.key=VALUE")
        i += 1
    for k, _ in pairs:
        if not k or k.startswith(".") or k.endswith(".") or ".." in k:
            raise ConfigError(f"malformed config key {k!r} in overrides")
    return pairs


def _field_type_at(cls: type, dotted: str) -> Any:
    """The declared type at a dotted key; raises the unknown-key error when it does not exist."""
    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if _is_dataclass_type(tp):
            hints = _hints(tp)
            if part not in hints:
                raise _unknown_key_error(dotted, cls)
            tp = hints[part]
        elif typing.get_origin(tp) is dict or tp is Any:
            tp = (typing.get_args(tp) or (Any, Any))[1] if tp is not Any else Any
        else:
            raise ConfigError(
                f"config key {'.'.join(parts[:i])!r} is a value, not a section: cannot set {dotted!r}"
            )
    return tp


def _parse_value(key: str, raw: str | None, tp: Any) -> Any:
    if raw is None:
        if tp is bool or (typing.get_origin(tp) in (Union, types.UnionType) and bool in typing.get_args(tp)):
            return True
        raise ConfigError(
            f"config key {key!r} needs a value ({_type_name(tp)}): --{key} VALUE or --{key}=VALUE"
        )
    if tp is str:
        return raw  # never let YAML turn "1.0" or "yes" into a non-string for a str field
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> C:
    """Build a `cls` instance from defaults, an optional YAML file and dotted overrides.

    path: YAML mapping with nested sections; a missing/unreadable file or non-mapping top
        level is a ConfigError.
    overrides: CLI tokens (see `parse_overrides`); values are parsed as YAML scalars /
        flow lists (``[a, b]``, ``null``, ``true``) then coerced to the field type.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = load_recipe_yaml(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {p}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    for key, raw in parse_overrides(list(overrides or [])):
        tp = _field_type_at(cls, key)
        value = _parse_value(key, raw, tp)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return _build(cls, data)


# --------------------------------------------------------------------------- output


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg: Any) -> dict:
    """Nested plain dict (tuples become lists) that `load_config` reads back to an equal config."""
    return _plain(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write `cfg` as YAML atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def undocumented_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys whose field has no ``metadata['help']`` (tests assert this is empty)."""
    missing = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if not f.metadata.get("help"):
            missing.append(prefix + f.name)
        if _is_dataclass_type(tp):
            missing.extend(undocumented_fields(tp, prefix + f.name + "."))
    return missing


def config_help(cls: type) -> str:
    """Every option of a command config: ``--dotted.key  TYPE  (default: X)`` and its doc."""
    lines = []
    doc = (cls.__doc__ or "").strip().splitlines()
    if doc:
        lines.append(doc[0])
    lines.append("")
    lines.extend(_help_lines(cls, cls(), ""))
    return "\n".join(lines).rstrip() + "\n"


def _help_lines(cls: type, instance: Any, prefix: str) -> list[str]:
    lines: list[str] = []
    hints = _hints(cls)
    plain_fields = [f for f in dataclasses.fields(cls) if not _is_dataclass_type(hints[f.name])]
    sections = [f for f in dataclasses.fields(cls) if _is_dataclass_type(hints[f.name])]
    for f in plain_fields:
        default = _plain(getattr(instance, f.name))
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  --{prefix}{f.name}  {_type_name(hints[f.name])}  (default: {shown})")
        lines.append(f"      {f.metadata.get('help', _MISSING_HELP)}")
    for f in sections:
        sub = hints[f.name]
        title = f.metadata.get("help") or ((sub.__doc__ or "").strip().splitlines() or [""])[0]
        lines.append("")
        lines.append(f"[{prefix}{f.name}] {title}")
        lines.extend(_help_lines(sub, getattr(instance, f.name), prefix + f.name + "."))
    return lines
