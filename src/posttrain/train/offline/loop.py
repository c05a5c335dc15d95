"""The one offline training loop shared by `posttrain sft | rm | prm | dpo`.

A *method* (train/offline/methods.py) owns the models and turns a list of tokenized
items into (loss, summed metrics) by calling algos/; this loop owns everything else:
data order, micro-batching with gradient accumulation, the guarded optimizer step,
held-out evaluation, metrics, progress bar, checkpoints and exact resume, and the final
Hugging Face export.

Accumulation invariance: before the micro-batches of a step run, the method computes the
step's GLOBAL normalisers (total completion tokens, pairs, steps) from all of its items;
every micro-batch loss is divided by those, so the summed gradient equals that of one
big batch (1×8 == 8×1 up to float summation order).

Exact resume: the data order of step s is a pure function of (seed, s) — a fresh seeded
permutation per epoch — so a checkpoint only needs the step counter; RNG states,
optimizer and scheduler come back through train/common/checkpoint.py.

Several processes (torchrun, or `--nproc N`): train/offline/dp.py shards the model with
FSDP2 and gives each rank its share of every step; everything above still holds for the
global batch. Rank 0 alone writes logs and final/; checkpoints are sharded (each rank writes
its shards, train/common/sharded_checkpoint.py). One process never
touches torch.distributed (`dp` is None below).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Protocol

import torch

from posttrain.engines import distributed as dist
from posttrain.engines.fastpath import fallback_counts, fallback_metrics
from posttrain.errors import ConfigError
from posttrain.train.common.checkpoint import CheckpointManager
from posttrain.train.common.input_checks import check_context, check_fills_a_batch, offline_tokens
from posttrain.train.common.metrics import MetricsLogger, NullLogger, format_postfix, progress
from posttrain.train.common.optim import BadStepGuard, build_optimizer, build_scheduler, guarded_step
from posttrain.train.common.rundir import begin_run, resume_point, run_lock
from posttrain.train.offline.dp import DataParallel, check_data_parallel


class OfflineMethod(Protocol):
    """What the loop needs from SFT / RM / PRM / preference methods."""

    name: str
    models: dict[str, torch.nn.Module]  # trained + checkpointed, e.g. {"policy": model}
    train_items: list[dict]

    def step_counts(self, items: list[dict]) -> dict:
        """Global normalisers of one optimizer step (plain numbers)."""

    def loss(self, items: list[dict], counts: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of a micro-batch (already divided by the global counts) + metric sums."""

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn summed metrics of a step into logged means."""

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics ("eval/..."), no gradients."""

    def save_final(self, path: Path) -> None:
        """Write the trained model(s) in Hugging Face form."""


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Item indices of optimizer step `step`: consecutive slices of per-epoch permutations.

    Epoch e is torch.randperm(n) under a generator seeded with (seed, e), independent of
    the global RNG so evaluation or sampling between steps cannot shift the data order.
    """
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take])
        pos += take
    return out


def total_steps(train, n_items: int) -> int:
    """Optimizer steps of the run: train.steps, or ceil(train.epochs · N / batch) when steps is 0."""
    if train.batch_size <= 0 or train.micro_batch_size <= 0:
        raise ConfigError("train.batch_size and train.micro_batch_size must be positive")
    if train.steps > 0:
        return train.steps
    if train.epochs <= 0:
        raise ConfigError("set train.steps > 0 or train.epochs > 0")
    return max(1, math.ceil(train.epochs * n_items / train.batch_size))


def _add(sums: dict[str, float], metrics: dict[str, torch.Tensor]) -> None:
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v)


def run_microbatches(
    method: OfflineMethod,
    items: list[dict],
    micro_batch_size: int,
    *,
    train: bool,
    counts: dict | None = None,
    grad_scale: float = 1.0,
) -> tuple[float, dict]:
    """Sum loss and metrics of `items` over micro-batches; backward when `train`.

    counts: the step's global normalisers when `items` is one rank's share of the step
    (default: computed from `items`). grad_scale: backward of grad_scale · loss (data
    parallel: undoes FSDP2's averaging of gradients over ranks).
    Returns (summed loss as a float, summed metrics). With train=False nothing needs grad.
    """
    counts = method.step_counts(items) if counts is None else counts
    sums: dict[str, float] = {}
    total = 0.0
    for start in range(0, len(items), micro_batch_size):
        chunk = items[start : start + micro_batch_size]
        with torch.set_grad_enabled(train):
            loss, metrics = method.loss(chunk, counts)
        if train:
            (loss * grad_scale if grad_scale != 1.0 else loss).backward()
        total += float(loss.detach())
        _add(sums, metrics)
    return total, sums


def train_offline(cfg, method: OfflineMethod, *, tokenizer=None) -> dict:
    """Train `method` under `cfg` (an offline command config); return a summary dict.

    cfg sections used: train (steps/epochs, batch sizes, eval_every), optim, run.
    Summary: steps, skipped steps, first/last training loss, final eval metrics, output
    paths.
    """
    # Under torch.distributed rank 0 owns the run directory (lock, logs, checkpoints).
    lock = (
        run_lock(cfg.run.output_dir) if dist.is_main() else contextlib.nullcontext(Path(cfg.run.output_dir))
    )
    with lock as run_dir:
        return _train_offline(cfg, method, run_dir, tokenizer)


def _train_offline(cfg, method: OfflineMethod, run_dir: Path, tokenizer) -> dict:
    n_items = len(method.train_items)
    check_fills_a_batch(n_items, cfg.train.batch_size, "train.batch_size", "training data")
    for model in method.models.values():
        check_context(
            model,
            [(f"training row {i + 1}", offline_tokens(it)) for i, it in enumerate(method.train_items)],
            "data.max_prompt_tokens",
        )
    steps = total_steps(cfg.train, n_items)
    ckpt = CheckpointManager(run_dir, keep=cfg.run.keep_checkpoints)
    world = dist.world_size()
    if world > 1:
        check_data_parallel(cfg, method, world)
        latest = dist.broadcast_object(resume_point(ckpt, cfg.run.resume) if dist.is_main() else None)
        dp = DataParallel(method, ckpt, latest)  # loads a checkpoint's weights, then shards
    else:
        latest, dp = resume_point(ckpt, cfg.run.resume), None
    params = [p for m in method.models.values() for p in m.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    guard = BadStepGuard(cfg.run.max_bad_steps)

    start, resumed = 0, False
    if latest is not None:
        if dp is None:
            state = ckpt.load(
                latest, models=method.models, optimizers={"main": optimizer}, schedulers={"main": scheduler}
            )
        else:
            state = dp.load_rest(latest, optimizer, scheduler)
        start, resumed = int(state["step"]), True
        guard.load_state_dict(state["guard"])
    if dist.is_main():
        begin_run(run_dir, cfg, resumed=resumed)
        logger = MetricsLogger(
            run_dir,
            tensorboard=cfg.run.tensorboard,
            wandb=cfg.run.wandb,
            resume_step=start if resumed else None,
            wandb_project=cfg.run.wandb_project,
        )
    else:
        logger = NullLogger()
    summary: dict = {"command": method.name, "steps": steps, "resumed_from": start if resumed else None}
    try:
        if start == 0 and cfg.train.eval_at_start:
            first = (dp or method).evaluate()
            logger.log(0, first)
            _log_samples(logger, 0, method)
            summary["initial_eval"] = first
        bar = progress(steps, method.name, initial=start, disable=None if dist.is_main() else True)
        last: dict = {}
        for step in range(start, steps):
            dist.set_phase(f"step {step + 1}")
            t0, missed = time.perf_counter(), fallback_counts()
            for m in method.models.values():
                m.train()
            items = [
                method.train_items[i]
                for i in batch_indices(step, cfg.train.batch_size, n_items, cfg.run.seed)
            ]
            if dp is None:
                loss, sums = run_microbatches(method, items, cfg.train.micro_batch_size, train=True)
            else:
                loss, sums = dp.run_step(items, cfg.train.micro_batch_size)
            result = guarded_step(
                params, optimizer, scheduler, cfg.optim.max_grad_norm, loss=loss,
                max_update_ratio=cfg.optim.max_update_ratio,
            )  # fmt: skip
            guard.update(result, step + 1)
            metrics = {
                "train/loss": loss,
                # the RL controller's names for the same quantities; one optimizer update per step here
                "train/lr": result.lr,
                "train/grad_norm": result.grad_norm,
                "train/updates": int(result.ok),
                "train/skipped_updates": int(not result.ok),
                "train/rolled_back_updates": int(result.rolled_back),
                "train/skipped_total": guard.total,
                "train/epoch": (step + 1) * cfg.train.batch_size / n_items,
            }
            metrics.update(method.summarize(sums))
            metrics.update(fallback_metrics(since=missed))
            metrics["time/step_s"] = time.perf_counter() - t0
            done = step + 1
            evaluate_now = cfg.train.eval_every > 0 and (done % cfg.train.eval_every == 0 or done == steps)
            if evaluate_now:
                dist.set_phase(f"evaluation after step {done}")
                metrics.update((dp or method).evaluate())
                _log_samples(logger, done, method)
            if done % max(cfg.run.log_every, 1) == 0 or evaluate_now or done == steps:
                logger.log(done, metrics)
            if cfg.run.save_every > 0 and done % cfg.run.save_every == 0 and done < steps:
                _save(ckpt, done, method, optimizer, scheduler, guard, tokenizer, dp)
            summary.setdefault("first_loss", loss)
            last = metrics
            bar.update(1)
            bar.set_postfix_str(format_postfix(metrics))
        bar.close()
        if steps > start:
            _save(ckpt, steps, method, optimizer, scheduler, guard, tokenizer, dp)
        final_dir = run_dir / "final"
        if dp is None:
            method.save_final(final_dir)
        else:
            dp.save_final(final_dir)
        summary.update(
            {
                "last_loss": last.get("train/loss"),
                "skipped_steps": guard.total,
                "final": {k: v for k, v in last.items() if k.startswith("eval/")},
                "output_dir": str(run_dir),
                "final_model": str(final_dir),
            }
        )
    finally:
        logger.close()
    return summary


def _log_samples(logger: MetricsLogger, step: int, method) -> None:
    """Held-out generations of the last evaluation (methods that generate set .samples)."""
    samples = getattr(method, "samples", None)
    if samples:
        logger.log_samples(step, samples)
        method.samples = []


def _save(ckpt, step, method, optimizer, scheduler, guard, tokenizer, dp=None) -> None:
    """Checkpoint `step`. Under torch.distributed every rank calls this: each writes its own
    shards of the sharded model and optimizer (train/common/sharded_checkpoint.py)."""
    if dp is not None:
        dist.set_phase(f"checkpoint at step {step}")
    ckpt.save(
        step,
        models=method.models,
        tokenizer=tokenizer,
        optimizers={"main": optimizer},
        schedulers={"main": scheduler},
        state={"step": step, "guard": guard.state_dict()},
    )
