"""`posttrain bench` as a user runs it: tiny preset, two GRPO steps, no timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from posttrain.errors import ConfigError
from posttrain.train.config.loader import load_config
from trlbench.bench import (
    BenchConfig,
    format_markdown,
    plan,
    rebuild_results,
    run_bench,
    summarize,
    time_to_target,
)


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "posttrain", "bench", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def test_bench_cli_runs_posttrain_steps(tmp_path):
    out = tmp_path / "bench"
    proc = _cli(
        "--presets",
        "[tiny]",
        "--frameworks",
        "[posttrain]",
        "--steps",
        "2",
        "--skip_steps",
        "1",
        "--threads",
        "1",
        "--max_new_tokens",
        "8",
        "--n_train",
        "16",
        "--run.output_dir",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    run = results["models"]["tiny"]["frameworks"]["posttrain"]
    assert run["steps_timed"] == 1
    assert run["median_step_s"] > 0
    assert len(run["reward_curve"]) == 2
    assert all(0.0 <= r <= 1.0 for r in run["reward_curve"])
    assert {"generate_s", "update_s"} <= set(run["phase_median_s"])
    assert run["completion_tokens_per_s"] > 0
    assert results["models"]["tiny"]["params"] > 100_000
    assert "| posttrain |" in (out / "results.md").read_text()
    # The worker ran isolated and left its trace, config and log in the run dir.
    assert (out / "tiny" / "posttrain-r0" / "trace.json").is_file()
    # Rebuilding from those traces (no training) reproduces the summary.
    rebuilt = rebuild_results(out)["models"]["tiny"]["frameworks"]["posttrain"]
    assert rebuilt["median_step_s"] == run["median_step_s"] and rebuilt["reward_curve"] == run["reward_curve"]


def test_bench_accuracy_mode_with_task_options(tmp_path):
    """Time-to-accuracy end to end on a tiny budget: SFT warm start on column-trace
    arithmetic, GRPO with greedy held-out evaluation; the task options reach every stage."""
    out = tmp_path / "acc"
    cfg = load_config(
        BenchConfig,
        None,
        [
            "mode=accuracy",
            "presets=[tiny]",
            "frameworks=[posttrain]",
            "task_options={operators: '+-', trace: columns}",
            "difficulty=2",
            "n_train=16",
            "max_new_tokens=8",
            "threads=1",
            "isolate=false",
            "accuracy.sft_steps=2",
            "accuracy.sft_examples=16",
            "accuracy.sft_batch_size=4",
            "accuracy.n_eval=4",
            "accuracy.eval_every=1",
            "accuracy.max_steps=2",
            "accuracy.target=1.0",
            f"run.output_dir={out}",
        ],
    )
    results = run_bench(cfg)
    run = results["models"]["tiny"]["frameworks"]["posttrain"]
    assert [e["step"] for e in run["evals"]] == [1, 2]
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in run["evals"])
    assert "trace: columns" in (out / "tiny" / "sft" / "config.yaml").read_text()
    rl_cfg = (out / "tiny" / "posttrain-r0" / "rl.yaml").read_text()
    assert "trace: columns" in rl_cfg


def test_bench_bad_framework_is_one_line_error(tmp_path):
    proc = _cli("--frameworks", "[trll]", "--run.output_dir", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown framework 'trll'" in lines[0] and "'trl'" in lines[0]


def test_bench_config_validation():
    pytest.importorskip("trl")  # validation of TRL frameworks needs the bench extra
    with pytest.raises(ConfigError, match="group_size"):
        plan(load_config(BenchConfig, None, ["group_size=1"]))
    with pytest.raises(ConfigError, match="skip_steps"):
        plan(load_config(BenchConfig, None, ["steps=2", "skip_steps=2"]))
    text = plan(load_config(BenchConfig, None, ["frameworks=[posttrain,trl]"]))
    assert "4 prompts x G=8" in text and "trl" in text


def test_summarize_pools_rounds_and_skips_warmup():
    traces = [
        {
            "step_s": [9.0, 1.0, 3.0],
            "completion_tokens": [5, 10, 30],
            "reward_mean": [0.0, 0.5, 1.0],
            "phases": {"generate_s": [8.0, 0.5, 1.5]},
            "evals": [],
        },
        {
            "step_s": [7.0, 2.0, 4.0],
            "completion_tokens": [5, 20, 40],
            "reward_mean": [0.0, 0.5, 0.0],
            "phases": {"generate_s": [6.0, 1.0, 2.0]},
            "evals": [],
        },
    ]
    s = summarize(traces, skip=1)
    assert s["steps_timed"] == 4
    assert s["median_step_s"] == pytest.approx(2.5)  # median of 1, 3, 2, 4
    assert s["completion_tokens_per_s"] == pytest.approx(100 / 10)
    assert s["phase_median_s"]["generate_s"] == pytest.approx(1.25)  # median of .5, 1.5, 1, 2
    assert s["reward_curve"] == pytest.approx([0.0, 0.5, 0.5])
    assert s["reward_mean_second_half"] == pytest.approx(0.5)


def test_time_to_target_is_first_crossing():
    evals = [
        {"step": 5, "train_s": 3.0, "accuracy": 0.2},
        {"step": 10, "train_s": 6.5, "accuracy": 0.45},
        {"step": 15, "train_s": 9.0, "accuracy": 0.6},
    ]
    assert time_to_target(evals, 0.4) == 6.5
    assert time_to_target(evals, 0.2) == 3.0
    assert time_to_target(evals, 0.9) is None
    # start + gain in floats (0.33 + 0.10 = 0.43000000000000005) still counts 86/200 as reached
    assert time_to_target([{"step": 10, "train_s": 1.0, "accuracy": 86 / 200}], 0.33 + 0.10) == 1.0


def _run(step_s: float, tokens_per_s: float, generate_s: float, curve: list[float]) -> dict:
    """One framework's summary as `summarize` writes it (its reward's second half = curve[-1])."""
    return {
        "median_step_s": step_s,
        "completion_tokens_per_s": tokens_per_s,
        "phase_median_s": {"generate_s": generate_s},
        "reward_curve": curve,
        "reward_mean_second_half": curve[-1],
    }


def test_markdown_reports_speedup():
    results = {
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "loadavg_1m": 0.5,
            "torch": "t",
            "transformers": "x",
            "trl": "y",
        },
        "config": {"mode": "step", "threads": 2},
        "models": {
            "small": {
                "params": 3_200_000,
                "speedup": {"trl": 3.5},
                "frameworks": {
                    "posttrain": _run(0.2, 4000.0, 0.1, [0.0, 1.0]),
                    "trl": _run(0.7, 1000.0, 0.3, [0.0, 0.0]),
                },
            }
        },
    }
    md = format_markdown(results)
    assert "| trl | 0.700 | 1000 | 0.300 | 3.50x | 0.000 |" in md
    assert "reward curve (posttrain): [0.00, 1.00]" in md


def test_bench_rollout_mode_in_process(tmp_path):
    cfg = load_config(
        BenchConfig,
        None,
        ["mode=rollout", "presets=[tiny]", "threads=1", "rollout.batch=4", "rollout.new_tokens=4",
         "rollout.repeats=1", f"run.output_dir={tmp_path}"],
    )  # fmt: skip
    results = run_bench(cfg)
    native = results["models"]["tiny"]["frameworks"]["native"]
    assert 0 < native["tokens"][0] <= 4 * 4  # at most batch x new_tokens were generated
    assert native["tokens_per_s"] > 0
    assert "| native |" in (tmp_path / "results.md").read_text()


# --------------------------------------------------------------------------- schedule, seeds, ratios


@pytest.mark.parametrize(
    "schedule,warmup,floor",
    [("constant", 0, 0.0), ("constant", 3, 0.0), ("cosine", 5, 0.1), ("cosine", 0, 0.0)],
)
def test_trl_trainer_gets_posttrain_lr_schedule_exactly(tmp_path, schedule, warmup, floor):
    """The scheduler TRL's Trainer builds (through use_posttrain_schedule) gives the same LR
    on every step as posttrain's optim.lr_factor, first update included."""
    pytest.importorskip("trl")
    from transformers import Trainer, TrainingArguments

    from posttrain.train.common.optim import lr_factor
    from trlbench.runs import use_posttrain_schedule

    steps = 40
    cfg = load_config(
        BenchConfig, None, [f"lr_schedule={schedule}", f"warmup_steps={warmup}", f"min_lr_ratio={floor}"]
    )
    model = torch.nn.Linear(2, 1)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1.0, use_cpu=True, report_to="none")
    trainer = Trainer(model=model, args=args)
    use_posttrain_schedule(trainer, cfg)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    got = []
    for _ in range(steps):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    floor_used = floor if schedule == "cosine" else 0.0
    ours = [
        lr_factor(s, warmup_steps=warmup, total_steps=steps, schedule=schedule, min_lr_ratio=floor_used)
        for s in range(steps)
    ]
    assert got == pytest.approx(ours, abs=1e-12)
    assert got[0] > 0  # the first update moves


def _trace(seed, evals, step_s):
    return {"seed": seed, "evals": evals, "step_s": step_s}


def test_seed_rows_handle_targets_not_reached():
    from trlbench.bench import seed_rows

    ev = lambda *accs: [
        {"step": 10 * (i + 1), "train_s": 5.0 * (i + 1), "accuracy": a} for i, a in enumerate(accs)
    ]
    traces = {
        "posttrain": [
            _trace(0, ev(0.3, 0.5), [2.5] * 4),  # reaches 0.45 at step 20, 10 s
            _trace(1, ev(0.3, 0.4), [2.5] * 4),  # never
            _trace(2, ev(0.3, 0.3), [2.5] * 4),  # never
            _trace(3, ev(0.5, 0.5), [2.5] * 4),  # step 10, 5 s
        ],
        "trl": [
            _trace(0, [{"step": 10, "train_s": 30.0, "accuracy": 0.5}], [6.0] * 5),  # 30 s
            _trace(1, ev(0.5), [1.0] * 2),  # 5 s
            _trace(2, ev(0.1), [1.0] * 2),  # never
            _trace(3, ev(0.1, 0.2), [6.0] * 10),  # never in 60 s of training
        ],
    }
    rows = {r["seed"]: r for r in seed_rows(traces, 0.45)}
    assert rows[0]["frameworks"]["posttrain"]["steps_to_target"] == 20
    assert rows[0]["ratio"]["trl"] == {"value": pytest.approx(3.0), "bound": "="}
    assert rows[1]["frameworks"]["posttrain"]["time_to_target_s"] is None
    assert rows[1]["ratio"]["trl"] == {"value": pytest.approx(0.5), "bound": "<"}  # 5 s / 10 s run
    assert rows[2]["ratio"]["trl"] == {"value": None, "bound": None}
    assert rows[3]["ratio"]["trl"] == {"value": pytest.approx(12.0), "bound": ">"}  # >= 60 s / 5 s
    assert rows[3]["frameworks"]["trl"]["final_accuracy"] == 0.2
    assert rows[3]["frameworks"]["trl"]["steps_run"] == 10


def test_bench_schedule_and_seed_validation():
    with pytest.raises(ConfigError, match="warmup_steps"):
        plan(load_config(BenchConfig, None, ["steps=4", "skip_steps=1", "warmup_steps=4"]))
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        plan(load_config(BenchConfig, None, ["min_lr_ratio=1.5"]))
    with pytest.raises(ConfigError, match="duplicates"):
        plan(load_config(BenchConfig, None, ["rl_seeds=[1,1]"]))
    text = plan(
        load_config(
            BenchConfig,
            None,
            [
                "mode=accuracy",
                "lr_schedule=cosine",
                "warmup_steps=5",
                "min_lr_ratio=0.1",
                "format_weight=0.2",
                "advantage_scale=batch",
                "rl_seeds=[0,1,2]",
            ],
        )  # fmt: skip
    )
    assert "cosine to 0.1x, warmup 5" in text and "0.2 format" in text and "seeds [0, 1, 2]" in text


def test_bench_accuracy_posttrain_and_trl_share_schedule_start_and_seeds(tmp_path):
    """Both frameworks, two GRPO seeds from one SFT start: the same LR each step, the demo's reward and advantage scale in our config, and one
    per-seed row per framework in the report."""
    pytest.importorskip("trl")
    out = tmp_path / "acc"
    cfg = load_config(
        BenchConfig,
        None,
        ["mode=accuracy", "presets=[tiny]", "frameworks=[posttrain,trl]", "difficulty=2", "n_train=16",
         "max_new_tokens=8", "threads=1", "isolate=false", "prompts_per_step=2", "group_size=2", "lr=1e-4",
         "lr_schedule=cosine", "warmup_steps=2", "min_lr_ratio=0.1", "format_weight=0.2", "advantage_scale=batch",
         "rl_seeds=[3,4]", "accuracy.sft_steps=2", "accuracy.sft_examples=16", "accuracy.sft_batch_size=4",
         "accuracy.n_eval=4", "accuracy.eval_every=3", "accuracy.max_steps=6", "accuracy.target=0.0",
         "accuracy.stop_at_target=false", f"run.output_dir={out}"],
    )  # fmt: skip
    results = run_bench(cfg)
    tiny = results["models"]["tiny"]
    pt, trl = (tiny["frameworks"][fw]["lr_curve"] for fw in ("posttrain", "trl"))
    assert len(pt) == len(trl) == 6
    assert pt[:2] == pytest.approx([5e-5, 1e-4])
    assert trl == pytest.approx(pt)  # TRL's Trainer runs our exact schedule
    assert [r["seed"] for r in tiny["seeds"]] == [3, 4]
    for row in tiny["seeds"]:
        assert set(row["frameworks"]) == {"posttrain", "trl"}
        assert row["frameworks"]["trl"]["steps_run"] == 6  # stop_at_target=false: the whole schedule
        run_dir = out / "tiny" / f"posttrain-s{row['seed']}-r0"
        rl = yaml.safe_load((run_dir / "rl.yaml").read_text())
        assert rl["run"]["seed"] == row["seed"]
        assert rl["model"]["path"] == str(out / "tiny" / "sft" / "final")  # one shared start
        assert rl["algo"]["advantage_options"]["scale"] == "batch"
        assert [(r["name"], r["weight"]) for r in rl["rewards"]] == [("task", 1.0), ("format", 0.2)]
    md = (out / "results.md").read_text()
    assert "| 4 | trl |" in md and "steps to target" in md


def _trl_parity_module():
    """benchmarks/trl_parity.py, a script outside the package, loaded as a module."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "trl_parity.py")
    spec = importlib.util.spec_from_file_location("trl_parity", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_parity_same_batch_gives_the_same_gradient(tmp_path):
    """benchmarks/trl_parity.py: one batch through TRL's GRPOTrainer.compute_loss and our loop's
    loss gives the same loss and gradient (and mask, advantages, log-probs). At step 0 the
    policy is its own reference, so the KL term's gradient is 0 here: the replay test below
    is the one that checks the KL."""
    pytest.importorskip("trl")
    parity = _trl_parity_module()
    cfg = load_config(
        BenchConfig,
        None,
        ["threads=1", "prompts_per_step=2", "group_size=4", "max_new_tokens=24", "beta=0.04",
         "format_weight=0.2", "difficulty=1", "n_train=50", "accuracy.sft_steps=40", "accuracy.sft_lr=3e-3",
         "accuracy.sft_examples=200", "accuracy.sft_batch_size=16"],
    )  # fmt: skip
    # A brief SFT so responses end at EOS at different lengths: with equal lengths token-mean
    # and sequence-mean aggregation coincide and the comparison could not tell them apart.
    from trlbench.bench import prepare_sft

    model_dir = prepare_sft(cfg, parity.prepare_model("tiny", tmp_path, 0), tmp_path)
    scores = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.2, 0.9, 0.0, 0.0])  # an untrained model earns ~0
    r = parity.compare(cfg, model_dir, tmp_path / "w", step=0, scores=scores)
    assert r["batch"]["groups_contiguous"] and r["mask_equal"]
    assert r["batch"]["response_tokens"] < 8 * 24  # some responses stopped early
    assert r["advantage_max_abs_diff"] < 1e-5
    assert r["logprob_max_abs_diff_trl_vs_sampler"] < 1e-4
    assert r["grad_norm"]["trl"] > 1e-3  # a real gradient, not 0 == 0
    assert r["grad_rel_l2_diff"] < 1e-4
    assert abs(r["loss"]["posttrain"] - r["loss"]["trl"]) < 1e-5
    wd = {g["weight_decay"] for side in r["optimizer"].values() for g in side["groups"]}
    assert wd == {0.0}


_REPLAY = ["threads=1", "prompts_per_step=2", "group_size=4", "max_new_tokens=16", "beta=0.04",
           "n_train=50", "difficulty=1", "lr=1e-3"]  # fmt: skip


@pytest.mark.parametrize("estimator", ["k3_is", "k3"])
def test_trl_replay_same_batches_give_the_same_weights(tmp_path, estimator):
    """Four whole training steps (loss, clipping, AdamW state, LR schedule) of both frameworks
    on the same batches, with beta > 0 so that the KL gradient is non-zero after step 0:
    the two weight updates agree to float rounding, for both KL estimators."""
    pytest.importorskip("trl")
    parity = _trl_parity_module()
    cfg = load_config(BenchConfig, None, [*_REPLAY, f"kl_estimator={estimator}"])
    model_dir = parity.prepare_model("tiny", tmp_path, 0)
    r = parity.replay(cfg, model_dir, tmp_path / "w", steps=4, random_scores=True)
    assert r["batches_replayed"] == 4
    assert r["update_norm"]["posttrain"] > 0.5  # lr 1e-3 Adam: the weights really moved
    assert r["update_rel_l2_diff"] < 1e-4


def test_trl_replay_catches_a_different_kl_gradient(tmp_path, monkeypatch):
    """The replay can fail: plain k3 on our side against TRL's default bias-corrected KL
    (same KL value, different gradient once the policy has left its reference)."""
    pytest.importorskip("trl")
    parity = _trl_parity_module()
    cfg = load_config(BenchConfig, None, [*_REPLAY, "kl_estimator=k3_is"])
    ours = parity.rl_config_dict

    def plain_k3(*a, **k):
        d = ours(*a, **k)
        d["algo"]["kl_estimator"] = "k3"
        return d

    monkeypatch.setattr(parity, "rl_config_dict", plain_k3)
    model_dir = parity.prepare_model("tiny", tmp_path, 0)
    r = parity.replay(cfg, model_dir, tmp_path / "w", steps=4, random_scores=True)
    assert r["update_rel_l2_diff"] > 1e-3


def test_trl_grpo_recipe_matches_grpoconfig_defaults():
    """recipes/trl_grpo.yaml claims TRL's GRPOConfig defaults (apart from lr and length):
    checked against the installed TRL, so a TRL upgrade that changes a default fails here."""
    pytest.importorskip("trl")
    from trl import GRPOConfig

    from posttrain.train.rl.controller import RLConfig

    trl = GRPOConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False)
    cfg = load_config(
        RLConfig, os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "trl_grpo.yaml"), []
    )
    r, a, o = cfg.rollout, cfg.algo, cfg.optim
    assert r.group_size == trl.num_generations
    assert (r.temperature, r.top_p, r.top_k) == (trl.temperature, trl.top_p, trl.top_k or 0)
    assert a.clip_eps_low == trl.epsilon
    assert a.clip_eps_high == (trl.epsilon_high if trl.epsilon_high is not None else trl.epsilon)
    assert trl.loss_type == "dapo" and a.aggregation == "token-mean"
    assert trl.scale_rewards == "group" and a.advantage_options == {
        "scale": "group",
        "std_eps": 1e-4,
        "unbiased_std": True,
    }
    assert trl.beta == 0.0 and a.kl_placement == "none"
    assert trl.use_bias_correction_kl and a.kl_estimator == "k3_is"
    assert trl.num_iterations == a.update_epochs == 1 and a.num_minibatches == 1
    assert not trl.mask_truncated_completions and a.overlong in ("none", "preset")
    assert trl.lr_scheduler_type == "linear" and (o.schedule, o.min_lr_ratio) == ("linear", 0.0)
    assert trl.warmup_steps == o.warmup_steps == 0
    assert (trl.weight_decay, trl.max_grad_norm) == (o.weight_decay, o.max_grad_norm)
    assert (trl.adam_beta1, trl.adam_beta2, trl.adam_epsilon) == (*o.betas, o.eps)


def test_trl_advantage_and_mask_rules_by_hand():
    """The TRL rules trl_parity.py reproduces, on numbers worked by hand."""
    parity = _trl_parity_module()
    r = torch.tensor([1.0, 0.0, 3.0, 3.0])  # groups of 2: means 0.5 and 3
    # group: std of [1, 0] (unbiased) = 0.7071 -> ±0.5/0.7072; group [3, 3] has std 0 -> 0
    a = parity.trl_advantages(r, 2, "group")
    assert torch.allclose(a, torch.tensor([0.5 / (0.5**0.5 + 1e-4), -0.5 / (0.5**0.5 + 1e-4), 0.0, 0.0]))
    # batch: unbiased std of [1, 0, 3, 3] = sqrt(((-0.75)^2 + (-1.75)^2 + 1.25^2 * 2) / 3) = sqrt(6.75 / 3) = 1.5
    b = parity.trl_advantages(r, 2, "batch")
    assert torch.allclose(b, torch.tensor([0.5, -0.5, 0.0, 0.0]) / 1.5001)
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])  # eos = 2: first row stops at column 1
    assert parity.trl_completion_mask(ids, 2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_trl_parity_sample_compare_draws_from_both_generation_paths(tmp_path):
    """`trl_parity.py --sample`: the same prompts through TRL's generation call and our engine."""
    pytest.importorskip("trl")
    parity = _trl_parity_module()
    cfg = load_config(BenchConfig, None, ["threads=1", "prompts_per_step=2", "group_size=3", "max_new_tokens=6",
                                          "n_train=20", "difficulty=1"])  # fmt: skip
    model_dir = parity.prepare_model("tiny", tmp_path, 0)
    r = parity.sample_compare(cfg, model_dir, tmp_path / "w", n_prompts=4, rounds=1)
    assert r["samples"] == 4 * 3
    for fw in ("trl", "posttrain"):
        assert 1 <= r[f"{fw}_mean_length"] <= 6
        assert 0.0 <= r[f"{fw}_accuracy"] <= 1.0
    assert r["trl_generation_config"]["top_k"] == 0 and r["trl_generation_config"]["do_sample"]
