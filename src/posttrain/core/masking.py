"""Masked reductions and loss aggregation.

Shapes: B sequences, T tokens. `mask` is 1 where a token counts (never a padding mask).
All reductions upcast bf16/fp16 to float32 (float64 stays float64) and return that dtype,
because sums of many low-precision terms lose the digits the optimiser needs.
Empty masks give 0, never NaN: every denominator is clamped to at least `min_count`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from posttrain.core._checks import compute_dtype, ndim, positive
from posttrain.core.registry import Registry
from posttrain.errors import DataError

Number = int | float | torch.Tensor


def _prep(where: str, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if mask.shape != x.shape:
        try:
            mask = mask.expand_as(x)
        except RuntimeError:
            raise DataError(
                f"{where}: mask shape {tuple(mask.shape)} does not match x shape {tuple(x.shape)}"
            ) from None
    dt = compute_dtype(x)
    return x.to(dt), mask.to(dt)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is 1.

    Args:
        x: any shape, e.g. [B, T].
        mask: same shape as `x` (or broadcastable to it); 1 = counts.
        dim: dimension to reduce; None reduces everything to a scalar.
    Returns: `x` reduced over `dim` (scalar when dim is None), float32/float64.
    """
    x, m = _prep("masked_sum", x, mask)
    # where() rather than x*m so that inf/NaN in padded positions cannot leak (0*inf = NaN).
    xm = torch.where(m > 0, x * m, torch.zeros_like(x))
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, min_count: float = 1.0
) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1.

    Args:
        x: any shape, e.g. [B, T].  mask: same shape.  dim: None = all elements.
        min_count: lower clamp of the denominator, so an empty mask yields 0 instead of NaN.
    Returns: scalar (dim None) or `x` reduced over `dim`.
    """
    x, m = _prep("masked_mean", x, mask)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp_min(min_count)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, unbiased: bool = True
) -> torch.Tensor:
    """Variance of `x` over positions where `mask` is 1.

    Args:
        x: any shape.  mask: same shape.  dim: None = all elements.
        unbiased: Bessel's correction n/(n-1). With n <= 1 active entries the unbiased
            variance is undefined; we return 0 there (a single sample carries no spread),
            which keeps whitening finite. The biased form also returns 0 on empty masks.
    Returns: scalar (dim None) or `x` reduced over `dim`.
    Shapes: x, mask [B, T] (any shape) -> scalar or reduced over dim.
    """
    x, m = _prep("masked_var", x, mask)
    mean = masked_mean(x, m, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    centered_sq = (x - mean) ** 2
    n = m.sum() if dim is None else m.sum(dim)
    ss = masked_sum(centered_sq, m, dim)
    denom = (n - 1.0) if unbiased else n
    var = ss / denom.clamp_min(1.0)
    return torch.where(n > (1.0 if unbiased else 0.0), var, torch.zeros_like(var))


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise `x` to zero mean and unit (unbiased) variance over the masked entries.

    Used for REINFORCE++ global advantage normalisation and PPO advantage whitening.

    Args:
        x: [B, T] (or any shape).  mask: same shape.
        shift_mean: if False the mean is added back (only the scale changes), as in
            whitening of returns for value targets.
        eps: (> 0) added to the variance before the square root; bounds the output for a
            zero-variance batch (which then whitens to exactly 0).
    Returns: same shape as `x`; masked-out positions are 0.
    """
    positive("masked_whiten", "eps", eps)
    x, m = _prep("masked_whiten", x, mask)
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m > 0, out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------
# Aggregation: one [B, T] (or [B]) loss -> scalar, named after what it computes.
# ---------------------------------------------------------------------------------------

AggregationFn = Callable[..., torch.Tensor]
AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation")


def _count(value: Number | None, fallback: torch.Tensor) -> torch.Tensor | float:
    # A caller-given global count is trusted as-is (clamped so an all-empty step gives 0).
    if value is None:
        return fallback.clamp_min(1.0)
    if isinstance(value, torch.Tensor):
        return value.to(fallback.dtype).clamp_min(1.0)
    return max(float(value), 1.0)


@AGGREGATIONS.register("token-mean")
def _token_mean(loss, mask, *, num_tokens=None, num_seqs=None, max_len=None):
    """sum over all active tokens / number of active tokens (DAPO's token-level loss)."""
    return masked_sum(loss, mask) / _count(num_tokens, mask.sum())


def _active_seqs(mask: torch.Tensor) -> torch.Tensor:
    return (mask.sum(-1) > 0).to(mask.dtype).sum()


@AGGREGATIONS.register("seq-mean-token-mean")
def _seq_mean_token_mean(loss, mask, *, num_tokens=None, num_seqs=None, max_len=None):
    """mean over sequences of each sequence's token mean (original GRPO)."""
    per_seq = masked_mean(loss, mask, dim=-1)  # [B]
    return per_seq.sum() / _count(num_seqs, _active_seqs(mask))


@AGGREGATIONS.register("seq-mean-token-sum")
def _seq_mean_token_sum(loss, mask, *, num_tokens=None, num_seqs=None, max_len=None):
    """mean over sequences of each sequence's token sum."""
    per_seq = masked_sum(loss, mask, dim=-1)  # [B]
    return per_seq.sum() / _count(num_seqs, _active_seqs(mask))


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(loss, mask, *, num_tokens=None, num_seqs=None, max_len=None):
    """token sum / (num_seqs * max_len): Dr. GRPO's constant normaliser (no length bias)."""
    length = float(max_len) if max_len is not None else float(mask.shape[-1])
    positive("aggregate", "max_len", length)
    return masked_sum(loss, mask) / (_count(num_seqs, _active_seqs(mask)) * length)


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    num_tokens: Number | None = None,
    num_seqs: Number | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to the scalar that is back-propagated.

    Modes (Dr. GRPO, Liu et al. 2025, §3, discuss the length bias of each):
      - "token-mean":            Σ_bt m·l / N_tok
      - "seq-mean-token-mean":   Σ_b (Σ_t m·l / Σ_t m) / N_seq
      - "seq-mean-token-sum":    Σ_b Σ_t m·l / N_seq
      - "seq-mean-token-sum-norm": Σ_bt m·l / (N_seq · max_len)   (Dr. GRPO)

    Args:
        loss: [B, T] per-token loss, or [B] for a sequence-level loss.
        mask: [B, T] (or [B] when loss is [B]); 1 = counts.
        mode: a name in AGGREGATIONS.
        num_tokens: GLOBAL number of active tokens in the whole optimiser step (all
            micro-batches, all ranks). Defaults to this call's mask.sum().
        num_seqs: GLOBAL number of (non-empty) sequences in the step. Defaults to the number
            of rows of this call's mask with at least one active token.
        max_len: the constant of "seq-mean-token-sum-norm" (the generation budget);
            defaults to T, which is only micro-batch-invariant if every micro-batch is padded
            to the same T — pass it explicitly.
    With the global counts given, Σ over micro-batches of aggregate(part) == aggregate(whole)
    for every mode, so gradient accumulation and data parallelism do not change the loss.
    A [B] loss is treated as one "token" per sequence: every mode then returns
    Σ_b m_b·l_b / N_seq (num_tokens and max_len are ignored).
    Returns: scalar tensor (float32, or float64 for float64 input). Empty mask -> 0.
    """
    fn = AGGREGATIONS[mode]
    ndim("aggregate", "loss", loss, (1, 2))
    if loss.dim() == 1:
        if mask.dim() == 2:
            mask = (mask.sum(-1) > 0).to(compute_dtype(loss))
        if mask.shape != loss.shape:
            raise DataError(
                f"aggregate: mask shape {tuple(mask.shape)} does not fit loss {tuple(loss.shape)}"
            )
        m = mask.to(compute_dtype(loss))
        return masked_sum(loss, m) / _count(num_seqs, m.sum())
    if mask.shape != loss.shape:
        raise DataError(f"aggregate: mask shape {tuple(mask.shape)} does not match loss {tuple(loss.shape)}")
    return fn(loss, mask.to(compute_dtype(loss)), num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
