"""Evaluation: pass@1, pass@k, maj@k, best-of-N (ORM or PRM), format rate, length.

`evaluate_policy` is the in-process function the RL loop, the demo and the benchmarks call
for before/after numbers; `run_eval` is `posttrain eval` (loads a model, evaluates it,
prints a table and writes ``eval.json``).

Per prompt i with k samples of which c_i are correct (Task.score == 1, or the math-verify
accuracy reward for a plain dataset):
- accuracy = pass@1 = mean_i c_i / k (the unbiased pass@1 of Chen et al. 2021, eq. 1)
- pass@j   = mean_i [1 − C(k − c_i, j) / C(k, j)] for each j ≤ k (same estimator)
- maj@k    = mean_i 1[the most frequent extracted answer is correct] (self-consistency,
  Wang et al. 2023). Deviation: answers are grouped by exact string after stripping, not by
  mathematical equivalence; ties go to the answer seen first; samples without an answer
  do not vote.
- best_of_k/orm, best_of_k/prm = mean_i 1[the sample with the highest ORM score / PRM
  aggregate is correct] (Cobbe et al. 2021; Lightman et al. 2023 use the min step score).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from posttrain.engines.encoding import encode_prompt
from posttrain.engines.thinking import DEFAULT_PHRASE
from posttrain.errors import ConfigError, DataError
from posttrain.train.config.checks import setting
from posttrain.train.config.loader import InferenceModelSection
from posttrain.train.config.rl import EnvSection
from posttrain.train.eval_env import check_eval_env, env_engine, env_metrics
from posttrain.train.eval_scorers import orm_scores, prm_scores  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # torch is imported inside functions so `posttrain eval --help` stays fast
    import torch


@dataclass
class EvalDataSection:
    """What to evaluate on: a synthetic task or a dataset file."""

    task: str | None = setting(
        "arithmetic", "Synthetic task name (its verifier scores answers); null with `path`."
    )
    path: str | None = setting(
        None,
        "Dataset file/dir with prompt and answer columns, used instead of the task's examples; "
        "answers are checked by `task`'s verifier, or by math-verify when task is null.",
    )
    task_options: dict[str, Any] = setting(
        dict, "Keyword options passed to get_task(name, **options), e.g. {trace: columns}.", factory=True
    )
    split: Literal["train", "test"] = setting("test", "Task split to evaluate.")
    n: int = setting(100, "Number of prompts (0 = every row of `path`).")
    difficulty: int | None = setting(None, "Task difficulty level; null = mixed levels.")
    prompt_column: str = setting("prompt", "Prompt column of `path`.")
    answer_column: str = setting("answer", "Ground-truth answer column of `path`.")
    chat_template: bool = setting(
        True,
        "Apply the tokenizer's chat template to prompts; false uses the raw text (BOS kept, as in training).",
    )
    enable_thinking: bool = setting(
        True, "Thinking mode of the chat template (false pre-fills an empty think block)."
    )


@dataclass
class EvalSamplingSection:
    """How completions are sampled."""

    k: int = setting(4, "Samples per prompt (pass@k, maj@k, best-of-k).")
    temperature: float = setting(1.0, "Sampling temperature (0 = greedy; then use k=1).")
    top_p: float = setting(1.0, "Nucleus sampling mass; 1 disables it.")
    max_new_tokens: int = setting(64, "Longest completion in tokens.")
    engine: str = setting("native", "Rollout engine: native | hf | vllm.")
    batch_size: int = setting(32, "Prompts per generate call.")
    thinking_budget: int = setting(
        0,
        "Qwen3 thinking budget: a sample still thinking after this many tokens gets thinking_end_phrase and "
        "</think> inserted, then answers within max_new_tokens; 0 = no budget.",
    )
    thinking_end_phrase: str = setting(
        DEFAULT_PHRASE, "Text inserted before </think> when the thinking budget cuts a sample."
    )

    def __post_init__(self) -> None:
        from posttrain.train.config.checks import check_range, check_sampling

        check_sampling(
            "sampling", temperature=self.temperature, max_new_tokens=self.max_new_tokens, greedy_ok=True
        )
        check_range("sampling.top_p", self.top_p, 0, 1, lo_open=True)
        check_range("sampling.batch_size", self.batch_size, 1)


@dataclass
class EvalScorerSection:
    """Optional verifier-free selection of one sample out of k (best-of-N)."""

    orm: str | None = setting(None, "Reward model directory (from `posttrain rm`) for best-of-k.")
    prm: str | None = setting(None, "Process reward model directory (from `posttrain prm`).")
    prm_aggregate: Literal["min", "last", "mean", "prod"] = setting(
        "min", "How step scores become one trace score (min: Lightman et al. 2023)."
    )


@dataclass
class EvalConfig:
    """Evaluate a model (`posttrain eval`): pass@1, pass@k, maj@k, best-of-N with an ORM/PRM."""

    model: InferenceModelSection = setting(InferenceModelSection, "The model to evaluate.", factory=True)
    data: EvalDataSection = setting(EvalDataSection, "Evaluation prompts.", factory=True)
    sampling: EvalSamplingSection = setting(EvalSamplingSection, "Sampling.", factory=True)
    scorer: EvalScorerSection = setting(EvalScorerSection, "Best-of-N scorers.", factory=True)
    output_dir: str = setting("runs/eval", "Where eval.json and samples.jsonl go.")
    seed: int = setting(0, "Seed for example selection and sampling.")
    save_samples: bool = setting(True, "Write every completion to samples.jsonl.")
    env: EnvSection = setting(
        EnvSection, "Multi-turn evaluation with tools: the `env:` section of `posttrain rl`.", factory=True
    )

    def __post_init__(self):
        if self.sampling.k < 1:
            raise ValueError(f"sampling.k must be >= 1, got {self.sampling.k}")
        if self.data.task is None and self.data.path is None:
            raise ValueError("set data.task or data.path")
        check_eval_env(self)


# --------------------------------------------------------------------------- metrics


def pass_at_k_mean(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean unbiased pass@k over prompts; each prompt's n = its number of samples (n >= k)."""
    from posttrain.core.evaluation import pass_at_k

    if not correct:
        return float("nan")
    return float(sum(pass_at_k(len(c), sum(c), k) for c in correct) / len(correct))


def _norm(answer: str | None) -> str | None:
    answer = answer.strip() if answer is not None else None
    return answer or None


def best_of(scores: Sequence[float], correct: Sequence[bool]) -> bool:
    """Whether the highest-scored sample (first on ties, NaN lowest) is correct."""
    keyed = [(-math.inf if (s is None or math.isnan(s)) else s) for s in scores]
    return bool(correct[max(range(len(keyed)), key=lambda i: (keyed[i], -i))])


def format_ok(text: str, *, think_prefilled: bool) -> bool:
    """R1 format: ``<think>…</think><answer>…</answer>`` (only the answer block when the
    template pre-filled an empty think block)."""
    pattern = _ANSWER_ONLY if think_prefilled else _THINK_ANSWER
    return pattern.fullmatch(text) is not None


_THINK_ANSWER = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.S)
_ANSWER_ONLY = re.compile(r"\s*<answer>.*?</answer>\s*", re.S)


# --------------------------------------------------------------------------- core routine


def _clean(text: str, tokenizer) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if eos and text.endswith(eos):
        text = text[: -len(eos)]
    return text


def generate_samples(
    model: torch.nn.Module | None,
    tokenizer,
    prompts: Sequence[str],
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    engine: str | Any = "native",
    seed: int = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
    chat_template: bool = True,
    enable_thinking: bool = True,
    tools: list[dict] | None = None,
    rows: Sequence[dict] | None = None,
    turn_stats: dict[str, list] | None = None,
) -> tuple[list[list[str]], list[list[int]], list[list[str]]]:
    """k completions per prompt: (texts[P][k], token lengths[P][k], finish reasons[P][k]).

    prompts: P raw user prompts; rendered with the chat template (as the RL loop does) when
        `chat_template` and the tokenizer has one, then tokenized with the tokenizer's BOS
        convention (`posttrain.engines.encoding.encode_prompt`).
    engine: a rollout engine name for `make_engine`, or an engine instance to reuse.
    model: the policy module; None when `engine` is an instance that already samples from
        the current weights and puts its model in eval mode itself (the RL loop's Generator
        role), so evaluation never needs the live module.
    seed: generate call b uses seed * 1_000_003 + b, so results do not depend on what ran
        before (same seed + same weights -> same samples).
    Multi-turn engines (train/eval_env.py): `tools` are declared in the rendered prompts,
    `rows` (one per prompt) go to the environments' reset, and each sample's turn counts
    are appended to the lists of `turn_stats` (prompt-major).
    Texts have a trailing EOS string removed. The model is put in eval mode (no dropout)
    and restored afterwards.
    """
    import torch

    from posttrain.engines.rollout import make_engine
    from posttrain.engines.rollout.base import SamplingParams

    # An engine instance (e.g. the RL loop's vLLM engine) is reused instead of building a
    # second one; sync_weights makes it sample from `model`'s current weights.
    if model is None and isinstance(engine, str):
        raise ValueError("generate_samples: model=None needs an engine instance, not an engine name")
    eng = make_engine(engine, model, tokenizer) if isinstance(engine, str) else engine
    if model is not None:
        eng.sync_weights(model)
    texts: list[list[str]] = []
    lengths: list[list[int]] = []
    reasons: list[list[str]] = []
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[start : start + batch_size]
            ids = [
                encode_prompt(
                    tokenizer, p, chat_template=chat_template, enable_thinking=enable_thinking, tools=tools
                )  # fmt: skip
                for p in chunk
            ]
            params = SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                n=k,
                seed=seed * 1_000_003 + b,
            )
            env_rows = {} if rows is None else {"rows": list(rows[start : start + batch_size])}
            with torch.no_grad():
                ro = eng.generate(ids, params, **env_rows)
            for key, values in (ro.turn_stats or {}).items() if turn_stats is not None else ():
                turn_stats.setdefault(key, []).extend(values)
            lens = ro.mask.sum(dim=1).long().tolist()  # [B]
            for i in range(len(chunk)):
                mine = range(i * k, (i + 1) * k)  # Rollout contract: sample j is prompt j // n
                texts.append([_clean(ro.texts[j], tokenizer) for j in mine])
                lengths.append([int(lens[j]) for j in mine])
                reasons.append([ro.finish_reason[j] for j in mine])
    finally:
        if model is not None:
            model.train(was_training)
    return texts, lengths, reasons


def evaluate_policy(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Any],
    task: Any,
    *,
    k: int,
    return_samples: bool = False,
    **sampling: Any,
) -> dict[str, Any]:
    """Sample k completions per example and score them with `task` (before/after numbers
    for the RL loop, the demo and the benchmarks).

    examples: P Example objects (or dicts) with `prompt` and `answer`.
    task: anything with ``score(completion, answer) -> float`` (1.0 = correct); a Task.
    k: completions per example; greedy (temperature 0) with k=1 is the usual held-out accuracy.
    sampling: the other keyword arguments of `generate_samples`, passed on: temperature and
        max_new_tokens (required), engine, seed, top_p, batch_size, chat_template,
        enable_thinking.
    Returns {"accuracy" (= pass@1), "pass@k" and "maj@k" (when k > 1), "format_rate",
    "length_mean" (tokens), "truncated_frac" (finished by length), "n", "k"}; with
    return_samples also "samples": one dict per completion.
    """
    if k < 1:
        raise ConfigError(f"evaluation needs k >= 1 samples per prompt, got {k}")
    prompts = [_field(ex, "prompt") for ex in examples]
    answers = [str(_field(ex, "answer")) for ex in examples]
    texts, lengths, reasons = generate_samples(model, tokenizer, prompts, k=k, **sampling)
    correct = [[task.score(t, a) >= 1.0 for t in ts] for ts, a in zip(texts, answers)]
    # generate_samples' defaults: the chat template on, thinking enabled.
    think_prefilled = sampling.get("chat_template", True) and not sampling.get("enable_thinking", True)
    return summarize(
        prompts, answers, texts, lengths, reasons, correct,
        think_prefilled=think_prefilled, return_samples=return_samples,
    )  # fmt: skip


def _field(ex: Any, name: str) -> Any:
    if isinstance(ex, dict):
        if name not in ex:
            raise DataError(f"evaluation example has no {name!r} field (fields: {', '.join(ex)})")
        return ex[name]
    return getattr(ex, name)


def summarize(
    prompts: Sequence[str],
    answers: Sequence[str],
    texts: Sequence[Sequence[str]],
    lengths: Sequence[Sequence[int]],
    reasons: Sequence[Sequence[str]],
    correct: Sequence[Sequence[bool]],
    *,
    think_prefilled: bool = False,
    scores: dict[str, Sequence[Sequence[float]]] | None = None,
    return_samples: bool = False,
) -> dict[str, Any]:
    """The metrics of the module docstring from per-sample texts/lengths/correctness.

    scores: optional name -> [P][k] selection scores (e.g. "orm", "prm") giving
        ``best_of_k/<name>``.
    """
    from posttrain.data.tasks.base import extract_answer

    n, k = len(prompts), len(texts[0]) if texts else 0
    flat_len = [x for ls in lengths for x in ls]
    flat_texts = [t for ts in texts for t in ts]
    out: dict[str, Any] = {
        "n": n,
        "k": k,
        "accuracy": pass_at_k_mean(correct, 1),
        "format_rate": sum(format_ok(t, think_prefilled=think_prefilled) for t in flat_texts)
        / max(1, len(flat_texts)),
        "length_mean": sum(flat_len) / max(1, len(flat_len)),
        "truncated_frac": sum(r == "length" for rs in reasons for r in rs) / max(1, len(flat_len)),
    }
    if k > 1:
        from posttrain.core.evaluation import maj_at_k

        out[f"pass@{k}"] = pass_at_k_mean(correct, k)
        votes = [[_norm(extract_answer(t)) for t in ts] for ts in texts]

        def vote_correct(answer: str, i: int) -> bool:
            # The vote's correctness is that of the first sample carrying that answer.
            return bool(correct[i][votes[i].index(answer)])

        out[f"maj@{k}"] = maj_at_k(votes, correct_fn=vote_correct)
    for name, sc in (scores or {}).items():
        out[f"best_of_{k}/{name}"] = sum(best_of(s, c) for s, c in zip(sc, correct)) / max(1, n)
    if return_samples:
        out["samples"] = [
            {
                "prompt": p,
                "answer": a,
                "sample": j,
                "completion": t,
                "correct": bool(c),
                "length": ln,
                "finish": r,
            }
            for p, a, ts, cs, ls, rs in zip(prompts, answers, texts, correct, lengths, reasons)
            for j, (t, c, ln, r) in enumerate(zip(ts, cs, ls, rs))
        ]
    return out


# --------------------------------------------------------------------------- the command


def _load_examples(cfg: EvalConfig) -> tuple[list[dict], Any]:
    """[{"prompt", "answer"}] rows and the Task (None for a dataset without a task)."""
    d = cfg.data
    task = None
    if d.task is not None:
        from posttrain.data.tasks import get_task

        task = get_task(d.task, **dict(d.task_options or {}))
    if d.path is not None:
        from posttrain.data.datasets import load_rows

        rows = load_rows(
            d.path,
            "prompt",
            prompt_column=d.prompt_column,
            require=(d.answer_column,),
            limit=d.n if d.n > 0 else None,
        )
        # load_rows returns the prompt under the standard name "prompt"; other columns as-is.
        rows = [{"prompt": r["prompt"], "answer": str(r[d.answer_column])} for r in rows]
    else:
        rows = [{"prompt": e.prompt, "answer": e.answer}
                for e in task.examples(d.split, d.n, seed=cfg.seed, difficulty=d.difficulty)]  # fmt: skip
    if not rows:
        raise DataError("evaluation set is empty (data.n = 0?)")
    return rows, task


class _Verifier:
    """Correctness of completions: Task.score, or the math-verify "accuracy" reward (run in
    killable worker processes) for a dataset without a task. Close it to stop the workers."""

    def __init__(self, task: Any):
        self.task = task
        self.reward = None
        if task is None:
            from posttrain.data.rewards import build_reward

            self.reward = build_reward("accuracy")

    def __call__(self, texts: Sequence[str], answers: Sequence[str]) -> list[bool]:
        if self.task is not None:
            return [self.task.score(t, a) >= 1.0 for t, a in zip(texts, answers)]
        scores = self.reward([""] * len(texts), list(texts), answer=list(answers))
        return [s is not None and s >= 1.0 for s in scores]  # None = verifier error/timeout

    def close(self) -> None:
        close = getattr(self.reward, "close", None)
        if close is not None:
            close()


def format_table(metrics: dict[str, Any]) -> str:
    """Two-column text table of the scalar metrics."""
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))]
    width = max((len(k) for k, _ in items), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in items]
    return "\n".join(lines)


def _engine(s: EvalSamplingSection, model, tokenizer):
    """The sampling engine, wrapped in a thinking budget when sampling.thinking_budget > 0."""
    from posttrain.engines.rollout import make_engine
    from posttrain.engines.rollout.budget import ThinkingBudgetEngine

    engine = make_engine(s.engine, model, tokenizer)
    if s.thinking_budget:
        engine = ThinkingBudgetEngine(engine, tokenizer, s.thinking_budget, s.thinking_end_phrase)
    return engine


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """`posttrain eval`: load, sample, score, print a table, write eval.json (+ samples.jsonl)."""
    import torch

    from posttrain.train.common.checkpoint import atomic_write_text
    from posttrain.train.common.loading import load_policy, load_section_tokenizer, model_source

    torch.manual_seed(cfg.seed)
    rows, task = _load_examples(cfg)
    source = model_source(cfg.model)
    tokenizer = load_section_tokenizer(cfg.model)
    model = load_policy(cfg.model, tokenizer)
    s, d = cfg.sampling, cfg.data
    t0 = time.perf_counter()
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    engine, env_kw = env_engine(cfg, _engine(s, model, tokenizer), tokenizer, rows)
    texts, lengths, reasons = generate_samples(
        model, tokenizer, prompts, k=s.k, temperature=s.temperature, max_new_tokens=s.max_new_tokens,
        engine=engine, seed=cfg.seed, top_p=s.top_p, batch_size=s.batch_size,
        chat_template=d.chat_template, enable_thinking=d.enable_thinking, **env_kw,
    )  # fmt: skip
    gen_s = time.perf_counter() - t0
    check = _Verifier(task)
    try:
        correct = [check(ts, [a] * len(ts)) for ts, a in zip(texts, answers)]
    finally:
        check.close()
    scores = {}
    if cfg.scorer.orm:
        scores["orm"] = orm_scores(cfg.scorer.orm, prompts, texts, device=cfg.model.device,
                                   chat_template=d.chat_template, enable_thinking=d.enable_thinking)  # fmt: skip
    if cfg.scorer.prm:
        scores["prm"] = prm_scores(cfg.scorer.prm, prompts, texts, aggregate=cfg.scorer.prm_aggregate,
                                   device=cfg.model.device, chat_template=d.chat_template,
                                   enable_thinking=d.enable_thinking)  # fmt: skip
    result = summarize(prompts, answers, texts, lengths, reasons, correct,
                       think_prefilled=d.chat_template and not d.enable_thinking, scores=scores,
                       return_samples=cfg.save_samples)  # fmt: skip
    samples = result.pop("samples", None)
    result["time/generate_s"] = gen_s
    result.update(env_metrics(env_kw))
    if s.thinking_budget:
        result["thinking_cut_frac"] = engine.cut_total / max(1, engine.samples_total)
    result.update({"model": source, "task": d.task, "dataset": d.path, "split": d.split,
                   "temperature": s.temperature})  # fmt: skip
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
    if samples is not None:
        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in samples))
    print(format_table(result))
    return result
