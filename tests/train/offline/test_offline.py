"""Offline trainers end to end on the tiny preset: learning, accumulation invariance,
exact resume, skipped non-finite steps, Hugging Face outputs, data errors, reference cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import posttrain.train.offline.loop as loop
import posttrain.train.offline.methods as methods
from posttrain.errors import DataError
from posttrain.train.config.loader import load_config
from posttrain.train.offline.commands import (
    DPOConfig,
    PRMConfig,
    RMConfig,
    SFTConfig,
    build_dpo,
    build_prm,
    build_rm,
    build_sft,
    plan,
    run_dpo,
    run_sft,
)

SMALL = ["--data.n_train", "64", "--data.n_eval", "16", "--train.eval_every", "0"]


def _cfg(cls, tmp_path: Path, *overrides: str, name: str = "run"):
    # Generation only in the policy trainers; rm / prm reject train.eval_generations.
    policy = ["--train.eval_generations", "0"] if cls in (SFTConfig, DPOConfig) else []
    args = ["--run.output_dir", str(tmp_path / name), *SMALL, *policy, *overrides]
    if cls is DPOConfig:
        args += ["--ref.cache_dir", str(tmp_path / "ref_cache")]
    return load_config(cls, None, args)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- learning


def test_sft_lowers_heldout_loss_and_raises_task_accuracy(tmp_path):
    cfg = _cfg(
        SFTConfig, tmp_path,
        "--data.n_train", "600", "--data.n_eval", "48", "--train.steps", "120", "--train.batch_size", "16",
        "--train.micro_batch_size", "16", "--train.eval_generations", "32", "--train.eval_every", "120", "--train.max_new_tokens", "20",
    )  # fmt: skip
    summary = run_sft(cfg)
    before, after = summary["initial_eval"], summary["final"]
    assert after["eval/nll"] < 0.25 * before["eval/nll"], (before, after)
    assert before["eval/accuracy"] <= 0.05
    assert after["eval/accuracy"] >= before["eval/accuracy"] + 0.2, (before, after)
    # the run directory holds what a user expects
    out = Path(cfg.run.output_dir)
    steps = [r["step"] for r in _rows(out / "metrics.jsonl")]
    assert steps[0] == 0 and steps[-1] == 120
    assert (out / "final" / "config.json").is_file() and (out / "checkpoints" / "latest").is_file()
    assert _rows(out / "samples.jsonl")  # held-out generations were logged
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final").config.model_type == "qwen2"


# ----------------------------------------------------------------------------- invariance


BUILDERS = {
    "sft": (SFTConfig, build_sft, ()),
    "sft_packed": (SFTConfig, build_sft, ("--algo.packing", "true")),
    "rm": (RMConfig, build_rm, ()),
    "prm": (PRMConfig, build_prm, ()),
    "dpo": (DPOConfig, build_dpo, ()),
    "simpo": (DPOConfig, build_dpo, ("--algo.loss", "simpo")),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_gradient_accumulation_invariance(tmp_path, name):
    """One optimizer step's gradient: 1 micro-batch of 8 == 8 micro-batches of 1."""
    cls, build, extra = BUILDERS[name]
    grads = []
    for micro in (8, 1):
        cfg = _cfg(cls, tmp_path, "--train.batch_size", "8", "--train.micro_batch_size", str(micro), *extra)
        method, _ = build(cfg)
        items = method.train_items[:8]
        loss, sums = loop.run_microbatches(method, items, micro, train=True)
        model = next(iter(method.models.values()))
        grads.append((loss, sums, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (l8, s8, g8), (l1, s1, g1) = grads
    assert l1 == pytest.approx(l8, rel=1e-5)
    assert s1 == pytest.approx(s8, rel=1e-5, abs=1e-5)
    assert len(g8) == len(g1) > 0
    for a, b in zip(g8, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- resume / NaN


class _Crash(RuntimeError):
    pass


def test_resume_is_exact(tmp_path, monkeypatch):
    common = (
        "--train.steps",
        "4",
        "--train.batch_size",
        "4",
        "--train.micro_batch_size",
        "2",
        "--run.save_every",
        "2",
    )
    full = _cfg(SFTConfig, tmp_path, *common, name="full")
    run_sft(full)

    crashed = _cfg(SFTConfig, tmp_path, *common, name="crashed")
    real_step = loop.guarded_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after the step-2 checkpoint
            raise _Crash("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "guarded_step", dying_step)
    with pytest.raises(_Crash):
        run_sft(crashed)
    monkeypatch.setattr(loop, "guarded_step", real_step)
    crashed.run.resume = True
    summary = run_sft(crashed)
    assert summary["resumed_from"] == 2

    a = load_file(str(Path(full.run.output_dir) / "final" / "model.safetensors"))
    b = load_file(str(Path(crashed.run.output_dir) / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    drop = ("time/step_s",)
    rows_a = [
        {k: v for k, v in r.items() if k not in drop}
        for r in _rows(Path(full.run.output_dir) / "metrics.jsonl")
    ]
    rows_b = [
        {k: v for k, v in r.items() if k not in drop}
        for r in _rows(Path(crashed.run.output_dir) / "metrics.jsonl")
    ]
    assert rows_a == rows_b


def test_nonfinite_loss_skips_the_step(tmp_path, monkeypatch):
    cfg = _cfg(
        SFTConfig, tmp_path, "--train.steps", "2", "--train.batch_size", "4", "--train.micro_batch_size", "4",
        "--train.eval_at_start", "false",
    )  # fmt: skip
    real_loss = methods.SFTMethod.loss
    seen = {"n": 0, "params": None}

    def poisoned(self, items, counts):
        seen["n"] += 1
        if seen["n"] == 1:
            seen["params"] = [p.detach().clone() for p in self.model.parameters()]
            loss, metrics = real_loss(self, items, counts)
            return loss * float("nan"), metrics
        if seen["n"] == 2:  # weights untouched by the skipped step
            for before, p in zip(seen["params"], self.model.parameters()):
                assert torch.equal(before, p)
        return real_loss(self, items, counts)

    monkeypatch.setattr(methods.SFTMethod, "loss", poisoned)
    summary = run_sft(cfg)
    assert summary["skipped_steps"] == 1
    rows = {r["step"]: r for r in _rows(Path(cfg.run.output_dir) / "metrics.jsonl")}
    assert rows[1]["train/skipped_updates"] == 1.0 and rows[2]["train/skipped_updates"] == 0.0


# ----------------------------------------------------------------------------- outputs


def test_reward_model_output_loads_as_hf_sequence_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from posttrain.algos.reward_model import sequence_scores
    from posttrain.data.rewards import build_reward

    cfg = _cfg(RMConfig, tmp_path, "--train.steps", "2", "--train.batch_size", "4")
    method, tok = build_rm(cfg)
    summary = loop.train_offline(cfg, method, tokenizer=tok)
    final = Path(summary["final_model"])
    items = method.eval_items[:3]
    batch = methods.pair_batch(items, tok.pad_token_id, "cpu")
    with torch.no_grad():
        trained = sequence_scores(method.models["reward_model"].eval(), batch)  # [2B]
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    with torch.no_grad():
        logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(logits, trained, atol=1e-4, rtol=1e-4)
    # and the "reward_model" reward scores generated text (prompt + completion) the same way
    # loaded by path, tokenizer included, as a recipe's reward_model entry does
    reward = build_reward("reward_model", model_path=str(final))
    prompts = [tok.decode(it["prompt"]) for it in items]
    chosen = [tok.decode(it["chosen"]) for it in items]
    assert reward(prompts, chosen) == pytest.approx(trained[: len(items)].tolist(), abs=1e-4)


def test_plan_describes_each_command():
    assert "completion-only" in plan(SFTConfig())
    assert "Bradley-Terry" in plan(RMConfig())
    assert "step BCE" in plan(PRMConfig())
    text = plan(load_config(DPOConfig, None, ["--algo.loss", "ipo"]))
    assert "ipo" in text and "ref:" in text and "self-generated" not in text
    assert "self-generated: 8 samples/prompt" in plan(load_config(DPOConfig, None, ["--data.pairs", "self"]))


# ----------------------------------------------------------------------------- data errors


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "cls, rows, expected",
    [
        (DPOConfig, [{"prompt": "a", "chosen": "x", "rejected": "x"}] * 4, "identical"),
        (RMConfig, [{"prompt": "a", "chosen": "x"}] * 4, "rejected"),
        (SFTConfig, [{"prompt": "a", "completion": ""}] * 4, "completion"),
        (PRMConfig, [{"prompt": "a", "completions": ["s1", "s2"], "labels": [True]}] * 4, "labels"),
    ],
)
def test_bad_rows_give_one_line_data_errors(tmp_path, cls, rows, expected):
    data = _write(tmp_path / "bad.jsonl", rows)
    cfg = _cfg(cls, tmp_path, "--data.path", data, "--data.task", "null", "--train.steps", "1")
    build = {SFTConfig: build_sft, RMConfig: build_rm, PRMConfig: build_prm, DPOConfig: build_dpo}[cls]
    with pytest.raises(DataError) as err:
        build(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "bad.jsonl" in msg and "row" in msg and expected in msg, msg


def test_no_think_rows_strip_reasoning(tmp_path):
    cfg = _cfg(SFTConfig, tmp_path, "--data.no_think_fraction", "0.5")
    method, tok = build_sft(cfg)
    think = [it for it in method.train_items if it["think"]]
    plain = [it for it in method.train_items if not it["think"]]
    assert 0.3 < len(plain) / len(method.train_items) < 0.7
    assert all(tok.decode(it["prompt"]).endswith("<think></think>") for it in plain)
    assert all(tok.decode(it["completion"]).startswith("<answer>") for it in plain)
    assert all(tok.decode(it["completion"]).startswith("<think>") for it in think)


def test_conversational_sft_rows_train_on_the_last_assistant_turn(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Sort: 3 1"}, {"role": "assistant", "content": "1 3"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
    ] * 3  # fmt: skip
    data = _write(tmp_path / "chat.jsonl", rows)
    cfg = _cfg(SFTConfig, tmp_path, "--data.path", data, "--data.messages", "true", "--data.task", "null",
               "--data.eval_fraction", "0")  # fmt: skip
    method, tok = build_sft(cfg)
    first = method.train_items[0]
    assert tok.decode(first["completion"]) == "1 3" + tok.eos_token
    prompt = tok.decode(first["prompt"])
    assert "Sort: 3 1" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert "be brief" in tok.decode(method.train_items[1]["prompt"])


# ----------------------------------------------------------------------------- reference cache


def count_calls(monkeypatch, module, name: str) -> dict:
    """Wrap `module.<name>` so that every call is counted in the returned {"n": calls}."""
    calls = {"n": 0}
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_reference_cache_is_reused_without_reference_forwards(tmp_path, monkeypatch):
    from posttrain.engines.models import build_preset, save_model
    from posttrain.engines.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    ref_dir = tmp_path / "ref_model"
    save_model(build_preset("tiny", len(tok)), tok, str(ref_dir))

    real = methods.reference_logps
    calls = count_calls(monkeypatch, methods, "reference_logps")
    args = ("--model.path", str(ref_dir), "--train.steps", "1", "--train.batch_size", "4")
    first = run_dpo(_cfg(DPOConfig, tmp_path, *args, name="a"))
    assert first["reference_cache_hit"] is False and calls["n"] == 2  # train + held-out
    files = list((tmp_path / "ref_cache").glob("ref-*.safetensors"))
    assert len(files) == 1

    calls["n"] = 0
    second = run_dpo(_cfg(DPOConfig, tmp_path, *args, name="b"))
    assert second["reference_cache_hit"] is True and calls["n"] == 0
    cached = load_file(str(files[0]))
    method, _ = build_dpo(_cfg(DPOConfig, tmp_path, *args, name="c"))
    assert calls["n"] == 0
    # the cached numbers are the reference's log-probs (policy == reference before training)
    fresh = real(method.model, method.train_items, tok.pad_token_id, 8)
    torch.testing.assert_close(method.ref["train"], fresh, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(method.ref["train"], cached["train"])

    # different data -> a different entry, computed afresh
    third = run_dpo(_cfg(DPOConfig, tmp_path, *args, "--data.n_train", "32", name="d"))
    assert third["reference_cache_hit"] is False and calls["n"] == 2
    assert len(list((tmp_path / "ref_cache").glob("ref-*.safetensors"))) == 2


# ----------------------------------------------------------------------------- self-generated pairs


def test_pair_by_outcome_by_hand():
    from posttrain.train.offline.data import pair_by_outcome

    texts = ["a", "x", "b", "y", "a", "z"]
    correct = [True, False, True, False, True, False]  # distinct correct: a, b; wrong: x, y, z
    assert pair_by_outcome(texts, correct, 1) == [("a", "x")]
    # first diagonal uses each correct once, then the next diagonal
    assert pair_by_outcome(texts, correct, 4) == [("a", "x"), ("b", "y"), ("a", "y"), ("b", "z")]
    assert len(pair_by_outcome(texts, correct, 100)) == 6  # every (correct, wrong) cell once
    assert pair_by_outcome(["a", "b"], [True, True], 3) == []  # no mixed outcome, no pair
    assert pair_by_outcome(["a", "b"], [False, False], 3) == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdefg"), st.booleans()), max_size=12), st.integers(1, 20))
def test_pair_by_outcome_properties(samples, max_pairs):
    from posttrain.train.offline.data import pair_by_outcome

    texts, correct = [t for t, _ in samples], [c for _, c in samples]
    pairs = pair_by_outcome(texts, correct, max_pairs)
    good = {t for t, c in samples if c}
    bad = {t for t, c in samples if not c}
    assert all(c in good and r in bad for c, r in pairs)
    assert len(set(pairs)) == len(pairs) == min(max_pairs, len(good) * len(bad))
    # no sample is reused before every sample on its side has been used once
    first = pairs[: min(len(good), len(bad))]
    assert len({c for c, _ in first}) == len(first) == len({r for _, r in first})


def test_self_generated_pairs_are_scored_by_the_verifier_and_reuse_the_reference_cache(tmp_path, monkeypatch):
    """pairs=self samples from the initial policy, labels with task.score, pairs correct
    vs. incorrect; a second run with the same settings reads both the pairs and the
    reference log-probs from the cache."""
    from posttrain.data.tasks.arithmetic import Arithmetic

    # A random-init policy never answers arithmetic; a stand-in verifier (even length =
    # "correct") gives mixed outcomes so the pairing logic is exercised on real samples.
    monkeypatch.setattr(Arithmetic, "score", lambda self, text, answer: float(len(text) % 2 == 0))
    calls = count_calls(monkeypatch, methods, "reference_logps")
    import posttrain.train.evaluate as evaluate

    sampled = count_calls(monkeypatch, evaluate, "generate_samples")
    args = ("--data.pairs", "self", "--data.n_train", "12", "--data.n_eval", "6", "--data.samples_per_prompt", "4",
            "--data.pairs_per_prompt", "2", "--data.sample_max_new_tokens", "12", "--data.keep_truncated", "true", "--train.steps", "1",
            "--train.batch_size", "4")  # fmt: skip
    first = run_dpo(_cfg(DPOConfig, tmp_path, *args, name="a"))
    counts = first["self_pairs"]["train"]
    assert counts["prompts"] == 12 and counts["samples"] == 48
    assert counts["mixed_prompts"] + counts["all_correct_prompts"] + counts["all_wrong_prompts"] == 12
    assert 0 < counts["pairs"] <= 2 * counts["mixed_prompts"]
    assert first["reference_cache_hit"] is False and calls["n"] == 2
    assert first["self_pairs"]["cache_hit"] is False and sampled["n"] == 2  # train + held-out prompts

    method, tok = build_dpo(_cfg(DPOConfig, tmp_path, *args, name="b"))
    assert len(method.train_items) == counts["pairs"] and calls["n"] == 2  # cache hit: no forward
    assert method.reference_cache_hit is True
    assert method.pair_counts["cache_hit"] is True and sampled["n"] == 2  # the pairs were not re-sampled
    for it in method.train_items:
        chosen = tok.decode(it["chosen"][:-1])  # EOS appended by encode_pairs
        rejected = tok.decode(it["rejected"][:-1])
        assert len(chosen) % 2 == 0 and len(rejected) % 2 == 1


def test_self_pairs_config_errors(tmp_path):
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 2"):
        build_dpo(_cfg(DPOConfig, tmp_path, "--data.pairs", "self", "--data.samples_per_prompt", "1"))
    with pytest.raises(ConfigError, match="unset data.path"):
        build_dpo(_cfg(DPOConfig, tmp_path, "--data.pairs", "self", "--data.path", str(tmp_path / "x.jsonl")))
    with pytest.raises(ConfigError, match="'gama' is not an option"):
        build_dpo(_cfg(DPOConfig, tmp_path, "--algo.loss", "simpo", "--algo.options", "{gama: 0.5}"))
