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
batch)`); a critic, if any, is updated by its own learner.

Under torch.distributed (`--nproc N`, train/rl/dp.py) the step is the one-process step on
the same global batch, by GATHERING FULL VECTORS: every rank gathers the FSDP2-sharded
policy into a plain full copy, runs its 1/N share of the batch's micro-batches (the split
of roles/updates.py) with the batch's GLOBAL token / sequence counts, and all-reduces
(sums) the full flat surrogate gradient g, each Fisher-vector product (damping added once,
after the sum) and the line search's surrogate and KL values. So every rank runs the same
conjugate gradient on the same vectors, finds the same β and takes the same line-search
decision; the accepted weights are then loaded back into the shards. This costs one full
model per rank during the update (as the generator's sampling copy does) and full-size
all-reduces of g and of cg_iters + 1 Fisher-vector products — chosen for exactness and
so that the double backward runs on plain tensors, never through FSDP2's hooks (whether it
would run through them was not tried). Costs per batch: one
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
from posttrain.engines import distributed as dist
from posttrain.engines.batching import to_model_device
from posttrain.engines.logprobs import response_logits
from posttrain.roles.updates import _my_micro_batches


def _summed(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over ranks (every rank gets the same sum); `t` itself in one process."""
    if dist.world_size() > 1:
        import torch.distributed as tdist

        t = t.clone()
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def _logits(learner, model, seq) -> torch.Tensor:
    """[b, T, V] logits / τ, on the batch's device (the model runs on its own)."""
    on_model, home = to_model_device(model, seq)
    return (response_logits(model, on_model).float() / learner.temperature).to(home)


def _pieces(learner, model, batch, chunks, counts: dict, old_logits: list[torch.Tensor], with_grad: bool):
    """(surrogate, kl) summed over this rank's micro-batches `chunks` at `model`'s weights."""
    spec = learner.spec
    surrogate = kl = torch.zeros(())
    ctx = torch.enable_grad() if with_grad else torch.no_grad()
    with ctx:
        for j, idx in enumerate(chunks):
            mi = batch.select(_rows(idx))
            logits = _logits(learner, model, mi.seq)
            lp = (
                torch.log_softmax(logits, -1).gather(-1, mi.seq.response_ids[..., None]).squeeze(-1)
            )  # [b, T]
            s_j = trpo_surrogate(lp, mi.old_logprobs, mi.advantages, mi.mask,
                                 aggregation=spec.aggregation, **counts)  # fmt: skip
            kl_j = trpo_kl(old_logits[j], logits, mi.mask, temperature=1.0, num_tokens=counts["num_tokens"])
            if idx is None:  # this rank's share ran out: a zero-weight pass keeps the graph
                s_j, kl_j = s_j * 0.0, kl_j * 0.0
            surrogate, kl = surrogate + s_j, kl + kl_j
    return surrogate, kl


def _rows(idx: torch.Tensor | None) -> torch.Tensor:
    """A micro-batch's rows; None (a rank with no rows left) stands for row 0 at weight 0."""
    return torch.zeros(1, dtype=torch.long) if idx is None else idx


def _natural_step(surrogate, kl, params, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, full step s): the surrogate's gradient and β·x with x ≈ −(F + λI)⁻¹ g. The KL
    graph (kept for the Fisher-vector products) is freed when this returns."""
    g = _summed(flat(torch.autograd.grad(surrogate, params, retain_graph=True)))
    kl_grad = flat(torch.autograd.grad(kl, params, create_graph=True))

    def fvp(v):
        if dist.world_size() == 1:
            return fisher_vector_product(kl_grad, params, v, spec.cg_damping)
        return _summed(fisher_vector_product(kl_grad, params, v, 0.0)) + spec.cg_damping * v

    direction = conjugate_gradient(fvp, -g.detach(), iters=spec.cg_iters)
    return g.detach(), trust_region_step(direction, fvp(direction), spec.trust_region).detach()


def trpo_update(learner, batch) -> dict[str, float]:
    """One TRPO step of the PolicyLearner `learner` on `batch` (see module doc); returns
    the step's metrics (train/updates is 1 when the line search accepted a step)."""
    spec, cfg = learner.spec, learner.cfg
    world = dist.world_size()
    # Under torch.distributed: a plain full copy of the sharded policy (see module doc).
    model = learner.model if world == 1 else _full_copy(learner)
    params = [p for p in model.parameters() if p.requires_grad]
    chunks = _my_micro_batches(len(batch), cfg.algo.micro_batch_size, world, dist.rank())
    counts = {
        "num_tokens": float(batch.mask.sum()),
        "num_seqs": float((batch.mask.sum(-1) > 0).sum()),
        "max_len": cfg.rollout.max_new_tokens,
    }
    with torch.no_grad():
        old_logits = [_logits(learner, model, batch.select(_rows(i)).seq) for i in chunks]
    # The fused attention kernels have no double backward; the math kernel is plain
    # differentiable ops, so the Fisher-vector products can differentiate through it.
    with sdpa_kernel(SDPBackend.MATH):
        surrogate, kl = _pieces(learner, model, batch, chunks, counts, old_logits, with_grad=True)
        g, full = _natural_step(surrogate, kl, params, spec)
    loss_old = float(_summed(surrogate.detach()))
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
            loss_new, kl_t = _pieces(learner, model, batch, chunks, counts, old_logits, with_grad=False)
            if world > 1:  # every rank sees the global values and decides alike
                loss_new, kl_t = _summed(torch.stack([loss_new, kl_t]))
            kl_new = float(kl_t)
            if kl_new <= spec.trust_region and float(loss_new) < loss_old:
                accepted = True
                out["trpo/improve"] = loss_old - float(loss_new)
                break
    if not accepted:
        vector_to_parameters(theta_old, params)  # a rejected line search: not a bad step
        frac, kl_new = 0.0, 0.0
    elif world > 1:  # the accepted weights into this rank's shards
        from posttrain.train.rl.dp import finish_load

        finish_load(learner, model)
    out.update({"trpo/accepted": float(accepted), "trpo/step_frac": frac, "trpo/kl": kl_new,
                "trpo/backtracks": float(tries - 1 if accepted else tries), "train/updates": float(accepted),
                "train/skipped_total": learner.guard.total})  # fmt: skip
    for param in params:
        param.grad = None
    out["train/lr"] = learner.lr()
    out["loss/total"] = loss_old
    return out


def _full_copy(learner) -> torch.nn.Module:
    """A plain full copy of the sharded policy on every rank (a collective), in its mode."""
    plain = learner.dp.full_copy(dist.full_model_state(learner.model, everywhere=True), learner.dp.device)
    return plain.train(learner.model.training)
