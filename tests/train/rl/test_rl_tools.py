"""The RL loop with a multi-turn tool environment (env section, issue #20): trajectories of
calls and results reach the loss with observation tokens masked, tools/* metrics are
logged, and bad env settings fail before any model is built."""

import json

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config
from tiny_models import scripted_rollout


class _Calls:
    """Inner engine stand-in: turn 1 calls the calculator on the prompt's numbers (or writes
    broken JSON for odd rows), turn 2 answers with the observation it was given."""

    def __init__(self, tok):
        self.tok = tok

    def sync_weights(self, model):
        pass

    def generate(self, prompts, params):
        texts = []
        for j, p in enumerate([p for p in prompts for _ in range(params.n)]):
            seen = self.tok.decode(p, skip_special_tokens=False)
            if "<|im_start|>tool\n" in seen:  # second turn: copy the tool's answer
                texts.append(
                    "<answer>" + seen.rsplit("<|im_start|>tool\n", 1)[1].split("<|im_end|>")[0] + "</answer>"
                )
            else:
                expr = seen.split("What is ")[-1].split("?")[0]
                call = json.dumps({"name": "calculator", "arguments": {"expression": expr}})
                texts.append(f"<tool_call>{call if j % 2 == 0 else call[:-3]}</tool_call>")
        rows = [self.tok(t, add_special_tokens=False)["input_ids"] + ([self.tok.eos_token_id] if t.startswith("<answer>") else [])
                for t in texts]  # fmt: skip
        return scripted_rollout(prompts, params.n, rows, texts)


def test_tool_trajectories_train_with_observations_masked(tmp_path):
    cfg = tiny_config(tmp_path / "run", "grpo", "env.name=tools", "env.max_turns=2", "env.max_total_tokens=200",
                      "rollout.max_new_tokens=100", "rewards=[{name: task}]")  # fmt: skip
    trainer = RLTrainer(cfg)
    trainer.generator.engine.engine = _Calls(trainer.tokenizer)
    metrics = trainer.step()
    assert metrics["tools/call_rate"] == 1.0 and metrics["tools/turns_mean"] == 2.0
    assert metrics["tools/error_rate"] == pytest.approx(0.5)  # the odd rows' calls are broken JSON
    assert metrics["reward/mean"] == pytest.approx(0.5)  # right answers exactly where the call worked
    batch = trainer._last_batch
    for i in range(len(batch)):
        text = trainer.tokenizer.decode(batch.seq.response_ids[i], skip_special_tokens=False)
        start = text.index("<|im_end|>")  # first observation token: the template's end of turn
        ids = batch.seq.response_ids[i].tolist()
        obs_start = len(trainer.tokenizer(text[:start], add_special_tokens=False)["input_ids"])
        assert batch.mask[i, obs_start] == 0 and batch.mask[i, 0] == 1
        assert ids[obs_start] == trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert metrics["train/updates"] >= 1


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["env.name=tool"], "env.name: unknown environment 'tool'"),
        (["env.name=tools", "env.tools=[calculater]"], "env.tools\\[0\\]: unknown tool"),
        (["env.name=tools", "env.max_turns=0"], "env.max_turns"),
        (["env.name=tools", "env.options={retries: 2}"], "env.options: unknown option"),
        (["env.name=tools", "env.options={error_reward: -0.1}"], "gives rewards that this run would ignore"),
        (
            ["env.name=tools", "env.options={error_reward: -0.1}", "env.dense_rewards=true"],
            "ignores token rewards",
        ),
    ],
)
def test_bad_env_settings_fail_before_any_model(overrides, match, tmp_path, monkeypatch):
    import posttrain.train.rl.setup as setup

    monkeypatch.setattr(setup, "_load_policy", lambda cfg: pytest.fail("a model was built"))
    with pytest.raises(ConfigError, match=match):
        RLTrainer(tiny_config(tmp_path / "run", "grpo", *overrides))


def test_textarena_game_trains_from_its_own_prompts_with_the_env_return_reward(tmp_path):
    pytest.importorskip("textarena")
    cfg = tiny_config(tmp_path / "run", "grpo", "data.task=null", "env.name=textarena",
                      "env.options={env_id: GuessTheNumber-v0}", "env.max_turns=2", "env.max_total_tokens=64",
                      "data.max_prompt_tokens=1024", "rewards=[{name: env_return}]", "sample_log_every=1")  # fmt: skip
    trainer = RLTrainer(cfg)
    assert trainer.prompts.items[0].text.strip().startswith("[GAME]")
    metrics = trainer.step()
    assert "env/return_mean" in metrics and metrics["tools/turns_mean"] >= 1
    assert metrics["reward/mean"] == pytest.approx(metrics["env/return_mean"])  # the score is the game's


def test_multi_turn_tool_rollouts_run_asynchronously_within_the_staleness_bound(tmp_path):
    """Asynchronous RL (rollout.max_staleness, docs/rl.md) with the tools environment: the
    rollout thread drives the multi-turn generator on its own policy copy; every trained
    token of step s was sampled by version s - min(s, 1), tools/* metrics are logged, and a
    second run trains the same weights (the schedule is deterministic)."""
    extra = ("env.name=tools", "env.max_turns=2", "env.max_total_tokens=120", "rollout.max_new_tokens=40",
             "rewards=[{name: task}]", "rollout.max_staleness=1")  # fmt: skip
    weights = []
    for run in ("a", "b"):
        trainer = RLTrainer(tiny_config(tmp_path / run, "grpo", *extra, steps=3))
        seen = []
        step = trainer.step

        def recording_step(trainer=trainer, step=step, seen=seen):
            metrics = step()
            b = trainer._last_batch
            s = trainer.step_count - 1
            ages = (s - b.versions)[b.mask > 0]
            seen.append((s, ages, metrics))
            return metrics

        trainer.step = recording_step
        trainer.train()
        for s, ages, metrics in seen:
            assert ages.numel() == 0 or bool((ages == min(s, 1)).all()), (s, ages.unique())
            assert "tools/call_rate" in metrics and "tools/turns_mean" in metrics
        weights.append({k: v.clone() for k, v in trainer.policy.model.state_dict().items()})
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
