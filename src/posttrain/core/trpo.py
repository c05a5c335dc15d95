"""TRPO's natural-gradient step: conjugate gradient on Fisher-vector products, scaled to
the trust region.

The study guide (§4.1 "Trust Region Methods", TRPO) states the problem:

    max_θ E[ π_θ(a|s) / π_old(a|s) · A ]   subject to   KL(π_old ‖ π_θ) ≤ δ

"computationally expensive (requires conjugate gradient, Fisher information matrix)".
Schulman et al. 2015 (Appendix C) solve it approximately: with g the gradient of the
surrogate and F the Fisher matrix (the Hessian of the KL at θ_old), the direction is
x = F⁻¹ g, found by conjugate gradient from Fisher-vector products F·v alone; the step
β·x with β = sqrt(2δ / xᵀFx) puts the quadratic KL model exactly at δ; a backtracking
line search (in train/rl/trpo.py) then shrinks it until the surrogate improves and the
measured KL is ≤ δ.

Shapes: flat parameter vectors [D] (D = number of trainable scalars).
Deviations: the conjugate gradient runs a fixed number of iterations with no residual
test (no host sync); `damping` λ solves (F + λI) x = g, as every TRPO implementation
does, because the empirical Fisher of a batch is singular.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from posttrain.core._checks import ndim, positive

# Added to the CG denominators so an exactly solved system (zero residual) gives 0/ε = 0.
CG_EPS = 1e-12


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors (gradients, parameters) into one flat [D] vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def conjugate_gradient(
    fvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int = 10
) -> torch.Tensor:
    """Approximate x = A⁻¹ b for a symmetric positive-definite A given only v -> A v.

    fvp: the matrix-vector product; b: [D]; iters: CG iterations (exact after D
    iterations in exact arithmetic). Returns x [D], starting from x = 0.
    """
    ndim("conjugate_gradient", "b", b, 1)
    positive("conjugate_gradient", "iters", iters)
    x = torch.zeros_like(b)
    r = b.clone()  # residual b − A x
    p = b.clone()  # search direction
    rr = r @ r
    for _ in range(iters):
        ap = fvp(p)
        alpha = rr / (p @ ap + CG_EPS)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + (rr_new / (rr + CG_EPS)) * p
        rr = rr_new
    return x


def fisher_vector_product(
    kl_grad: torch.Tensor, params: Sequence[torch.Tensor], v: torch.Tensor, damping: float
) -> torch.Tensor:
    """(F + λI) v with F the Hessian of the KL at θ_old (the Fisher information).

    kl_grad: [D] flat ∇_θ KL(π_old ‖ π_θ) built with create_graph=True (reused across
    calls: its graph is kept); params: the tensors it was taken with respect to; v: [D].
    One double-backward: F v = ∇_θ (∇_θ KL · v).
    """
    positive("fisher_vector_product", "damping", damping, allow_zero=True)
    hv = torch.autograd.grad(kl_grad @ v.detach(), list(params), retain_graph=True)
    return flat(hv) + damping * v


def trust_region_step(direction: torch.Tensor, f_direction: torch.Tensor, max_kl: float) -> torch.Tensor:
    """β · x with β = sqrt(2δ / xᵀFx): the step whose quadratic KL model ½ sᵀFs equals δ.

    direction: x [D]; f_direction: F x [D]; max_kl: δ > 0. A direction with xᵀFx ≤ 0
    (no curvature) gives the zero step.
    """
    positive("trust_region_step", "max_kl", max_kl)
    shs = direction @ f_direction
    beta = torch.sqrt(2.0 * max_kl / shs.clamp_min(CG_EPS))
    return torch.where(shs > 0, beta, torch.zeros_like(beta)) * direction
