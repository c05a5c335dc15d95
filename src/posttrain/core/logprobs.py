"""Per-token log-probabilities and entropies from logits, chunked over rows.

Shapes: B sequences, T tokens, V vocabulary. A full fp32 log-softmax of a [B, T, V] bf16
tensor is 2x its size again (and autograd would keep it alive until backward). Here both
functions are custom autograd Functions that walk N = B*T rows `chunk_size` at a time,
keep only the per-row log-normaliser (logsumexp) for backward, and recompute the softmax
of one chunk at a time in backward. Peak extra memory is O(chunk_size * V) in fp32.

Temperature: sampling at temperature τ draws from softmax(z/τ), so the log-probs that
importance ratios compare against must be computed from z/τ too — both functions take it.
"""

from __future__ import annotations

import torch

from posttrain.core._checks import compute_dtype, ndim, positive
from posttrain.errors import DataError

DEFAULT_CHUNK_SIZE = 1024  # rows (tokens) per chunk; 1024 x 152k vocab x 4 B = 0.6 GB fp32


class _GatherLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_size):  # logits [N, V], tokens [N]
        dt = compute_dtype(logits)
        out = torch.empty(logits.shape[0], dtype=dt, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, logits.shape[0], chunk_size):
            z = logits[s : s + chunk_size].to(dt) / temperature  # [n, V]
            lse[s : s + chunk_size] = torch.logsumexp(z, dim=-1)
            picked = z.gather(-1, tokens[s : s + chunk_size, None]).squeeze(-1)
            out[s : s + chunk_size] = picked - lse[s : s + chunk_size]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [N]
        logits, tokens, lse = ctx.saved_tensors
        tau, cs = ctx.temperature, ctx.chunk_size
        grad = torch.empty_like(logits)
        dt = lse.dtype
        for s in range(0, logits.shape[0], cs):
            z = logits[s : s + cs].to(dt) / tau
            go = grad_out[s : s + cs].to(dt)
            # d(z_y - lse)/dz_j = 1[j=y] - softmax_j, then the chain rule through z = logits/τ.
            g = -torch.exp(z - lse[s : s + cs, None]) * go[:, None]
            g.scatter_add_(-1, tokens[s : s + cs, None], go[:, None])
            grad[s : s + cs] = (g / tau).to(logits.dtype)
        return grad, None, None, None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, temperature, chunk_size):  # logits [N, V]
        dt = compute_dtype(logits)
        out = torch.empty(logits.shape[0], dtype=dt, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, logits.shape[0], chunk_size):
            z = logits[s : s + chunk_size].to(dt) / temperature
            lse_c = torch.logsumexp(z, dim=-1)
            p = torch.exp(z - lse_c[:, None])
            lse[s : s + chunk_size] = lse_c
            out[s : s + chunk_size] = lse_c - (p * z).sum(-1)  # H = lse - E_p[z]
        ctx.save_for_backward(logits, lse, out)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, ent = ctx.saved_tensors
        tau, cs = ctx.temperature, ctx.chunk_size
        grad = torch.empty_like(logits)
        dt = lse.dtype
        for s in range(0, logits.shape[0], cs):
            z = logits[s : s + cs].to(dt) / tau
            p = torch.exp(z - lse[s : s + cs, None])
            # dH/dz_j = -p_j (log p_j + H)  with log p_j = z_j - lse.
            logp = z - lse[s : s + cs, None]
            g = -p * (logp + ent[s : s + cs, None]) * grad_out[s : s + cs, None].to(dt)
            grad[s : s + cs] = (g / tau).to(logits.dtype)
        return grad, None, None


def _flatten(where: str, logits: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
    ndim(where, "logits", logits, (2, 3))
    positive(where, "temperature", temperature)
    positive(where, "chunk_size", chunk_size)
    return logits.reshape(-1, logits.shape[-1])


def logprobs_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens], computed chunk by chunk.

    Args:
        logits: [B, T, V] (or [N, V]) — the logits that PREDICT `tokens` (already shifted
            by the caller: logits[:, t] scores tokens[:, t]). Any float dtype; computed in
            float32 (float64 kept).
        tokens: [B, T] (or [N]) int64 token ids in [0, V). Negative ids (e.g. -100 padding)
            are read as id 0; mask those positions out downstream.
        temperature: τ > 0 the sampler used.
        chunk_size: rows per chunk; only memory depends on it, never the result.
    Returns: [B, T] log-probs in float32 (float64 for float64 logits), differentiable
        w.r.t. `logits` (the gradient is returned in `logits.dtype`).
    """
    flat = _flatten("logprobs_from_logits", logits, temperature, chunk_size)
    if tokens.shape != logits.shape[:-1]:
        raise DataError(
            f"logprobs_from_logits: tokens shape {tuple(tokens.shape)} does not match logits "
            f"{tuple(logits.shape)} without the vocab dim"
        )
    tok = tokens.reshape(-1).long().clamp_min(0)
    out = _GatherLogprob.apply(flat, tok, float(temperature), int(chunk_size))
    return out.reshape(tokens.shape)


def entropy_from_logits(
    logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Shannon entropy H = -Σ_v p_v log p_v of softmax(logits / temperature), per position.

    The entropy bonus of PPO (Schulman et al. 2017, eq. 9) is `-coef * aggregate(entropy)`
    added to the loss; the caller owns the coefficient and aggregation mode.

    Args:
        logits: [B, T, V] (or [N, V]), any float dtype.  temperature: τ > 0.
        chunk_size: rows per chunk (memory only).
    Returns: [B, T] entropies (nats), float32/float64, differentiable w.r.t. logits.
    """
    flat = _flatten("entropy_from_logits", logits, temperature, chunk_size)
    out = _Entropy.apply(flat, float(temperature), int(chunk_size))
    return out.reshape(logits.shape[:-1])
