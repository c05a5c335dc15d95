"""One reward-model input layout for training, the RL reward and evaluation (issue #16, item 1).

The same (prompt, completion) must get the same score whether it is laid out as
`posttrain rm` / `posttrain prm` train on it, scored by the "reward_model" / "prm" RL
rewards (which get the prompt as the policy saw it, `model_prompt`), or ranked by
`posttrain eval --scorer.orm / --scorer.prm`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from posttrain.engines.tokenizer import build_char_tokenizer

PROMPT, COMPLETION = "What is 2+3?", "<think>2+3=5</think><answer>5</answer>"
DATA = SimpleNamespace(seed=0, no_think_fraction=0.0, max_prompt_tokens=0, too_long="error")


def _tokenizers():
    bos = build_char_tokenizer(add_bos=True)
    bos.chat_template = None
    return {"template": build_char_tokenizer(), "raw_bos": bos}


def _model_prompt(tok) -> str:
    """The `model_prompt` column of the RL loop: the policy's prompt ids (what
    ``tokenizer(rendered prompt)`` gives), decoded."""
    from posttrain.algos.sft import render_prompt

    return tok.decode(tok(render_prompt(tok, PROMPT))["input_ids"], skip_special_tokens=False)


@pytest.mark.parametrize("name", ["template", "raw_bos"])
def test_orm_scores_agree_in_training_rl_reward_and_eval(name, tmp_path):
    from posttrain.algos.reward_model import sequence_scores
    from posttrain.data.rewards import build_reward
    from posttrain.engines.models import build_preset, build_value_model, save_value_model
    from posttrain.train.evaluate import orm_scores
    from posttrain.train.offline.data import encode_pairs
    from posttrain.train.offline.methods import pair_batch

    tok = _tokenizers()[name]
    torch.manual_seed(0)
    rm = build_value_model(build_preset("tiny", vocab_size=len(tok)), tokenizer=tok, head_init_std=1.0).eval()
    save_value_model(rm, tok, str(tmp_path / "rm"))
    rows = [{"prompt": PROMPT, "chosen": COMPLETION, "rejected": "<answer>6</answer>"}]
    items = encode_pairs(rows, tok, DATA, "rows", append_eos=False)  # what `posttrain rm` trains on
    with torch.no_grad():
        trained = sequence_scores(rm, pair_batch(items, tok.pad_token_id, "cpu"))[0].item()
    reward = build_reward("reward_model", model_path=str(tmp_path / "rm"))
    rl = reward([PROMPT], [COMPLETION], model_prompt=[_model_prompt(tok)])[0]
    (evaluated,) = orm_scores(str(tmp_path / "rm"), [PROMPT], [[COMPLETION]])
    assert rl == pytest.approx(trained, abs=1e-5)
    assert evaluated[0] == pytest.approx(trained, abs=1e-5)


@pytest.mark.parametrize("name", ["template", "raw_bos"])
def test_prm_scores_agree_in_training_rl_reward_and_eval(name, tmp_path):
    from posttrain.data.rewards import build_reward
    from posttrain.engines.models import build_preset, build_value_model, save_value_model
    from posttrain.engines.scoring import STEP_SEPARATOR, build_step_batch, step_logits
    from posttrain.train.evaluate import prm_scores
    from posttrain.train.offline.data import encode_steps

    tok = _tokenizers()[name]
    torch.manual_seed(0)
    prm = build_value_model(
        build_preset("tiny", vocab_size=len(tok)), tokenizer=tok, head_init_std=1.0
    ).eval()
    save_value_model(prm, tok, str(tmp_path / "prm"))
    steps = ["2+3=5", "so 5"]
    completion = f"<think>{STEP_SEPARATOR.join(steps)}</think><answer>5</answer>"
    (item,) = encode_steps(
        [{"prompt": PROMPT, "completions": steps, "labels": [True, True]}], tok, DATA, "rows"
    )
    sep = tok(STEP_SEPARATOR, add_special_tokens=False)["input_ids"]
    batch = build_step_batch(
        [item["prompt"]], [item["steps"]], None, separator_ids=sep, pad_id=tok.pad_token_id
    )
    with torch.no_grad():
        trained = torch.sigmoid(step_logits(prm, batch))[0].tolist()  # what `posttrain prm` trains on
    reward = build_reward("prm", model_path=str(tmp_path / "prm"), aggregate="min")
    rl = reward([PROMPT], [completion], model_prompt=[_model_prompt(tok)])[0]
    (evaluated,) = prm_scores(str(tmp_path / "prm"), [PROMPT], [[completion]], aggregate="min")
    assert rl == pytest.approx(min(trained), abs=1e-5)
    assert evaluated[0] == pytest.approx(min(trained), abs=1e-5)
