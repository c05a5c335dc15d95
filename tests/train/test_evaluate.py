"""train/evaluate.py: metrics against hand arithmetic, sample/prompt bookkeeping, a real
tiny-model run, and ORM best-of-N selection."""

from __future__ import annotations

import pytest
import torch

from posttrain.engines.rollout.base import Rollout
from posttrain.errors import ConfigError, PosttrainError
from posttrain.train import evaluate as ev
from posttrain.train.config.loader import load_config

GOOD = "<think>2+2=4</think><answer>4</answer>"


def test_summarize_hand_arithmetic():
    # 2 prompts x 4 samples.
    texts = [
        [GOOD, "<think>x</think><answer>5</answer>", "<answer>5</answer>", "no answer"],
        ["<think>a</think><answer>7</answer>", "<think>b</think><answer>7</answer>", GOOD, GOOD],
    ]
    correct = [[True, False, False, False], [False, False, True, True]]
    lengths = [[10, 12, 6, 64], [8, 8, 10, 10]]
    reasons = [["stop", "stop", "stop", "length"], ["stop"] * 4]
    orm = [[0.1, 0.9, 0.2, 0.0], [0.0, 0.1, 0.5, 0.3]]
    out = ev.summarize(["p1", "p2"], ["4", "4"], texts, lengths, reasons, correct, scores={"orm": orm})
    assert out["n"] == 2 and out["k"] == 4
    # pass@1 = mean(1/4, 2/4)
    assert out["accuracy"] == pytest.approx(0.375)
    # pass@4 with n = 4: 1 if any correct
    assert out["pass@4"] == pytest.approx(1.0)
    # maj@4: p1 votes {4: 1, 5: 2} -> "5" wrong; p2 {7: 2, 4: 2} tie -> "7" seen first, wrong
    assert out["maj@4"] == pytest.approx(0.0)
    # format: 5 of 8 have <think>..</think><answer>..</answer>
    assert out["format_rate"] == pytest.approx(6 / 8)
    assert out["length_mean"] == pytest.approx((10 + 12 + 6 + 64 + 8 + 8 + 10 + 10) / 8)
    assert out["truncated_frac"] == pytest.approx(1 / 8)
    # ORM best-of-4: p1 picks sample 1 (wrong), p2 picks sample 2 (right)
    assert out["best_of_4/orm"] == pytest.approx(0.5)


def test_pass_at_k_and_best_of_edge_cases():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert ev.pass_at_k_mean([[True, False, False, False]], 2) == pytest.approx(0.5)
    assert ev.best_of([float("nan"), 0.2], [True, False]) is False  # NaN never wins
    assert ev.best_of([0.3, 0.3], [True, False]) is True  # ties: first sample
    assert ev.format_ok("<answer>3</answer>", think_prefilled=True)
    assert not ev.format_ok("<answer>3</answer>", think_prefilled=False)
    assert not ev.format_ok("<think>x</think><answer>3</answer> trailing", think_prefilled=False)


class ScriptedEngine:
    """Returns fixed completions per prompt (by prompt order), honouring the Rollout contract."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def sync_weights(self, model):
        pass

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params.n, params.temperature, params.max_new_tokens))
        texts, lens = [], []
        for p in prompts:
            for j in range(params.n):
                texts.append(self.script[len(self.calls) - 1, tuple(p)][j])
                lens.append(len(texts[-1]))
        B, T = len(texts), max(lens)
        mask = torch.zeros(B, T)
        for i, n in enumerate(lens):
            mask[i, :n] = 1
        return Rollout(
            prompt_ids=[list(p) for p in prompts for _ in range(params.n)],
            response_ids=torch.zeros(B, T, dtype=torch.long),
            mask=mask,
            sampling_logprobs=torch.zeros(B, T),
            finish_reason=["stop"] * B,
            group_id=torch.arange(len(prompts)).repeat_interleave(params.n),
            texts=texts,
        )


class DigitsTokenizer:
    chat_template = None
    eos_token = "<eos>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


class ExactTask:
    def score(self, completion, answer):
        return 1.0 if f"<answer>{answer}</answer>" in completion else 0.0


def test_evaluate_policy_maps_samples_to_their_prompts():
    examples = [
        {"prompt": "a", "answer": "1"},
        {"prompt": "b", "answer": "2"},
        {"prompt": "c", "answer": "3"},
    ]
    ids = {e["prompt"]: (ord(e["prompt"]),) for e in examples}
    script = {
        (0, ids["a"]): ["<think>.</think><answer>1</answer><eos>", "<answer>9</answer>"],
        (0, ids["b"]): ["<answer>9</answer>", "<answer>9</answer>"],
        (1, ids["c"]): ["<think>.</think><answer>3</answer>", "<think>.</think><answer>3</answer>"],
    }
    engine = ScriptedEngine(script)
    model = torch.nn.Linear(1, 1)
    out = ev.evaluate_policy(
        model, DigitsTokenizer(), examples, ExactTask(), k=2, temperature=0.7, max_new_tokens=9,
        batch_size=2, return_samples=True, engine=engine,
    )  # fmt: skip
    assert engine.calls == [(2, 2, 0.7, 9), (1, 2, 0.7, 9)]
    assert out["accuracy"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert out["pass@2"] == pytest.approx(2 / 3)
    assert out["maj@2"] == pytest.approx(2 / 3)  # a: tie 1 vs 9 -> "1" first (right); c right
    assert out["format_rate"] == pytest.approx(3 / 6)  # the trailing EOS string is stripped
    assert [s["correct"] for s in out["samples"]] == [True, False, False, False, True, True]
    assert model.training  # restored after evaluation
    with pytest.raises(ConfigError, match="k >= 1"):
        ev.evaluate_policy(
            model, DigitsTokenizer(), examples, ExactTask(), k=0, temperature=1.0, max_new_tokens=4
        )


def test_evaluate_policy_real_tiny_model():
    from posttrain.data.tasks import get_task
    from posttrain.engines.models import build_preset
    from posttrain.engines.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    model = build_preset("tiny", vocab_size=len(tok))
    task = get_task("arithmetic")
    examples = task.examples("test", 3, seed=0)
    out = ev.evaluate_policy(model, tok, examples, task, k=2, temperature=1.0, max_new_tokens=8, seed=1)
    assert out["n"] == 3 and out["k"] == 2
    assert 0.0 <= out["accuracy"] <= out["pass@2"] <= 1.0
    assert 1.0 <= out["length_mean"] <= 8.0
    again = ev.evaluate_policy(model, tok, examples, task, k=2, temperature=1.0, max_new_tokens=8, seed=1)
    assert again == out  # same seed, same weights -> same numbers


def test_orm_best_of_uses_reward_model_scores(tmp_path):
    """An ORM whose head reads one embedding feature prefers the completions that use it."""
    from posttrain.engines.models import build_preset, build_value_model, save_value_model
    from posttrain.engines.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    rm = build_value_model(build_preset("tiny", vocab_size=len(tok)), tokenizer=tok)
    save_value_model(rm, tok, str(tmp_path / "rm"))
    texts = [["<answer>1</answer>", "<answer>2</answer>"], ["<answer>3</answer>", "<answer>1</answer>"]]
    scores = ev.orm_scores(str(tmp_path / "rm"), ["q1", "q2"], texts)
    assert len(scores) == 2 and all(len(s) == 2 for s in scores)
    # Same (prompt, completion) -> same score; the score depends on the completion.
    again = ev.orm_scores(str(tmp_path / "rm"), ["q1"], [["<answer>1</answer>", "<answer>1</answer>"]])
    assert again[0][0] == pytest.approx(scores[0][0], abs=1e-5) == pytest.approx(again[0][1], abs=1e-5)
    assert scores[0][0] != pytest.approx(scores[0][1], abs=1e-7)


def test_eval_config_validation():
    with pytest.raises(ConfigError, match="sampling.k must be >= 1"):
        load_config(ev.EvalConfig, None, ["--sampling.k", "0"])
    with pytest.raises(ConfigError, match="set data.task or data.path"):
        load_config(ev.EvalConfig, None, ["--data.task", "null"])


def test_prm_scores_split_think_steps_and_aggregate(tmp_path):
    from posttrain.algos.prm import load_prm, score_steps
    from posttrain.engines.models import build_preset, build_value_model, save_value_model
    from posttrain.engines.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    prm = build_value_model(build_preset("tiny", vocab_size=len(tok)), tokenizer=tok, head_init_std=1.0)
    save_value_model(prm, tok, str(tmp_path / "prm"))
    texts = [["<think>1+1=2; 2*3=6</think><answer>6</answer>", "<answer>6</answer>"]]
    mins = ev.prm_scores(str(tmp_path / "prm"), ["q"], texts, aggregate="min")
    lasts = ev.prm_scores(str(tmp_path / "prm"), ["q"], texts, aggregate="last")
    model, sep = load_prm(str(tmp_path / "prm"))
    # The prompt is templated, as `posttrain prm` trains on it.
    (direct,) = score_steps(
        model, tok, ["q"], [["1+1=2", "2*3=6"]], step_separator=sep, apply_chat_template=True
    )
    assert len(direct) == 2
    assert mins[0][0] == pytest.approx(min(direct), abs=1e-6)
    assert lasts[0][0] == pytest.approx(direct[-1], abs=1e-6)
    assert mins[0][1] != mins[0][1]  # no think steps -> NaN, never picked by best_of


def test_saved_char_tokenizer_keeps_spaces_next_to_a_model_config(tmp_path):
    from posttrain.engines.models import build_preset, load_tokenizer, save_model
    from posttrain.engines.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    save_model(build_preset("tiny", vocab_size=len(tok)), tok, str(tmp_path / "m"))
    loaded = load_tokenizer(str(tmp_path / "m"))
    assert loaded("a b; c")["input_ids"] == tok("a b; c")["input_ids"]
    assert loaded.pad_token_id == tok.pad_token_id


def test_dataset_rows_and_math_verify_fallback(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1?", "gold": "2"}\n{"question": "half of 1?", "gold": "1/2"}\n')
    cfg = load_config(
        ev.EvalConfig, None,
        ["--data.path", str(data), "--data.task", "null", "--data.prompt_column", "question",
         "--data.answer_column", "gold", "--data.n", "0"],
    )  # fmt: skip
    rows, task = ev._load_examples(cfg)
    assert (
        rows == [{"prompt": "1+1?", "answer": "2"}, {"prompt": "half of 1?", "answer": "1/2"}]
        and task is None
    )
    check = ev._Verifier(None)
    try:
        assert check(
            ["<answer>2</answer>", "<answer>3</answer>", "<answer>0.5</answer>"], ["2", "2", "1/2"]
        ) == [
            True,
            False,
            True,
        ]
    finally:
        check.close()


def test_eval_task_options_reach_the_task():
    cfg = load_config(
        ev.EvalConfig,
        None,
        [
            "--data.task_options",
            "{operators: '+', trace: columns}",
            "--data.difficulty",
            "2",
            "--data.n",
            "20",
        ],
    )
    rows, task = ev._load_examples(cfg)
    assert len(rows) == 20 and all("+" in r["prompt"] and "-" not in r["prompt"] for r in rows)
    bad = load_config(ev.EvalConfig, None, ["--data.task_options", "{tracee: columns}"])
    with pytest.raises(PosttrainError, match="tracee"):
        ev._load_examples(bad)
