"""Thinking budget (Qwen3; case studies III.3 "Early Stopping and Graceful Degradation"):
a scripted engine shows by hand where the phrase and </think> go, what is masked and what
continues; then `posttrain eval` and one RL step with a model that thinks."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain import cli
from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.engines.rollout.budget import ThinkingBudgetEngine
from posttrain.engines.tokenizer import build_char_tokenizer
from posttrain.errors import ModelError

TOK = build_char_tokenizer()
EOS = TOK.eos_token


class Scripted:
    """A RolloutEngine answering each context (decoded prompt) with a fixed text, honouring
    max_new_tokens and stop strings like the real engines; records every call."""

    def __init__(self, script: dict[str, str]):
        self.script, self.calls = script, []

    def sync_weights(self, model):
        pass

    def generate(self, prompts, params: SamplingParams) -> Rollout:
        self.calls.append(([TOK.decode(p) for p in prompts], params))
        rows, reasons, groups = [], [], []
        for g, p in enumerate(prompts):
            full = TOK(self.script[TOK.decode(p)], add_special_tokens=False)["input_ids"]
            for _ in range(params.n):
                ids, why = full[: params.max_new_tokens], "length"
                for s in params.stop_strings:
                    text = TOK.decode(ids)
                    if s in text:
                        ids, why = (
                            TOK(text[: text.index(s) + len(s)], add_special_tokens=False)["input_ids"],
                            "stop",
                        )
                if why == "length" and len(full) <= params.max_new_tokens:
                    why = "stop"  # ended by its EOS
                rows.append(ids)
                reasons.append(why)
                groups.append(g)
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T)
        for b, r in enumerate(rows):
            ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1.0
        lps = torch.full((len(rows), T), -0.5) * mask
        texts = [TOK.decode(r) for r in rows]
        return Rollout([list(p) for p in prompts], ids, mask, lps, reasons, torch.tensor(groups), texts)


def _ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


PHRASE = " STOP."


def test_budget_cuts_inserts_masks_and_continues_by_hand():
    script = {
        "Q1": "<think>abcdefgh</think>A1" + EOS,  # thinks 8 + ... -> cut at 4 tokens
        "Q2": "<think>ab</think>A2" + EOS,  # closes its thinking within the budget, then answers
        "Q3": "xy" + EOS,  # answers without thinking, within the budget: untouched
        "Q4": "plain answer longer than four"
        + EOS,  # no thinking, longer than the budget: goes on, no phrase
        "Q1<think>abc" + PHRASE + "</think>": "A1" + EOS,
        "Q2<think>ab</think>": "A2" + EOS,
        "Q4plai": "n answer longer than four" + EOS,
    }
    inner = Scripted(script)
    eng = ThinkingBudgetEngine(inner, TOK, budget=4, phrase=PHRASE)
    ro = eng.generate([_ids(q) for q in ("Q1", "Q2", "Q3", "Q4")], SamplingParams(max_new_tokens=40, seed=3))
    first, *second = inner.calls
    assert first[1].max_new_tokens == 4 and first[1].stop_strings == ["</think>"]
    # phase 2: one call per remaining room, each sample continuing from its own context
    assert sorted(c for call in second for c in call[0]) == [
        "Q1<think>abc" + PHRASE + "</think>",
        "Q2<think>ab</think>",
        "Q4plai",
    ]
    assert ro.texts == ["<think>abc" + PHRASE + "</think>A1" + EOS, "<think>ab</think>A2" + EOS, "xy" + EOS,
                        "plain answer longer than four" + EOS]  # fmt: skip
    # Q1: 4 sampled tokens, then the forced phrase + </think> (mask 0, log-prob 0), then 3 sampled
    forced = len(_ids(PHRASE + "</think>"))
    assert ro.mask[0].tolist()[: 4 + forced + 3] == [1.0] * 4 + [0.0] * forced + [1.0] * 3
    assert ro.sampling_logprobs[0, 4 : 4 + forced].abs().sum() == 0
    assert ro.mask[1].sum() == len(_ids("<think>ab</think>A2" + EOS))  # nothing forced
    assert ro.finish_reason == ["stop"] * 4
    assert (eng.cut_total, eng.samples_total) == (1, 4)


def test_no_room_left_after_the_phrase_finishes_with_length():
    inner = Scripted({"Q": "<think>abcdefgh" + EOS})
    ro = ThinkingBudgetEngine(inner, TOK, budget=3, phrase=PHRASE).generate(
        [_ids("Q")], SamplingParams(max_new_tokens=8)
    )
    assert ro.finish_reason == ["length"] and len(inner.calls) == 1
    assert ro.texts[0].endswith("</think>")


def test_budget_at_or_above_max_new_tokens_is_plain_generation_and_keep_masks_are_refused():
    inner = Scripted({"Q": "<think>abcdefgh" + EOS})
    eng = ThinkingBudgetEngine(inner, TOK, budget=16, phrase=PHRASE)
    eng.generate([_ids("Q")], SamplingParams(max_new_tokens=8))
    assert inner.calls[0][1].stop_strings == [] and eng.cut_total == 0
    with pytest.raises(ModelError, match="keep masks"):
        eng.generate([_ids("Q")], SamplingParams(max_new_tokens=32, return_keep_mask=True))
    with pytest.raises(ModelError, match=">= 1"):
        ThinkingBudgetEngine(inner, TOK, budget=0)


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    """A tiny model SFT'd for 60 steps on two-step arithmetic: it opens <think> and reasons."""
    out = tmp_path_factory.mktemp("think_sft")
    args = ["sft", "--run.output_dir", str(out), "--train.steps", "60", "--data.difficulty", "3", "--optim.lr", "3e-3",
            "--train.eval_every", "0", "--train.eval_generations", "0", "--data.n_train", "500"]  # fmt: skip
    assert cli.main(args) == 0
    return out / "final"


def test_eval_and_rl_with_a_thinking_budget(thinking_model, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--model.path", str(thinking_model), "--data.task", "arithmetic", "--data.difficulty", "3",
            "--data.n", "8", "--sampling.k", "2", "--sampling.max_new_tokens", "200", "--sampling.thinking_budget", "3",
            "--output_dir", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["thinking_cut_frac"] > 0.5
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    cut = [s["completion"] for s in samples if "Considering the limited time" in s["completion"]]
    assert len(cut) == round(result["thinking_cut_frac"] * len(samples))
    assert all("directly now.\n</think>" in c for c in cut)

    from posttrain.train.config.loader import load_config
    from posttrain.train.rl.controller import RLConfig, RLTrainer

    cfg = load_config(RLConfig, None, [
        "steps=1", f"model.path={thinking_model}", f"run.output_dir={tmp_path / 'rl'}", "data.task=arithmetic",
        "data.difficulty=3", "data.n_train=16", "data.n_test=0", "rollout.prompts_per_step=2", "rollout.group_size=2",
        "rollout.max_new_tokens=200", "rollout.thinking_budget=3", "sample_log_every=0", "alerts.enabled=false",
    ])  # fmt: skip
    trainer = RLTrainer(cfg)
    metrics = trainer.step()
    assert metrics["rollout/thinking_cut_frac"] > 0.5
    batch = trainer._last_batch
    phrase_len = len(trainer.generator.engine.forced_ids)
    cut_rows = [b for b, t in enumerate(batch.texts) if "Considering the limited time" in t]
    assert cut_rows
    for b in cut_rows:  # the forced tokens are context, never trained on
        mask = batch.mask[b].tolist()
        assert mask[3 : 3 + phrase_len] == [0.0] * phrase_len and mask[:3] == [1.0] * 3


def test_rl_config_errors(tmp_path):
    from posttrain.errors import ConfigError
    from posttrain.train.config.loader import load_config
    from posttrain.train.rl.controller import RLConfig, plan

    for bad in (
        ["rollout.thinking_budget=-1"],
        ["rollout.thinking_budget=4", "algo.keep_sampling_mask=true"],
        ["rollout.thinking_budget=4", "env.name=tools", "env.tools=[calculator]"],
    ):
        with pytest.raises(ConfigError, match="thinking_budget"):
            plan(load_config(RLConfig, None, bad))
