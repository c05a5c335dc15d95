"""TIS and off-policy sequence masking with a sampler that differs from the trainer
(issue #16, items 4 and 5).

On CPU the native sampler is the trainer, so its log-probs μ equal π_old and every TIS
weight is 1. Here the sampler's reported log-probs are shifted by a known amount (what a
bf16 or otherwise different inference engine does), and the gradients of the step are
compared with hand-derived multiples of the plain ones. Updates are recorded, not applied,
so π_θ = π_old throughout a step unless a test lets minibatches update.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.train.common.optim import StepResult
from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config


def _trainer(tmp_path, name, *extra, shift=0.0):
    """A dr_grpo trainer (pg-style loss, no KL) whose sampler reports log μ = log π + shift."""
    trainer = RLTrainer(tiny_config(tmp_path / name, "dr_grpo", *extra, steps=1))
    generate = trainer.generator.engine.generate

    def shifted(prompts, params):
        ro = generate(prompts, params)
        ro.sampling_logprobs = ro.sampling_logprobs + shift * ro.mask
        return ro

    trainer.generator.engine.generate = shifted
    return trainer


def _step_grads(trainer, monkeypatch, apply=False):
    """(gradient of each optimizer step of one RL step, the step's metrics)."""
    import posttrain.roles.updates as rl

    grads = []
    real = rl.guarded_step

    def record(params, optimizer, *args, **kwargs):
        grads.append([q.grad.detach().clone() for q in trainer.policy.parameters()])
        if apply:
            return real(params, optimizer, *args, **kwargs)
        optimizer.zero_grad(set_to_none=True)
        return StepResult(ok=True, grad_norm=0.0, lr=0.0)

    monkeypatch.setattr(rl, "guarded_step", record)
    metrics = trainer.step()
    return grads, metrics


def _ratio(a, b):
    """The scalar r with a = r·b over all gradient entries (asserting it is one scalar)."""
    a = torch.cat([g.flatten() for g in a])
    b = torch.cat([g.flatten() for g in b])
    r = float((a @ b) / (b @ b))
    assert torch.allclose(a, r * b, atol=1e-6 * b.abs().max().item()), "not a scalar multiple"
    return r


@pytest.mark.parametrize("shift, cap, weight", [(-math.log(1.5), 2.0, 1.5), (-math.log(3.0), 2.0, 2.0)])
def test_token_tis_scales_the_update_by_the_capped_weight(tmp_path, monkeypatch, shift, cap, weight):
    """μ = π/1.5 on every token: w = min(π_old/μ, C) = 1.5 (C = 2), and 2 when π_old/μ = 3."""
    (plain,), _ = _step_grads(_trainer(tmp_path, "plain"), monkeypatch)
    (tis,), m = _step_grads(
        _trainer(tmp_path, "tis", f"algo.tis_cap={cap}", "algo.tis_level=token", shift=shift), monkeypatch
    )
    assert _ratio(tis, plain) == pytest.approx(weight, rel=1e-5)
    assert m["offpolicy/tis_weight_mean"] == pytest.approx(weight, rel=1e-6)
    # The gap metrics see the shift exactly: log(π_old/μ) = −shift, k3 = e^−shift − 1 + shift.
    assert m["offpolicy/gap_log_ratio"] == pytest.approx(-shift, abs=1e-5)
    assert m["offpolicy/gap_k3"] == pytest.approx(math.exp(-shift) - 1 + shift, abs=1e-5)
    assert m["offpolicy/staleness_log_ratio"] == pytest.approx(0.0, abs=1e-5)


def test_off_policy_mask_drops_exactly_the_negative_sequences_of_a_drifted_sampler(tmp_path, monkeypatch):
    """μ = π·e^0.5 (log-ratio 0.5 > δ = 0.1 on every sequence): the masked update equals the
    plain update with the advantages of negative-advantage sequences set to 0."""
    plain = _trainer(tmp_path, "plain")
    real = plain._advantages

    def zero_negative(batch, step):
        out = real(batch, step)
        a_seq = (batch.advantages * batch.mask).sum(-1) / batch.mask.sum(-1).clamp(min=1)  # [B]
        batch.advantages[a_seq < 0] = 0.0
        return out

    plain._advantages = zero_negative
    (want,), _ = _step_grads(plain, monkeypatch)
    masked = _trainer(tmp_path, "masked", "algo.off_policy_kl_threshold=0.1", shift=0.5)
    (got,), m = _step_grads(masked, monkeypatch)
    b = masked._last_batch
    a_seq = (b.advantages * b.mask).sum(-1) / b.mask.sum(-1).clamp(min=1)
    assert 0 < int((a_seq < 0).sum()) < len(b)
    assert m["offpolicy/masked_seq_frac"] == pytest.approx(float((a_seq < 0).float().mean()))
    assert _ratio(got, want) == pytest.approx(1.0, rel=1e-5)


def test_off_policy_mask_reacts_to_staleness_across_minibatches(tmp_path, monkeypatch):
    """Sampler = trainer, so only staleness can trigger the mask: none on the first
    minibatch (π_θ = π_old = μ), and on later minibatches the sequences whose probability
    the earlier updates lowered (DeepSeek-V3.2 compares μ with the CURRENT policy)."""
    import posttrain.roles.learner as rl

    calls = []
    real = rl.off_policy_sequence_mask

    def spy(logprobs, sampling_logprobs, advantages, mask, threshold):
        keep = real(logprobs, sampling_logprobs, advantages, mask, threshold)
        calls.append(keep)
        return keep

    monkeypatch.setattr(rl, "off_policy_sequence_mask", spy)
    trainer = _trainer(tmp_path, "stale", "algo.off_policy_kl_threshold=1e-4", "algo.num_minibatches=4")
    _, m = _step_grads(trainer, monkeypatch, apply=True)
    assert len(calls) == 4
    assert bool(calls[0].all())  # the first minibatch is on-policy
    assert any(not bool(k.all()) for k in calls[1:])  # stale negative sequences are dropped
    assert m["offpolicy/staleness_k3"] > 0 and abs(m["offpolicy/gap_log_ratio"]) < 1e-5
