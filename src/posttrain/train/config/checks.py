"""Value checks of the shared config sections, run when a section is built (so before any
model is): an absurd or non-finite optimizer setting, an unknown model preset or device is a
one-line ConfigError naming the key. Also `setting`, the documented config field every
command's dataclasses are written with."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import TYPE_CHECKING, Any

from posttrain.errors import ConfigError

if TYPE_CHECKING:
    from posttrain.train.config.sections import OptimSection


def setting(default: Any, help: str, *, factory: bool = False) -> Any:
    """A documented config field: `default` (with `factory`, a zero-argument constructor of
    it, for mutable defaults) and the `help` text `posttrain <command> --help` prints."""
    if factory:
        return dataclasses.field(default_factory=default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


MAX_LR = 1.0  # AdamW moves each weight by up to ~lr per step: beyond 1 nothing trains


def validate_optim(o: OptimSection) -> None:
    """One-line ConfigError for an absurd or non-finite `optim` value."""

    def bad(key: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"optim.{key} must be {want}, got {value!r}")

    numbers = {"lr": o.lr, "eps": o.eps, "weight_decay": o.weight_decay, "max_grad_norm": o.max_grad_norm,
               "min_lr_ratio": o.min_lr_ratio, "max_update_ratio": o.max_update_ratio}  # fmt: skip
    for key, value in numbers.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(key, value, "a finite number")
    if not 0 < o.lr <= MAX_LR:
        raise bad("lr", o.lr, f"a positive finite number <= {MAX_LR:g}")
    if o.eps <= 0 or o.weight_decay < 0 or o.max_update_ratio < 0:
        key = "eps" if o.eps <= 0 else "weight_decay" if o.weight_decay < 0 else "max_update_ratio"
        raise bad(key, numbers[key], "> 0" if key == "eps" else ">= 0")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in o.betas):
        raise bad("betas", list(o.betas), "two numbers in [0, 1)")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise bad("min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
    if o.warmup_steps < 0:
        raise bad("warmup_steps", o.warmup_steps, ">= 0")


def check_preset(key: str, name: str) -> None:
    """A ConfigError naming `key` when `name` is not a model preset (never a hub lookup)."""
    from posttrain.engines.models import PRESETS

    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: unknown preset {name!r}{hint} (valid: {', '.join(PRESETS)})")


def check_device(key: str, device: str) -> None:
    """A ConfigError naming `key` for a device torch does not know or this machine lacks."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{key}: unknown device {device!r} (expected cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (dev.index is not None and dev.index >= n):
            have = f"{n} CUDA device(s)" if n else "no CUDA device"
            raise ConfigError(f"{key}: {device!r} is not available on this machine ({have})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}: {device!r} is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{key}: unsupported device {device!r} (expected cpu, cuda, cuda:N or mps)")


def _strict_loader():
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last)."""

        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    hash(key)
                except TypeError:
                    continue  # let SafeLoader report the unhashable key
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first on line {seen[key] + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def load_recipe_yaml(text: str) -> Any:
    """yaml.safe_load that raises yaml.YAMLError on a key duplicated in one mapping."""
    import yaml

    return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass


def check_sampling(
    prefix: str, *, temperature: float, max_new_tokens: int, greedy_ok: bool, zero_tokens_ok: bool = False
) -> None:
    """One-line ConfigError naming `{prefix}.temperature` / `{prefix}.max_new_tokens` for
    sampling settings that cannot generate (checked when the config is read).

    greedy_ok: temperature 0 means greedy decoding (evaluation) rather than an error (RL,
        whose training forward divides the logits by the temperature).
    zero_tokens_ok: max_new_tokens 0 means "the default" for this key.
    """
    low = 0 if zero_tokens_ok else 1
    if not isinstance(max_new_tokens, int) or max_new_tokens < low:
        raise ConfigError(f"{prefix}.max_new_tokens must be >= {low}, got {max_new_tokens!r}")
    ok = math.isfinite(temperature) and (temperature >= 0 if greedy_ok else temperature > 0)
    if not ok:
        want = "a finite number >= 0 (0 = greedy)" if greedy_ok else "a finite number > 0"
        raise ConfigError(f"{prefix}.temperature must be {want}, got {temperature!r}")


def check_range(
    key: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False
) -> None:
    """ConfigError naming `key` unless lo <= value <= hi (lo < value with lo_open); None passes."""
    if value is None:
        return
    below = lo is not None and (value <= lo if lo_open else value < lo)
    if below or (hi is not None and value > hi):
        low = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        high = "" if hi is None else f"<= {hi:g}"
        raise ConfigError(f"{key} must be {' and '.join(x for x in (low, high) if x)}, got {value!r}")


def check_attention(key: str, name: str | None) -> None:
    """ConfigError naming `key` for an attention kernel transformers does not know (a hub
    kernel "org/repo" is left to transformers)."""
    if name is None or name == "eager" or "/" in name:
        return
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - other transformers layouts: let it decide
        return
    known = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
    if name not in known:
        raise ConfigError(f"{key}: unknown attention implementation {name!r} (valid: {', '.join(known)})")
