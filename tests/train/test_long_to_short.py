"""Kimi k1.5's long-to-short methods (the GRPO seed's "Long2Short RL"): shortest rejection
sampling, long-vs-short DPO pairs and weight merging — selection and averaging by hand,
and each through its command."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain import cli
from posttrain.errors import ConfigError, DataError
from posttrain.train.config.loader import load_config
from posttrain.train.long_to_short import long_short_pairs, merge_state_dicts, shortest_per_prompt
from posttrain.train.offline.commands import DPOConfig, SFTConfig, build_dpo, build_sft


def _row(prompt, completion, correct, length=None):
    row = {"prompt": prompt, "completion": completion, "correct": correct, "answer": "7"}
    if length is not None:
        row["length"] = length
    return row


# prompt p: A correct 10, B correct 14 (< 1.5 x 10), C correct 16 (>= 15), D wrong 12 (> 10), E wrong 8 (shorter)
SAMPLES = [
    _row("p", "B" * 14, True, 14),
    _row("p", "A" * 10, True, 10),
    _row("p", "C" * 16, True, 16),
    _row("p", "D" * 12, False, 12),
    _row("p", "E" * 8, False, 8),
    _row("q", "F" * 5, False, 5),  # no correct sample: no pair, and dropped by keep_if
    _row("r", "GG", True),  # no length column: 2 characters
    _row("r", "H", True),
    _row("r", "IIII", False),
]


def test_shortest_per_prompt_by_hand():
    kept = shortest_per_prompt([r for r in SAMPLES if r["correct"]], "s")
    assert [r["completion"] for r in kept] == ["A" * 10, "H"]


def test_long_short_pairs_by_hand():
    pairs = long_short_pairs(SAMPLES, "s", long_ratio=1.5, max_pairs=3)
    got = [(r["prompt"], r["chosen"], r["rejected"]) for r in pairs]
    # p: chosen A; rejected C (correct, 16 >= 15) then D (wrong, 12 > 10), longest first; B, E are not
    # r: chosen H (1 char); rejected IIII (wrong, longer) and GG (correct, 2 >= 1.5 x 1)
    assert got == [("p", "A" * 10, "C" * 16), ("p", "A" * 10, "D" * 12), ("r", "H", "IIII"), ("r", "H", "GG")]
    assert all(r["answer"] == "7" for r in pairs)
    assert len(long_short_pairs(SAMPLES, "s", long_ratio=1.5, max_pairs=1)) == 2  # one per prompt
    # a stricter ratio drops the correct-but-long rejections: 16 < 2 x 10, 2 = 2 x 1 still counts
    strict = long_short_pairs(SAMPLES, "s", long_ratio=2.0, max_pairs=3)
    assert [r["rejected"] for r in strict] == ["D" * 12, "IIII", "GG"]
    with pytest.raises(DataError, match="no long-vs-short pair"):
        long_short_pairs(SAMPLES[5:6], "s", long_ratio=1.5, max_pairs=1)
    with pytest.raises(DataError, match="'correct' must be true/false"):
        long_short_pairs([{**SAMPLES[0], "correct": "yes"}], "s", long_ratio=1.5, max_pairs=1)
    with pytest.raises(ConfigError, match="long_ratio"):
        long_short_pairs(SAMPLES, "s", long_ratio=0.5, max_pairs=1)


def test_merge_state_dicts_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0]), "pos": torch.tensor([0, 1])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0]), "pos": torch.tensor([0, 1])}
    merged = merge_state_dicts([a, b], [1.0, 3.0])  # normalised: 0.25, 0.75
    assert merged["w"].tolist() == [2.5, 5.0] and merged["b"].tolist() == [3.0]
    assert merged["pos"].tolist() == [0, 1]
    with pytest.raises(ConfigError, match="shapes"):
        merge_state_dicts([a, {**b, "w": torch.zeros(3)}], [1, 1])
    with pytest.raises(ConfigError, match="non-float"):
        merge_state_dicts([a, {**b, "pos": torch.tensor([1, 0])}], [1, 1])
    with pytest.raises(ConfigError, match="different parameters"):
        merge_state_dicts([a, {"w": b["w"], "b": b["b"]}], [1, 1])
    with pytest.raises(ConfigError, match=">= 0"):
        merge_state_dicts([a, b], [1.0, -1.0])


def test_posttrain_merge_averages_two_saved_models(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from posttrain.engines.models import load_model, save_model
    from posttrain.engines.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"m{seed}"
        save_model(load_model("tiny", tokenizer=tok), tok, str(path))
        paths.append(path)
    out = tmp_path / "merged"
    args = ["merge", "--models", f"[{paths[0]}, {paths[1]}]", "--weights", "[1, 3]", "--output_dir", str(out)]
    assert cli.main([*args, "--dry-run"]) == 0 and "0.25 x" in capsys.readouterr().out
    assert cli.main(args) == 0
    m0, m1, merged = (AutoModelForCausalLM.from_pretrained(p) for p in (*paths, out / "final"))
    for (name, p0), p1, pm in zip(m0.named_parameters(), m1.parameters(), merged.parameters()):
        torch.testing.assert_close(pm, 0.25 * p0 + 0.75 * p1, msg=name)
    assert (out / "final" / "tokenizer.json").is_file() or (out / "final" / "tokenizer_config.json").is_file()
    assert cli.main(["merge", "--models", f"[{paths[0]}]", "--output_dir", str(out)]) == 2


def _samples_file(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SAMPLES))
    return path


def test_sft_keeps_the_shortest_correct_sample_of_each_prompt(tmp_path):
    args = ["--data.path", str(_samples_file(tmp_path)), "--data.keep_if", "correct", "--data.keep_shortest", "true",
            "--data.eval_fraction", "0", "--data.task", "null", "--run.output_dir", str(tmp_path / "run")]  # fmt: skip
    method, tok = build_sft(load_config(SFTConfig, None, args))
    texts = [tok.decode(it["completion"][:-1]) for it in method.train_items]
    assert texts == ["A" * 10, "H"]
    with pytest.raises(ConfigError, match="keep_shortest"):
        build_sft(load_config(SFTConfig, None, ["--data.keep_shortest", "true"]))


def test_dpo_long_short_pairs_from_samples(tmp_path, capsys):
    args = ["--data.path", str(_samples_file(tmp_path)), "--data.pairs", "long_short", "--data.pairs_per_prompt", "3",
            "--data.eval_fraction", "0", "--data.task", "null", "--run.output_dir", str(tmp_path / "run"),
            "--ref.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    method, tok = build_dpo(load_config(DPOConfig, None, args))
    got = [(tok.decode(it["chosen"][:-1]), tok.decode(it["rejected"][:-1])) for it in method.train_items]
    assert got == [("A" * 10, "C" * 16), ("A" * 10, "D" * 12), ("H", "IIII"), ("H", "GG")]
    assert cli.main(["dpo", *args, "--dry-run"]) == 0
    assert "long-vs-short from" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="long_short"):
        build_dpo(
            load_config(DPOConfig, None, ["--data.pairs", "long_short", "--ref.cache_dir", str(tmp_path)])
        )
    with pytest.raises(ConfigError, match="makes its own pairs"):
        build_dpo(load_config(DPOConfig, None, [*args, "--data.format", "ranked"]))
