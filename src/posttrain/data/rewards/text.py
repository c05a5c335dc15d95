"""Rewards computed from the completion text alone (plus its length and group).

Every reward here is built by a factory returning f(prompts, completions, **columns) ->
list[float | None] over a batch of B completions. Lengths are measured, in order of
preference, from the column `length_column` (token counts the trainer passes, e.g.
"response_length"), from `tokenizer` when one is given, else in characters.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from posttrain.errors import ConfigError, RewardError

_THINK_FORMAT = re.compile(
    r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*\Z", re.DOTALL
)
_THINK_ONLY_FORMAT = re.compile(r"\A\s*<think>(?P<think>.*?)</think>(?P<rest>.*)\Z", re.DOTALL)


def with_open_think(prompt, completion: str) -> str:
    """The completion as written after the prompt: when the chat template already opened
    ``<think>`` at the end of the prompt, put it back in front so every reward sees the
    same text whether or not the template opened it."""
    if (
        isinstance(prompt, str)
        and prompt.rstrip().endswith("<think>")
        and not completion.lstrip().startswith("<think>")
    ):
        return "<think>" + completion
    return completion


def think_text(prompt, completion: str) -> str:
    """The reasoning part: inside <think>…</think> (to the end if never closed); the
    whole completion when it has no think block."""
    text = with_open_think(prompt, completion)
    if "<think>" not in text:
        return text
    inner = text.split("<think>", 1)[1]
    return inner.split("</think>", 1)[0]


def _lengths(completions: list[str], columns: dict, length_column: str, tokenizer) -> list[int]:
    if length_column in columns:
        lengths = columns[length_column]
        if len(lengths) != len(completions):
            raise RewardError(
                f"column {length_column!r} has {len(lengths)} entries for {len(completions)} completions"
            )
        return [int(x) for x in lengths]
    if tokenizer is not None:
        return [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    return [len(c) for c in completions]


# ---------------------------------------------------------------------------- format


def format_reward(*, require_answer: bool = True, nonempty: bool = True) -> Callable:
    """R1-style format reward: 1.0 iff the completion is ``<think>…</think><answer>…</answer>``
    (only whitespace around the blocks), else 0.0.

    DeepSeek-R1 §2.2.2 ("format reward"). require_answer=False accepts ``<think>…</think>``
    followed by any text. nonempty: the think and answer blocks must contain non-space text.
    A prompt ending with ``<think>`` counts as having opened the block.
    """

    def fn(prompts, completions, **columns):
        out = []
        for p, c in zip(prompts, completions):
            text = with_open_think(p, c)
            m = (_THINK_FORMAT if require_answer else _THINK_ONLY_FORMAT).match(text)
            ok = m is not None
            if ok and nonempty:
                ok = bool(m.group("think").strip()) and (
                    not require_answer or bool(m.group("answer").strip())
                )
            if ok and ("<think>" in m.group("think") or "</answer>" in m.groupdict().get("answer", "")):
                ok = False  # nested or repeated tags are not the format
            out.append(1.0 if ok else 0.0)
        return out

    return fn


# ---------------------------------------------------------------------------- lengths


def length_linear_reward(
    *, coef: float = 0.001, length_column: str = "response_length", tokenizer=None
) -> Callable:
    """Linear length penalty r = −coef · |y| (the "length penalty" R_i = r(x, y_i) − λ|y_i|
    of the GRPO practical tips in the seed notes). |y| in tokens when available (see module
    docstring), else characters."""

    def fn(prompts, completions, **columns):
        return [-coef * n for n in _lengths(completions, columns, length_column, tokenizer)]

    return fn


def kimi_length_values(lengths: list[int], correct: list[bool | None], group_ids: list) -> list[float | None]:
    """Kimi k1.5 length reward (§2.3.3 of the k1.5 report), per group of samples of one prompt.

    λ_i = 0.5 − (len_i − min_len) / (max_len − min_len) over the group; correct answers get
    λ_i, wrong ones min(0, λ_i); when max_len == min_len every sample of the group gets 0
    (the report's rule). Samples with unknown correctness (None) get None and do not enter
    the group's min/max.
    """
    out: list[float | None] = [None] * len(lengths)
    groups: dict = {}
    for i, g in enumerate(group_ids):
        if correct[i] is not None:
            groups.setdefault(g, []).append(i)
    for idx in groups.values():
        lo = min(lengths[i] for i in idx)
        hi = max(lengths[i] for i in idx)
        for i in idx:
            if hi == lo:
                out[i] = 0.0
                continue
            lam = 0.5 - (lengths[i] - lo) / (hi - lo)
            out[i] = lam if correct[i] else min(0.0, lam)
    return out


def kimi_length_reward(
    *,
    correctness: Callable | None = None,
    correct_column: str = "correct",
    group_column: str = "group_id",
    group_size: int | None = None,
    length_column: str = "response_length",
    tokenizer=None,
    correct_threshold: float = 0.5,
) -> Callable:
    """Kimi k1.5 group length reward (see `kimi_length_values`).

    Correctness r(x, y_i, y*) ∈ {0, 1} comes from the column `correct_column` when the
    trainer passes one, else from calling `correctness` (any reward callable, e.g. the
    accuracy or task reward) — a score ≥ `correct_threshold` counts as correct.
    Groups come from the column `group_column` (Rollout.group_id), else from contiguous
    blocks of `group_size`; without either the call fails (a whole batch is not a group).
    """

    def fn(prompts, completions, **columns):
        n = len(completions)
        if correct_column in columns:
            raw = list(columns[correct_column])
        elif correctness is not None:
            raw = list(correctness(prompts, completions, **columns))
        else:
            raise RewardError(f"kimi_length needs a {correct_column!r} column or a correctness= reward")
        correct = [None if r is None else float(r) >= correct_threshold for r in raw]
        if group_column in columns:
            gids = list(columns[group_column])
        elif group_size:
            if n % group_size:
                raise RewardError(f"kimi_length: batch of {n} is not a multiple of group_size={group_size}")
            gids = [i // group_size for i in range(n)]
        else:
            raise RewardError(f"kimi_length needs a {group_column!r} column or group_size=")
        return kimi_length_values(_lengths(completions, columns, length_column, tokenizer), correct, gids)

    fn.batch_dependent = True  # group statistics: the runner must never score a sample alone
    return fn


def dapo_overlong_value(length: int, max_length: int, cache_length: int) -> float:
    """DAPO soft overlong punishment (DAPO, Yu et al. 2025, Eq. 13):
    0 if |y| ≤ L_max − L_cache; ((L_max − L_cache) − |y|) / L_cache inside the buffer;
    −1 past L_max."""
    if length <= max_length - cache_length:
        return 0.0
    if length <= max_length:
        return ((max_length - cache_length) - length) / cache_length
    return -1.0


def dapo_overlong_reward(
    *, max_length: int, cache_length: int, length_column: str = "response_length", tokenizer=None
) -> Callable:
    """DAPO soft overlong punishment as a reward (see `dapo_overlong_value`).
    max_length = L_max (the generation cap), cache_length = L_cache (the buffer before it)."""
    if not (0 < cache_length <= max_length):
        raise ConfigError(
            f"dapo_overlong needs 0 < cache_length <= max_length, got {cache_length}, {max_length}"
        )

    def fn(prompts, completions, **columns):
        lengths = _lengths(completions, columns, length_column, tokenizer)
        return [dapo_overlong_value(n, max_length, cache_length) for n in lengths]

    return fn


# ---------------------------------------------------------------------------- repetition


def repetition_rate(units: list[str], n: int) -> float:
    """Share of the text's n-grams that repeat an earlier n-gram: 1 − distinct/total
    (0 when there are fewer than n units)."""
    total = len(units) - n + 1
    if total <= 0:
        return 0.0
    grams = {tuple(units[i : i + n]) for i in range(total)}
    return 1.0 - len(grams) / total


def repetition_reward(*, ngram_size: int = 4, unit: str = "word", coef: float = 1.0) -> Callable:
    """Repetition penalty r = −coef · repetition_rate(y, n) in [−coef, 0]; units are
    whitespace-separated words ("word") or characters ("char"). Catches the looping
    generations Kimi k1.5 truncates early."""
    if unit not in ("word", "char"):
        raise ConfigError(f"repetition unit must be 'word' or 'char', got {unit!r}")

    def fn(prompts, completions, **columns):
        return [
            -coef * repetition_rate(c.split() if unit == "word" else list(c), ngram_size) for c in completions
        ]

    return fn


# ---------------------------------------------------------------------------- language

_SCRIPTS = {
    "latin": ("LATIN",),
    "cjk": ("CJK", "HIRAGANA", "KATAKANA"),
    "cyrillic": ("CYRILLIC",),
    "greek": ("GREEK",),
    "arabic": ("ARABIC",),
    "hebrew": ("HEBREW",),
    "devanagari": ("DEVANAGARI",),
    "hangul": ("HANGUL",),
    "thai": ("THAI",),
}
# Scripts written without spaces between words: each character counts as one word.
_UNSPACED = ("cjk", "thai")


def _script_of(ch: str) -> str | None:
    name = unicodedata.name(ch, "")
    for script, prefixes in _SCRIPTS.items():
        if name.startswith(prefixes):
            return script
    return "other"


def script_words(text: str) -> list[str]:
    """The script of each word of `text`: a word is a maximal run of letters of one
    script, except in unspaced scripts (CJK, Thai) where each character is a word, so a
    Chinese sentence and its English translation weigh about the same."""
    out: list[str] = []
    prev = None
    for ch in text:
        if not ch.isalpha():
            prev = None
            continue
        script = _script_of(ch)
        if script in _UNSPACED or script != prev:
            out.append(script)
        prev = script
    return out


def language_reward(*, target: str = "latin", column: str | None = None) -> Callable:
    """Language-consistency reward (DeepSeek-R1 §2.3.3): the share of words in the
    reasoning (<think> part; the whole completion when there is none) written in the
    target script. None when the reasoning has no letters (nothing to measure).

    target: a script name (latin, cjk, cyrillic, greek, arabic, hebrew, devanagari, hangul,
        thai); column: a per-row column naming the target script instead (e.g. the
        prompt's language). Deviation: R1 counts words of the target *language*; scripts
        are what can be told apart without a language model.
    """
    if target not in _SCRIPTS:
        raise ConfigError(f"unknown language script {target!r}; valid: {', '.join(_SCRIPTS)}")

    def fn(prompts, completions, **columns):
        targets = columns[column] if column else [target] * len(completions)
        out = []
        for p, c, t in zip(prompts, completions, targets):
            words = script_words(think_text(p, c))
            out.append(sum(w == t for w in words) / len(words) if words else None)
        return out

    return fn


# ---------------------------------------------------------------------------- task


def task_reward(
    *, task=None, task_name: str | None = None, answer_column: str = "answer", **task_options
) -> Callable:
    """Score with a synthetic task's own verifier (`Task.score(completion, answer)`), e.g.
    countdown's expression checker. Give a built `task`, or a task name (as `task` or
    `task_name`, + task options) from posttrain.data.tasks. None for rows without an answer."""
    if isinstance(task, str):  # a YAML config names the task
        task, task_name = None, task
    if task is None:
        if task_name is None:
            raise ConfigError("task reward needs task= or task_name=")
        from posttrain.data.tasks import get_task

        task = get_task(task_name, **task_options)

    def fn(prompts, completions, **columns):
        if answer_column not in columns:
            raise RewardError(f"task reward needs a column {answer_column!r}; got {sorted(columns)}")
        out = []
        for p, c, a in zip(prompts, completions, columns[answer_column]):
            out.append(None if a is None else float(task.score(with_open_think(p, c), str(a))))
        return out

    return fn


# ---------------------------------------------------------------------------- reference trace


def _trace_steps(think: str, separator: str) -> list[str]:
    # Split on the separator without its spaces ("7+5=12;4+3+1=8" is two steps) and strip.
    return [s.strip() for s in think.split(separator.strip() or separator) if s.strip()]


def step_credit_values(steps: list[str], reference: list[str]) -> float:
    """Share of `reference` reproduced before the first deviation: k / len(reference), k the
    number of leading positions where `steps` equals `reference` (whitespace-stripped).

    The ground-truth analogue of a PRM800K-style "correct up to the first wrong step"
    label: a trace that gets the first two of four columns right earns 0.5, whatever follows.
    Extra steps after a complete reference cost nothing here (the accuracy reward judges
    the answer). reference must be non-empty.
    """
    k = 0
    for got, want in zip(steps, reference):
        if got != want:
            break
        k += 1
    return k / len(reference)


def step_credit_reward(*, solution_column: str = "solution", separator: str = "; ") -> Callable:
    """Partial credit for reasoning that follows a reference trace (see `step_credit_values`).

    Reads each sample's reference solution from the column `solution_column` (the synthetic
    tasks give ``<think>s1; s2</think><answer>…</answer>``; any text works: its think block, or
    the whole text when it has none, is split on `separator`). None for rows without a
    reference. Meant next to the accuracy reward for tasks with one canonical derivation
    (column-by-column arithmetic): it rewards each correct column of a trace whose answer
    is still wrong, which gives the GRPO group a signal where accuracy alone is all zeros.
    """

    def fn(prompts, completions, **columns):
        if solution_column not in columns:
            raise RewardError(f"step_credit reward needs a column {solution_column!r}; got {sorted(columns)}")
        out: list[float | None] = []
        for p, c, ref in zip(prompts, completions, columns[solution_column]):
            reference = _trace_steps(think_text(None, ref), separator) if ref else []
            if not reference:
                out.append(None)
                continue
            out.append(step_credit_values(_trace_steps(think_text(p, c), separator), reference))
        return out

    return fn
