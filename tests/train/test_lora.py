"""LoRA (PEFT extra) through the trainers: the reference is the adapter-disabled policy,
only adapters train, the native sampler runs LoRA-wrapped projections, resume is exact,
and the saved model is a plain (merged) Hugging Face checkpoint.

Skipped when peft is not installed (`pip install 'posttrain[peft]'`; CI installs it).
"""

from __future__ import annotations

import json

import pytest
import torch

from rl_common import tiny_config

pytest.importorskip("peft")

from posttrain.train.rl.controller import RLTrainer  # noqa: E402

LORA = ["model.lora_r=8", "model.lora_alpha=16", "model.lora_target=[q_proj, v_proj, up_proj, down_proj]"]


def _adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_rl_lora_reference_is_adapter_disabled_policy(tmp_path):
    trainer = RLTrainer(
        tiny_config(tmp_path, "grpo", *LORA, "algo.kl_placement=loss", "algo.kl_coef=0.1", steps=2)
    )
    policy = trainer.policy.model
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable[:5]
    frozen_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    adapters_before = _adapter_state(policy)

    m = trainer.step()
    # LoRA B starts at zero, so before the first update the policy IS the reference:
    # the loop's KL diagnostics from this step's (pre-update) batch are exactly zero.
    assert m["kl/k3"] == pytest.approx(0.0, abs=1e-6)
    m2 = trainer.step()
    assert m2["kl/k1"] != 0.0  # after an update the adapters moved the policy off the reference

    for n, p in policy.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"frozen base weight {n} changed"
    moved = [n for n, p in _adapter_state(policy).items() if not torch.equal(p, adapters_before[n])]
    assert moved, "no adapter weight changed after two updates"

    # The reference's log-probs come from the same module with adapters off: equal to a
    # fresh forward of the base weights.
    seq = trainer._last_batch.seq
    ref = trainer.reference.logprobs(seq)
    with policy.disable_adapter():
        from posttrain.engines.logprobs import sequence_logprobs

        base, _ = sequence_logprobs(policy, seq, temperature=trainer.policy.temperature)
    torch.testing.assert_close(ref, base)


def _digit_probability(trainer) -> float:
    """Mean probability the policy puts on the 10 digit tokens at the first response
    position of a fixed prompt set (exact, no sampling noise)."""
    tok = trainer.tokenizer
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"What is {a}+{b}?"}], add_generation_prompt=True, tokenize=False
        )
        for a in range(4)
        for b in range(4)
    ]
    model = trainer.policy.model
    with torch.no_grad():
        probs = [
            model(input_ids=torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]))
            .logits[0, -1]
            .softmax(-1)
            for t in texts
        ]
    return float(torch.stack([p[digits].sum() for p in probs]).mean())


@pytest.mark.slow
def test_rl_lora_learns_digit_task(tmp_path):
    # LoRA leaves the (random, small) embeddings and LM head frozen, so it can only raise
    # the digits' total probability to ~0.2 on this random-init model (one residual
    # direction shared by 10 near-orthogonal digit embeddings); full fine-tuning reaches ~1.
    # The test therefore measures the exact digit probability, not noisy sampled rewards.
    steps = 20
    trainer = RLTrainer(tiny_config(tmp_path, "grpo", *LORA, "optim.lr=3e-2", steps=steps))
    before = _digit_probability(trainer)
    for _ in range(steps):
        trainer.step()
    after = _digit_probability(trainer)
    assert after > 1.5 * before, f"digit probability {before:.3f} -> {after:.3f}"


def test_rl_lora_resume_and_merged_save(tmp_path):
    from transformers import AutoModelForCausalLM

    a = RLTrainer(tiny_config(tmp_path / "a", "grpo", *LORA, "run.save_every=2", steps=4))
    ref_metrics = [a.step() for _ in range(4)]
    a.save_checkpoint()

    b = RLTrainer(tiny_config(tmp_path / "b", "grpo", *LORA, "run.save_every=2", steps=4))
    for _ in range(2):
        b.step()
    ckpt = b.save_checkpoint()
    c = RLTrainer(tiny_config(tmp_path / "c", "grpo", *LORA, steps=4))
    c.load_checkpoint(ckpt)
    resumed = [c.step() for _ in range(2)]
    for x, y in zip(ref_metrics[2:], resumed):
        assert x["loss/total"] == y["loss/total"]
        assert x["reward/mean"] == y["reward/mean"]

    # The model is saved merged: plain transformers loads it and gives the policy's logits.
    out = tmp_path / "merged"
    from posttrain.engines.models import save_model

    save_model(a.policy.model, a.tokenizer, str(out))
    cfg = json.loads((out / "config.json").read_text())
    assert "lora" not in json.dumps(cfg).lower()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    a.policy.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain(ids).logits, a.policy.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
