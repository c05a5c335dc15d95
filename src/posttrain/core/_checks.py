"""Shape and option checks shared by the core modules.

Every check raises a one-line `DataError` (tensor shapes) or `ConfigError` (option values)
that names the function and the argument, so a mis-wired caller finds the culprit at once.
Checks look only at shapes and Python numbers: they never synchronise with the device.
"""

from __future__ import annotations

import torch

from posttrain.errors import ConfigError, DataError


def same_shape(where: str, **tensors: torch.Tensor | None) -> None:
    """Raise DataError unless all non-None tensors share one shape."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise DataError(
                f"{where}: {name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}"
            )


def ndim(where: str, name: str, t: torch.Tensor, dims: int | tuple[int, ...]) -> None:
    """Raise DataError unless `t.dim()` is one of `dims`."""
    allowed = (dims,) if isinstance(dims, int) else dims
    if t.dim() not in allowed:
        want = " or ".join(str(d) for d in allowed)
        raise DataError(f"{where}: {name} must have {want} dims, got shape {tuple(t.shape)}")


def positive(where: str, name: str, value: float, allow_zero: bool = False) -> None:
    """Raise ConfigError unless `value` is > 0 (or >= 0 with allow_zero)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{where}: {name} must be {bound}, got {value!r}")


def choice(where: str, name: str, value: str, options: tuple[str, ...]) -> None:
    """Raise ConfigError unless `value` is one of `options`."""
    if value not in options:
        raise ConfigError(f"{where}: {name} must be one of {', '.join(options)}; got {value!r}")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32, ints) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
