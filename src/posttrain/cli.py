"""The `posttrain` command line.

    posttrain <command> [--config recipe.yaml] [--section.key VALUE | section.key=VALUE ...]
                        [--dry-run] [--resume] [--help]
    posttrain report RUN_DIR [RUN_DIR ...] [--out DIR]

Command modules are imported only when their command runs, so `posttrain --help` is fast
and a module that fails to import breaks only its own command. Every user-facing failure
(`PosttrainError`) is printed as one line ``error: ...`` on stderr with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, PosttrainError

EXIT_USAGE = 2


@dataclass(frozen=True)
class Command:
    """A subcommand: where its config class and run function live, and a one-line summary."""

    module: str
    config_class: str
    run_function: str
    summary: str


COMMANDS: dict[str, Command] = {
    "sft": Command(
        "posttrain.train.offline.commands", "SFTConfig", "run_sft", "supervised fine-tuning on completions"
    ),
    "rm": Command(
        "posttrain.train.offline.commands",
        "RMConfig",
        "run_rm",
        "train an outcome reward model (Bradley-Terry or pointwise)",
    ),
    "prm": Command(
        "posttrain.train.offline.commands",
        "PRMConfig",
        "run_prm",
        "train a process reward model on step labels",
    ),
    "dpo": Command(
        "posttrain.train.offline.commands",
        "DPOConfig",
        "run_dpo",
        "preference optimization (DPO / IPO / SimPO ...)",
    ),
    "rl": Command(
        "posttrain.train.rl.controller",
        "RLConfig",
        "run_rl",
        "online RL: PPO, GRPO, DAPO, GSPO, RLOO, ... one loop",
    ),
    "eval": Command("posttrain.train.evaluate", "EvalConfig", "run_eval", "pass@1, pass@k, maj@k, best-of-N"),
    "annotate": Command(
        "posttrain.train.offline.prm_annotate",
        "AnnotateConfig",
        "run_annotate",
        "label PRM steps by Monte-Carlo continuations (Math-Shepherd)",
    ),
    "merge": Command(
        "posttrain.train.long_to_short",
        "MergeConfig",
        "run_merge",
        "average the weights of models (long2short)",
    ),
    "demo": Command(
        "posttrain.train.demo", "DemoConfig", "run_demo", "CPU demo: SFT warm start -> GRPO -> eval"
    ),
    # A launcher only: the comparison with TRL lives in benchmarks/trlbench/, outside the
    # package (the library never imports trl); it runs from a source checkout.
    "bench": Command(
        "trlbench.bench", "BenchConfig", "run_bench", "benchmarks against other frameworks (source checkout)"
    ),
}
# Commands whose training loop owns its run directory (rundir.begin_run); every other command
# refuses a directory that holds a training run rather than overwrite its files.
TRAINING_COMMANDS = ("sft", "rm", "prm", "dpo", "rl")
# Commands that run data parallel under torch.distributed (`--nproc N` or torchrun).
DISTRIBUTED_COMMANDS = ("sft", "rm", "prm", "dpo", "rl")
REPORT_SUMMARY = "plots + Markdown/HTML summary of one or more run directories"


def _usage() -> str:
    lines = [
        "usage: posttrain <command> [--config recipe.yaml] [--section.key VALUE ...] [--dry-run] [--resume]",
        "       posttrain report RUN_DIR [RUN_DIR ...] [--out DIR]",
        "",
        "commands:",
    ]
    for name, cmd in COMMANDS.items():
        lines.append(f"  {name:<7} {cmd.summary}")
    lines.append(f"  {'report':<7} {REPORT_SUMMARY}")
    lines += [
        "",
        "`posttrain <command> --help` lists every option of a command with its default.",
        "Overrides: --algo.clip_eps_high 0.28, algo.clip_eps_high=0.28, --run.resume, --model.lora_target '[q_proj, v_proj]'",
    ]
    return "\n".join(lines) + "\n"


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _unknown_command(name: str) -> ConfigError:
    valid = [*COMMANDS, "report"]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" — did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown command {name!r}{hint} (valid: {', '.join(valid)})")


def _add_benchmarks_to_path() -> None:
    """Put a source checkout's benchmarks/ (next to src/) on sys.path for `posttrain bench`."""
    benchmarks = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (benchmarks / "trlbench").is_dir():
        raise ConfigError(
            "command 'bench' needs a source checkout of posttrain: benchmarks/trlbench/ not found "
            f"next to {Path(__file__).resolve().parents[1]} (clone the repository and run "
            "python benchmarks/vs_trl.py)"
        )
    if str(benchmarks) not in sys.path:
        sys.path.append(str(benchmarks))


def load_command(name: str) -> tuple[Any, type, Any]:
    """Import a command's module lazily: (module, ConfigClass, run_function)."""
    if name not in COMMANDS:
        raise _unknown_command(name)
    cmd = COMMANDS[name]
    if cmd.module.startswith("trlbench."):
        _add_benchmarks_to_path()
    try:
        module = importlib.import_module(cmd.module)
    except ImportError as e:
        raise ConfigError(f"command {name!r} is unavailable: cannot import {cmd.module} ({e})") from None
    try:
        return module, getattr(module, cmd.config_class), getattr(module, cmd.run_function)
    except AttributeError as e:
        raise ConfigError(f"command {name!r} is unavailable: {cmd.module} has no {e.name!r}") from None


def _option_value(args: list[str], i: int, names: tuple[str, ...], what: str) -> tuple[str | None, int]:
    """(value, index after it) when args[i] is `NAME VALUE` or `--name=VALUE` (the first of
    `names`), else (None, i); `NAME` without a value is a ConfigError saying it needs `what`."""
    a = args[i]
    if a in names:
        if i + 1 >= len(args):
            raise ConfigError(f"{names[0]} needs {what}")
        return args[i + 1], i + 2
    if a.startswith(names[0] + "="):
        return a.split("=", 1)[1], i + 1
    return None, i


def _split_args(args: list[str]) -> tuple[str | None, bool, bool, bool, list[str]]:
    """(config_path, dry_run, resume, help, overrides) from a command's argument list."""
    config, dry, resume, want_help, rest = None, False, False, False, []
    i = 0
    while i < len(args):
        a = args[i]
        value, i = _option_value(args, i, ("--config", "-c"), "a file path")
        if value is not None:
            config = value
            continue
        if a == "--dry-run":
            dry = True
        elif a == "--resume":
            resume = True
        elif a in ("--help", "-h"):
            want_help = True
        else:
            rest.append(a)
        i += 1
    return config, dry, resume, want_help, rest


def output_dir_of(cfg: Any) -> Path | None:
    """The run directory of a config: ``cfg.run.output_dir``, else ``cfg.output_dir``."""
    run = getattr(cfg, "run", None)
    out = getattr(run, "output_dir", None) if run is not None else None
    out = out if out is not None else getattr(cfg, "output_dir", None)
    return Path(out) if out is not None else None


def _split_nproc(args: list[str]) -> tuple[int, list[str]]:
    """(N of `--nproc N` / `--nproc=N`, or 1; the other arguments)."""
    nproc, rest, i = 1, [], 0
    while i < len(args):
        a = args[i]
        if a == "--nproc" or a.startswith("--nproc="):
            value = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in a else 2
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--nproc needs a positive number of processes, got {value!r}")
            nproc = int(value)
            continue
        rest.append(a)
        i += 1
    return nproc, rest


def run_command(name: str, args: list[str]) -> int:
    """Resolve the config for `name` from `args`, then print a plan or run it."""
    from posttrain.engines import distributed as dist
    from posttrain.train.config.loader import config_help, config_to_dict, load_config, save_config

    nproc, args = _split_nproc(args)
    config_path, dry, resume, want_help, overrides = _split_args(args)
    module, config_cls, run_fn = load_command(name)
    if want_help:
        sys.stdout.write(
            f"usage: posttrain {name} [--config recipe.yaml] [--key VALUE ...] [--dry-run] [--resume]"
            + (" [--nproc N]" if name in DISTRIBUTED_COMMANDS else "")
            + "\n\n"
        )
        sys.stdout.write(config_help(config_cls))
        return 0
    world = max(nproc, dist.env_world_size())
    if world > 1 and name not in DISTRIBUTED_COMMANDS:
        raise ConfigError(
            f"posttrain {name} runs in one process; torch.distributed (--nproc / torchrun) serves "
            f"{', '.join(DISTRIBUTED_COMMANDS)}"
        )
    if nproc > 1 and dist.env_world_size() > 1:
        raise ConfigError("--nproc starts its own processes; under torchrun leave it out")
    if resume:
        if not hasattr(getattr(config_cls(), "run", None), "resume"):
            raise ConfigError(f"posttrain {name} has no --resume (it keeps no checkpoints)")
        overrides = [*overrides, "--run.resume=true"]
    cfg = load_config(config_cls, config_path, overrides)
    if world > 1:
        if name == "rl":
            from posttrain.train.rl.dp import check_world
        else:
            from posttrain.train.offline.dp import check_world

        check_world(cfg, world)  # before any process starts or any model is built
    if nproc > 1 and not dry:
        from posttrain.train.common.launch import launch

        return launch([name, *args], nproc)
    if dry:
        plan = getattr(module, "plan", None)
        if callable(plan):
            text = plan(cfg)
        else:
            import yaml

            text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
        if world > 1:
            text += f"\n  launch: {world} processes (torch.distributed, FSDP2 data parallel)"
        sys.stdout.write(f"# posttrain {name} (dry run: nothing is trained or written)\n{text.rstrip()}\n")
        return 0
    if dist.init_from_env():
        return _run_distributed(name, cfg, run_fn)
    out = output_dir_of(cfg)
    if out is None:
        _print_summary(name, run_fn(cfg))
        return 0
    from posttrain.train.common.rundir import has_previous_run, run_lock

    # The lock refuses a second run (or a --resume) on a directory in use. Nothing in the
    # directory is modified here: the training loops write config.yaml and start their
    # logs only once data, models and checkpoints have loaded (rundir.begin_run), so a
    # command that fails validation leaves an existing run as it was.
    key = "run.output_dir" if hasattr(cfg, "run") else "output_dir"
    with run_lock(out, key):
        if name not in TRAINING_COMMANDS and has_previous_run(out):
            raise ConfigError(
                f"{key}: {out} holds a training run (metrics.jsonl / checkpoints/); posttrain {name} "
                "would overwrite its files — choose another directory"
            )
        if resume:
            _warn_changed_config(out / "config.yaml", config_to_dict(cfg))
        summary = run_fn(cfg)
        save_config(cfg, out / "config.yaml")
        if isinstance(summary, dict):
            from posttrain.train.common.checkpoint import atomic_write_text

            atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    _print_summary(name, summary)
    return 0


def _run_distributed(name: str, cfg: Any, run_fn) -> int:
    """One rank of a torch.distributed run: rank 0 alone locks the run directory, writes
    config.yaml / summary.json and prints the summary (train/offline/dp.py)."""
    from posttrain.engines import distributed as dist
    from posttrain.train.common.checkpoint import atomic_write_text
    from posttrain.train.common.rundir import run_lock
    from posttrain.train.config.loader import config_to_dict, save_config

    out = output_dir_of(cfg)
    if not dist.is_main():
        run_fn(cfg)
        dist.shutdown()
        return 0
    with run_lock(out, "run.output_dir"):
        if cfg.run.resume:
            _warn_changed_config(out / "config.yaml", config_to_dict(cfg))
        summary = run_fn(cfg)
        summary["world_size"] = dist.world_size()
        save_config(cfg, out / "config.yaml")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    dist.shutdown()
    _print_summary(name, summary)
    return 0


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _warn_changed_config(path: Path, new: dict) -> None:
    """On --resume, say which keys differ from the run's saved config (it is then replaced)."""
    if not path.is_file():
        return
    import yaml

    try:
        old = _flatten(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError:
        return
    flat = _flatten(new)
    changed = sorted(k for k in flat.keys() | old.keys() if k != "run.resume" and flat.get(k) != old.get(k))
    if changed:
        shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
        sys.stderr.write(f"warning: resuming with a config that differs from {path} in: {shown}\n")


def _print_summary(name: str, summary: Any) -> None:
    if not isinstance(summary, dict):
        return
    sys.stdout.write(f"posttrain {name} done\n")
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
            v = v if len(v) <= 200 else v[:197] + "..."
        sys.stdout.write(f"  {k}: {v}\n")


def run_report(args: list[str]) -> int:
    """`posttrain report RUN_DIR [RUN_DIR ...] [--out DIR]`."""
    out, run_dirs, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a in ("--help", "-h"):
            sys.stdout.write(
                "usage: posttrain report RUN_DIR [RUN_DIR ...] [--out DIR]\n\n"
                "Plots reward, accuracy, KL, response length and loss over steps (runs overlaid)\n"
                "and writes report.md + report.html. --out defaults to RUN_DIR/report for one run,\n"
                "./report for several.\n"
            )
            return 0
        value, i = _option_value(args, i, ("--out",), "a directory")
        if value is not None:
            out = value
            continue
        if a.startswith("-"):
            raise ConfigError(f"report: unknown option {a!r} (valid: --out DIR)")
        else:
            run_dirs.append(a)
        i += 1
    if not run_dirs:
        raise ConfigError("report needs at least one run directory: posttrain report RUN_DIR [RUN_DIR ...]")
    if out is None:
        out = str(Path(run_dirs[0]) / "report") if len(run_dirs) == 1 else "report"
    from posttrain.train.common.report import write_report

    md = write_report(run_dirs, out)
    sys.stdout.write(f"wrote {md} and {md.with_suffix('.html')}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `posttrain` and `python -m posttrain`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return 0 if argv else EXIT_USAGE
    if argv[0] == "--version":
        from posttrain import __version__

        sys.stdout.write(f"posttrain {__version__}\n")
        return 0
    name, rest = argv[0], argv[1:]
    try:
        if name == "report":
            return run_report(rest)
        return run_command(name, rest)
    except PosttrainError as e:
        return _fail(_one_line(e), EXIT_USAGE, with_phase=True)
    except Exception as e:
        from posttrain.engines import distributed as dist

        if not (dist.is_initialized() and dist.is_comm_error(e)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return _fail(f"lost contact with another rank during {dist.phase()} ({first})", 1)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130


def _fail(message: str, status: int, *, with_phase: bool = False) -> int:
    """Report a failure: `error: ...` on stderr, naming the rank under torch.distributed (and,
    with_phase, what it was doing past start-up: "rank 1 (step 2): ..."); a rank started by
    `--nproc` hands it to the launcher, which prints the job's one line."""
    from posttrain.engines import distributed as dist

    if dist.env_world_size() > 1:
        during = f" ({dist.phase()})" if with_phase and dist.phase() != "startup" else ""
        message = f"rank {dist.env_rank()}{during}: {message}"
        from posttrain.train.common.launch import report_to_launcher

        if report_to_launcher(message, dist.phase()):
            return status
    sys.stderr.write(f"error: {message}\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
