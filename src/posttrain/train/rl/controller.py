"""`posttrain rl`: the one online RL loop that PPO, GRPO and their relatives configure.

One step (DESIGN.md §2):
    prompts ─► rollout engine (G samples each) ─► rewards ─► [dynamic sampling refill]
      ─► scoring passes, no grad, only those the config needs (old log-probs, reference,
         critic values, teacher) ─► KL-in-reward / teacher reward ─► advantages
      ─► loss mask filters (invalid rewards, overlong) ─► learners update (the policy
         learner, roles/learner.py; the critic learner, roles/critic.py: each owns its
         model, update rule, micro-batches, clipping and bad-step guard)
      ─► weight sync (policy learner's WeightSource ─► generator, reference refresh)
      ─► metrics row, samples, checkpoint

The controller only moves plain data between roles (DESIGN.md §2a): it holds no
model state to update and runs no backward pass, so every role can move to another
process.

Public: `RLConfig` (re-exported from rl_config), `RLTrainer` (`.step()`, `.train()`),
`run_rl(cfg) -> dict`, `plan(cfg) -> str`.

Speed choices (issue #8): when one update uses each batch strictly on-policy, the old
log-probs are the detached training log-probs (no extra forward); reference / teacher /
critic forwards run only when a piece uses them; the native engine shares the policy
module (the sync is a no-op: no weight copy); all per-token work is vectorised.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from posttrain.algos.distill import teacher_token_rewards
from posttrain.algos.policy_gradient import estimate_advantages
from posttrain.algos.spec import RLSpec
from posttrain.core.distill import anneal
from posttrain.core.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_reward_penalty,
)
from posttrain.engines.fastpath import fallback_counts, fallback_metrics
from posttrain.roles import CriticLearner, Generator, PolicyLearner, RunningMean, ScoringRole, WeightSource
from posttrain.train.common.alerts import HackingMonitor
from posttrain.train.common.checkpoint import CheckpointManager
from posttrain.train.config.rl import RLConfig, validate
from posttrain.train.rl.async_rollouts import (
    AsyncRollouts,
    QueueCheckpoint,
    behaviour_metrics,
    snapshot,
    staleness_metrics,
)
from posttrain.train.rl.run import RLRunMixin, _f
from posttrain.train.rl.setup import build_components, collect, plan

__all__ = ["RLConfig", "RLTrainer", "run_rl", "plan"]


class RLTrainer(RLRunMixin):
    """The online RL loop over one RLConfig: moves plain data between the roles.

    It holds the roles and the loop's own state (KL controller, REINFORCE baseline,
    counters); the learners own the training state and its updates. `step()` runs one full RL step
    and returns its metrics (floats); `train()` runs `cfg.steps` steps with logging,
    checkpoints, evaluation, and returns a summary.

    build: (cfg, spec) -> the roles (see `build_components`); a caller can wrap them
    (tests/roles/test_process_boundary.py puts each behind a pickling proxy).
    """

    def __init__(
        self, cfg: RLConfig, *, build: Callable[[RLConfig, RLSpec], dict[str, Any]] = build_components
    ):
        self.cfg = cfg
        self.spec = validate(cfg)
        random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)
        self.run_dir = Path(cfg.run.output_dir)
        c = build(cfg, self.spec)
        self.tokenizer = c["tokenizer"]
        self.policy: PolicyLearner = c["policy"]
        self.generator: Generator = c["generator"]
        self.reference: ScoringRole | None = c["reference"]
        self.critic: CriticLearner | None = c["critic"]
        self.teacher: ScoringRole | None = c["teacher"]
        self.rewards = c["rewards"]
        self.prompts = c["prompts"]
        self.eval_examples = c["eval_examples"]
        self.task = c["task"]
        self._filter_record = c["difficulty_filter_record"]
        self.eval_rewards = c["eval_rewards"]
        self.backend_metrics = c.get("backend_metrics")  # a backend's own per-step metrics (ray/*)
        self.updates_per_step = self.spec.update_epochs * self.spec.num_minibatches
        if self.spec.kl_target is not None:
            self.kl_ctl = AdaptiveKLController(self.spec.kl_coef, self.spec.kl_target, self.spec.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(self.spec.kl_coef)
        self.baseline = RunningMean(self.spec.baseline_momentum)
        self.step_count = 0
        self.ckpt = CheckpointManager(self.run_dir, keep=cfg.run.keep_checkpoints)
        self.monitor = HackingMonitor(cfg.alerts) if cfg.alerts.enabled else None
        # rollout.max_staleness >= 1: the rollout thread (train/rl/async_rollouts.py), started by
        # train(); its checkpoint part is saved with the schedulers.
        self.rollouts: AsyncRollouts | None = None
        self._queue_part = QueueCheckpoint(self) if cfg.rollout.max_staleness else None

    # ------------------------------------------------------------------ one step

    def _score(self, batch) -> None:
        """No-grad scoring passes — each only when a piece reads its output.

        Strictly on-policy steps make no old-log-prob pass: the policy learner takes the
        detached training log-probs as the old ones (no extra forward).
        """
        spec = self.spec
        beta = self.kl_ctl.value
        needs_old = (
            self.updates_per_step > 1
            # asynchronous: π_old must be the proximal policy (this step's version), not the sampler
            or self.cfg.rollout.max_staleness > 0
            or (spec.kl_placement == "reward" and beta > 0)
            or spec.teacher_mode == "reward"
            or spec.trust_region is not None  # TRPO's surrogate ratio
        )
        if needs_old:
            batch.old_logprobs, _ = self.policy.logprobs(batch.seq, keep_ids=batch.keep_ids)
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

    def _update(self, batch, step: int) -> dict[str, float]:
        """The learners' updates on `batch`: policy (train/*, policy/*, kl/*, ...) then
        critic (value/*, critic/*); loss/total is the sum of both models' losses."""
        out = self.policy.update(batch, step, kl_coef=self.kl_ctl.value, kd_coef=self._kd_coef(step))
        if self.critic is not None:
            critic = self.critic.update(batch, step)
            out = {**out, **critic, "loss/total": out["loss/total"] + critic["loss/total"]}
        return out

    def step(self) -> dict[str, float]:
        """One RL step: generate, reward, score, advantages, update. Returns metrics."""
        step = self.step_count
        if self._queue_part is not None and self.rollouts is None:  # step() called without train()
            self.start_rollouts()
        t0, missed = time.perf_counter(), fallback_counts()
        if self.rollouts is None:
            batch, metrics = collect(
                self.cfg, self.spec, step, generator=self.generator, rewards=self.rewards, prompts=self.prompts,
                tokenizer=self.tokenizer,
            )  # fmt: skip
        else:  # asynchronous: collected ahead by the rollout thread
            batch, metrics, wait_s = self.rollouts.take(step)
            metrics["async/wait_s"] = wait_s
        t1 = time.perf_counter()
        self._score(batch)
        if self.rollouts is not None:
            metrics.update(staleness_metrics(step, batch.versions, batch.mask))
            metrics.update(behaviour_metrics(step, batch.versions, batch.mask, batch.old_logprobs,
                                             batch.sampling_logprobs))  # fmt: skip
        t2 = time.perf_counter()
        metrics.update(self._advantages(batch, step))
        t3 = time.perf_counter()
        metrics.update(self._update(batch, step))
        if self.spec.kl_placement == "loss" and "kl/loss" in metrics:
            # The adaptive controller wants a per-sequence KL; the KL loss is a per-token mean
            # estimate, so scale it by the mean response length (a no-op for a fixed β).
            self.kl_ctl.update(metrics["kl/loss"] * metrics["rollout/length_mean"], len(batch))
        t_sync = time.perf_counter()
        weights = self.policy.weights()
        if self.rollouts is None:
            # sync/bytes: weights the rollout worker received (0 when it shares the module).
            metrics["sync/bytes"] = self.generator.sync(weights)
            metrics["time/weight_sync_s"] = time.perf_counter() - t_sync
        else:  # the rollout thread syncs when a collect needs this version (its metrics say so)
            self.rollouts.publish(snapshot(weights))
            metrics["time/publish_s"] = time.perf_counter() - t_sync
        if self.backend_metrics is not None:
            metrics.update(self.backend_metrics())
        metrics.update(self._refresh_reference(step, weights))
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

    def start_rollouts(self) -> None:
        """With rollout.max_staleness >= 1, start the rollout thread at the current step
        (after a resume: with the checkpoint's queue). A no-op when synchronous."""
        cfg = self.cfg
        if not cfg.rollout.max_staleness:
            return
        timeout, key = (cfg.ray.timeout_s, "ray.timeout_s") if cfg.backend == "ray" else (
            cfg.rollout.async_timeout_s, "rollout.async_timeout_s")  # fmt: skip

        def collect_step(step: int, version: int, before_segment):
            return collect(cfg, self.spec, step, generator=self.generator, rewards=self.rewards,
                           prompts=self.prompts, tokenizer=self.tokenizer, version=version,
                           before_segment=before_segment)  # fmt: skip

        self.rollouts = AsyncRollouts(
            collect_step, self.generator.sync, self.prompts, max_staleness=cfg.rollout.max_staleness,
            partial_tokens=cfg.rollout.partial_tokens, start=self.step_count, steps=cfg.steps,
            timeout_s=timeout, timeout_key=key,
        )  # fmt: skip
        if self._queue_part.loaded is not None:
            self.rollouts.load_state_dict(self._queue_part.loaded)
        self.rollouts.publish(snapshot(self.policy.weights()))
        self.rollouts.start()

    def stop_rollouts(self) -> None:
        if self.rollouts is not None:
            self.rollouts.stop()

    def _refresh_reference(self, step: int, weights: WeightSource) -> dict[str, float]:
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
            self.reference.refresh_from(weights)
        return {"kl/ref_refreshed": float(refreshed)}


def run_rl(cfg: RLConfig) -> dict[str, Any]:
    """`posttrain rl`: build the trainer from cfg, train, return the summary."""
    if cfg.backend == "ray":  # the same trainer over roles placed as Ray actors
        from posttrain.train.rl.ray_backend import run_rl_on_ray

        return run_rl_on_ray(cfg)
    return RLTrainer(cfg).train()
