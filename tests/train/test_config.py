"""train/config/loader.py: YAML + dotted overrides, type coercion, unknown-key suggestions, help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.errors import ConfigError
from posttrain.train.config.loader import (
    ModelSection,
    OptimSection,
    RunSection,
    config_help,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
    undocumented_fields,
    valid_keys,
)


@dataclass
class AlgoSection:
    """Algorithm knobs."""

    clip_eps_high: float = field(default=0.2, metadata={"help": "Upper PPO clip."})
    name: Literal["ppo", "grpo"] = field(default="ppo", metadata={"help": "Which algorithm."})
    kl_beta: float | None = field(default=None, metadata={"help": "KL coefficient; null = no KL."})
    options: dict[str, float] = field(default_factory=dict, metadata={"help": "Extra options."})


@dataclass
class ToyConfig:
    """A toy command."""

    steps: int = field(default=10, metadata={"help": "Number of steps."})
    model: ModelSection = field(default_factory=ModelSection, metadata={"help": "Model."})
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=3e-4), metadata={"help": "Optim."})
    algo: AlgoSection = field(default_factory=AlgoSection, metadata={"help": "Algo."})
    run: RunSection = field(default_factory=RunSection, metadata={"help": "Run."})


def test_defaults_and_command_specific_section_defaults():
    cfg = load_config(ToyConfig, None, [])
    assert cfg.optim.lr == 3e-4  # the command's default_factory, not OptimSection's 1e-5
    assert cfg.optim.betas == (0.9, 0.999)
    # A YAML that sets another optim key must keep the command's lr default.
    cfg = load_config(ToyConfig, None, ["--optim.warmup_steps", "4"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.warmup_steps == 4


def test_yaml_then_overrides_all_syntaxes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 5\nalgo:\n  clip_eps_high: 0.25\n  name: grpo\noptim:\n  lr: 1e-3\n")
    cfg = load_config(
        ToyConfig,
        recipe,
        [
            "--algo.clip_eps_high", "0.28",
            "--run.resume",
            "optim.betas=[0.9, 0.95]",
            "--model.lora_target=[q_proj, v_proj]",
            "--algo.kl_beta", "null",
            "--run.tensorboard=false",
            "--algo.options.gamma", "0.5",
        ],
    )  # fmt: skip
    assert cfg.steps == 5
    assert cfg.algo.name == "grpo"
    assert cfg.algo.clip_eps_high == 0.28  # override beats YAML
    assert cfg.optim.lr == 1e-3  # YAML 1.1 reads "1e-3" as a string: coerced to float
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.lora_target == ["q_proj", "v_proj"]
    assert cfg.algo.kl_beta is None
    assert cfg.run.resume is True and cfg.run.tensorboard is False
    assert cfg.algo.options == {"gamma": 0.5}


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(ToyConfig, None, ["--algo.kl_beta", "0.05", "--run.seed", "7", "--model.path", "123"])
    assert cfg.model.path == "123"  # a str field keeps digits as text
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(ToyConfig, path, [])
    assert again == cfg
    assert config_to_dict(again)["optim"]["betas"] == [0.9, 0.999]


@settings(max_examples=30, deadline=None)
@given(
    lr=st.floats(1e-8, 1.0, allow_nan=False),
    steps=st.integers(0, 10**6),
    name=st.sampled_from(["ppo", "grpo"]),
    resume=st.booleans(),
)
def test_override_value_round_trip_property(lr, steps, name, resume):
    """Any value printed with repr() and passed as an override comes back equal."""
    cfg = load_config(
        ToyConfig,
        None,
        [f"--optim.lr={lr!r}", f"--steps={steps}", f"algo.name={name}", f"--run.resume={resume}"],
    )
    assert (cfg.optim.lr, cfg.steps, cfg.algo.name, cfg.run.resume) == (lr, steps, name, resume)


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(ToyConfig, None, ["--algo.clip_eps_hgh", "0.28"])
    assert str(e.value) == "unknown config key 'algo.clip_eps_hgh' — did you mean 'algo.clip_eps_high'?"
    with pytest.raises(ConfigError, match=r"'clip_eps_high' — did you mean 'algo.clip_eps_high'"):
        load_config(ToyConfig, None, ["clip_eps_high=0.3"])


def test_unknown_key_in_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'"):
        load_config(ToyConfig, recipe, [])


@pytest.mark.parametrize(
    "override, message",
    [
        (["--steps", "ten"], "config key 'steps': expected int, got 'ten'"),
        (["--steps", "1.5"], "config key 'steps': expected int, got 1.5"),
        (["--optim.lr", "fast"], "config key 'optim.lr': expected float, got 'fast'"),
        (["--run.resume", "maybe"], "config key 'run.resume': expected bool, got 'maybe'"),
        (["--algo.name", "sac"], "config key 'algo.name': 'sac' is not one of 'ppo', 'grpo'"),
        (["--optim.betas", "[0.9]"], "config key 'optim.betas': expected 2 values, got 1: [0.9]"),
        (["--optim.schedule", "step"], "config key 'optim.schedule': 'step' is not one of"),
        (["--run.seed.x", "1"], "config key 'run.seed' is a value, not a section"),
        (["--steps"], "config key 'steps' needs a value (int): --steps VALUE or --steps=VALUE"),
        (["--steps", "null"], "config key 'steps': expected int, got None"),
        (["oops"], "cannot parse override 'oops'"),
    ],
)
def test_type_errors_name_key_and_type(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ToyConfig, None, override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ToyConfig, tmp_path / "nope.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(ToyConfig, bad, [])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(ToyConfig, lst, [])


def test_post_init_validation_becomes_config_error():
    @dataclass
    class Checked:
        n: int = field(default=1, metadata={"help": "must be positive"})

        def __post_init__(self):
            if self.n <= 0:
                raise ValueError(f"n must be positive, got {self.n}")

    with pytest.raises(ConfigError, match="n must be positive, got -1"):
        load_config(Checked, None, ["--n", "-1"])


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c=2", "d.e=x=y", "--flag"]) == [
        ("a.b", "1"),
        ("c", "2"),
        ("d.e", "x=y"),
        ("flag", None),
    ]


def test_help_lists_every_option_with_doc_and_default():
    text = config_help(ToyConfig)
    for key in valid_keys(ToyConfig):
        assert f"--{key} " in text
    assert "--optim.lr  float  (default: 0.0003)" in text
    assert "Upper PPO clip." in text
    assert "'constant' | 'linear' | 'cosine'" in text
    assert undocumented_fields(ToyConfig) == []


def test_undocumented_fields_reported():
    @dataclass
    class Bad:
        x: int = 1

    assert undocumented_fields(Bad) == ["x"]


def test_empty_yaml_section_keeps_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algo:\n# clip_eps_high: 0.3\nsteps: 2\n")
    cfg = load_config(ToyConfig, recipe, [])
    assert cfg.algo == AlgoSection() and cfg.steps == 2
