"""Issue #5: GRPO from a briefly SFT'd tiny model raises *held-out* arithmetic accuracy.

The run is the `posttrain demo` default (DemoConfig()): a random-init `tiny` model is
SFT'd on reference solutions of two-digit +/- worked column by column (train split), then
trained with GRPO (math-verify accuracy + format reward) on train-split prompts, and
evaluated greedily on test-split prompts before and after RL. The task's splits come
from a hash of each problem and are disjoint by construction; the test re-checks that no
evaluated prompt was trained on. Numbers and timings: docs/benchmarks.md, "GRPO held-out
arithmetic" and "Demo".

Bar: issue #5's +20 points within 10 CPU minutes. The default (seed 0) measured +32.0 in
449 CPU-s (600 GRPO steps); over four seeds the gain was +13 to +32, so a different warm
start (another seed, or float rounding changed by a code change) can fall short — see the
table in "Demo".
"""

from __future__ import annotations

import json

import pytest

from posttrain.data.tasks import get_task
from posttrain.train.config.loader import load_config
from posttrain.train.demo import DemoConfig, _stage_configs, run_demo

# Issue #5's bar, met by the default seed with a 12-point margin (see docstring).
MIN_GAIN = 0.20


@pytest.mark.slow
def test_demo_grpo_raises_heldout_accuracy(tmp_path):
    cfg = load_config(DemoConfig, None, [f"run.output_dir={tmp_path / 'demo'}"])
    summary = run_demo(cfg)

    # Held-out prompts are the task's test split; none of them was an SFT or RL prompt.
    task = get_task(cfg.task, **cfg.task_options)
    heldout = {
        e.prompt for e in task.examples("test", cfg.eval_n, seed=cfg.run.seed, difficulty=cfg.difficulty)
    }
    sft_rows = (tmp_path / "demo" / "data" / "sft_train.jsonl").read_text().splitlines()
    assert not heldout & {json.loads(r)["prompt"] for r in sft_rows}
    n_rl = _stage_configs(cfg, tmp_path / "demo")[1].data.n_train
    rl_prompts = {
        e.prompt for e in task.examples("train", n_rl, seed=cfg.run.seed, difficulty=cfg.difficulty)
    }
    assert not heldout & rl_prompts

    before = summary["eval_before"]["eval/accuracy"]
    after = summary["eval_after"]["eval/accuracy"]
    assert summary["eval_after"]["eval/n"] == cfg.eval_n
    assert after - before >= MIN_GAIN, f"held-out accuracy {before:.3f} -> {after:.3f}"
