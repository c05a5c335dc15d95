"""Every recipe in recipes/ as a user runs it.

Default suite (fast): each recipe file names its command in its header, dry-runs cleanly
(every key validated by the command's config class), and multi-stage pipelines are wired
correctly (each stage reads an earlier stage's output directory; no two recipes write to
the same place). Slow suite: every recipe is actually run, stage after stage, through
`python -m posttrain` in a scratch working directory with overrides that make it tiny,
and its outputs are checked (metrics rows, saved config, a loadable final model).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain import cli

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
ALL = sorted(RECIPES.rglob("*.yaml"))
PIPELINES = sorted(p for p in RECIPES.iterdir() if p.is_dir())
SINGLE = sorted(p for p in RECIPES.glob("*.yaml"))
TRAINERS = ("sft", "rm", "prm", "dpo", "rl")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def header(path: Path) -> str:
    """The leading comment block of a recipe."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def command_of(path: Path) -> str:
    """The subcommand the recipe's header says to run it with."""
    m = re.search(rf"posttrain (\w+) --config {re.escape(rel(path))}(\s|$)", header(path))
    assert m, f"{rel(path)}: header must show `posttrain <command> --config {rel(path)}`"
    return m.group(1)


def output_of(path: Path) -> str:
    """Where a recipe writes (run.output_dir, or output_dir for eval)."""
    cfg = yaml.safe_load(path.read_text()) or {}
    out = (cfg.get("run") or {}).get("output_dir") or cfg.get("output_dir")
    assert out, f"{rel(path)}: set run.output_dir (or output_dir) explicitly"
    return out


def inputs_of(path: Path) -> list[str]:
    """Every model directory or data file the recipe reads (policy, reference, critic, teacher,
    scorers, RMs, data.path)."""
    cfg = yaml.safe_load(path.read_text()) or {}
    found = [
        (cfg.get("model") or {}).get("path"),
        (cfg.get("ref") or {}).get("path"),
        (cfg.get("critic") or {}).get("path"),
        (cfg.get("teacher") or {}).get("path"),
        (cfg.get("scorer") or {}).get("orm"),
        (cfg.get("scorer") or {}).get("prm"),
    ]
    found += [(r.get("options") or {}).get("model_path") for r in cfg.get("rewards") or []]
    found.append(((cfg.get("rollout") or {}).get("prm_guide") or {}).get("model_path"))
    found.append((cfg.get("data") or {}).get("path"))  # a file an earlier stage wrote (r1 samples)
    found += list(cfg.get("models") or [])  # posttrain merge
    return [p for p in found if p]


def ids(paths):
    return [rel(p).removeprefix("recipes/") for p in paths]


# --------------------------------------------------------------------------- fast checks


def test_recipes_exist_for_every_method_and_pipeline():
    from posttrain.algos.presets import METHODS

    # Distillation methods need a teacher: they live in the distill/ pipeline.
    for method in sorted(set(METHODS) - {"on_policy_distill", "kdrl"}):
        path = RECIPES / f"{method}.yaml"
        assert path.is_file(), f"no single-file recipe for RL method {method!r}"
        assert yaml.safe_load(path.read_text())["algo"]["method"] == method
    for loss in ("dpo", "ipo", "simpo", "ln_dpo"):
        assert yaml.safe_load((RECIPES / f"{loss}.yaml").read_text())["algo"]["loss"] == loss
    assert {p.name for p in PIPELINES} >= {
        "r1",
        "kimi_k15",
        "qwen3",
        "rlhf",
        "distill",
        "prm",
        "long_to_short",
    }
    assert (RECIPES / "r1_zero.yaml").is_file()


@pytest.mark.parametrize("path", ALL, ids=ids(ALL))
def test_header_documents_recipe(path):
    text = header(path)
    assert text, f"{rel(path)} must start with a comment block"
    for part in ("Reproduces:", "GPU settings"):
        assert part in text, f"{rel(path)}: header lacks {part!r}"
    assert command_of(path) in cli.COMMANDS


@pytest.mark.parametrize("path", ALL, ids=ids(ALL))
def test_dry_run_validates_every_key(path, tmp_path, monkeypatch, capsys):
    """`posttrain <cmd> --config recipe --dry-run` exits 0 and writes nothing."""
    monkeypatch.chdir(tmp_path)
    command = command_of(path)
    assert cli.main([command, "--config", str(path), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith(f"# posttrain {command} (dry run")
    assert list(tmp_path.iterdir()) == []


GPU_KEY = re.compile(r"(?<![\w.\[\]])([a-z_]+(?:\.[a-z_]+)+):")


def config_has_key(cls, dotted: str) -> bool:
    import dataclasses

    obj = cls()
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


@pytest.mark.parametrize("path", ALL, ids=ids(ALL))
def test_gpu_settings_name_real_keys(path):
    """The dotted keys the header tells users to set on a GPU exist in the command's config."""
    text = header(path)
    gpu = text[text.index("GPU settings") :]
    keys = GPU_KEY.findall(gpu)
    _, config_cls, _ = cli.load_command(command_of(path))
    assert keys or "skip this stage" in gpu, f"{rel(path)}: GPU settings list no keys"
    bad = [k for k in keys if not config_has_key(config_cls, k)]
    assert not bad, f"{rel(path)}: GPU settings name unknown keys {bad}"


def test_a_bad_key_in_a_recipe_is_caught(tmp_path, capsys):
    """The dry-run check above can fail: a misspelt key is an error naming it."""
    bad = tmp_path / "grpo.yaml"
    bad.write_text((RECIPES / "grpo.yaml").read_text().replace("clip_eps_high:", "clip_eps_hihg:"))
    assert cli.main(["rl", "--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "algo.clip_eps_hihg" in err and "algo.clip_eps_high" in err


def test_reward_names_and_options_exist():
    """A dry run does not build rewards, so check their names and options here."""
    import inspect

    from posttrain.data.rewards import REWARDS

    for path in ALL:
        for spec in (yaml.safe_load(path.read_text()) or {}).get("rewards") or []:
            assert spec["name"] in REWARDS, f"{rel(path)}: unknown reward {spec['name']!r}"
            options = spec.get("options") or {}
            params = inspect.signature(REWARDS[spec["name"]]).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                assert set(options) <= set(params), f"{rel(path)}: {spec['name']} options {sorted(options)}"
            if "correctness" in options:
                assert options["correctness"] in REWARDS


@pytest.mark.parametrize("folder", PIPELINES, ids=[p.name for p in PIPELINES])
def test_pipeline_stages_chain(folder):
    """Stages are numbered 1..n and every runs/ path a stage reads is an earlier stage's output."""
    stages = sorted(folder.glob("*.yaml"))
    assert [int(p.name.split("_", 1)[0]) for p in stages] == list(range(1, len(stages) + 1))
    produced: set[str] = set()
    for stage in stages:
        for src in inputs_of(stage):
            if src.startswith("runs/"):
                assert src.removesuffix("/final") in produced or str(Path(src).parent) in produced, (
                    f"{rel(stage)} reads {src}, which no earlier stage of {folder.name}/ writes"
                )
        produced.add(output_of(stage))
    # The first stage starts from a preset or a hub model, never from another run.
    assert not any(s.startswith("runs/") for s in inputs_of(stages[0]))


def test_single_file_recipes_read_the_shared_sft_model():
    sft_out = output_of(RECIPES / "sft.yaml")
    for path in SINGLE:
        for src in inputs_of(path):
            assert src == f"{sft_out}/final", f"{rel(path)} reads {src}; single recipes start from sft.yaml"


def test_output_directories_are_distinct():
    outs = {}
    for path in ALL:
        out = output_of(path)
        assert out.startswith("runs/"), f"{rel(path)} writes outside runs/: {out}"
        assert out not in outs, f"{rel(path)} and {outs[out]} both write {out}"
        outs[out] = rel(path)


def test_readme_and_docs_name_every_recipe():
    readme = (RECIPES / "README.md").read_text()
    docs = (ROOT / "docs" / "recipes.md").read_text()
    for path in ALL:
        name = rel(path)
        assert name in readme or name.removeprefix("recipes/") in readme, f"recipes/README.md misses {name}"
    for path in SINGLE + PIPELINES:
        assert rel(path) in docs, f"docs/recipes.md misses {rel(path)}"


# --------------------------------------------------------------------------- running them

OFFLINE_TINY = (
    "--train.steps 2 --train.batch_size 4 --train.micro_batch_size 2 --train.eval_every 2 "
    "--train.eval_batch_size 4 --data.n_train 16 --data.n_eval 4 --optim.warmup_steps 0"
).split()
# Generation settings of the policy trainers (SFT, DPO); rm / prm generate nothing and reject them.
POLICY_TINY = [*OFFLINE_TINY, *"--train.eval_generations 2 --train.max_new_tokens 8".split()]
TINY = {
    "sft": POLICY_TINY,
    "rm": OFFLINE_TINY,
    "prm": OFFLINE_TINY,
    "dpo": [*POLICY_TINY, "--ref.cache_dir", "cache/reference_logps"],
    "rl": (
        "--steps 2 --rollout.prompts_per_step 2 --rollout.group_size 2 --rollout.max_new_tokens 8 "
        "--data.n_train 8 --data.n_test 4 --eval.n 2 --eval.every 0 --algo.micro_batch_size 0"
    ).split(),
    "eval": "--data.n 2 --sampling.k 2 --sampling.max_new_tokens 8".split(),
    "merge": [],
    "annotate": "--data.n 4 --k 2 --max_new_tokens 8".split(),
}


# Stage-specific additions to TINY. R1's rejection sampling (r1/3_sample.yaml ->
# r1/4_sft.yaml with data.keep_if: correct) needs some correct samples, which a 2-step model
# never gives: its cold start trains long enough to answer its 16 training prompts (the
# ones the sampling stage draws: same task, split, seed), and the sampling stage draws
# enough tokens to close the answer.
STAGE_TINY = {
    "r1/1_sft.yaml": ["--train.steps", "150", "--optim.lr", "3e-3"],
    "r1/3_sample.yaml": ["--data.n", "16", "--sampling.k", "4", "--sampling.max_new_tokens", "32"],
    # Long-to-short's shortest-correct SFT and long-vs-short DPO need correct samples too.
    "long_to_short/1_long_sft.yaml": ["--train.steps", "150", "--optim.lr", "3e-3"],
    "long_to_short/4_sample.yaml": ["--data.n", "16", "--sampling.k", "8", "--sampling.max_new_tokens", "48"],
}


def stage_args(path: Path) -> list[str]:
    """TINY for the stage's command, then its STAGE_TINY additions (later ones win)."""
    return [*TINY[command_of(path)], *STAGE_TINY.get(rel(path).removeprefix("recipes/"), [])]


def run_stage(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m posttrain <cmd> --config <recipe> <tiny overrides>` from `cwd`, as a user would."""
    command = command_of(path)
    env = dict(os.environ, OMP_NUM_THREADS="1", POSTTRAIN_CACHE=str(cwd / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", command, "--config", str(path), *stage_args(path)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{rel(path)} failed:\n{proc.stderr[-3000:]}"
    return proc


def check_outputs(path: Path, cwd: Path) -> None:
    """A finished stage left what its users rely on."""
    command = command_of(path)
    out = cwd / output_of(path)
    if command == "merge":
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(out / "final").config.vocab_size > 0
        return
    if command == "annotate":
        rows = [json.loads(line) for line in (out / "stepwise.jsonl").read_text().splitlines()]
        assert rows and all(len(r["labels"]) == len(r["completions"]) for r in rows)
        return
    if command == "eval":
        result = json.loads((out / "eval.json").read_text())
        assert 0.0 <= result["accuracy"] <= 1.0
        assert (out / "samples.jsonl").is_file()
        if (yaml.safe_load(path.read_text()).get("scorer") or {}).get("prm"):
            assert any(k.startswith("best_of_") and k.endswith("/prm") for k in result)
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("step" in r for r in rows)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    recipe = yaml.safe_load(path.read_text())
    # The saved config is the resolved one: the recipe's model plus the CLI overrides.
    assert saved["model"].get("path") == (recipe.get("model") or {}).get("path")
    steps = saved["steps"] if command == "rl" else saved["train"]["steps"]
    key = "--steps" if command == "rl" else "--train.steps"
    args = stage_args(path)
    assert steps == int([v for k, v in zip(args, args[1:]) if k == key][-1])
    final = out / "final"
    if command in ("rm", "prm"):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(final)
        assert model.config.num_labels == 1
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(final)
        assert model.config.vocab_size > 0


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    """A working directory holding runs/sft (recipes/sft.yaml), shared by the single recipes."""
    cwd = tmp_path_factory.mktemp("single")
    run_stage(RECIPES / "sft.yaml", cwd)
    check_outputs(RECIPES / "sft.yaml", cwd)
    return cwd


STARTS_FROM_SFT = [p for p in SINGLE if p.name not in ("sft.yaml", "r1_zero.yaml")]


@pytest.mark.slow
@pytest.mark.parametrize("path", STARTS_FROM_SFT, ids=ids(STARTS_FROM_SFT))
def test_single_recipe_runs(path, sft_workdir):
    run_stage(path, sft_workdir)
    check_outputs(path, sft_workdir)


@pytest.mark.slow
def test_r1_zero_runs_from_a_preset(tmp_path):
    path = RECIPES / "r1_zero.yaml"
    run_stage(path, tmp_path)
    check_outputs(path, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("folder", PIPELINES, ids=[p.name for p in PIPELINES])
def test_pipeline_runs_stage_by_stage(folder, tmp_path):
    """Every stage in order, each reading the previous stages' outputs from runs/."""
    for stage in sorted(folder.glob("*.yaml")):
        for src in inputs_of(stage):
            if src.startswith("runs/"):
                assert (tmp_path / src).exists(), f"{rel(stage)}: {src} missing before the stage runs"
        run_stage(stage, tmp_path)
        check_outputs(stage, tmp_path)
