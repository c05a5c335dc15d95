"""User rewards named as "module:function" from a config."""

import sys

import pytest

from posttrain.data.rewards import build_reward
from posttrain.errors import ConfigError


def test_import_reward_function_and_factory(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def contains_seven(prompts, completions, **columns):\n"
        "    return [1.0 if '7' in c else 0.0 for c in completions]\n"
        "def make_scaled(scale):\n"
        "    return lambda prompts, completions, **c: [scale * len(x) for x in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        f = build_reward("my_rewards:contains_seven")
        assert f(["p", "p"], ["a7", "b"]) == [1.0, 0.0]
        g = build_reward("my_rewards:make_scaled", scale=2.0)
        assert g(["p"], ["abc"]) == [6.0]
    finally:
        sys.modules.pop("my_rewards", None)


def test_import_reward_errors_are_one_line():
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        build_reward("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        build_reward("os.path:nope")
