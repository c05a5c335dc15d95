"""One adapter for the parts of transformers' API that moved between releases.

transformers 5.25 renamed the decoder's KV-cache argument from ``past_key_values`` to
``cache`` (the old name is a deprecated alias until 5.40). Code that checked for the old
name silently stopped taking its cached fast path on 5.25, so every place that passes a
cache goes through here instead of spelling the argument itself:

- `cache_argument(module)`: the keyword under which ``module.forward`` takes a KV cache
  (``"cache"`` or ``"past_key_values"``), or None when it takes none;
- `new_cache()`: an empty `DynamicCache`;
- `reorder_cache(cache, index)`: rows of every layer's keys/values picked by ``index``;
- `forward_with_cache(module, cache, **inputs)`: ``module(**inputs)`` continuing from and
  filling ``cache``.

Tested against the locked transformers and the newest allowed release
(``bash scripts/test.sh --latest``), and against stand-in decoders of both spellings.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

# Newest spelling first: a module that accepts both (the deprecation window) gets the new one.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(module: nn.Module) -> str | None:
    """Name of ``module.forward``'s KV-cache keyword, or None if it has none (or no signature)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    if "use_cache" not in params:
        return None
    return next((name for name in CACHE_ARGUMENTS if name in params), None)


def new_cache() -> DynamicCache:
    """An empty dynamic (growing) KV cache."""
    return DynamicCache()


def reorder_cache(cache: DynamicCache, index: torch.Tensor) -> None:
    """Select rows ``index`` [B'] of every layer's keys and values, in place.

    Differentiable (index_select): gradients of all rows that share a source row add up.
    """
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return
    cache.batch_select_indices(index)  # pragma: no cover - older spelling


def forward_with_cache(module: nn.Module, cache: DynamicCache, **inputs):
    """``module(**inputs)`` that reads and extends ``cache``.

    Raises TypeError when the module takes no cache (callers check `cache_argument` first).
    """
    name = cache_argument(module)
    if name is None:
        raise TypeError(f"{type(module).__name__}.forward takes no KV cache argument")
    return module(**inputs, **{name: cache}, use_cache=True)


__all__ = ["CACHE_ARGUMENTS", "cache_argument", "forward_with_cache", "new_cache", "reorder_cache"]
