"""Shared helpers for the RL loop tests (no tests here).

The trivial task used by the learning tests: any prompt, reward = fraction of the
response's characters that are digits. A random tiny model emits digits ~10% of the time
(10 of ~110 characters), so every method gets a dense, easy signal to climb.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from posttrain.algos.presets import METHODS
from posttrain.train.config.loader import load_config
from posttrain.train.rl.controller import RLConfig

DIGIT_REWARD = "test_digit_fraction"

# Every registered RL method preset (the parametrised tests run each one), and those that
# need a teacher model (teacher.path).
ALL_METHODS = METHODS.names()
TEACHER_METHODS = {m for m in ALL_METHODS if METHODS[m]().get("teacher_mode", "none") != "none"}


def digit_fraction(prompts, completions, **columns):
    """Fraction of digit characters per completion (0 for an empty one)."""
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


_calls = {"n": 0}


def digit_fraction_failing_on_rank_one(prompts, completions, **columns):
    """digit_fraction, except that rank 1 of a torch.distributed run raises on its second
    call (step 2 of a run): a rank that fails mid-step."""
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] >= 2:
        raise RuntimeError("the reward failed on purpose")
    return digit_fraction(prompts, completions, **columns)


def stalled_reward(prompts, completions, **columns):
    """A reward that never answers in time (sleeps 120 s): for deadline tests."""
    import time

    time.sleep(120)
    return [0.0 for _ in completions]


def failing_reward(prompts, completions, **columns):
    """A reward that raises on every sample: for error-reporting tests."""
    raise ValueError("this reward always fails")


def register_digit_reward() -> None:
    from posttrain.data.rewards import REWARDS

    if DIGIT_REWARD not in REWARDS:
        REWARDS.register(DIGIT_REWARD)(lambda **options: digit_fraction)


def tiny_config(run_dir: Path, method: str, *extra: str, steps: int = 2) -> RLConfig:
    """A tiny-preset RL config on the digit task; `extra` are dotted overrides."""
    register_digit_reward()
    overrides = [
        f"steps={steps}",
        f"algo.method={method}",
        "model.preset=tiny",
        f"run.output_dir={run_dir}",
        "run.seed=0",
        "data.task=arithmetic",
        "data.n_train=64",
        "data.n_test=0",
        "data.difficulty=1",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=8",
        "optim.lr=3e-3",
        "optim.max_grad_norm=1.0",
        "sample_log_every=0",
        f"rewards=[{{name: {DIGIT_REWARD}, weight: 1.0}}]",
        *extra,
    ]
    return load_config(RLConfig, None, overrides)


def train_digit_teacher(path: Path, steps: int = 60, seed: int = 0) -> Path:
    """Teacher-force a tiny model to answer any prompt with digits; save it to `path`.

    Used as the teacher of on-policy distillation / KDRL: a model that is good at the task.
    """
    from posttrain.data.tasks import get_task
    from posttrain.engines.batching import build_sequences
    from posttrain.engines.logprobs import sequence_logprobs
    from posttrain.engines.models import load_model, save_model
    from posttrain.engines.tokenizer import build_char_tokenizer

    torch.manual_seed(seed)
    tok = build_char_tokenizer()
    model = load_model("tiny", tokenizer=tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    examples = get_task("arithmetic").examples("train", 32, seed=seed, difficulty=1)
    prompts = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": ex.prompt}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        for ex in examples
    ]
    g = torch.Generator().manual_seed(seed)
    digit_ids = torch.tensor([tok.convert_tokens_to_ids(str(d)) for d in range(10)])
    for _ in range(steps):
        resp = digit_ids[torch.randint(0, 10, (len(prompts), 8), generator=g)]
        batch = build_sequences(prompts, resp, torch.ones(len(prompts), 8), tok.pad_token_id)
        lp, _ = sequence_logprobs(model, batch, with_grad=True)
        loss = -lp.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model, tok, str(path))
    return path


def collect_batch(trainer, step: int):
    """`collect` for `trainer`'s step `step` with the trainer's own roles: (RLBatch, metrics)."""
    from posttrain.train.rl.setup import collect

    return collect(
        trainer.cfg,
        trainer.spec,
        step,
        generator=trainer.generator,
        rewards=trainer.rewards,
        prompts=trainer.prompts,
        tokenizer=trainer.tokenizer,
    )


def cli_resume_matches_uninterrupted(
    ref: Path, run: Path, env: dict, *, steps: int = 5, group: int = 4
) -> None:
    """For the async kill -9 tests: `run` was killed before its last step; resume it with
    `posttrain rl --config run/config.yaml --run.resume true` and assert it ends exactly as the
    uninterrupted `ref` (final weights, samples.jsonl trained rows), every step trained once,
    and each prompt trained 2 or 3 times (steps x 4 prompts drawn over 8 prompts)."""
    import json
    import subprocess
    import sys
    from collections import Counter

    from safetensors.torch import load_file

    from posttrain.train.common.checkpoint import CheckpointManager

    latest = CheckpointManager(run).latest()
    assert latest is not None and CheckpointManager.step_of(latest) < steps
    cli = subprocess.run(
        [sys.executable, "-m", "posttrain", "rl", "--config", str(run / "config.yaml"), "--run.resume", "true"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]

    def final(d: Path) -> dict:
        return load_file(str(next((d / "final").glob("*.safetensors"))))

    def trained(d: Path) -> list[dict]:
        rows = [json.loads(x) for x in (d / "samples.jsonl").read_text().splitlines() if x.strip()]
        return [r for r in rows if "trained" in r]

    a, b = final(ref), final(run)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert trained(ref) == trained(run)
    assert [r["step"] for r in trained(run)] == list(range(steps))
    counts = Counter(t["prompt_id"] for r in trained(run) for t in r["trained"])
    times = {pid: n / group for pid, n in counts.items()}
    assert sum(times.values()) == steps * 4 and sorted(set(times.values())) == [2.0, 3.0]
