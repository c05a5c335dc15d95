"""Registry metadata: needs and typed options of every entry, and the option errors."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Literal

import pytest

from posttrain.core.advantages import ADVANTAGES, GRPOOptions
from posttrain.core.kl import KL_ESTIMATORS
from posttrain.core.policy_losses import POLICY_LOSSES, KimiOptions
from posttrain.core.registry import Registry
from posttrain.errors import ConfigError

# family -> the arguments every entry takes (not part of `needs`)
FIXED = [
    (ADVANTAGES, {"mask"}),
    (POLICY_LOSSES, {"logprobs", "old_logprobs", "advantages", "mask"}),
    (KL_ESTIMATORS, {"logprobs", "ref_logprobs"}),
]
ENTRIES = [(reg, fixed, name) for reg, fixed in FIXED for name in reg.names()]


@pytest.mark.parametrize(
    ("registry", "fixed", "name"), ENTRIES, ids=[f"{r.family}:{n}" for r, _, n in ENTRIES]
)
def test_signature_is_exactly_fixed_needs_and_options(registry, fixed, name):
    """No **kwargs, no parameter the metadata does not declare, and the options dataclass's
    defaults are the function's."""
    params = inspect.signature(registry[name]).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), name
    cls = registry.options_type(name)
    fields = {f.name: f.default for f in dataclasses.fields(cls)} if cls is not None else {}
    assert set(params) == fixed | registry.needs(name) | set(fields), name
    assert registry.needs(name) <= registry.inputs_vocabulary
    for key, default in fields.items():
        assert params[key].default == default, (name, key)
        assert params[key].kind is inspect.Parameter.KEYWORD_ONLY, (name, key)


def test_needs_metadata_of_the_estimators_and_losses():
    group = {n for n in ADVANTAGES if "group_id" in ADVANTAGES.needs(n)}
    assert group == {"grpo", "dr_grpo", "rloo", "kimi", "reinforce_pp_baseline"}
    assert {n for n in ADVANTAGES if "values" in ADVANTAGES.needs(n)} == {"gae"}
    dense = {n for n in ADVANTAGES if "token_rewards" in ADVANTAGES.needs(n)}
    assert dense == {"gae", "reinforce", "reinforce_pp", "reinforce_pp_baseline"}
    assert all("scores" in ADVANTAGES.needs(n) for n in ADVANTAGES)
    clipping = {n for n in POLICY_LOSSES if "clip_eps_low" in POLICY_LOSSES.needs(n)}
    assert clipping == {"ppo", "gspo", "cispo"}
    assert POLICY_LOSSES.needs("ppo") == {"clip_eps_low", "clip_eps_high", "dual_clip"}
    assert POLICY_LOSSES.needs("kimi") == {"ref_logprobs"} and POLICY_LOSSES.needs("pg") == frozenset()
    assert {n for n in KL_ESTIMATORS if KL_ESTIMATORS.needs(n)} == {"k3_is"}


def test_unknown_option_names_the_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        ADVANTAGES.options("grpo", {"sacle": "batch"}, "algo.advantage_options")
    assert str(err.value) == (
        "algo.advantage_options.sacle: unknown option for advantage estimator 'grpo'. "
        "Did you mean 'scale'? Valid: scale, std_eps, unbiased_std"
    )
    with pytest.raises(
        ConfigError, match=r"^x.std_eps: unknown option for advantage estimator 'rloo'\..*none"
    ):
        ADVANTAGES.options("rloo", {"std_eps": 1e-3}, "x")


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"scale": "grop"}, r"^w.scale: .* wants one of 'group', 'batch', 'none', got 'grop'$"),
        ({"std_eps": "small"}, r"^w.std_eps: .* wants float, got 'small'$"),
        ({"std_eps": True}, r"^w.std_eps: .* wants float, got True$"),
        ({"unbiased_std": 1}, r"^w.unbiased_std: .* wants bool, got 1$"),
    ],
)
def test_bad_option_type_is_one_line_naming_the_key(given, match):
    with pytest.raises(ConfigError, match=match):
        ADVANTAGES.options("grpo", given, "w")


def test_options_build_typed_defaults_and_read_yaml_none():
    assert ADVANTAGES.options("grpo", {}, "w") == GRPOOptions()
    assert ADVANTAGES.options("grpo", {"std_eps": 0}, "w").std_eps == 0  # an int is a float
    assert ADVANTAGES.options("grpo", {"scale": None}, "w").scale == "none"  # YAML `none` is null
    assert ADVANTAGES.options("rloo", None, "w") is None
    assert POLICY_LOSSES.options("kimi", {"beta": 0.5}, "w") == KimiOptions(beta=0.5)
    assert POLICY_LOSSES.option_kwargs("kimi", KimiOptions(beta=0.5)) == {"beta": 0.5}
    assert POLICY_LOSSES.option_kwargs("kimi", None) == {}
    with pytest.raises(TypeError, match="KimiOptions"):
        POLICY_LOSSES.option_kwargs("kimi", GRPOOptions())


def test_register_checks_metadata_and_inputs_checks_the_caller():
    reg: Registry = Registry("thing", inputs=("a", "b"))

    @dataclass
    class Mutable:
        x: int = 1

    with pytest.raises(ValueError, match="unknown inputs"):
        reg.register("bad", needs={"c"})
    with pytest.raises(ValueError, match="frozen dataclass"):
        reg.register("bad", options=Mutable)

    @dataclass(frozen=True)
    class Opts:
        mode: Literal["x", "y"] | None = None

    reg.register("ok", needs={"a"}, options=Opts)(lambda *, a, mode=None: (a, mode))
    assert reg.inputs("ok", {"a": 1, "b": 2}) == {"a": 1}
    with pytest.raises(ValueError, match=r"needs \['a'\]"):
        reg.inputs("ok", {"b": 2})
    assert reg.options("ok", {"mode": None}, "w") == Opts()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("ok")(lambda: None)
