"""`posttrain rl`: the one online RL loop that PPO, GRPO and their relatives configure.

One step (DESIGN.md §2):
    prompts ─► rollout engine (G samples each) ─► rewards ─► [dynamic sampling refill]
      ─► scoring passes, no grad, only those the config needs (old log-probs, reference,
         critic values, teacher) ─► KL-in-reward / teacher reward ─► advantages
      ─► loss mask filters (invalid rewards, overlong) ─► epochs × minibatches ×
         micro-batches of policy (+ KL, entropy, KD, value) loss ─► guarded optimizer step
      ─► weight sync ─► metrics row, samples, checkpoint

Public: `RLConfig` (re-exported from rl_config), `RLTrainer` (`.step()`, `.train()`),
`run_rl(cfg) -> dict`, `plan(cfg) -> str`.

Speed choices (issue #8): when one update uses each batch strictly on-policy, the old
log-probs are the detached training log-probs (no extra forward); reference / teacher /
critic forwards run only when a piece uses them; the native engine shares the policy
module (no weight copy); all per-token work is vectorised.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from posttrain.algos.critic import critic_objective
from posttrain.algos.distill import kd_objective, teacher_token_rewards
from posttrain.algos.policy_gradient import estimate_advantages, rl_objective
from posttrain.core.distill import anneal
from posttrain.core.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_reward_penalty,
    policy_drift_metrics,
)
from posttrain.core.policy_losses import off_policy_sequence_mask, truncated_is_weights
from posttrain.engines.fastpath import fallback_counts, fallback_metrics
from posttrain.roles import CriticRole, PolicyRole, RunningMean, ScoringRole
from posttrain.train.common.alerts import HackingMonitor, describe
from posttrain.train.common.checkpoint import CheckpointManager
from posttrain.train.common.optim import BadStepGuard, build_optimizer, build_scheduler, guarded_step
from posttrain.train.config.rl import RLConfig, validate
from posttrain.train.rl.run import RLRunMixin, _f
from posttrain.train.rl.setup import build_components, collect, model_summary
from posttrain.train.rl.trpo import trpo_update

__all__ = ["RLConfig", "RLTrainer", "run_rl", "plan"]


class RLTrainer(RLRunMixin):
    """The online RL loop over one RLConfig; holds the roles, optimizer and counters.

    `step()` runs one full RL step and returns its metrics (floats); `train()` runs
    `cfg.steps` steps with logging, checkpoints, evaluation, and returns a summary.
    """

    def __init__(self, cfg: RLConfig):
        self.cfg = cfg
        self.spec = validate(cfg)
        random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        self.run_dir = Path(cfg.run.output_dir)
        c = build_components(cfg, self.spec)
        self.tokenizer = c["tokenizer"]
        self.policy: PolicyRole = c["policy"]
        self.engine = c["engine"]
        self.reference: ScoringRole | None = c["reference"]
        self.critic: CriticRole | None = c["critic"]
        self.teacher: ScoringRole | None = c["teacher"]
        self.rewards = c["rewards"]
        self.prompts = c["prompts"]
        self.eval_examples = c["eval_examples"]
        self.task = c["task"]
        self._filter_record = c["difficulty_filter_record"]
        self.eval_rewards = c["eval_rewards"]
        groups = [{"params": self.policy.parameters()}]
        if self.critic is not None:
            groups.append({"params": self.critic.parameters(), "lr": cfg.critic.lr or cfg.optim.lr})
        self.optimizer = build_optimizer(groups, cfg.optim)
        self.updates_per_step = self.spec.update_epochs * self.spec.num_minibatches
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps * self.updates_per_step)
        if self.spec.kl_target is not None:
            self.kl_ctl = AdaptiveKLController(self.spec.kl_coef, self.spec.kl_target, self.spec.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(self.spec.kl_coef)
        self.baseline = RunningMean(self.spec.baseline_momentum)
        self.step_count = 0
        self.guard = BadStepGuard(cfg.run.max_bad_steps)
        self.ckpt = CheckpointManager(self.run_dir, keep=cfg.run.keep_checkpoints)
        self.monitor = HackingMonitor(cfg.alerts) if cfg.alerts.enabled else None

    # ------------------------------------------------------------------ one step

    def _train_params(self) -> list[torch.nn.Parameter]:
        params = self.policy.parameters()
        return params + (self.critic.parameters() if self.critic is not None else [])

    def _score(self, batch) -> None:
        """No-grad scoring passes — each only when a piece reads its output."""
        spec = self.spec
        beta = self.kl_ctl.value
        needs_old = (
            self.updates_per_step > 1
            or (spec.kl_placement == "reward" and beta > 0)
            or spec.teacher_mode == "reward"
            or spec.trust_region is not None  # TRPO's surrogate ratio
        )
        if needs_old:
            batch.old_logprobs, _ = self.policy.logprobs(batch.seq, keep_mask=batch.keep_mask)
        if self.reference is not None and beta > 0:
            batch.ref_logprobs = self.reference.logprobs(batch.seq)
        if self.critic is not None:
            batch.values = self.critic.values(batch.seq)
        if self.teacher is not None:
            batch.teacher_logprobs = self.teacher.logprobs(batch.seq)

    def _advantages(self, batch, step: int) -> dict[str, float]:
        spec = self.spec
        mask = batch.mask
        beta = self.kl_ctl.value
        token_rewards = None
        metrics: dict[str, float] = {}
        if batch.ref_logprobs is not None and batch.old_logprobs is not None:
            for name in ("k1", "k2", "k3"):
                kl = KL_ESTIMATORS[name](batch.old_logprobs, batch.ref_logprobs)  # [B, T]
                metrics[f"kl/{name}"] = _f((kl * mask).sum() / mask.sum().clamp(min=1))
        if spec.kl_placement == "reward" and beta > 0:
            token_rewards = kl_reward_penalty(
                batch.old_logprobs, batch.ref_logprobs, mask, beta, spec.kl_estimator
            )  # [B, T]
            # The adaptive controller tracks the per-sequence KL (Ziegler et al. 2019), measured
            # with the estimator the penalty uses.
            seq_kl = _f(-token_rewards.sum() / beta / (mask.sum(-1) > 0).sum().clamp(min=1))
            self.kl_ctl.update(seq_kl, len(batch))
        if spec.teacher_mode == "reward":
            dense = teacher_token_rewards(
                batch.old_logprobs, batch.teacher_logprobs, mask, spec.teacher_reward_weight
            )
            token_rewards = dense if token_rewards is None else token_rewards + dense
            metrics["distill/reverse_kl"] = _f(
                -(dense * mask).sum() / mask.sum().clamp(min=1) / spec.teacher_reward_weight
            )
        if batch.dense_rewards is not None:  # dense reward specs (PRM step marginals), not in scores
            prm = batch.dense_rewards * mask
            token_rewards = prm if token_rewards is None else token_rewards + prm
        use_scores = spec.teacher_mode != "reward"  # pure distillation: the teacher is the reward
        # An excluded sample (NaN reward) gets a group of its own, so it neither receives
        # an advantage (singleton -> 0, mask 0) nor shifts its group's mean and std.
        gid = batch.group_id.clone()
        bad = ~batch.valid
        if bad.any():
            gid[bad] = gid.max() + 1 + torch.arange(int(bad.sum()))
        adv, ret = estimate_advantages(
            spec,
            scores=batch.scores if use_scores else None,
            mask=mask,
            group_id=gid,
            token_rewards=token_rewards,
            values=batch.values,
            baseline=self.baseline.value if use_scores else 0.0,
        )
        batch.advantages, batch.returns = adv * mask, ret * mask
        if use_scores and batch.valid.any():
            self.baseline.update(_f(batch.scores[batch.valid].mean()))
        if spec.overlong == "mask":  # DAPO overlong filtering: truncated samples teach nothing
            trunc = torch.tensor([r == "length" for r in batch.finish_reason])
            batch.mask = mask * (~trunc).to(mask.dtype)[:, None]
            metrics["rollout/overlong_masked_frac"] = _f(trunc.float().mean())
        m = batch.mask
        n = m.sum().clamp(min=1)
        a_mean = (batch.advantages * m).sum() / n
        metrics.update(
            {
                "adv/mean": _f(a_mean),
                "adv/std": _f((((batch.advantages - a_mean) * m) ** 2).sum() / n).__pow__(0.5),
                "adv/max": _f(torch.where(m > 0, batch.advantages, -torch.inf).max()) if m.any() else 0.0,
                "adv/min": _f(torch.where(m > 0, batch.advantages, torch.inf).min()) if m.any() else 0.0,
                "adv/returns_mean": _f((batch.returns * m).sum() / n),
                "kl/coef": beta,
            }
        )
        return metrics

    def _kd_coef(self, step: int) -> float:
        spec = self.spec
        if spec.kd_anneal_steps <= 0:
            return spec.kd_coef_start
        return anneal(step, spec.kd_coef_start, spec.kd_coef_end, spec.kd_anneal_steps, kind=spec.kd_anneal)

    def _micro_loss(self, mi, counts: dict[str, float], step: int) -> tuple[torch.Tensor, dict]:
        """Total loss of one micro-batch (policy + KL + entropy + KD + value) and metrics."""
        spec = self.spec
        beta = self.kl_ctl.value
        kl_loss_on = spec.kl_placement == "loss" and beta > 0
        # The entropy is needed for the bonus; otherwise it is a (configurable) diagnostic.
        want_entropy = spec.entropy_coef > 0 or self.cfg.log_entropy
        logprobs, entropy = self.policy.logprobs(
            mi.seq, with_grad=True, return_entropy=want_entropy, keep_mask=mi.keep_mask
        )
        if entropy is not None and spec.entropy_coef <= 0:
            entropy = entropy.detach()
        old = mi.old_logprobs if mi.old_logprobs is not None else logprobs.detach()
        mask = mi.mask
        metrics: dict[str, torch.Tensor] = {}
        if mi.old_logprobs is None and mi.ref_logprobs is not None:
            # Strictly on-policy: no scoring pass made old log-probs, so the KL diagnostics
            # are taken here from the (identical) detached training log-probs.
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
            kl_coef=beta if kl_loss_on else 0.0,
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
                coef=self._kd_coef(step),
                reward_threshold=spec.kd_reward_threshold,
                aggregation=spec.aggregation,
                **counts,
            )
            loss = loss + kd
            metrics.update(km)
        if self.critic is not None:
            values = self.critic.values(mi.seq, with_grad=True)
            vloss, vm = critic_objective(
                values,
                mi.values,
                mi.returns,
                mask,
                value_coef=spec.value_coef,
                clip_range=spec.value_clip,
                aggregation=spec.aggregation,
                **counts,
            )
            loss = loss + vloss
            metrics.update(vm)
        return loss, metrics

    def _update(self, batch, step: int) -> dict[str, float]:
        """Epochs × minibatches of optimizer steps; micro-batches accumulate gradients.

        Each minibatch's loss is aggregated with its GLOBAL token / sequence counts, so
        the accumulated gradient is identical for any micro-batch size (1×8 == 8×1).
        """
        spec, cfg = self.spec, self.cfg
        if spec.trust_region is not None:  # TRPO: one natural-gradient step (train/rl/trpo.py)
            return trpo_update(self, batch, step)
        B = len(batch)
        n_mb = min(spec.num_minibatches, B)
        gen = torch.Generator().manual_seed(cfg.run.seed * 100_003 + step)
        sums: dict[str, float] = {}
        n_metric = 0
        applied = skipped = empty = rolled_back = 0
        grad_norms = []
        for _epoch in range(spec.update_epochs):
            order = torch.randperm(B, generator=gen) if n_mb > 1 else torch.arange(B)
            for mb_idx in torch.tensor_split(order, n_mb):
                mb = batch.select(mb_idx)
                n_tok = _f(mb.mask.sum())
                if n_tok == 0:  # all-masked minibatch: loss 0, nothing to learn, no step
                    empty += 1
                    continue
                counts = {
                    "num_tokens": n_tok,
                    "num_seqs": _f((mb.mask.sum(-1) > 0).sum()),
                    "max_len": cfg.rollout.max_new_tokens,
                }
                micro = cfg.algo.micro_batch_size or len(mb)
                total = torch.zeros(())
                for mi_idx in torch.arange(len(mb)).split(micro):
                    loss, m = self._micro_loss(mb.select(mi_idx), counts, step)
                    loss.backward()
                    total = total + loss.detach()
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + _f(v)
                    n_metric += 1
                sums["loss/total"] = sums.get("loss/total", 0.0) + _f(total)
                result = guarded_step(
                    self._train_params(), self.optimizer, self.scheduler, cfg.optim.max_grad_norm, loss=total,
                    max_update_ratio=cfg.optim.max_update_ratio,
                )  # fmt: skip
                grad_norms.append(result.grad_norm)
                applied += result.ok
                skipped += not result.ok
                rolled_back += result.rolled_back
                self.guard.update(result, step)
        n_updates = max(1, applied + skipped)
        out = {k: v / max(1, n_metric) for k, v in sums.items() if k != "loss/total"}
        out["loss/total"] = sums.get("loss/total", 0.0) / n_updates
        finite = [g for g in grad_norms if math.isfinite(g)]
        out.update(
            {
                "train/updates": applied,
                "train/skipped_updates": skipped,
                "train/rolled_back_updates": rolled_back,
                "train/skipped_total": self.guard.total,
                "train/empty_minibatches": empty,
                "train/grad_norm": sum(finite) / len(finite) if finite else float("nan"),
                "train/lr": self.scheduler.get_last_lr()[0],
            }
        )
        return out

    def step(self) -> dict[str, float]:
        """One RL step: generate, reward, score, advantages, update. Returns metrics."""
        step = self.step_count
        t0, missed = time.perf_counter(), fallback_counts()
        batch, metrics = collect(self, step)
        t1 = time.perf_counter()
        self._score(batch)
        t2 = time.perf_counter()
        metrics.update(self._advantages(batch, step))
        t3 = time.perf_counter()
        metrics.update(self._update(batch, step))
        if self.spec.kl_placement == "loss" and "kl/loss" in metrics:
            # The adaptive controller wants a per-sequence KL; the KL loss is a per-token mean
            # estimate, so scale it by the mean response length (a no-op for a fixed β).
            self.kl_ctl.update(metrics["kl/loss"] * metrics["rollout/length_mean"], len(batch))
        self.engine.sync_weights(self.policy.model)
        metrics.update(self._refresh_reference(step))
        t4 = time.perf_counter()
        metrics.update(
            {
                "time/score_s": t2 - t1,
                "time/advantage_s": t3 - t2,
                "time/update_s": t4 - t3,
                "time/step_s": t4 - t0,
                "train/step": step,
                **fallback_metrics(since=missed),
            }
        )
        self._last_batch = batch
        self.step_count += 1
        return metrics

    def _refresh_reference(self, step: int) -> dict[str, float]:
        """π_ref <- π_θ after every algo.ref_refresh_every-th step (0 = never).

        After a refresh the KL to the reference restarts from 0: the next step's samples
        are scored by a reference equal to the policy that drew them, so its kl/* metrics
        are 0 (up to the update within the step), and they then measure the drift since
        the last refresh, not since the start of training. "kl/ref_refreshed" is 1 on the
        steps whose update was followed by a refresh.
        """
        every = self.cfg.algo.ref_refresh_every
        if not every or self.reference is None:
            return {}
        refreshed = (step + 1) % every == 0
        if refreshed:
            self.reference.refresh_from(self.policy.model)
        return {"kl/ref_refreshed": float(refreshed)}


def run_rl(cfg: RLConfig) -> dict[str, Any]:
    """`posttrain rl`: build the trainer from cfg, train, return the summary."""
    return RLTrainer(cfg).train()


def plan(cfg: RLConfig) -> str:
    """Dry-run description: method pieces, models and sizes, memory estimate, steps, tokens."""
    spec = validate(cfg)
    ro = cfg.rollout
    batch = ro.prompts_per_step * ro.group_size
    lines = [f"posttrain rl — method {cfg.algo.method!r}, {cfg.steps} steps"]
    lines += [f"  {k}: {v}" for k, v in spec.as_dict().items()]
    lines += model_summary(cfg, spec)
    tokens = batch * ro.max_new_tokens
    lines.append(
        f"  batch: {ro.prompts_per_step} prompts x G={ro.group_size} = {batch} sequences, "
        f"<= {tokens} response tokens/step, <= {tokens * cfg.steps} in total"
    )
    lines.append(
        f"  updates: {spec.update_epochs} epoch(s) x {spec.num_minibatches} minibatch(es) per step "
        f"= {cfg.steps * spec.update_epochs * spec.num_minibatches} optimizer steps"
    )
    # TRPO's update makes no entropy pass (train/rl/trpo.py), so policy/entropy is not logged.
    logs_entropy = (cfg.log_entropy or spec.entropy_coef > 0) and spec.trust_region is None
    flags = dict(has_reference=spec.uses_reference, logs_entropy=logs_entropy, evaluates=cfg.eval.every > 0)
    lines.append("  " + describe(cfg.alerts, **flags))
    return "\n".join(lines)
