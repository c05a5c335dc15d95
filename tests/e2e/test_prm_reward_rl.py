"""A trained PRM as an RL reward from YAML, as a user runs it (issue #7).

`posttrain prm` saves run_dir/final (weights, tokenizer, prm.json); an RL config then
names it with ``rewards: [{name: prm, options: {model_path: ..., aggregate: min}}]`` and
`posttrain rl` scores every rollout with it. Real processes, real files.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_commands import ok, run_cli, run_rl_yaml

COLUMNS = "{operators: '+-', trace: columns}"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working directory holding runs/prm/final: a tiny PRM trained for 2 steps on column traces."""
    cwd = tmp_path_factory.mktemp("prm_reward")
    ok(run_cli(
        "prm", "--data.difficulty", "2", "--data.task_options", COLUMNS, "--data.n_train", "16",
        "--data.n_eval", "4", "--train.steps", "2", "--train.batch_size", "4", "--train.micro_batch_size", "4",
        "--train.eval_every", "0", "--optim.warmup_steps", "0", "--run.output_dir", "runs/prm", cwd=cwd,
    ))  # fmt: skip
    assert (cwd / "runs/prm/final/prm.json").is_file()
    return cwd


@pytest.mark.slow
def test_rl_with_a_prm_reward_from_yaml(work):
    config = {
        "steps": 2,
        "model": {"preset": "tiny"},
        "data": {"task": "arithmetic", "difficulty": 2, "task_options": {"operators": "+-", "trace": "columns"},
                 "n_train": 8, "n_test": 0},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 12},
        "algo": {"method": "grpo", "micro_batch_size": 0},
        "rewards": [{"name": "prm", "weight": 1.0, "options": {"model_path": "runs/prm/final", "aggregate": "min"}}],
        "eval": {"every": 0, "n": 2},
        "samples_per_log": 4,
        "sample_log_every": 1,
        "run": {"output_dir": "runs/rl"},
    }  # fmt: skip
    rows, samples = run_rl_yaml(work, config)
    train = [r for r in rows if "reward/prm" in r]
    assert len(train) == 2
    assert all(0.0 < r["reward/prm"] < 1.0 for r in train), train  # a PRM score is a probability
    # The logged scores are the PRM's own: re-scoring the logged rollouts with the saved
    # PRM (the prm reward alone, weight 1, so score == PRM min step score) gives them back.
    from posttrain.data.rewards import build_reward

    samples = [s for s in samples if s.get("score") is not None]
    assert samples
    prm = build_reward("prm", model_path=str(work / "runs/prm/final"), aggregate="min")
    # The loop scores the prompt as the policy saw it (chat template applied, `model_prompt`).
    from posttrain.engines.models import load_tokenizer

    tok = load_tokenizer(str(work / "runs/prm/final"))
    rendered = [
        tok.apply_chat_template(
            [{"role": "user", "content": s["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        for s in samples
    ]
    assert all(r != s["prompt"] for r, s in zip(rendered, samples))
    again = prm([s["prompt"] for s in samples], [s["completion"] for s in samples], model_prompt=rendered)
    for s, want in zip(samples, again):
        assert math.isclose(s["score"], want, abs_tol=1e-4), (s, want)
