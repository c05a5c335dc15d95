"""Held-out evaluation of the online RL loop (`eval.every`, `eval.before_after`).

One greedy (eval.temperature) sample per held-out prompt, from the rollout engine the run
already has (no second engine), then:

* with a task (`data.task`, synthetic or naming the verifier of a dataset's answers): the
  task's accuracy, format rate and lengths (`train.evaluate.summarize`) as `eval/*`;
* with rewards — `eval.rewards` when given, else the run's own `rewards` (the case of a
  user's dataset, `data.path` + `data.test_path` with no task): each reward's mean over
  the valid samples as `eval/reward/<name>` and the weighted sum as `eval/reward/mean`,
  plus `eval/reward/valid_frac`. The rewards get what they get in training: the dataset's
  extra columns, `response_length`, `group_id` and `model_prompt`.

`check_eval` rejects, before any model is built, an evaluation that was asked for and
cannot run (no held-out prompts, nothing to score with), and eval settings that would
do nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.errors import ConfigError


def check_eval(cfg) -> None:
    """One-line ConfigError for an evaluation that is requested but cannot run, or eval keys that would do nothing."""
    ev, d = cfg.eval, cfg.data
    if ev.every < 0:
        raise ConfigError(f"eval.every must be >= 0, got {ev.every}")
    requested = bool(ev.every or ev.before_after)
    if not requested:
        if ev.rewards:
            raise ConfigError(
                "eval.rewards is set but no evaluation runs: set eval.every or eval.before_after"
            )
        return
    if ev.n < 1:
        raise ConfigError(f"eval.n must be >= 1 when evaluation runs, got {ev.n}")
    if d.path and not d.test_path:
        raise ConfigError(
            "eval.every / eval.before_after need held-out prompts: set data.test_path (a data.path file has no test split)"
        )
    if not d.path and d.n_test < 1:
        raise ConfigError(
            f"eval.every / eval.before_after need held-out prompts: data.n_test must be >= 1, got {d.n_test}"
        )
    if not d.task and not ev.rewards and not any(_scalar(spec) for spec in cfg.rewards):
        raise ConfigError(
            "eval.every / eval.before_after: no data.task and no scalar reward to score held-out samples; set eval.rewards"
        )
    from posttrain.data.rewards import REWARDS

    for i, spec in enumerate(ev.rewards):
        if spec.name not in REWARDS and ":" not in spec.name:
            raise ConfigError(f"eval.rewards[{i}].name: {REWARDS.unknown_message(spec.name)}")
        if not _scalar(spec):
            raise ConfigError(f"eval.rewards[{i}]: a dense reward has no per-sample score to evaluate with")


def _scalar(spec) -> bool:
    return not spec.options.get("dense", False)


def evaluate(trainer) -> dict[str, float]:
    """`eval/*` metrics of the trainer's current policy on its held-out prompts."""
    from posttrain.train.evaluate import generate_samples, summarize

    cfg = trainer.cfg
    ev, d = cfg.eval, cfg.data
    examples = trainer.eval_examples[: ev.n]
    prompts = [ex.prompt if hasattr(ex, "prompt") else ex.text for ex in examples]
    answers = [str(ex.answer) for ex in examples]
    # Through the Generator role, which samples from the weights it was last synced to (the
    # controller syncs after every update), never from a module handed over here.
    texts, lengths, reasons = generate_samples(
        None, trainer.tokenizer, prompts, k=1, temperature=ev.temperature,
        max_new_tokens=ev.max_new_tokens or cfg.rollout.max_new_tokens, engine=trainer.generator,
        seed=cfg.run.seed, chat_template=d.chat_template, enable_thinking=d.enable_thinking,
    )  # fmt: skip
    out: dict[str, float] = {}
    if trainer.task is not None:
        correct = [[trainer.task.score(t, a) >= 1.0 for t in ts] for ts, a in zip(texts, answers)]
        result = summarize(
            prompts, answers, texts, lengths, reasons, correct,
            think_prefilled=d.chat_template and not d.enable_thinking,
        )  # fmt: skip
        out.update({f"eval/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))})
    rewards = trainer.eval_rewards or (trainer.rewards if trainer.task is None else None)
    if rewards is not None:
        out.update(_reward_metrics(trainer, rewards, examples, prompts, [ts[0] for ts in texts], lengths))
    return out


def _reward_metrics(trainer, rewards, examples, prompts, texts, lengths) -> dict[str, float]:
    from posttrain.train.rl.setup import model_prompts

    items = [ex for ex in examples if hasattr(ex, "prompt_ids")]  # PromptItems (dataset rows)
    if len(items) != len(examples):  # task Examples: templated like the training prompts
        from posttrain.train.rl.setup import _items_from_examples

        items = _items_from_examples(examples, trainer.tokenizer, trainer.cfg)
    columns: dict[str, list[Any]] = {}
    for key in sorted({k for it in items for k in it.columns}):
        columns[key] = [it.columns.get(key) for it in items]
    columns["response_length"] = [int(n[0]) for n in lengths]
    columns["group_id"] = list(range(len(items)))
    columns["model_prompt"] = model_prompts(trainer.tokenizer, items)
    res = rewards.score(prompts, texts, columns, trainer.step_count)
    valid = res.valid.bool() & torch.isfinite(res.scores.float())  # [P]
    n_valid = int(valid.sum())
    out = {"eval/reward/valid_frac": n_valid / max(1, len(items))}
    if n_valid:
        out["eval/reward/mean"] = float(res.scores.float()[valid].mean())
        for name, values in res.per_reward.items():
            v = values.float()[valid]
            v = v[torch.isfinite(v)]
            if len(v):
                out[f"eval/reward/{name}"] = float(v.mean())
    return out
