"""The TRPO update of the RL loop (`algo.trust_region δ`, preset `algo.method trpo`).

Replaces the optimizer's policy step with one natural-gradient step per batch (study
guide §4.1; Schulman et al. 2015, Appendix C):

1. g = ∇ surrogate at θ_old (algos/trpo.py), over the batch's micro-batches;
2. x ≈ −(F + λI)⁻¹ g by `algo.cg_iters` conjugate-gradient iterations on Fisher-vector
   products of the mean token KL (core/trpo.py);
3. the full step s = β x with ½ sᵀF s = δ;
4. backtracking line search: θ_old + 2⁻ⁱ s for i = 0 .. `algo.backtrack_steps`−1, the
   first whose surrogate is lower than at θ_old and whose measured KL(π_old ‖ π_θ) ≤ δ is
   accepted; if none is, θ stays θ_old (metric trpo/accepted 0).

This is the policy learner's update (`PolicyLearner.update` calls `trpo_update(self,
batch)`); a critic, if any, is updated by its own learner. Costs per batch: one
forward for old logits, one forward/backward for g, one KL graph kept for cg_iters + 1
double-backward passes, and one forward per line-search try — for small models.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from posttrain.algos.trpo import trpo_kl, trpo_surrogate
from posttrain.core.trpo import conjugate_gradient, fisher_vector_product, flat, trust_region_step
from posttrain.engines.logprobs import response_logits


def _logits(learner, seq) -> torch.Tensor:
    return response_logits(learner.model, seq).float() / learner.temperature  # [b, T, V]


def _pieces(learner, batch, micro: int, counts: dict, old_logits: list[torch.Tensor], with_grad: bool):
    """(surrogate, kl) summed over micro-batches at the current weights."""
    spec = learner.spec
    surrogate = kl = torch.zeros(())
    ctx = torch.enable_grad() if with_grad else torch.no_grad()
    with ctx:
        for j, idx in enumerate(torch.arange(len(batch)).split(micro)):
            mi = batch.select(idx)
            logits = _logits(learner, mi.seq)
            lp = (
                torch.log_softmax(logits, -1).gather(-1, mi.seq.response_ids[..., None]).squeeze(-1)
            )  # [b, T]
            surrogate = surrogate + trpo_surrogate(lp, mi.old_logprobs, mi.advantages, mi.mask,
                                                   aggregation=spec.aggregation, **counts)  # fmt: skip
            kl = kl + trpo_kl(
                old_logits[j], logits, mi.mask, temperature=1.0, num_tokens=counts["num_tokens"]
            )
    return surrogate, kl


def _natural_step(surrogate, kl, params, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, full step s): the surrogate's gradient and β·x with x ≈ −(F + λI)⁻¹ g. The KL
    graph (kept for the Fisher-vector products) is freed when this returns."""
    g = flat(torch.autograd.grad(surrogate, params, retain_graph=True))
    kl_grad = flat(torch.autograd.grad(kl, params, create_graph=True))

    def fvp(v):
        return fisher_vector_product(kl_grad, params, v, spec.cg_damping)

    direction = conjugate_gradient(fvp, -g.detach(), iters=spec.cg_iters)
    return g.detach(), trust_region_step(direction, fvp(direction), spec.trust_region).detach()


def trpo_update(learner, batch) -> dict[str, float]:
    """One TRPO step of the PolicyLearner `learner` on `batch` (see module doc); returns
    the step's metrics (train/updates is 1 when the line search accepted a step)."""
    spec, cfg = learner.spec, learner.cfg
    params = learner.parameters()
    micro = cfg.algo.micro_batch_size or len(batch)
    counts = {
        "num_tokens": float(batch.mask.sum()),
        "num_seqs": float((batch.mask.sum(-1) > 0).sum()),
        "max_len": cfg.rollout.max_new_tokens,
    }
    with torch.no_grad():
        old_logits = [_logits(learner, batch.select(i).seq) for i in torch.arange(len(batch)).split(micro)]
    # The fused attention kernels have no double backward; the math kernel is plain
    # differentiable ops, so the Fisher-vector products can differentiate through it.
    with sdpa_kernel(SDPBackend.MATH):
        surrogate, kl = _pieces(learner, batch, micro, counts, old_logits, with_grad=True)
        g, full = _natural_step(surrogate, kl, params, spec)
    loss_old = float(surrogate.detach())
    theta_old = parameters_to_vector(params).detach().clone()
    out = {
        "policy/loss": loss_old,
        "train/grad_norm": float(g.norm()),
        "trpo/expected_improve": float(-(g @ full)),
    }
    accepted, frac, kl_new, tries = False, 0.0, 0.0, 0
    if math.isfinite(float(full.norm())) and math.isfinite(loss_old):
        for i in range(spec.backtrack_steps):
            tries = i + 1
            frac = 0.5**i
            vector_to_parameters(theta_old + frac * full, params)
            loss_new, kl_t = _pieces(learner, batch, micro, counts, old_logits, with_grad=False)
            kl_new = float(kl_t)
            if kl_new <= spec.trust_region and float(loss_new) < loss_old:
                accepted = True
                out["trpo/improve"] = loss_old - float(loss_new)
                break
    if not accepted:
        vector_to_parameters(theta_old, params)  # a rejected line search: not a bad step
        frac, kl_new = 0.0, 0.0
    out.update({"trpo/accepted": float(accepted), "trpo/step_frac": frac, "trpo/kl": kl_new,
                "trpo/backtracks": float(tries - 1 if accepted else tries), "train/updates": float(accepted),
                "train/skipped_total": learner.guard.total})  # fmt: skip
    for param in params:
        param.grad = None
    out["train/lr"] = learner.lr()
    out["loss/total"] = loss_old
    return out
