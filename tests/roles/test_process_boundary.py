"""The controller talks to its roles only through plain data that pickles.

The generator of the proxied run also samples from its own copy of the policy module,
so its weights arrive only through `Generator.sync`.

Every role the controller calls (generator, rewarder, prompt source, policy and critic
learners, reference and teacher scorers) is put behind a proxy that sends each argument
and each result through `pickle.loads(pickle.dumps(x))` — what a process boundary
(torch.distributed ranks, Ray actors) will do. Full RL steps through the proxies must
leave the policy and critic weights bit-identical to the in-process run: nothing the
controller relies on may travel by reference (a live module, a shared tensor mutated
in place, a callable).
"""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch

import posttrain.train.rl.controller as controller
from posttrain.train.rl.controller import RLTrainer
from posttrain.train.rl.setup import build_components, build_generator
from rl_common import tiny_config, train_digit_teacher

# The roles build_components returns; the rest (tokenizer, eval data, task, ...) stays
# with the controller.
ROLES = ("policy", "generator", "reference", "critic", "teacher", "rewards", "prompts")


def _copy(x):
    return pickle.loads(pickle.dumps(x))


class CrossProcess:
    """`target` behind a pickling boundary: method arguments and results are copies, a
    plain attribute read is a copy; `calls` counts the calls per method name."""

    def __init__(self, target):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "calls", {})

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        if not callable(value):
            return _copy(value)

        def remote(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            args, kwargs = _copy((args, kwargs))
            return _copy(value(*args, **kwargs))

        return remote

    def __setattr__(self, name: str, value):
        raise AttributeError(f"the controller set {name!r} on a remote role")


def _weights(roles: dict) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in roles["policy"].model.parameters()]
    if roles["critic"] is not None:
        out += [p.detach().clone() for p in roles["critic"].model.parameters()]
    return out


def _run(cfg, proxied: bool, steps: int):
    """(the roles after `steps` steps, the proxies or {}, the last metrics, the weights
    before the first step)."""
    built: dict = {}
    proxies: dict = {}

    def build(cfg, spec):
        c = build_components(cfg, spec)
        built.update(c)
        if proxied:
            # A generator in another process samples from its own copy of the weights, which
            # only `sync` (a state-dict snapshot after pickling) keeps up to date.
            c["generator"] = build_generator(cfg, copy.deepcopy(c["policy"].model), c["tokenizer"])
            for name in ROLES:
                if c[name] is not None:
                    proxies[name] = c[name] = CrossProcess(c[name])
        return c

    trainer = RLTrainer(cfg, build=build)
    initial = _weights(built)
    metrics = {}
    for _ in range(steps):
        metrics = trainer.step()
    return built, proxies, metrics, initial


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return train_digit_teacher(tmp_path_factory.mktemp("teacher") / "model", steps=5)


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("grpo", ["algo.kl_coef=0.05", "algo.ref_refresh_every=1"]),  # reference + its refresh
        ("ppo", []),  # critic learner, several epochs x minibatches
        ("kdrl", "teacher"),  # teacher scorer, KD loss
        ("on_policy_distill", "teacher"),  # teacher as the reward, old log-probs pass
        ("grpo", ["algo.keep_sampling_mask=true", "rollout.top_k=20", "algo.update_epochs=2"]),  # keep_ids
    ],
)
def test_roles_behind_a_pickling_boundary_train_bit_identically(method, extra, tmp_path, request):
    if extra == "teacher":
        extra = [f"teacher.path={request.getfixturevalue('teacher_dir')}"]
    local, _, m_local, initial = _run(tiny_config(tmp_path / "local", method, *extra), proxied=False, steps=2)
    remote, proxies, m_remote, _ = _run(
        tiny_config(tmp_path / "remote", method, *extra), proxied=True, steps=2
    )
    assert proxies["policy"].calls.get("update") == 2 and proxies["generator"].calls.get("sync") == 2
    if local["critic"] is not None:
        assert proxies["critic"].calls.get("update") == 2
    if local["teacher"] is not None:
        assert proxies["teacher"].calls.get("logprobs") == 2
    assert not all(torch.equal(a, b) for a, b in zip(initial, _weights(local), strict=True))  # it trained
    for a, b in zip(_weights(local), _weights(remote), strict=True):
        assert torch.equal(a, b)
    assert m_local.keys() == m_remote.keys()


def test_controller_holds_no_optimizer_and_runs_no_backward():
    source = inspect.getsource(controller)
    assert ".backward(" not in source
    assert "optimizer" not in source


def test_learner_state_dicts_cross_a_boundary_and_continue_exactly(tmp_path):
    """PolicyLearner / CriticLearner.state_dict() (model, optimizer, scheduler, guard),
    pickled into a fresh trainer's learners, continue training bit-identically."""
    a = RLTrainer(tiny_config(tmp_path / "a", "ppo", steps=3))
    a.step()
    b = RLTrainer(tiny_config(tmp_path / "b", "ppo", steps=3))
    b.policy.load_state_dict(_copy(a.policy.state_dict()))
    b.critic.load_state_dict(_copy(a.critic.state_dict()))
    # The controller's own state, as a checkpoint restores it.
    b.step_count = a.step_count
    b.prompts.load_state_dict(a.prompts.state_dict())
    b.baseline.load_state_dict(a.baseline.state_dict())
    rng = torch.get_rng_state()
    a.step()
    torch.set_rng_state(rng)
    b.step()
    for x, y in zip(
        _weights({"policy": a.policy, "critic": a.critic}),
        _weights({"policy": b.policy, "critic": b.critic}),
        strict=True,
    ):
        assert torch.equal(x, y)
    assert a.policy.scheduler.get_last_lr() == b.policy.scheduler.get_last_lr()


def test_evaluation_samples_through_the_generator_role(tmp_path):
    """Held-out evaluation asks the Generator (no live module): behind the pickling proxy,
    whose generator samples from its own synced copy, it gives the in-process numbers."""
    extra = ["data.n_test=6", "eval.n=6", "eval.every=1"]
    results = []
    for proxied in (False, True):
        built: dict = {}

        def build(cfg, spec, proxied=proxied, built=built):
            c = build_components(cfg, spec)
            built.update(c)
            if proxied:
                c["generator"] = CrossProcess(
                    build_generator(cfg, copy.deepcopy(c["policy"].model), c["tokenizer"])
                )
            return c

        trainer = RLTrainer(tiny_config(tmp_path / str(proxied), "grpo", *extra), build=build)
        trainer.step()
        results.append(trainer.evaluate())
    assert results[0] and results[0] == results[1]
    assert any(k.startswith("eval/") for k in results[0])
