"""`posttrain annotate`: label every step of a solution by Monte-Carlo continuations.

The GRPO seed ("Process Reward Model" → "PRM Training") names two sources of PRM data:
"Human annotation: experts annotate correctness of each reasoning step" and "Automatic
annotation: infer intermediate steps from final answer correctness". This is the
automatic one, as Math-Shepherd (Wang et al. 2024) does it. From the prefix y≤t of a solution (the prompt, then its first t reasoning
steps) a completer policy samples k continuations; a step is as good as the chance that a
solution through it still reaches the right answer:

    soft label  s_t = (# continuations from y≤t whose final answer is right) / k
    hard label  h_t = [at least one of them is right]          (Math-Shepherd "HE")

A step after which the completer can no longer reach the answer is where the solution went
wrong. The result is a stepwise dataset (`prompt`, `completions` = the steps, `labels` =
hard labels, `soft_labels`, `answer`) that `posttrain prm --data.path` trains on. The
traces come from a stepwise file (data.path) or the synthetic task's traces (the wrong
trace with one slip and the correct trace per problem); when the input carries labels
(`given_labels` in the output), the summary says how often the Monte-Carlo first wrong
step is the given one, next to a uniform guess.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.tasks.base import STEP_SEPARATOR
from posttrain.errors import ConfigError, DataError
from posttrain.train.config.checks import setting
from posttrain.train.config.loader import ModelSection

# sample_fn(prompts, prefixes, k) -> k continuation texts per (prompt, prefix)
SampleFn = Callable[[Sequence[Any], Sequence[str], int], list[list[str]]]


def step_prefixes(steps: Sequence[str], separator: str = STEP_SEPARATOR) -> list[str]:
    """The S completion prefixes y≤t of a trace, in the tasks' solution format:
    ``<think>s1; …; st; `` for t < S and ``<think>s1; …; sS</think>`` for the last step."""
    out = []
    for t in range(1, len(steps) + 1):
        body = separator.join(steps[:t])
        out.append(f"<think>{body}</think>" if t == len(steps) else f"<think>{body}{separator}")
    return out


def mc_labels(correct: Sequence[int], k: int) -> tuple[list[bool], list[float]]:
    """(hard, soft) labels of S steps from the number of right continuations of each prefix."""
    if k < 1 or any(not 0 <= c <= k for c in correct):
        raise ValueError(f"mc_labels: counts must lie in [0, k={k}], got {list(correct)}")
    return [c > 0 for c in correct], [c / k for c in correct]


def first_false(labels: Sequence[bool]) -> int | None:
    """Index of the first False label, None when every step is True."""
    return next((i for i, x in enumerate(labels) if not x), None)


def annotate(
    rows: list[dict], sample_fn: SampleFn, score_fn: Callable[[str, str], float], k: int
) -> list[dict]:
    """Monte-Carlo step labels for stepwise rows {prompt, completions (steps), answer, labels?}.

    score_fn(full completion text, answer) -> 1.0 when right. Every prefix of every row is
    sampled in one call of `sample_fn` (batched by the caller).
    """
    prompts, prefixes, owners = [], [], []
    for i, row in enumerate(rows):
        for prefix in step_prefixes(row["completions"]):
            prompts.append(row["prompt"])
            prefixes.append(prefix)
            owners.append(i)
    conts = sample_fn(prompts, prefixes, k)
    counts: list[list[int]] = [[] for _ in rows]
    for owner, prefix, texts in zip(owners, prefixes, conts):
        counts[owner].append(
            sum(score_fn(prefix + text, str(rows[owner]["answer"])) >= 1.0 for text in texts)
        )
    out = []
    for row, c in zip(rows, counts):
        hard, soft = mc_labels(c, k)
        new = {"prompt": row["prompt"], "completions": list(row["completions"]), "labels": hard,
               "soft_labels": soft, "answer": row["answer"]}  # fmt: skip
        if "labels" in row:
            new["given_labels"] = list(row["labels"])
        out.append(new)
    return out


def agreement(rows: list[dict]) -> dict[str, float]:
    """Against given labels, over the traces that have a given wrong step: how often the
    Monte-Carlo first wrong step is the given one ("first_wrong_acc"), next to a uniform
    guess among the trace's steps ("first_wrong_chance", mean 1/S) and to always naming
    the most common given position ("first_wrong_majority"); and the share of steps whose
    hard label equals the given one ("step_agreement", all traces)."""
    hits = chance = n = same = steps = 0.0
    truths: list[int] = []
    for row in rows:
        given = row.get("given_labels")
        if given is None:
            continue
        same += sum(a == b for a, b in zip(row["labels"], given))
        steps += len(given)
        truth = first_false(given)
        if truth is None:
            continue
        truths.append(truth)
        hits += first_false(row["labels"]) == truth
        chance += 1.0 / len(given)
        n += 1
    if not steps:
        return {}
    majority = max((truths.count(t) for t in set(truths)), default=0)
    rate = (lambda x: x / n) if n else (lambda x: float("nan"))
    return {"first_wrong_acc": rate(hits), "first_wrong_chance": rate(chance), "first_wrong_majority": rate(majority),
            "step_agreement": same / steps, "traces_with_a_wrong_step": n}  # fmt: skip


# --------------------------------------------------------------------------- command


@dataclass
class AnnotateDataSection:
    """The traces to label: a stepwise file, or the synthetic task's traces."""

    path: str | None = setting(None, "Stepwise file (prompt, completions, answer[, labels]); overrides task.")
    task: str | None = setting("arithmetic", "Synthetic task whose traces are labelled.")
    task_options: dict[str, Any] = setting(dict, "Keyword options of get_task.", factory=True)
    split: str = setting("train", "Task split of the traces.")
    difficulty: int | None = setting(2, "Task difficulty (multi-step levels).")
    n: int = setting(64, "Task problems (two traces each: with a slip, and correct).")
    seed: int = setting(0, "Seed of the task problems.")


@dataclass
class AnnotateConfig:
    """Monte-Carlo PRM step labels, Math-Shepherd style (posttrain annotate)."""

    model: ModelSection = setting(ModelSection, "The completer policy.", factory=True)
    data: AnnotateDataSection = setting(AnnotateDataSection, "Traces.", factory=True)
    k: int = setting(8, "Continuations sampled from every step prefix.")
    temperature: float = setting(1.0, "Sampling temperature of the continuations (> 0).")
    max_new_tokens: int = setting(48, "Length cap of a continuation.")
    batch_size: int = setting(32, "Prefixes per generate call.")
    seed: int = setting(0, "Sampling seed.")
    output_dir: str = setting("runs/annotate", "Writes stepwise.jsonl here.")


def model_sampler(
    model, tokenizer, *, temperature: float, max_new_tokens: int, seed: int, batch_size: int
) -> SampleFn:
    """A SampleFn drawing continuations of (chat-rendered prompt + prefix) with the native engine."""
    import torch

    from posttrain.engines.encoding import encode_text, render_prompt
    from posttrain.engines.rollout import make_engine
    from posttrain.engines.rollout.base import SamplingParams

    engine = make_engine("native", model, tokenizer)

    def sample(prompts, prefixes, k):
        out: list[list[str]] = []
        model.eval()
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            # the prompt as the policy was trained on it (template, BOS once), then the prefix
            ids = [encode_text(tokenizer, render_prompt(tokenizer, p) + x)
                   for p, x in zip(prompts[start : start + batch_size], prefixes[start : start + batch_size])]  # fmt: skip
            params = SamplingParams(
                temperature=temperature, max_new_tokens=max_new_tokens, n=k, seed=seed * 1_000_003 + b
            )
            with torch.no_grad():
                ro = engine.generate(ids, params)
            eos = tokenizer.eos_token or ""
            texts = [t[: -len(eos)] if eos and t.endswith(eos) else t for t in ro.texts]
            out += [texts[i * k : (i + 1) * k] for i in range(len(ids))]
        return out

    return sample


def _rows(cfg: AnnotateConfig) -> tuple[list[dict], Any]:
    from posttrain.data.tasks import get_task, task_rows

    d = cfg.data
    task = get_task(d.task, **dict(d.task_options)) if d.task else None
    if d.path:
        from posttrain.data.datasets import load_rows

        rows = load_rows(d.path, "stepwise", require=("answer",))
    elif task is not None:
        rows = task_rows(task, d.split, d.n, seed=d.seed, kind="stepwise", difficulty=d.difficulty)
    else:
        raise ConfigError("set data.path (a stepwise file with an answer column) or data.task")
    if task is None:
        raise ConfigError("data.task names the verifier that scores continuations (e.g. arithmetic)")
    if not rows:
        raise DataError("no traces to annotate")
    return rows, task


def run_annotate(cfg: AnnotateConfig) -> dict[str, Any]:
    """Label the traces, write output_dir/stepwise.jsonl, return counts and agreement."""
    from posttrain.train.common.loading import load_policy, load_section_tokenizer

    if cfg.k < 1 or cfg.temperature <= 0:
        raise ConfigError(f"k must be >= 1 and temperature > 0, got {cfg.k} and {cfg.temperature}")
    rows, task = _rows(cfg)
    tokenizer = load_section_tokenizer(cfg.model)
    model = load_policy(cfg.model, tokenizer)
    sampler = model_sampler(model, tokenizer, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                            seed=cfg.seed, batch_size=cfg.batch_size)  # fmt: skip
    labelled = annotate(rows, sampler, task.score, cfg.k)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stepwise.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    steps = sum(len(r["labels"]) for r in labelled)
    summary = {"traces": len(labelled), "steps": steps, "steps_labelled_right": sum(sum(r["labels"]) for r in labelled),
               "output": str(out / "stepwise.jsonl")}  # fmt: skip
    summary.update(agreement(labelled))
    return summary


def plan(cfg: AnnotateConfig) -> str:
    """Dry-run description."""
    d = cfg.data
    src = (
        f"file {d.path}"
        if d.path
        else f"task {d.task} ({d.split}, difficulty {d.difficulty}, {d.n} problems x 2 traces)"
    )
    return (f"posttrain annotate\n  completer: {cfg.model.path or 'preset ' + cfg.model.preset}\n  traces: {src}\n"
            f"  labels: k={cfg.k} continuations per step prefix at T={cfg.temperature:g} "
            f"(hard: any right, soft: share right)\n  output: {cfg.output_dir}/stepwise.jsonl")  # fmt: skip
