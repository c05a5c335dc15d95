"""The run around the RL steps: checkpoints and resume, the train loop with its logging,
held-out evaluation, reward-hacking alerts and sample rows.

`RLRunMixin` holds the part of `RLTrainer` (train/rl/controller.py) that is not one step: it reads the
trainer's roles and counters (`policy`, `critic`, `reference`, `step_count`, `_last_batch`,
...) and calls its `step()`. Each learner's model, optimizer, scheduler and bad-step guard
are checkpointed as that learner's (`checkpoint_parts`, guard state in state.json).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from posttrain.engines import distributed as dist
from posttrain.errors import ConfigError
from posttrain.train.common.alerts import append_alerts
from posttrain.train.common.checkpoint import atomic_write_text
from posttrain.train.common.metrics import MetricsLogger, NullLogger, format_postfix, progress
from posttrain.train.common.rundir import begin_run, resume_point, run_lock
from posttrain.train.common.sharded_checkpoint import is_sharded
from posttrain.train.config.loader import config_to_dict
from posttrain.train.rl import dp as rl_dp


def _f(x: torch.Tensor | float) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class RLRunMixin:
    """Checkpointing, the train loop, evaluation, alerts and samples of `RLTrainer`."""

    def state(self) -> dict:
        """JSON-serialisable loop state (counters, data position, controllers)."""
        kl_state = self.kl_ctl.state_dict() if hasattr(self.kl_ctl, "state_dict") else {}
        return {
            "step": self.step_count,
            "bad_in_a_row": self.policy.guard.consecutive,
            "skipped_updates": self.policy.guard.total,
            "critic_guard": self.critic.guard.state_dict() if self.critic is not None else None,
            # Asynchronous: the rollout thread draws ahead; a resumed run restarts collecting
            # from the first collect not finished (train/rl/async_rollouts.py).
            "prompts": self.prompts.state_dict() if self.rollouts is None else self.rollouts.prompt_state(),
            "kl_ctl": kl_state,
            "baseline": self.baseline.state_dict(),
            "alerts": self.monitor.state_dict() if self.monitor is not None else None,
        }

    def _checkpoint_parts(self, learner_parts: dict[str, tuple] | None = None) -> dict[str, dict]:
        """models / optimizers / schedulers for CheckpointManager, from each learner
        (`learner_parts`: what `_learner_parts()` returned, when the caller holds it)."""
        parts: dict[str, dict] = {"models": {}, "optimizers": {}, "schedulers": {}}
        for objs_of_learner in (learner_parts or self._learner_parts()).values():
            for key, objs in zip(parts, objs_of_learner):
                parts[key].update(objs)
        if self.cfg.algo.ref_refresh_every and self.reference is not None:
            # A refreshed π_ref is no longer the initial policy: exact resume needs its weights.
            parts["models"]["reference"] = self.reference.model
        if self._queue_part is not None:  # the rollouts collected ahead, with the schedulers
            parts["schedulers"]["async_rollouts"] = self._queue_part
        return parts

    def _learners(self) -> list[tuple[str, Any]]:
        return [("policy", self.policy)] + ([("critic", self.critic)] if self.critic is not None else [])

    def _learner_parts(self) -> dict[str, tuple[dict, dict, dict]]:
        """{learner name: its checkpoint_parts}: the policy, and the critic when there is one."""
        return {name: learner.checkpoint_parts(name) for name, learner in self._learners()}

    def save_checkpoint(self) -> Path:
        """Write run_dir/checkpoints/step-N (each learner's model, optimizer and scheduler,
        the reference when it is refreshed, RNGs, loop state; with max_staleness the rollout
        queue). Under torch.distributed every rank calls this and writes its own shards of the
        sharded learners (train/common/sharded_checkpoint.py)."""
        if self.rollouts is not None:  # hold the rollout thread at a safe point while saving
            with self.rollouts.paused():
                return self.ckpt.save(
                    self.step_count, tokenizer=self.tokenizer, state=self.state(), **self._checkpoint_parts()
                )
        if self.policy.dp is not None:
            dist.set_phase(f"checkpoint at step {self.step_count}")
        return self.ckpt.save(
            self.step_count, tokenizer=self.tokenizer, state=self.state(), **self._checkpoint_parts()
        )

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizers, schedulers, RNGs, data position and controllers."""
        if self._queue_part is not None and not (Path(path) / "schedulers" / "async_rollouts.pt").is_file():
            raise ConfigError(
                f"rollout.max_staleness={self.cfg.rollout.max_staleness}: checkpoint {path} was written by a "
                "synchronous run (no rollout queue); resume it with rollout.max_staleness=0"
            )
        sharded = self.policy.dp is not None
        if not sharded or is_sharded(path):  # a sharded checkpoint loads into sharded learners as they are
            per_learner = self._learner_parts()
            parts = self._checkpoint_parts(per_learner)
            state = self.ckpt.load(path, **parts)
        else:  # a one-process checkpoint: sharded learners load through plain twins
            parts = {"models": {}, "optimizers": {}, "schedulers": {}}
            plains = []
            for name, learner in self._learners():
                *got, plain = rl_dp.loading_parts(learner, name)
                plains.append((learner, plain))
                for key, objs in zip(parts, got):
                    parts[key].update(objs)
            ref_plain = None
            if self.cfg.algo.ref_refresh_every and self.reference is not None:
                ref_plain = rl_dp.reference_twin(self.policy, self.reference)
                parts["models"]["reference"] = ref_plain
            state = self.ckpt.load(path, **parts)
            for learner, plain in plains:
                rl_dp.finish_load(learner, plain)
            if ref_plain is not None and ref_plain is not self.reference.model:
                from posttrain.roles import StateDictWeights

                self.reference.refresh_from(StateDictWeights(0, ref_plain.state_dict()))
        self.step_count = int(state["step"])
        guards = {"policy": {"consecutive": state["bad_in_a_row"], "total": state["skipped_updates"]},
                  "critic": state.get("critic_guard")}  # fmt: skip
        if not sharded:
            self._restore_roles(per_learner, guards, parts["models"].get("reference"))
        else:  # the sharded learners live in this process: their state was loaded in place
            for name, learner in self._learners():
                if guards[name]:
                    learner.guard.load_state_dict(guards[name])
            self.policy.version = self.step_count
        self.prompts.load_state_dict(state["prompts"])
        if state.get("kl_ctl") and hasattr(self.kl_ctl, "load_state_dict"):
            self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.baseline.load_state_dict(state["baseline"])
        if self.monitor is not None and state.get("alerts"):
            self.monitor.load_state_dict(state["alerts"])
        self.generator.sync(self.policy.weights())

    def _restore_roles(self, per_learner: dict[str, tuple], guards: dict, reference) -> None:
        """Hand each learner (and a refreshed reference) what the checkpoint loaded, through
        its own load_state_dict / refresh_from: a role in another process (a Ray actor,
        train/rl/ray_backend.py) handed out copies as its checkpoint parts, so loading into
        those alone would not reach it. In process the parts are the learner's own objects
        and this reloads them onto themselves."""
        for name, (models, optimizers, schedulers) in per_learner.items():
            learner = self.policy if name == "policy" else self.critic
            (model,), (optimizer,), (scheduler,) = models.values(), optimizers.values(), schedulers.values()
            learner.load_state_dict(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "guard": guards[name] or learner.guard.state_dict(),
                    # The policy version counts updates: one per step.
                    **({"version": self.step_count} if name == "policy" else {}),
                }
            )
        if reference is not None:
            from posttrain.roles import StateDictWeights

            self.reference.refresh_from(StateDictWeights(0, reference.state_dict()))

    def evaluate(self) -> dict[str, float]:
        """Held-out `eval/*` metrics: task accuracy, or rewards on dataset rows (train/rl/eval.py)."""
        from posttrain.train.rl.eval import evaluate

        if self.rollouts is None:
            return evaluate(self)
        # Asynchronous: the generator is the rollout thread's (at an older version); hold the
        # thread, evaluate the current policy, and let the thread sync back when it resumes.
        from posttrain.train.rl.async_rollouts import snapshot

        with self.rollouts.paused():
            self.generator.sync(snapshot(self.policy.weights()))
            return evaluate(self)

    def train(self) -> dict[str, Any]:
        """Run until cfg.steps with logging, samples, eval, checkpoints; return a summary.
        Under torch.distributed rank 0 alone locks the run directory and writes to it."""
        main = dist.is_main()
        with run_lock(self.run_dir) if main else contextlib.nullcontext(self.run_dir):
            return self._train(main)

    def _train(self, main: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        resume_step = None
        latest = resume_point(self.ckpt, cfg.run.resume) if main else None
        latest = dist.broadcast_object(latest)
        if latest is not None:
            self.load_checkpoint(latest)
            resume_step = self.step_count - 1
        if main:
            begin_run(self.run_dir, cfg, resumed=latest is not None)
            if self._filter_record is not None:
                atomic_write_text(self.run_dir / "difficulty_filter.json", self._filter_record)
            logger = MetricsLogger(
                self.run_dir,
                tensorboard=cfg.run.tensorboard,
                wandb=cfg.run.wandb,
                resume_step=resume_step,
                wandb_project=cfg.run.wandb_project,
                config=config_to_dict(cfg),
            )
        else:
            logger = NullLogger()
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "resumed_from": resume_step}
        can_eval = bool(
            self.eval_examples
        )  # validate (rl_eval.check_eval) refused eval without held-out prompts
        try:
            self.start_rollouts()  # rollout.max_staleness >= 1: the rollout thread
            if cfg.eval.before_after and can_eval and self.step_count == 0:
                summary["eval_before"] = self.evaluate()
                logger.log(0, summary["eval_before"])
            bar = progress(cfg.steps, "rl", initial=self.step_count, disable=None if main else True)
            metrics: dict[str, float] = {}
            while self.step_count < cfg.steps:
                step = self.step_count
                dist.set_phase(f"step {step + 1}")
                metrics = self.step()
                if cfg.eval.every and can_eval and (step + 1) % cfg.eval.every == 0:
                    metrics.update(self.evaluate())
                fired = self._alerts(step, metrics)
                if step % max(1, cfg.run.log_every) == 0 or fired:
                    logger.log(step, metrics)
                if cfg.sample_log_every and step % cfg.sample_log_every == 0:
                    logger.log_samples(step, self._sample_rows(step))
                if self.rollouts is not None:  # every step: the audit of what was trained
                    logger.log_samples(step, [self._trained_row()])
                bar.update(1)
                bar.set_postfix_str(format_postfix(metrics))
                if cfg.run.save_every and self.step_count % cfg.run.save_every == 0:
                    self.save_checkpoint()
                if fired and cfg.alerts.stop:
                    summary["stopped_by_alert"] = [a.row() for a in fired]
                    break
            bar.close()
            if cfg.eval.before_after and can_eval:
                summary["eval_after"] = self.evaluate()
                logger.log(self.step_count, summary["eval_after"])
            self.save_checkpoint()
            self.policy.save_pretrained(self.run_dir / "final", self.tokenizer)
            if self.critic is not None:
                self.critic.save_pretrained(self.run_dir / "final_critic", self.tokenizer)
            dist.barrier()
        finally:
            self.stop_rollouts()
            logger.close()
            self.rewards.close()
            if self.eval_rewards is not None:
                self.eval_rewards.close()
        summary.update(
            {"steps": self.step_count, "final_metrics": metrics, "final_model": str(self.run_dir / "final")}
        )
        return summary

    def _alerts(self, step: int, metrics: dict[str, float]) -> list:
        """Reward-hacking checks on this step's metrics and responses (train/common/alerts.py)."""
        if self.monitor is None:
            return []
        b = self._last_batch
        fired = self.monitor.observe(step, metrics, list(b.texts), b.group_id.tolist())
        if dist.is_main():
            append_alerts(self.run_dir, fired)
        return fired

    def _trained_row(self) -> dict:
        """{"trained": [{"prompt_id", "versions": [min, max]}, ...]}: every sample of the
        step's batch with the policy versions of its response tokens (samples.jsonl, one row
        per step under asynchronous RL, so an audit can count how often each prompt was trained)."""
        b = self._last_batch
        on = b.seq.response_mask > 0  # [B, T]
        vmin = b.versions.masked_fill(~on, torch.iinfo(torch.long).max).amin(-1).tolist()
        vmax = b.versions.masked_fill(~on, -1).amax(-1).tolist()
        trained = []
        for i in range(len(b)):
            lo, hi = (vmin[i], vmax[i]) if vmax[i] >= 0 else (None, None)  # an empty response
            trained.append({"prompt_id": self.prompts.items[int(b.item_index[i])].id, "versions": [lo, hi]})
        return {"trained": trained}

    def _sample_rows(self, step: int) -> list[dict]:
        b = self._last_batch
        rows = []
        for i in range(min(self.cfg.samples_per_log, len(b))):
            item = self.prompts.items[int(b.item_index[i])]
            rows.append(
                {
                    "prompt_id": item.id,
                    "prompt": item.text,
                    "completion": b.texts[i],
                    "answer": item.answer,
                    "score": _f(b.scores[i]) if bool(b.valid[i]) else None,
                    "finish_reason": b.finish_reason[i],
                }
            )
        return rows
