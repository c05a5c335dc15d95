"""Raw-text prompts through SFT, the RL loop and evaluation keep the tokenizer's BOS
(issue #16, item 8): every path gives the ids ``tokenizer(prompt)`` gives."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from posttrain.engines.tokenizer import build_char_tokenizer
from rl_common import tiny_config


@pytest.fixture(scope="module")
def bos_dir(tmp_path_factory):
    """A saved Llama-style tokenizer (BOS post-processor, no chat template)."""
    tok = build_char_tokenizer(add_bos=True)
    tok.chat_template = None
    path = tmp_path_factory.mktemp("bos_tok")
    tok.save_pretrained(path)
    return path


def _tok(bos_dir):
    from posttrain.engines.models import load_tokenizer

    tok = load_tokenizer(str(bos_dir))
    assert tok("1+2=")["input_ids"][0] == tok.bos_token_id  # the saved BOS convention survives
    return tok


def test_sft_encoding_keeps_bos_once(bos_dir):
    from posttrain.train.offline.data import encode_sft

    tok = _tok(bos_dir)
    data = SimpleNamespace(seed=0, no_think_fraction=0.0, max_prompt_tokens=0, too_long="error")
    rows = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "<s>4+4=", "completion": "8"}]
    items = encode_sft(rows, tok, data, "rows")
    assert items[0]["prompt"] == tok("1+2=")["input_ids"]
    assert items[1]["prompt"] == tok("4+4=")["input_ids"]  # a BOS already in the text: not doubled
    for it in items:
        assert tok.bos_token_id not in it["completion"]


def test_rl_rollout_and_scoring_see_the_bos(bos_dir, tmp_path):
    from posttrain.train.rl.controller import RLTrainer

    tok = _tok(bos_dir)
    cfg = tiny_config(
        tmp_path / "rl", "grpo", f"model.tokenizer={bos_dir}", "data.chat_template=false", steps=1
    )
    trainer = RLTrainer(cfg)
    for it in trainer.prompts.items[:8]:
        assert it.prompt_ids == tok(it.text)["input_ids"]
    seen = []
    generate = trainer.generator.engine.generate

    def recording(prompts, params):
        seen.extend(list(p) for p in prompts)
        return generate(prompts, params)

    trainer.generator.engine.generate = recording
    trainer.step()
    b = trainer._last_batch
    texts = [trainer.prompts.items[int(i)].text for i in b.item_index]
    assert seen and all(p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1 for p in seen)
    start = b.seq.response_start
    for row, text in enumerate(texts):  # what the scoring passes and the learner read
        attended = b.seq.attention_mask[row, :start].bool()
        assert b.seq.input_ids[row, :start][attended].tolist() == tok(text)["input_ids"]


class _Recorder:
    """A rollout engine that records the prompt ids it is given and answers with EOS."""

    def __init__(self, eos_id):
        self.eos_id, self.prompts = eos_id, []

    def sync_weights(self, model):
        pass

    def generate(self, prompts, params):
        from posttrain.engines.rollout.base import Rollout

        self.prompts.extend(list(p) for p in prompts)
        B = len(prompts) * params.n
        return Rollout(
            prompt_ids=[list(p) for p in prompts for _ in range(params.n)],
            response_ids=torch.full((B, 1), self.eos_id),
            mask=torch.ones(B, 1),
            sampling_logprobs=torch.zeros(B, 1),
            finish_reason=["stop"] * B,
            group_id=torch.arange(len(prompts)).repeat_interleave(params.n),
            texts=["<answer>3</answer>"] * B,
        )


@pytest.mark.parametrize("chat_template", [False, True])
def test_eval_prompts_keep_bos(bos_dir, chat_template):
    from posttrain.train.evaluate import generate_samples

    tok = _tok(bos_dir)  # no template: chat_template=True falls back to the raw text
    engine = _Recorder(tok.eos_token_id)
    prompts = ["1+2=", "5*5="]
    generate_samples(
        torch.nn.Linear(1, 1), tok, prompts, k=1, temperature=1.0, max_new_tokens=2,
        engine=engine, chat_template=chat_template,
    )  # fmt: skip
    assert engine.prompts == [tok(p)["input_ids"] for p in prompts]


def test_prm_scoring_keeps_bos(bos_dir):
    """score_steps lays out raw prompts with the BOS: same scores as the hand-built layout."""
    from posttrain.engines.models import build_preset, build_value_model
    from posttrain.engines.scoring import build_step_batch, score_steps, step_logits

    tok = _tok(bos_dir)
    torch.manual_seed(0)
    prm = build_value_model(
        build_preset("tiny", vocab_size=len(tok)), tokenizer=tok, head_init_std=1.0
    ).eval()
    (scores,) = score_steps(prm, tok, ["1+2="], [["1+2=3"]])
    sep = tok("; ", add_special_tokens=False)["input_ids"]
    step = tok("1+2=3", add_special_tokens=False)["input_ids"]
    batch = build_step_batch(
        [tok("1+2=")["input_ids"]], [[step]], None, separator_ids=sep, pad_id=tok.pad_token_id
    )
    with torch.no_grad():
        want = torch.sigmoid(step_logits(prm, batch))[0, 0].item()
    assert scores[0] == pytest.approx(want, abs=1e-6)
