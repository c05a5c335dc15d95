"""Asynchronous GRPO learns the demo task about as well as synchronous GRPO (slow).

One SFT warm start (the `posttrain demo` stage, DemoConfig defaults), then GRPO on the same
prompts, seed and sample budget three times: synchronous, rollout.max_staleness 1 and 2.
Held-out accuracy (greedy, the task's test split) is measured before and after each run in
this test, and each asynchronous run must gain at least MIN_SHARE of the synchronous run's
gain, and more than 0. Measured (seed 0, 2-core CPU, ~15 min for the test): sync +0.148,
k=1 +0.141, k=2 +0.164 from 0.305, so the floor (half of sync) leaves a 2x margin; docs/rl.md
"Asynchronous RL".
"""

from __future__ import annotations

import copy

import pytest

from posttrain.train.config.loader import load_config
from posttrain.train.demo import DemoConfig, _stage_configs, write_sft_data
from posttrain.train.offline.commands import run_sft
from posttrain.train.rl.controller import RLTrainer

RL_STEPS = 150  # docs/benchmarks.md: cosine from 2e-4 gains ~+21 points in 150 steps
MIN_SHARE = 0.5


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = load_config(DemoConfig, None, [f"run.output_dir={root}", f"rl_steps={RL_STEPS}", "eval_every=0"])
    write_sft_data(cfg, root / "data")
    sft, rl = _stage_configs(cfg, root)
    run_sft(sft)
    return rl


def _gain(rl, k: int) -> float:
    rl = copy.deepcopy(rl)
    rl.rollout.max_staleness = k
    rl.run.output_dir = f"{rl.run.output_dir}-k{k}"
    summary = RLTrainer(rl).train()
    return summary["eval_after"]["eval/accuracy"] - summary["eval_before"]["eval/accuracy"]


@pytest.mark.slow
def test_async_grpo_gains_comparable_to_sync(stages):
    sync = _gain(stages, 0)
    gains = {k: _gain(stages, k) for k in (1, 2)}
    print(
        f"held-out accuracy gain: sync {sync:+.3f}, " + ", ".join(f"k={k} {g:+.3f}" for k, g in gains.items())
    )
    assert sync > 0, f"the synchronous run did not learn ({sync:+.3f})"
    for k, gain in gains.items():
        assert gain > 0 and gain >= MIN_SHARE * sync, f"max_staleness {k}: {gain:+.3f} vs sync {sync:+.3f}"
