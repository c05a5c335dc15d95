"""The TRL comparison: measured speed of our GRPO step and rollouts, optionally side by side with TRL.

Run it as `python benchmarks/vs_trl.py ...`, or `posttrain bench ...` in a source checkout
(the CLI finds this package next to src/; the library itself never imports it or `trl`).

Three modes (`BenchConfig.mode`):

- ``step``: the same GRPO step in each framework of `frameworks` ("posttrain", "trl"
  = TRL's GRPOTrainer with gradient checkpointing off, "trl_gc" = TRL with its default
  gradient checkpointing on): median wall time per step, completion tokens/s, the time
  split per phase, and every step's mean reward (the reward curve).
- ``accuracy``: time-to-accuracy. One SFT checkpoint (posttrain's run_sft) is the start
  for every framework; each trains GRPO and is evaluated greedily on held-out task
  examples every `accuracy.eval_every` steps with the *same* evaluation code. The clock
  counts training steps only (evaluation is paused out of it); the result is the training
  time until held-out accuracy first reaches the target.
- ``rollout``: tokens/s of our rollout engines alone (no training, no TRL).

Fairness (issue #8): every framework loads the same model directory (weights and
tokenizer saved once in HF format), sees the same task prompts through the same chat
template, is rewarded by the same Python verifier (`Task.score`), and runs with the same
G, prompts per step, max new tokens, temperature, learning rate and its schedule
(`lr_schedule`, `warmup_steps`, `min_lr_ratio` over the run's steps; TRL's Trainer is
given our exact scheduler, `trlbench.runs.use_posttrain_schedule`), AdamW settings,
gradient clipping, clip range and beta (KL to the reference in the loss: by default our
`k3_is`, k3 times the differentiable ratio pi/pi_old, which is TRL's default
`use_bias_correction_kl=True`; `kl_estimator=k3` for plain k3 in both), token-level loss
aggregation (TRL's default "dapo" loss_type = our "token-mean"), the reward (task verifier, plus `format_weight` x the R1 format reward,
summed before the advantage in both) and the advantage scale (group or batch std, +1e-4).
`rl_seeds` repeats the GRPO runs with other sampling seeds from the same SFT start, the
same prompt pool and the same held-out set. Each run executes in its own subprocess
(`isolate=true`) so no framework inherits another's allocator or thread state, and
frameworks run back to back so they see the same machine load.

Nothing here asserts a speed: numbers are written to `results.json` / `results.md` in the
run directory and returned as the summary dict.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from posttrain.errors import ConfigError, TrainingError
from posttrain.train.config.loader import config_to_dict, load_config, save_config
from trlbench.config import FRAMEWORKS, BenchConfig, _seeds, _validate, plan
from trlbench.report import (
    format_combined,
    format_markdown,
    paired_summaries,
    paired_summary,
    seed_rows,
    summarize,
    time_to_target,
)
from trlbench.runs import (
    HeldOutEval,
    _Trace,
    _train_examples,
    rl_config_dict,
    run_posttrain,
    run_trl,
)

BENCHMARKS_DIR = str(Path(__file__).resolve().parents[1])

# Re-exported: benchmarks/vs_trl.py and tests import these from here.
__all__ = [
    "BenchConfig",
    "FRAMEWORKS",
    "combine_results",
    "format_combined",
    "format_markdown",
    "paired_summary",
    "plan",
    "rebuild_results",
    "rl_config_dict",
    "run_bench",
    "seed_rows",
    "summarize",
    "time_to_target",
]


def machine_info() -> dict:
    """CPU model, core count, load average and library versions, recorded with every result."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("transformers", "trl"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def prepare_model(preset: str, out_dir: Path, seed: int) -> Path:
    """Build a random-init preset with the char tokenizer, save it once in HF format; return the dir.

    Every framework then loads this directory, so all start from bit-identical weights.
    """
    from posttrain.engines.models import build_preset, save_model
    from posttrain.engines.tokenizer import build_char_tokenizer

    path = out_dir / f"init-{preset}"
    if (path / "config.json").is_file():
        return path
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    model = build_preset(preset, vocab_size=len(tokenizer))
    save_model(model, tokenizer, path)
    return path


def prepare_sft(cfg: BenchConfig, init_dir: Path, out_dir: Path) -> Path:
    """The shared SFT warm start: posttrain's run_sft on the task's reference solutions."""
    from posttrain.train.offline.commands import SFTConfig, run_sft

    path = out_dir / "sft"
    final = path / "final"
    if (final / "config.json").is_file():
        return final
    a = cfg.accuracy
    overrides = [
        f"model.path={init_dir}",
        f"data.task={cfg.task}",
        f"data.task_options={json.dumps(cfg.task_options)}",
        f"data.n_train={a.sft_examples}",
        f"optim.lr={a.sft_lr}",
        f"train.steps={a.sft_steps}",
        f"train.batch_size={a.sft_batch_size}",
        "train.eval_generations=0",
        "train.eval_every=0",
        "train.eval_at_start=false",
        f"run.output_dir={path}",
        f"run.seed={cfg.run.seed}",
    ]
    if cfg.difficulty is not None:
        overrides.append(f"data.difficulty={cfg.difficulty}")
    sft = load_config(SFTConfig, None, overrides)
    path.mkdir(parents=True, exist_ok=True)
    save_config(sft, path / "config.yaml")  # the warm start's exact recipe, next to its model
    run_sft(sft)
    if not (final / "config.json").is_file():
        raise TrainingError(f"SFT warm start finished but wrote no model at {final}")
    return final


def _worker(
    cfg: BenchConfig, framework: str, model_dir: Path, out_dir: Path, target: float | None, seed: int
) -> dict:
    """Run one framework in this process with GRPO seed `seed` and return its trace dict."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.mode == "accuracy":
        from posttrain.engines.models import load_tokenizer

        a = cfg.accuracy
        evaluator = HeldOutEval(cfg, load_tokenizer(str(model_dir)))
        stop = target if a.stop_at_target else None  # the trace stops only on a target it is given
        trace = _Trace(framework, evaluator, stop, a.eval_every, a.max_steps, a.max_seconds)
        steps = a.max_steps
    else:
        trace = _Trace(framework)
        steps = cfg.steps
    if framework == "posttrain":
        run_posttrain(cfg, model_dir, out_dir, trace=trace, steps=steps, seed=seed)
    else:
        run_trl(cfg, model_dir, out_dir, gradient_checkpointing=framework == "trl_gc", trace=trace,
                steps=steps, seed=seed)  # fmt: skip
    return {**trace.to_dict(), "seed": seed}


def _run_one(
    cfg: BenchConfig, framework: str, model_dir: Path, out_dir: Path, target: float | None, seed: int
) -> dict:
    """One framework's run, in a fresh subprocess when `cfg.isolate` (the default)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.isolate:
        return _worker(cfg, framework, model_dir, out_dir, target, seed)
    spec = out_dir / "spec.json"
    save_config(cfg, out_dir / "bench.yaml")
    spec.write_text(
        json.dumps(
            {
                "config": str(out_dir / "bench.yaml"),
                "framework": framework,
                "model_dir": str(model_dir),
                "out_dir": str(out_dir),
                "target": target,
                "seed": seed,
            }
        )
    )
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(cfg.threads),
        MKL_NUM_THREADS=str(cfg.threads),
        TOKENIZERS_PARALLELISM="false",
        # trlbench lives outside the package: the worker finds it next to this directory.
        PYTHONPATH=os.pathsep.join(p for p in (BENCHMARKS_DIR, os.environ.get("PYTHONPATH")) if p),
    )
    log = out_dir / "worker.log"
    with open(log, "w") as fh:
        proc = subprocess.run(
            [sys.executable, "-m", "trlbench.bench", str(spec)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    result = out_dir / "trace.json"
    if proc.returncode != 0 or not result.is_file():
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or [
            "(no output)"
        ]
        raise TrainingError(
            f"bench worker '{framework}' failed (exit {proc.returncode}): {tail[0]} — log: {log}"
        )
    return json.loads(result.read_text())


def _bench_rollout(cfg: BenchConfig, model_dir: Path) -> dict:
    """Tokens/s of each rollout engine on templated task prompts (one warm-up call)."""
    from posttrain.engines.encoding import render_prompt
    from posttrain.engines.models import load_model, load_tokenizer
    from posttrain.engines.rollout import make_engine
    from posttrain.engines.rollout.base import SamplingParams

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir))
    model.eval()
    _, examples = _train_examples(cfg)
    prompts = [
        render_prompt(tokenizer, examples[i % len(examples)].prompt, enable_thinking=cfg.thinking)
        for i in range(cfg.rollout.batch)
    ]
    r = cfg.rollout
    out: dict[str, dict] = {}
    for name in r.engines:
        engine = make_engine(name, model, tokenizer)
        params = SamplingParams(temperature=cfg.temperature, max_new_tokens=r.new_tokens, seed=cfg.run.seed)
        engine.generate(prompts, params)  # warm-up: lazy init and allocator growth stay out of the timing
        times, tokens = [], []
        for i in range(r.repeats):
            params.seed = cfg.run.seed + 1 + i
            t0 = time.perf_counter()
            rollout = engine.generate(prompts, params)
            times.append(time.perf_counter() - t0)
            tokens.append(float(rollout.mask.sum()))
        out[name] = {
            "tokens_per_s": sum(tokens) / sum(times),
            "median_call_s": statistics.median(times),
            "tokens": tokens,
            "call_s": times,
        }
    return {"frameworks": out, "params": sum(p.numel() for p in model.parameters())}


def _count_params(model_dir: Path) -> int:
    """Parameter count read from the safetensors headers (no model load)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= int(d)
                total += n
    return total


def _rounds(cfg: BenchConfig) -> list[tuple[str, int, str]]:
    """(framework, GRPO seed, run sub-directory) in run order: seeds, then repeats, then frameworks."""
    seeds = _seeds(cfg)
    # One seed keeps the historical run-dir names (fw-rN).
    return [
        (fw, seed, f"{fw}-r{r}" if len(seeds) == 1 else f"{fw}-s{seed}-r{r}")
        for seed in seeds
        for r in range(cfg.repeats)
        for fw in cfg.frameworks
    ]


def _summarize_model(cfg: BenchConfig, per: dict, traces: dict[str, list[dict]]) -> None:
    """Fill `per` (one model's results) from its runs' traces: summaries, per-seed rows, speed-ups."""
    skip = cfg.skip_steps if cfg.mode == "step" else 0
    per["frameworks"] = {fw: summarize(ts, skip) for fw, ts in traces.items()}
    if cfg.mode == "accuracy":
        for fw, ts in traces.items():
            per["frameworks"][fw]["time_to_target_s"] = time_to_target(ts[0]["evals"], per["target"])
        per["seeds"] = seed_rows(traces, per["target"])
    if "posttrain" in per["frameworks"]:
        key = "median_step_s" if cfg.mode == "step" else "time_to_target_s"
        ours = per["frameworks"]["posttrain"].get(key)
        per["speedup"] = {
            fw: (s[key] / ours if ours and s.get(key) else None)
            for fw, s in per["frameworks"].items()
            if fw != "posttrain"
        }


def _write(out: Path, results: dict) -> None:
    from posttrain.train.common.checkpoint import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", format_markdown(results))
    print(format_markdown(results))


def _saved_traces(out: Path) -> tuple[dict, BenchConfig, dict[str, dict[str, list[dict]]]]:
    """(results.json, its config, model -> framework -> traces) of a finished isolated run."""
    path = out / "results.json"
    if not path.is_file():
        raise ConfigError(f"bench: no results.json in {out}")
    results = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:  # the run directory stays untouched
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(results["config"], sort_keys=False))
        cfg = load_config(BenchConfig, path, [])
    if cfg.mode == "rollout":
        raise ConfigError(f"bench: {out} holds rollout results, which keep no traces")
    per_model: dict[str, dict[str, list[dict]]] = {}
    for name in results["models"]:
        traces: dict[str, list[dict]] = {fw: [] for fw in cfg.frameworks}
        for fw, seed, sub in _rounds(cfg):
            trace = out / name / sub / "trace.json"
            if not trace.is_file():
                raise ConfigError(f"bench: missing {trace} (was the run isolate=true?)")
            traces[fw].append({"seed": seed, **json.loads(trace.read_text())})
        per_model[name] = traces
    return results, cfg, per_model


def rebuild_results(output_dir: str | Path) -> dict:
    """Recompute a finished run's summaries from its saved traces (no training, no timing).

    For an isolated run directory written by `run_bench` (each run's trace.json is kept):
    re-reads the traces, recomputes every summary with the current report code and rewrites
    results.json / results.md; machine info, SFT accuracy and target are kept as measured.
    """
    out = Path(output_dir)
    results, cfg, per_model = _saved_traces(out)
    for name, traces in per_model.items():
        _summarize_model(cfg, results["models"][name], traces)
    _write(out, results)
    return results


# Config keys that may differ between accuracy runs pooled by `combine_results`.
_POOLABLE = {"rl_seeds", "run", "threads", "repeats", "steps", "skip_steps", "isolate", "rollout"}


def combine_results(output_dirs: list[str | Path]) -> dict:
    """Pool the GRPO seeds of several finished accuracy runs of one recipe (no training).

    Each directory is a `run_bench` output (isolated, with traces). The recipes must agree
    on every key but seeds, output directory, threads and timing settings; a seed may
    appear only once. Returns {"sources": [...], "config": first config, "models": {name:
    {"sft_accuracy": [per source], "target", "seeds": seed_rows, "paired": {metric:
    paired_summary}}}} for the models all sources share.
    """
    if not output_dirs:
        raise ConfigError("bench combine: give at least one output directory")
    loaded = [(Path(d), *_saved_traces(Path(d))) for d in output_dirs]
    first_dir, first, first_cfg, _ = loaded[0]
    if first_cfg.mode != "accuracy":
        raise ConfigError(
            f"bench combine: {first_dir} is a {first_cfg.mode}-mode run; only accuracy runs pool"
        )
    # Compared after loading, so a key added since a run was made counts as its default.
    base = {k: v for k, v in config_to_dict(first_cfg).items() if k not in _POOLABLE}
    for d, _, cfg, _ in loaded[1:]:
        cfg_d = {k: v for k, v in config_to_dict(cfg).items() if k not in _POOLABLE}
        diff = sorted(k for k in base.keys() | cfg_d.keys() if base.get(k) != cfg_d.get(k))
        if diff:
            raise ConfigError(
                f"bench combine: {d} ran another recipe than {first_dir} (differs in {', '.join(diff)})"
            )
    names = [n for n in first["models"] if all(n in res["models"] for _, res, _, _ in loaded)]
    models: dict[str, dict] = {}
    for name in names:
        pooled: dict[str, list[dict]] = {}
        where: dict[int, Path] = {}
        for d, _, _, per_model in loaded:
            for fw, ts in per_model[name].items():
                for t in ts:
                    if where.setdefault(t["seed"], d) != d:
                        raise ConfigError(
                            f"bench combine: seed {t['seed']} of {name} is in both {where[t['seed']]} and {d}"
                        )
                    pooled.setdefault(fw, []).append(t)
        target = first["models"][name]["target"]
        rows = sorted(seed_rows(pooled, target), key=lambda r: r["seed"])
        models[name] = {
            "sft_accuracy": [res["models"][name]["sft_accuracy"] for _, res, _, _ in loaded],
            "target": target,
            "seeds": rows,
            "paired": paired_summaries(rows),
        }
    return {"sources": [str(d) for d, *_ in loaded], "config": first["config"], "models": models}


def run_bench(cfg: BenchConfig) -> dict:
    """Run the configured benchmark; write results.json + results.md to run.output_dir; return results.

    Returns {"machine": machine_info(), "config": config_to_dict(cfg), "models": {name: {
    "params", "frameworks": {framework: summary}, "speedup": {framework: ratio}, ...}}}. A
    speed-up is (other framework's median step or time-to-target) / posttrain's, so > 1
    means posttrain is faster.
    """
    _validate(cfg)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(), "config": config_to_dict(cfg), "models": {}}
    models = [("model", Path(cfg.model_path))] if cfg.model_path else [(p, None) for p in cfg.presets]
    for name, path in models:
        mdir = out / name
        mdir.mkdir(parents=True, exist_ok=True)
        start = path or prepare_model(name, mdir, cfg.run.seed)
        if (cfg.mode == "accuracy" or (cfg.mode == "step" and cfg.sft_init)) and cfg.accuracy.sft_steps > 0:
            start = prepare_sft(cfg, start, mdir)
        if cfg.mode == "rollout":
            results["models"][name] = _bench_rollout(cfg, start)
            continue
        per: dict[str, Any] = {"params": _count_params(start), "model_dir": str(start)}
        target = None
        if cfg.mode == "accuracy":
            from posttrain.engines.models import load_model, load_tokenizer

            sft_acc = HeldOutEval(cfg, load_tokenizer(str(start)))(load_model(str(start)))
            target = (
                cfg.accuracy.target if cfg.accuracy.target is not None else sft_acc + cfg.accuracy.target_gain
            )
            per.update(sft_accuracy=sft_acc, target=target)
        traces: dict[str, list[dict]] = {fw: [] for fw in cfg.frameworks}
        for fw, seed, sub in _rounds(cfg):  # back to back, so every framework sees the same load
            traces[fw].append(_run_one(cfg, fw, start, mdir / sub, target, seed))
        per["loadavg_1m_end"] = machine_info()["loadavg_1m"]
        _summarize_model(cfg, per, traces)
        results["models"][name] = per
    _write(out, results)
    return results


if __name__ == "__main__":
    # Worker entry (see _run_one): python -m trlbench.bench SPEC.json
    _spec = json.loads(Path(sys.argv[1]).read_text())
    _cfg = load_config(BenchConfig, _spec["config"], [])
    _trace = _worker(
        _cfg,
        _spec["framework"],
        Path(_spec["model_dir"]),
        Path(_spec["out_dir"]),
        _spec["target"],
        _spec.get("seed", _cfg.run.seed),
    )
    (Path(_spec["out_dir"]) / "trace.json").write_text(json.dumps(_trace))
