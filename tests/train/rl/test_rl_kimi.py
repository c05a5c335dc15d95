"""The Kimi k1.5 preset takes several minibatch steps per batch, so β acts (issue #16, item 2).

With one gradient step per batch π_θ = π_old at the update and the squared loss
(A − β·ℓ)²/(2β) has gradient −A·∇ℓ whatever β is. From the second minibatch on the policy
has moved away from the batch's starting policy (ℓ ≠ 0) and β changes the update.
"""

from __future__ import annotations

from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config


def _updates_per_minibatch(tmp_path, beta, monkeypatch):
    import posttrain.roles.updates as rl

    cfg = tiny_config(tmp_path / f"beta{beta}", "kimi", f"algo.policy_loss_options={{beta: {beta}}}", steps=1)
    trainer = RLTrainer(cfg)
    snapshots = [[q.detach().clone() for q in trainer.policy.parameters()]]
    real = rl.guarded_step

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        snapshots.append([q.detach().clone() for q in trainer.policy.parameters()])
        return result

    monkeypatch.setattr(rl, "guarded_step", spy)
    trainer.step()
    return [[after - before for before, after in zip(a, b)] for a, b in zip(snapshots, snapshots[1:])]


def test_kimi_preset_takes_several_minibatch_steps_and_beta_acts_from_the_second(tmp_path, monkeypatch):
    small = _updates_per_minibatch(tmp_path, 0.1, monkeypatch)
    large = _updates_per_minibatch(tmp_path, 10.0, monkeypatch)
    assert len(small) == len(large) >= 2  # several optimizer steps on one batch

    def gap(u, v):
        return max((a - b).abs().max().item() for a, b in zip(u, v))

    def size(u):
        return max(a.abs().max().item() for a in u)

    # First minibatch: π_θ = π_old, ℓ = 0 up to round-off: the same update for any β.
    assert gap(small[0], large[0]) < 1e-3 * size(small[0])
    # Second minibatch: the policy has moved, β·ℓ ≠ 0, and β changes the update.
    assert gap(small[1], large[1]) > 0.05 * size(small[1])
