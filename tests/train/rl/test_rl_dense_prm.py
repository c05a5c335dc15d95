"""Dense PRM rewards in the RL loop: r_t = PRM(x, y≤t) − PRM(x, y≤t−1) at the token ending step t.

A hand-worked batch (fake PRM scores on known completions -> exact token positions and
values), the advantage estimators that can read them, the config errors, and a few RL
steps with a PRM saved to disk and named from a YAML file.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from posttrain.core.advantages import ADVANTAGES
from posttrain.data.rewards import build_reward
from posttrain.engines.rollout.base import Rollout
from posttrain.errors import ConfigError
from posttrain.roles import RewardRole
from posttrain.train.config.loader import load_config
from posttrain.train.config.rl import token_reward_advantages, validate
from posttrain.train.rl.controller import RLConfig, RLTrainer
from posttrain.train.rl.setup import step_token_index
from rl_common import DIGIT_REWARD, collect_batch, digit_fraction, tiny_config

# Char tokenizer: "<think>" is one token (7 characters), every other character one token.
# Step "1+2=3" ends at character 12 (token 5, the "3"), step "3+4=7" at character 19 (token 12).
WITH_STEPS = "<think>1+2=3; 3+4=7</think><answer>7</answer>"
NO_STEPS = "<think> </think><answer>5</answer>"
PRM_SCORES = {WITH_STEPS: [0.25, 0.75]}  # PRM(x, y≤t); marginals 0.25, 0.5
WEIGHT = 2.0
SEEN_PROMPTS: list[str] = []


def _fake_prm(prompts, step_lists):
    """Step scores keyed by the steps: the fixed scores for WITH_STEPS's two steps."""
    assert all(steps in ([], ["1+2=3", "3+4=7"]) for steps in step_lists), step_lists
    SEEN_PROMPTS.extend(prompts)
    return [PRM_SCORES[WITH_STEPS] if steps else [] for steps in step_lists]


class _FixedEngine:
    """A rollout engine that answers every prompt with WITH_STEPS, then NO_STEPS, alternately."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, prompt_ids, params):
        n = params.n
        texts = [(WITH_STEPS, NO_STEPS)[i % 2] for i in range(len(prompt_ids) * n)]
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id] for t in texts]
        width = max(len(x) for x in ids)
        response = torch.full((len(ids), width), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(ids), width)
        for r, x in enumerate(ids):
            response[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1.0
        return Rollout(
            prompt_ids=[list(prompt_ids[i // n]) for i in range(len(ids))],
            response_ids=response,
            mask=mask,
            sampling_logprobs=torch.zeros(len(ids), width),
            finish_reason=["stop"] * len(ids),
            group_id=torch.arange(len(prompt_ids)).repeat_interleave(n),
            texts=texts,
        )

    def sync_weights(self, model):
        pass


def _dense_trainer(tmp_path, method: str = "reinforce"):
    cfg = tiny_config(tmp_path, method, "algo.kl_coef=0", steps=1)
    trainer = RLTrainer(cfg)
    trainer.generator.engine = _FixedEngine(trainer.tokenizer)
    prm = build_reward("prm", scorer=_fake_prm, dense=True)
    trainer.rewards = RewardRole(
        [("prm", prm, WEIGHT, 0), (DIGIT_REWARD, digit_fraction, 1.0, 0)],
        dense=frozenset({0}),
        timeout_s=10,
        max_workers=1,
        max_error_rate=0.0,
    )
    return trainer


def test_step_token_index_by_hand():
    # tokens "<think>", "a", "bc", "d": cumulative ends 7, 8, 10, 11
    lengths = [7, 1, 2, 1]
    assert step_token_index([8, 9, 10, 11], lengths) == [1, 2, 2, 3]
    assert step_token_index([30], lengths) == [3]  # past the decoded text: the last token
    assert step_token_index([1], []) == [-1]  # an empty response has no token to reward


def test_hand_worked_batch_has_the_marginals_at_the_step_ends(tmp_path):
    trainer = _dense_trainer(tmp_path)
    SEEN_PROMPTS.clear()
    batch, metrics = collect_batch(trainer, step=0)
    # The PRM sees each prompt as the policy did (chat template applied), as it was trained.
    templated = trainer.tokenizer.decode(trainer.prompts.items[int(batch.item_index[0])].prompt_ids)
    assert templated.startswith("<s><|im_start|>user\n") and templated in SEEN_PROMPTS
    assert all(p.endswith("<|im_start|>assistant\n") for p in SEEN_PROMPTS)
    B, T = batch.mask.shape
    assert B == 16 and batch.dense_rewards.shape == (B, T)
    want_steps = torch.zeros(T)
    want_steps[5], want_steps[12] = WEIGHT * 0.25, WEIGHT * (0.75 - 0.25)
    for i, text in enumerate(batch.texts):
        want = want_steps if text == WITH_STEPS else torch.zeros(T)
        assert torch.equal(batch.dense_rewards[i], want), (i, batch.dense_rewards[i])
        # No double counting: the summed score is the scalar reward alone, no PRM term.
        assert batch.scores[i].item() == pytest.approx(digit_fraction([""], [text])[0])
    assert metrics["reward/prm_dense_mean"] == pytest.approx(0.75 / 2)  # unweighted Σ r_t, half the samples
    assert metrics["reward/prm_no_steps_frac"] == pytest.approx(0.5)
    assert "reward/prm" not in metrics  # no sequence-level PRM score was computed

    # reinforce, γ = 1, baseline 0 on the first step: G_t = Σ_{k≥t} r_k, the score at the EOS.
    trainer._score(batch)
    trainer._advantages(batch, 0)
    for i in range(B):
        n = int(batch.mask[i].sum())
        r = batch.dense_rewards[i].clone()
        r[n - 1] += batch.scores[i]
        want = torch.flip(torch.cumsum(torch.flip(r[:n], [0]), 0), [0])
        torch.testing.assert_close(batch.returns[i, :n], want)
        torch.testing.assert_close(batch.advantages[i, :n], want)
    with_steps = batch.texts.index(WITH_STEPS)
    g = batch.returns[with_steps]
    assert g[5] - g[6] == pytest.approx(0.5) and g[12] - g[13] == pytest.approx(1.0)


def test_the_token_reward_estimators_are_the_ones_that_read_token_rewards():
    """The `token_rewards` need (what the config check allows) matches core/advantages.py:
    the estimators that declare it change with the token rewards, the others do not take them."""
    torch.manual_seed(0)
    B, T = 4, 5
    common = {
        "scores": torch.tensor([1.0, 0.0, 0.5, 0.2]),
        "mask": torch.ones(B, T),
        "group_id": torch.tensor([0, 0, 1, 1]),
        "values": torch.randn(B, T),
        "gamma": 1.0,
        "lam": 1.0,
        "baseline": 0.0,
    }
    dense = torch.randn(B, T)
    reads = set()
    for name in ADVANTAGES.names():
        fn = ADVANTAGES[name]
        if "token_rewards" not in ADVANTAGES.needs(name):
            with pytest.raises(TypeError, match="token_rewards"):
                fn(mask=torch.ones(B, T), token_rewards=dense, **ADVANTAGES.inputs(name, common))
            continue
        a0, _ = fn(mask=torch.ones(B, T), **ADVANTAGES.inputs(name, {**common, "token_rewards": None}))
        a1, _ = fn(mask=torch.ones(B, T), **ADVANTAGES.inputs(name, {**common, "token_rewards": dense}))
        if not torch.allclose(a0, a1):
            reads.add(name)
    assert (
        reads
        == set(token_reward_advantages())
        == {"gae", "reinforce", "reinforce_pp", "reinforce_pp_baseline"}
    )


def _cfg(tmp_path, method: str, *extra: str, options: str = "{model_path: p, dense: true}"):
    return tiny_config(tmp_path, method, f"rewards=[{{name: prm, options: {options}}}]", *extra)


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="ignores token rewards; use one of gae, reinforce") as e:
        validate(_cfg(tmp_path, "grpo"))
    assert "\n" not in str(e.value)
    for method in ("reinforce_pp", "ppo", "reinforce"):
        validate(_cfg(tmp_path, method))
    with pytest.raises(ConfigError, match="must be true or false"):
        validate(_cfg(tmp_path, "ppo", options="{model_path: p, dense: 'yes'}"))
    with pytest.raises(ConfigError, match="only the prm reward is dense"):
        validate(tiny_config(tmp_path, "ppo", "rewards=[{name: format, options: {dense: true}}]"))
    with pytest.raises(ConfigError, match="success_reward"):
        validate(_cfg(tmp_path, "ppo", "data.success_reward=prm"))
    with pytest.raises(ConfigError, match="aggregate does not apply"):
        build_reward("prm", scorer=_fake_prm, dense=True, aggregate="min")


def test_a_custom_reward_marked_dense_is_checked_when_built(tmp_path, monkeypatch):
    """A "module:function" reward that marks itself dense (`fn.dense = True`) cannot pass
    validate's option check, so build_rewards checks the estimator again before the first step."""
    (tmp_path / "my_dense_prm.py").write_text(
        "from posttrain.data.rewards import build_reward\n"
        "reward = build_reward('prm', scorer=lambda prompts, steps: [[0.5] * len(s) for s in steps], dense=True)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tiny_config(tmp_path, "grpo", "rewards=[{name: 'my_dense_prm:reward'}]")
    validate(cfg)
    with pytest.raises(ConfigError, match="ignores token rewards"):
        RLTrainer(cfg)


def _save_random_prm(path):
    """A random-init tiny PRM written the way `posttrain prm` writes one."""
    from posttrain.engines.models import build_preset, build_value_model, save_value_model
    from posttrain.engines.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = build_value_model(build_preset("tiny", len(tok), num_hidden_layers=1), tokenizer=tok)
    save_value_model(model, tok, str(path))
    (path / "prm.json").write_text(json.dumps({"step_separator": "; ", "threshold": 0.5}))


@pytest.mark.parametrize("method", ["reinforce_pp", "ppo"])
def test_rl_steps_with_a_saved_prm_from_yaml(tmp_path, method):
    _save_random_prm(tmp_path / "prm")
    config = {
        "steps": 2,
        "model": {"preset": "tiny"},
        "data": {"task": "arithmetic", "difficulty": 1, "n_train": 16, "n_test": 0},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 10},
        "algo": {"method": method, "kl_coef": 0.0, "micro_batch_size": 0},
        "rewards": [
            {"name": "prm", "weight": 0.5, "options": {"model_path": str(tmp_path / "prm"), "dense": True}},
            {"name": "format", "weight": 1.0},
        ],
        "sample_log_every": 0,
        "run": {"output_dir": str(tmp_path / "rl"), "seed": 0},
    }
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(config))
    trainer = RLTrainer(load_config(RLConfig, tmp_path / "rl.yaml"))
    prm = build_reward("prm", model_path=str(tmp_path / "prm"), dense=True)
    for _ in range(2):
        m = trainer.step()
        batch = trainer._last_batch
        assert 0.0 < m["reward/prm_dense_mean"] < 1.0 and 0.0 <= m["reward/prm_no_steps_frac"] < 1.0
        assert math.isfinite(m["loss/total"])
        # Telescoping: a sample's dense rewards sum to weight · PRM(last step) of the saved PRM.
        scores, _ = prm.scored_steps(_prompts(trainer, batch), batch.texts)
        want = torch.tensor([0.5 * s[-1] if s else 0.0 for s in scores])
        torch.testing.assert_close(batch.dense_rewards.sum(-1), want, atol=1e-5, rtol=0)
        assert batch.scores.abs().max() <= 1.0  # format alone (0/1), no PRM score added
        spec = trainer.spec
        if method == "reinforce_pp":  # γ = 1 returns: the rewards reach every earlier token
            assert spec.gamma == 1.0
            r = batch.dense_rewards * batch.mask
            last = (batch.mask.cumsum(-1) == batch.mask.sum(-1, keepdim=True)) & (batch.mask > 0)
            r = r + last * batch.scores[:, None]
            want_g = torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1]) * batch.mask
            torch.testing.assert_close(batch.returns, want_g, atol=1e-5, rtol=0)
        else:  # GAE's returns are those of the critic's values and score + dense rewards
            gae = {"scores": batch.scores, "mask": batch.mask, "values": batch.values}
            gae |= {"gamma": spec.gamma, "lam": spec.lam}
            _, with_dense = ADVANTAGES["gae"](token_rewards=batch.dense_rewards, **gae)
            _, without = ADVANTAGES["gae"](**gae)
            torch.testing.assert_close(batch.returns, with_dense * batch.mask, atol=1e-5, rtol=0)
            assert not torch.allclose(batch.returns, without * batch.mask)


def _prompts(trainer, batch):
    """The prompts as the policy saw them (what the loop gives a dense PRM)."""
    return [trainer.tokenizer.decode(trainer.prompts.items[int(i)].prompt_ids) for i in batch.item_index]
