"""Optimizer, learning-rate schedule and a guarded optimizer step.

`guarded_step` is the only place a training loop should call `optimizer.step()`: it
measures (and clips) the global gradient norm and refuses to apply an update whose loss or
gradient is non-finite, so one bad batch can never write NaN into the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from posttrain.errors import ConfigError, ModelError, TrainingError
from posttrain.train.config.checks import validate_optim
from posttrain.train.config.loader import OptimSection


@dataclass
class StepResult:
    """Outcome of one `guarded_step`.

    ok: True when the update was applied; False when it was skipped (non-finite loss/grad)
        or rolled back (see `guarded_step`).
    grad_norm: global L2 norm of the gradients before clipping (inf / nan when non-finite).
    lr: learning rate of the first param group used for this step (before the scheduler
        advanced).
    rolled_back: True when the update was applied, found exploding and undone.
    update_ratio: the update's `update_ratio` (0.0 when not measured).
    """

    ok: bool
    grad_norm: float
    lr: float = 0.0
    rolled_back: bool = False
    update_ratio: float = 0.0


def _trainable(params: Iterable) -> list:
    items = list(params)
    if items and isinstance(items[0], dict):  # explicit param groups
        groups = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in items]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ModelError("the optimizer got no trainable parameters (every requires_grad is False)")
        return groups
    plist = [p for p in items if p.requires_grad]
    if not plist:
        raise ModelError("the optimizer got no trainable parameters (every requires_grad is False)")
    return plist


def build_optimizer(params: Iterable, cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over the trainable tensors in `params`.

    params: parameters or param-group dicts; those with requires_grad=False are dropped
        (frozen bases under LoRA).
    cfg: lr, betas, eps, weight_decay from the `optim` config section.
    The fused kernel is used only when every parameter lives on CUDA; on CPU `fused=False`
    (the fused CPU path is slower and less portable for the tiny models used there).
    """
    validate_optim(cfg)  # again: a section's fields may have been set after it was built
    groups = _trainable(params)
    flat = [p for g in groups for p in g["params"]] if isinstance(groups[0], dict) else groups
    on_cuda = all(p.is_cuda for p in flat)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=True if on_cuda else False,
    )


def lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float = 0.0
) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based).

    Warmup: factor (step + 1) / warmup_steps for the first `warmup_steps` updates, so the
    very first update already moves (HF's step / warmup gives lr 0 on step 0, a wasted
    batch). Afterwards, with progress p = (step - warmup) / (total - warmup) in [0, 1]:
    constant 1; linear 1 - (1 - min_lr_ratio) p; cosine (Loshchilov & Hutter 2017, no
    restarts) min_lr_ratio + (1 - min_lr_ratio) (1 + cos(pi p)) / 2.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"optim.schedule: unknown schedule {schedule!r}; valid: constant, linear, cosine")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimSection, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following `lr_factor`; call `.step()` once per applied optimizer update.

    total_steps: number of optimizer updates planned for the run (the decay horizon).
    The lambda is a closure, so the scheduler's state_dict holds only plain numbers and
    loads with `torch.load(weights_only=True)`.
    """
    if total_steps <= 0:
        raise ConfigError(f"total optimizer steps must be positive, got {total_steps}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must lie in [0, 1], got {cfg.min_lr_ratio}")
    lr_factor(0, warmup_steps=0, total_steps=1, schedule=cfg.schedule)  # validate the name now
    warmup, schedule, floor = cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio

    def factor(step: int) -> float:
        return lr_factor(
            step, warmup_steps=warmup, total_steps=total_steps, schedule=schedule, min_lr_ratio=floor
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _params_of(model_params: Iterable) -> list[torch.Tensor]:
    out = []
    for p in model_params:
        if isinstance(p, dict):
            out.extend(p["params"])
        else:
            out.append(p)
    return out


def _snapshot(params: list[torch.Tensor], optimizer: torch.optim.Optimizer):
    """Copies of the weights and of the optimizer state, for `_restore`."""
    weights = [p.detach().clone() for p in params]
    state = {
        p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
        for p in params
        if p in optimizer.state
    }
    return weights, state  # the step replaces optimizer.state[p] entries in place: copies needed


def _restore(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, snapshot) -> None:
    weights, state = snapshot
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    for p in params:
        if p in state:
            optimizer.state[p] = state[p]
        else:
            optimizer.state.pop(p, None)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the global value of a DTensor (sharded parameters), else `t` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def update_ratio(params: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    """‖w_after − w_before‖ / max(‖w_before‖, 1) over all tensors (global L2 norms).

    The floor of 1 keeps all-zero or tiny weights trainable: an update of norm up to
    `max_update_ratio` is then always accepted. NaN or inf when an update made a weight
    non-finite.
    """
    if not params:
        return 0.0
    deltas = torch._foreach_sub([p.detach() for p in params], before)
    d = torch.linalg.vector_norm(torch.stack([_full(n).double() for n in torch._foreach_norm(deltas)]))
    w = torch.linalg.vector_norm(torch.stack([_full(n).double() for n in torch._foreach_norm(before)]))
    return float(d / w.clamp(min=1.0))


def guarded_step(
    model_params: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    max_grad_norm: float,
    *,
    loss: float | torch.Tensor | None = None,
    max_update_ratio: float = 0.0,
) -> StepResult:
    """Clip gradients and apply one update, unless it is bad.

    model_params: the parameters whose `.grad` was filled by backward (params or groups).
    max_grad_norm: clip threshold for the global L2 norm; <= 0 only measures the norm.
    loss: the (detached or not) loss of this step; a NaN/inf loss skips the update even if
        the gradients happen to be finite.
    max_update_ratio: > 0 rolls back an applied update whose `update_ratio` exceeds it or is
        non-finite (the update made a weight non-finite or exploded, e.g. lr far too high):
        weights and optimizer state are restored from a copy taken before the step; 0 skips
        the check and the copy.
    On a bad step (skipped or rolled back): gradients are zeroed, the scheduler does not
    step, weights and optimizer moments are bit-identical to before. On success: optimizer
    and scheduler step and gradients are zeroed (set to None) for the next accumulation.
    """
    params = [p for p in _params_of(model_params) if p.requires_grad]
    lr = float(optimizer.param_groups[0]["lr"])
    # error_if_nonfinite=False: we want to *observe* a bad norm and skip, not crash.
    limit = max_grad_norm if max_grad_norm and max_grad_norm > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, limit, error_if_nonfinite=False)
    grad_norm = float(_full(norm))  # FSDP2: the norm over every rank's shards
    loss_ok = True
    if loss is not None:
        loss_ok = bool(torch.isfinite(torch.as_tensor(loss, dtype=torch.float64)).all())
    if not (loss_ok and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(ok=False, grad_norm=grad_norm, lr=lr)
    snapshot = _snapshot(params, optimizer) if max_update_ratio > 0 else None
    try:
        optimizer.step()
    except RuntimeError as e:  # e.g. torch's Adam: "value cannot be converted ... without overflow"
        if snapshot is None or "overflow" not in str(e):
            raise
        ratio = math.inf  # the step size itself overflowed; the update may be half applied
    else:
        ratio = update_ratio(params, snapshot[0]) if snapshot is not None else 0.0
    optimizer.zero_grad(set_to_none=True)
    if snapshot is not None and not ratio <= max_update_ratio:
        _restore(params, optimizer, snapshot)
        return StepResult(ok=False, grad_norm=grad_norm, lr=lr, rolled_back=True, update_ratio=ratio)
    if scheduler is not None:
        scheduler.step()
    return StepResult(ok=True, grad_norm=grad_norm, lr=lr, update_ratio=ratio)


class BadStepGuard:
    """Counts consecutive bad steps and stops training past `max_bad_steps`.

    A bad step is one `guarded_step` did not apply: a non-finite loss or gradient (skipped)
    or an exploding update (rolled back). `max_bad_steps` = N tolerates N bad steps in a
    row and stops training with a TrainingError at the (N+1)-th; 0 stops at the first.
    The same meaning in every command (sft, rm, prm, dpo, rl).
    """

    def __init__(self, max_bad_steps: int):
        if max_bad_steps < 0:
            raise ConfigError(f"run.max_bad_steps must be >= 0, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.consecutive = 0
        self.total = 0

    def update(self, result: StepResult, step: int) -> None:
        """Record `result` of optimizer step `step`; raise TrainingError past the limit."""
        if result.ok:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive > self.max_bad_steps:
            why = (
                f"update/weight norm ratio {result.update_ratio:.3g} (rolled back)"
                if result.rolled_back
                else f"grad norm {result.grad_norm}"
            )
            raise TrainingError(
                f"step {step}: {self.consecutive} consecutive bad optimizer steps (non-finite loss or "
                f"gradient, or an exploding update; last: {why}) exceed run.max_bad_steps={self.max_bad_steps}; "
                "lower optim.lr or check the data"
            )

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])
