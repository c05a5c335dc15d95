"""The policy learner: the trained policy model, its optimizer, and its update.

`PolicyLearner.update(batch, step, kl_coef=, kd_coef=)` runs epochs × minibatches ×
micro-batches of the policy loss (+ KL loss, − entropy bonus, + KD loss) with guarded
optimizer steps (roles/updates.py), or TRPO's natural-gradient step (train/rl/trpo.py)
when `algo.trust_region` is set. The controller only hands it an `RLBatch` and two
coefficients and reads back metrics; weights leave it as a `WeightSource`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from posttrain.algos.distill import kd_objective
from posttrain.algos.policy_gradient import rl_objective
from posttrain.core.kl import KL_ESTIMATORS, policy_drift_metrics
from posttrain.core.policy_losses import off_policy_sequence_mask, truncated_is_weights
from posttrain.engines import distributed as dist
from posttrain.engines.batching import SequenceBatch
from posttrain.roles.batch import RLBatch
from posttrain.roles.policy import PolicyRole
from posttrain.roles.updates import ModelLearner
from posttrain.roles.weights import SharedModule, StateDictWeights, WeightSource

if TYPE_CHECKING:
    from posttrain.algos.spec import RLSpec
    from posttrain.train.config.rl import RLConfig


class PolicyLearner(ModelLearner):
    """The trained causal LM with its AdamW (optim.lr), schedule and bad-step guard.

    version: number of `update` calls so far (the policy version `weights()` reports).
    """

    def __init__(self, model: torch.nn.Module, cfg: RLConfig, spec: RLSpec, *, dp=None):
        super().__init__(model, cfg, spec, lr=cfg.optim.lr, dp=dp)
        self.temperature = cfg.rollout.temperature
        self.scorer = PolicyRole(model, temperature=cfg.rollout.temperature)
        self.version = 0

    def logprobs(
        self,
        seq: SequenceBatch,
        *,
        keep_ids: torch.Tensor | None = None,
        with_grad: bool = False,
        return_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, T] log π_θ of the responses (and [B, T] entropy if asked); no grad unless
        with_grad. keep_ids: [B, T, K] the sampler's kept support (RLBatch.keep_ids)."""
        return self.scorer.logprobs(
            seq, with_grad=with_grad, return_entropy=return_entropy, keep_ids=keep_ids
        )

    def state_dict(self) -> dict:
        """ModelLearner's state (model, optimizer, scheduler, guard) and the policy version."""
        return {**super().state_dict(), "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()` (a state without "version" keeps the current one)."""
        super().load_state_dict(state)
        self.version = int(state.get("version", self.version))

    def weights(self) -> WeightSource:
        """The current weights for the generator and the reference refresh (in process: the
        module itself, no copy; pickled: a state-dict snapshot). Sharded (torch.distributed):
        the full weights gathered on every rank (a collective), for the generator's and the
        reference's plain copies."""
        if self.dp is not None:
            return StateDictWeights(self.version, dist.full_model_state(self.model, everywhere=True))
        return SharedModule(self.model, self.version)

    def save_pretrained(self, path: Path, tokenizer) -> None:
        """Export the policy in Hugging Face format (+ tokenizer) to `path`."""
        from posttrain.engines.models import save_model

        module = self.export_module()  # under torch.distributed: rank 0 writes
        if module is not None:
            save_model(module, tokenizer, str(path))

    def update(self, batch: RLBatch, step: int, *, kl_coef: float, kd_coef: float) -> dict[str, float]:
        """Update the policy on `batch` (advantages filled); returns metrics.

        kl_coef: the current β (the adaptive controller's value; used as a KL loss only
        when algo.kl_placement is "loss"). kd_coef: the KD loss weight at this step.
        """
        if self.spec.trust_region is not None:  # TRPO: one natural-gradient step
            from posttrain.train.rl.trpo import trpo_update

            out = trpo_update(self, batch)
        else:
            out = self._updates(
                batch, step, lambda mi, counts, s: self._micro_loss(mi, counts, s, kl_coef, kd_coef)
            )
        self.version += 1
        return out

    def _micro_loss(
        self, mi: RLBatch, counts: dict[str, float], step: int, kl_coef: float, kd_coef: float
    ) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch (policy + KL + entropy + KD) and its metrics.

        counts: the minibatch's GLOBAL num_tokens / num_seqs and max_len, so that the
        micro-batch losses sum to the minibatch loss.
        """
        spec = self.spec
        kl_loss_on = spec.kl_placement == "loss" and kl_coef > 0
        # The entropy is needed for the bonus; otherwise it is a (configurable) diagnostic.
        want_entropy = spec.entropy_coef > 0 or self.cfg.log_entropy
        logprobs, entropy = self.logprobs(
            mi.seq, with_grad=True, return_entropy=want_entropy, keep_ids=mi.keep_ids
        )
        if entropy is not None and spec.entropy_coef <= 0:
            entropy = entropy.detach()
        # Strictly on-policy (no scoring pass made old log-probs): the old log-probs ARE the
        # detached training log-probs, so no extra forward is spent on them.
        old = mi.old_logprobs if mi.old_logprobs is not None else logprobs.detach()
        mask = mi.mask
        metrics: dict[str, torch.Tensor] = {}
        if mi.old_logprobs is None and mi.ref_logprobs is not None:
            # The KL diagnostics are then taken here from those same log-probs.
            for name in ("k1", "k2", "k3"):
                kl = KL_ESTIMATORS[name](old, mi.ref_logprobs)  # [b, T]
                metrics[f"kl/{name}"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        is_weights = None
        if spec.tis_cap is not None:
            is_weights = truncated_is_weights(
                old, mi.sampling_logprobs, mask, spec.tis_cap, level=spec.tis_level
            )
            metrics["offpolicy/tis_weight_mean"] = (is_weights * mask).sum() / mask.sum().clamp(min=1)
        metrics.update(policy_drift_metrics(logprobs, old, mi.sampling_logprobs, mask))
        if spec.off_policy_kl_threshold is not None:
            keep = off_policy_sequence_mask(  # against the current policy: gap and staleness
                logprobs.detach(), mi.sampling_logprobs, mi.advantages, mask, spec.off_policy_kl_threshold
            )
            mask = mask * keep.to(mask.dtype)[:, None]
            metrics["offpolicy/masked_seq_frac"] = 1.0 - keep.float().mean()
        loss, m = rl_objective(
            logprobs,
            old,
            mi.advantages,
            mask,
            spec=spec,
            kl_coef=kl_coef if kl_loss_on else 0.0,
            ref_logprobs=mi.ref_logprobs,
            scores=mi.scores,
            is_weights=is_weights,
            entropy=entropy,
            **counts,
        )
        metrics.update(m)
        if spec.teacher_mode == "loss":
            kd, km = kd_objective(
                logprobs,
                mi.teacher_logprobs,
                mask,
                mi.scores,
                coef=kd_coef,
                reward_threshold=spec.kd_reward_threshold,
                aggregation=spec.aggregation,
                **counts,
            )
            loss = loss + kd
            metrics.update(km)
        return loss, metrics
