"""PRM-guided rollouts through the CLI (issue 21 item 4), as a user runs them: `posttrain
sft` makes a policy that writes "<think>step; step; ...", `posttrain prm` a PRM, and
`posttrain rl` with ``rollout.prm_guide`` truncates/resamples and stops samples by that
PRM's step scores. Every logged sample is re-scored with the saved PRM: a stopped one ends
with its first step under the threshold, every other closed step is at or above it."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from test_commands import ok, run_cli, run_rl_yaml

COLUMNS = "{operators: '+-', trace: columns}"
TOL = 1e-4  # the run scores in its own batches; re-scoring may differ in the last float bits


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("prm_guide")
    ok(run_cli(
        "sft", "--run.output_dir", "runs/sft", "--train.steps", "60", "--data.difficulty", "2",
        "--data.task_options", COLUMNS, "--optim.lr", "3e-3", "--train.eval_every", "0",
        "--train.eval_generations", "0", "--data.n_train", "500", cwd=cwd,
    ))  # fmt: skip
    ok(run_cli(
        "prm", "--data.difficulty", "2", "--data.task_options", COLUMNS, "--data.n_train", "16",
        "--data.n_eval", "4", "--train.steps", "2", "--train.batch_size", "4", "--train.micro_batch_size", "4",
        "--train.eval_every", "0", "--optim.warmup_steps", "0", "--run.output_dir", "runs/prm", cwd=cwd,
    ))  # fmt: skip
    return cwd


def _closed_steps(scorer, prompt: str, completion: str) -> list[float]:
    """Scores of the steps the guide judges: those followed by "; " or </think>."""
    (scores,), (ends,) = scorer([prompt], [completion])
    return [s for s, e in zip(scores, ends) if "; " in completion[e:] or "</think>" in completion[e:]]


@pytest.mark.slow
def test_rl_with_prm_guided_resampling(work):
    from posttrain.data.rewards.models import prm_reward
    from posttrain.data.tasks import get_task
    from posttrain.engines.models import load_tokenizer

    prm = prm_reward(model_path=str(work / "runs/prm/final"))
    tok = load_tokenizer(str(work / "runs/prm/final"))

    def render(text):
        return tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )

    # The threshold: the median PRM score of the task's own (right and wrong) steps, so
    # that some of the policy's steps pass and some do not.
    examples = get_task("arithmetic", operators="+-", trace="columns").examples(
        "train", 8, seed=5, difficulty=2
    )
    pool = [
        s for ex in examples for text in (ex.solution, ex.wrong_solution)
        for s in _closed_steps(prm.scored_steps, render(ex.prompt), text)
    ]  # fmt: skip
    threshold = statistics.median(pool)
    config = {
        "steps": 2,
        "model": {"path": "runs/sft/final"},
        "data": {"task": "arithmetic", "difficulty": 2, "task_options": {"operators": "+-", "trace": "columns"},
                 "n_train": 8, "n_test": 0},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 40,
                    "prm_guide": {"model_path": "runs/prm/final", "threshold": threshold, "mode": "resample",
                                  "max_resamples": 1}},
        "algo": {"method": "grpo", "micro_batch_size": 0},
        "rewards": [{"name": "accuracy"}],
        "samples_per_log": 8,
        "run": {"output_dir": "runs/rl"},
    }  # fmt: skip
    rows, samples = run_rl_yaml(work, config)
    train = [r for r in rows if "rollout/prm_stop_frac" in r]
    assert len(train) == 2
    assert sum(r["rollout/prm_resamples"] for r in train) > 0
    assert sum(r["rollout/prm_tokens_discarded"] for r in train) > 0
    assert len(samples) == 16
    stopped = 0
    for s in samples:
        scores = _closed_steps(prm.scored_steps, render(s["prompt"]), s["completion"])
        if s["finish_reason"] == "prm_stop":
            stopped += 1
            assert scores[-1] < threshold + TOL, (s, scores, threshold)
            scores = scores[:-1]
        assert all(x >= threshold - TOL for x in scores), (s, scores, threshold)
    # the logged stop share is the samples' (no dynamic sampling: every sample is logged)
    assert stopped == round(sum(r["rollout/prm_stop_frac"] for r in train) * 8)
