"""Model-based rewards (reward model, PRM) and the code-execution reward."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from posttrain.data.rewards import build_reward
from posttrain.data.rewards.code import extract_code
from posttrain.data.rewards.models import prm_step_marginals, split_steps, step_spans
from posttrain.engines.tokenizer import build_char_tokenizer
from posttrain.errors import ConfigError, ModelError, RewardError
from tiny_models import tiny_hf_kwargs

# ------------------------------------------------------------------ reward model


@pytest.fixture(scope="module")
def tiny_rm():
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(**tiny_hf_kwargs(len(tok), 32, 64, num_labels=1, pad_token_id=tok.pad_token_id))
    return Qwen2ForSequenceClassification(cfg).eval(), tok


def _score_alone(model, tok, text: str) -> float:
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0].item()


def test_reward_model_scores_match_unpadded_forward(tiny_rm):
    model, tok = tiny_rm
    prompts = ["What is 2+2? ", "Sort 3 1 2: ", "x"]
    completions = [
        "<think>2+2=4</think><answer>4</answer>",
        "<answer>1 2 3</answer>",
        "a much longer completion text",
    ]
    f = build_reward("reward_model", model=model, tokenizer=tok, batch_size=3)
    got = f(prompts, completions)
    want = [_score_alone(model, tok, p + c) for p, c in zip(prompts, completions)]
    assert got == pytest.approx(want, abs=1e-5)  # padding in the batch changes nothing
    assert build_reward("reward_model", model=model, tokenizer=tok, batch_size=1)(
        prompts, completions
    ) == pytest.approx(want, abs=1e-5)


def test_reward_model_from_path_and_training_mode_restored(tiny_rm, tmp_path):
    model, tok = tiny_rm
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    f = build_reward("reward_model", model_path=str(tmp_path / "rm"))
    want = build_reward("reward_model", model=model, tokenizer=tok)(["q:"], ["<answer>1</answer>"])
    assert f(["q:"], ["<answer>1</answer>"]) == pytest.approx(want, abs=1e-5)
    model.train()
    build_reward("reward_model", model=model, tokenizer=tok)(["q"], ["a"])
    assert model.training
    model.eval()


def test_saved_checkpoint_tokenizer_round_trips(tiny_rm, tmp_path):
    from posttrain.engines.models import load_tokenizer

    model, tok = tiny_rm
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    text = "q <answer>1</answer>"
    assert load_tokenizer(str(tmp_path / "rm"))(text)["input_ids"] == tok(text)["input_ids"]


def test_reward_model_with_scalar_head_model(tiny_rm):
    models = pytest.importorskip("posttrain.engines.models")
    _, tok = tiny_rm
    torch.manual_seed(0)
    vm = models.build_value_model(models.build_preset("tiny", len(tok)), tokenizer=tok).eval()
    f = build_reward("reward_model", model=vm, tokenizer=tok, batch_size=2)
    texts = ["ab", "abcdef", "q"]
    got = f(["", "", ""], texts)
    for t, g in zip(texts, got):
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            assert g == pytest.approx(vm.sequence_scores(ids, torch.ones_like(ids)).item(), abs=1e-5)


def test_reward_model_bad_inputs(tmp_path):
    with pytest.raises(ConfigError):
        build_reward("reward_model")
    with pytest.raises(ModelError, match="cannot load reward model"):
        build_reward("reward_model", model_path=str(tmp_path / "missing"))


# ------------------------------------------------------------------ PRM


def _fake_scorer(prompts, step_lists):
    """PRM(≤t): 0.9 while every step so far is right, 0.2 from the first step with 'bad'."""
    out = []
    for steps in step_lists:
        s, ok = [], True
        for step in steps:
            ok = ok and "bad" not in step
            s.append(0.9 if ok else 0.2)
        out.append(s)
    return out


def test_split_steps_uses_task_separator():
    assert split_steps("", "<think>7+5=12; 12*2=24</think><answer>24</answer>") == ["7+5=12", "12*2=24"]
    assert split_steps("q <think>", "a; b</think>") == ["a", "b"]
    assert split_steps("", "a\nb", separator="\n") == ["a", "b"]


def test_step_spans_end_offsets_by_hand():
    # "<think>" is 7 characters: "7+5=12" is characters 7..12, "12*2=24" 15..21 (after "; ").
    c = "<think>7+5=12; 12*2=24</think><answer>24</answer>"
    assert step_spans("", c) == [("7+5=12", 13), ("12*2=24", 22)]
    # The template opened <think>: offsets are still in the completion's own characters.
    assert step_spans("q <think>", " a ;  b</think>") == [("a", 2), ("b", 7)]
    assert step_spans("", "x; y") == [("x", 1), ("y", 4)]  # no think block: the whole text
    assert step_spans("", "<think>a; b") == [("a", 8), ("b", 11)]  # never closed: to the end
    assert step_spans("", "<think> ; </think>") == []


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.text(alphabet="ab ;|", max_size=6), max_size=5),
    st.sampled_from(["; ", " | "]),
    st.booleans(),
    st.booleans(),
)
def test_step_spans_point_at_the_steps(pieces, separator, opened, closed):
    body = separator.join(pieces)
    completion = body + ("</think><answer>1</answer>" if closed else "")
    prompt = "q <think>" if opened else "q"
    if not opened:
        completion = "<think>" + completion
    spans = step_spans(prompt, completion, separator)
    assert [t for t, _ in spans] == split_steps(prompt, completion, separator)
    for text, end in spans:
        assert completion[end - len(text) : end] == text


def test_dense_prm_reward_exposes_scores_and_step_ends():
    f = build_reward("prm", scorer=_fake_scorer, dense=True)
    assert f.dense is True and build_reward("prm", scorer=_fake_scorer).dense is False
    comps = ["<think>s1; bad</think>", "<think></think>"]
    assert f.scored_steps(["", ""], comps) == ([[0.9, 0.2], []], [[9, 14], []])
    with pytest.raises(ConfigError, match="aggregate does not apply"):
        build_reward("prm", scorer=_fake_scorer, dense=True, aggregate="last")
    with pytest.raises(ConfigError, match="true or false"):
        build_reward("prm", scorer=_fake_scorer, dense="yes")


def test_prm_reward_aggregates_hand_arithmetic():
    comps = [
        "<think>s1; s2; bad s3; s4</think><answer>1</answer>",
        "<think>s1; s2</think>",
        "<think></think>",
    ]
    # per-step scores: [0.9, 0.9, 0.2, 0.2], [0.9, 0.9], []
    expect = {"min": [0.2, 0.9, None], "mean": [0.55, 0.9, None], "last": [0.2, 0.9, None]}
    for agg, want in expect.items():
        got = build_reward("prm", scorer=_fake_scorer, aggregate=agg)(["", "", ""], comps)
        assert got[2] is None
        assert got[:2] == pytest.approx(want[:2])
    f = build_reward("prm", scorer=_fake_scorer)
    scores = f.step_scores([""], comps[:1])[0]
    # marginals r_t = s_t - s_{t-1}, s_0 = 0: [0.9, 0, -0.7, 0]
    assert prm_step_marginals(scores) == pytest.approx([0.9, 0.0, -0.7, 0.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), max_size=12), st.floats(0, 1))
def test_prm_marginals_telescope(scores, initial):
    r = prm_step_marginals(scores, initial)
    assert len(r) == len(scores)
    if scores:
        assert sum(r) == pytest.approx(scores[-1] - initial, abs=1e-9)


def test_prm_scorer_mismatch_and_bad_aggregate():
    with pytest.raises(ConfigError):
        build_reward("prm", scorer=_fake_scorer, aggregate="max")
    f = build_reward("prm", scorer=lambda p, s: [[0.5]] * len(s))
    with pytest.raises(RewardError, match="does not match"):
        f([""], ["<think>a; b</think>"])


def _save_tiny_prm(path, separator: str = "; "):
    """A random-init tiny PRM saved the way `posttrain prm` saves one (weights, tokenizer, prm.json)."""
    from posttrain.engines.models import build_preset, build_value_model, save_value_model

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    prm = build_value_model(build_preset("tiny", len(tok), num_hidden_layers=1), tokenizer=tok).eval()
    save_value_model(prm, tok, str(path))
    (path / "prm.json").write_text(json.dumps({"step_separator": separator, "threshold": 0.5}))
    return prm, tok


def test_prm_reward_from_a_saved_prm_matches_score_steps(tmp_path):
    """{name: prm, options: {model_path: ...}} (what an RL YAML says) loads the PRM and its
    separator and gives the same numbers as scoring the in-memory model directly."""
    from posttrain.engines.scoring import score_steps

    prm, tok = _save_tiny_prm(tmp_path / "prm")
    prompts = ["<|im_start|>user\nWhat is 47+35?<|im_end|>\n<|im_start|>assistant\n", "q", "q"]
    comps = [
        "<think>7+5=12; 4+3+1=8; 47+35=82</think><answer>82</answer>",
        "<think>1+1=2</think>",
        "<think></think>",
    ]
    want = score_steps(prm, tok, prompts[:2], [["7+5=12", "4+3+1=8", "47+35=82"], ["1+1=2"]])
    for agg, pick in (("min", min), ("last", lambda s: s[-1]), ("mean", lambda s: sum(s) / len(s))):
        f = build_reward("prm", model_path=str(tmp_path / "prm"), aggregate=agg, batch_size=2)
        got = f(prompts, comps)
        assert got[2] is None
        assert got[:2] == pytest.approx([pick(s) for s in want], abs=1e-5)
    in_memory = build_reward("prm", model=prm, tokenizer=tok)
    assert in_memory.step_scores(prompts[:1], comps[:1])[0] == pytest.approx(want[0], abs=1e-5)


def test_prm_reward_uses_the_separator_the_prm_was_trained_with(tmp_path):
    _save_tiny_prm(tmp_path / "prm", separator=" | ")
    f = build_reward("prm", model_path=str(tmp_path / "prm"))
    # The think block is split on the trained separator, not on the tasks' "; ".
    assert len(f.step_scores(["q"], ["<think>a; b | c</think>"])[0]) == 2


def test_prm_reward_bad_sources(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        build_reward("prm")
    with pytest.raises(ConfigError, match="exactly one"):
        build_reward("prm", scorer=_fake_scorer, model_path=str(tmp_path))
    with pytest.raises(ConfigError, match="tokenizer"):
        build_reward("prm", model=torch.nn.Linear(1, 1))
    with pytest.raises(ModelError):
        build_reward("prm", model_path=str(tmp_path / "missing"))


def test_step_separator_constant_is_the_tasks_one():
    """engines/ cannot import data/, so the separator is defined in both; they must agree."""
    from posttrain.data.tasks.base import STEP_SEPARATOR as TASKS_SEPARATOR
    from posttrain.engines.scoring import STEP_SEPARATOR

    assert STEP_SEPARATOR == TASKS_SEPARATOR


def test_data_rewards_do_not_import_algos():
    """Layering (core <- engines <- data <- algos <- train): building the prm reward from a
    path must work without algos/ (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, posttrain.data.rewards.models as m, posttrain.engines.scoring; "
        "print(any(k.startswith('posttrain.algos') for k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ code


TESTS = [{"input": "2 3\n", "output": "5\n"}, {"input": "-1 1\n", "output": "0\n"}]
GOOD = "<think>read two ints</think>```python\na, b = map(int, input().split())\nprint(a + b)\n```"
HALF = "```python\na, b = map(int, input().split())\nprint(5)\n```"


def test_extract_code():
    assert extract_code(GOOD).startswith("a, b")
    assert extract_code("```py\nx=1\n```\ntext\n```python\ny=2\n```") == "y=2\n"
    assert extract_code("<think>```python\nprint(1)\n```") is None  # code inside unfinished reasoning
    assert extract_code("<answer>print(1)</answer>") == "print(1)"
    assert extract_code("no code here") is None


def test_code_reward_scores():
    f = build_reward("code", cpu_time_s=1, wall_time_s=2.0)
    out = f(["", "", "", ""], [GOOD, HALF, "no code", GOOD], tests=[TESTS, TESTS, TESTS, None])
    assert out == [1.0, 0.0, 0.0, None]
    g = build_reward("code", partial_credit=True, cpu_time_s=1, wall_time_s=2.0)
    assert g([""], [HALF], tests=[json.dumps(TESTS)]) == [0.5]


def test_code_reward_sandbox_failure_is_an_error_not_a_zero():
    f = build_reward("code", python="/nonexistent/python3")
    with pytest.raises(RewardError, match="sandbox"):
        f([""], [GOOD], tests=[TESTS])
