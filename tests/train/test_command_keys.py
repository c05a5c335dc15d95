"""Every key a command accepts acts, or the command rejects it (issue #16, item 6)."""

from __future__ import annotations

import sys
import types

import pytest

from posttrain.errors import ConfigError
from posttrain.train.config.loader import load_config
from posttrain.train.offline.commands import DPOConfig, PRMConfig, RMConfig, SFTConfig
from rl_common import tiny_config

SFT_ONLY = {"data.max_length": "64", "data.no_think_fraction": "0.5", "data.messages": "true"}


@pytest.mark.parametrize("cls", [RMConfig, PRMConfig, DPOConfig])
@pytest.mark.parametrize("key", sorted(SFT_ONLY))
def test_sft_only_data_keys_are_rejected_by_other_trainers(cls, key):
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [f"--{key}", SFT_ONLY[key]])
    msg = str(e.value)
    assert f"unknown config key {key!r}" in msg and "\n" not in msg


def test_sft_accepts_its_data_keys():
    cfg = load_config(SFTConfig, None, [f"--{k}={v}" for k, v in SFT_ONLY.items()])
    assert (cfg.data.max_length, cfg.data.no_think_fraction, cfg.data.messages) == (64, 0.5, True)


def test_rl_wandb_project_reaches_wandb(tmp_path, monkeypatch):
    inits = []

    class Run:
        id = "run-id"

        def log(self, row, step):
            pass

        def finish(self):
            pass

    from posttrain.train.rl.controller import RLTrainer

    cfg = tiny_config(tmp_path, "grpo", "run.wandb=true", "run.wandb_project=my-project", steps=1)
    trainer = RLTrainer(cfg)  # built first: model loading probes for an installed wandb
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: inits.append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trainer.train()
    assert [i["project"] for i in inits] == ["my-project"]
    assert inits[0]["config"]["run"]["wandb_project"] == "my-project"


VALUE_MODEL_REJECTS = {
    "model.lora_r": "8",  # reward models and PRMs train every weight
    "train.eval_generations": "4",  # they generate nothing
    "train.max_new_tokens": "8",
    "train.eval_temperature": "1.0",
    "train.eval_samples": "2",
}


@pytest.mark.parametrize("cls", [RMConfig, PRMConfig])
@pytest.mark.parametrize("key", sorted(VALUE_MODEL_REJECTS))
def test_reward_models_reject_policy_only_keys(cls, key):
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [f"--{key}", VALUE_MODEL_REJECTS[key]])
    assert f"unknown config key {key!r}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_reward_model_attn_implementation_is_applied(kernel):
    from posttrain.train.offline.commands import build_rm

    cfg = load_config(
        RMConfig, None, ["--model.attn_implementation", kernel, "--data.n_train", "8", "--data.n_eval", "4"]
    )
    method, _ = build_rm(cfg)
    assert method.models["reward_model"].config._attn_implementation == kernel


def test_teacher_has_no_learning_rate(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'teacher.lr'"):
        tiny_config(tmp_path, "kdrl", "teacher.lr=1e-4")


@pytest.mark.parametrize("key, value", [("model.lora_r", "8"), ("model.gradient_checkpointing", "true")])
def test_eval_rejects_training_only_model_keys(key, value):
    from posttrain.train.evaluate import EvalConfig

    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(EvalConfig, None, [f"--{key}", value])


def test_vllm_settings_reach_the_engine_and_eval_reuses_it(tmp_path, monkeypatch):
    """rollout.vllm_* reach the vLLM engine's constructor; held-out evaluation samples from
    the rollout engine instead of building a second one (a fake stands in for vLLM)."""
    from posttrain.engines.rollout import ENGINES
    from posttrain.engines.rollout.native import NativeEngine
    from posttrain.train.rl.controller import RLTrainer

    built = []

    def fake_vllm(model, tokenizer, **kw):
        built.append(kw)
        return NativeEngine(model, tokenizer)

    monkeypatch.setitem(ENGINES._items, "vllm", fake_vllm)
    cfg = tiny_config(
        tmp_path, "grpo", "rollout.engine=vllm", "rollout.vllm_gpu_memory_utilization=0.7",
        "rollout.vllm_sleep_mode=true", "data.n_test=2", "eval.every=1", "eval.n=2", steps=1,
    )  # fmt: skip
    trainer = RLTrainer(cfg)
    trainer.evaluate()
    assert built == [{"gpu_memory_utilization": 0.7, "sleep_between_calls": True}]


def test_vllm_settings_without_vllm_are_refused(tmp_path):
    from posttrain.train.config.rl import validate

    with pytest.raises(ConfigError, match="apply to rollout.engine=vllm, not 'native'"):
        validate(tiny_config(tmp_path, "grpo", "rollout.vllm_sleep_mode=true"))
