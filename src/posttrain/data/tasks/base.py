"""The contract every synthetic verifiable task follows.

A task turns a seed into examples. Solutions use the R1 format that the char tokenizer
knows as special tokens: ``<think>{reasoning steps}</think><answer>{answer}</answer>``.

Reasoning steps inside ``<think>`` are joined with `STEP_SEPARATOR` ("; ") in every task,
so a process reward model can score the token that ends each step. No step text ever
contains the separator.

Train/test splits are derived from a hash of each problem's canonical key (not from the
seed), so a problem lands in the same split whatever the seed, difficulty or call order:
the splits are disjoint by construction, across seeds too.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass, field

from posttrain.errors import ConfigError, DataError

STEP_SEPARATOR = "; "
SPLITS = ("train", "test")

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass
class Example:
    """One task instance.

    id: unique within one `Task.examples` call ("arithmetic-train-000042").
    prompt: the question as the user would ask it (no chat template applied).
    answer: the ground-truth final answer, as a string ("42", "3/4", "1 2 3"); for
        countdown, where many expressions are right, it encodes the problem instead
        ("24 from 3 4 2"), which is what that task's verifier needs.
    difficulty: 1 (easiest) .. task's max level.
    solution: a correct reference solution in <think>..</think><answer>..</answer> form.
    wrong_solution: a plausible incorrect solution in the same form (for preference pairs).
    steps: the reasoning steps of `wrong_solution`'s trace, in order (joined by
        STEP_SEPARATOR inside its <think>).
    step_labels: per step of `steps`, True while the reasoning is still correct
        (PRM training data; the first False marks the first wrong step, and every
        later step is False too).
    solution_steps: the reasoning steps of `solution` (all correct: label them True).
    """

    id: str
    prompt: str
    answer: str
    difficulty: int
    solution: str
    wrong_solution: str
    steps: list[str] = field(default_factory=list)
    step_labels: list[bool] = field(default_factory=list)
    solution_steps: list[str] = field(default_factory=list)

    def to_row(self) -> dict:
        """All fields as a plain dict (JSON-serialisable)."""
        return asdict(self)


@dataclass
class Problem:
    """What a task's generator returns for one drawn problem (internal to tasks).

    key: canonical identity of the problem; the split is a hash of it, and two problems
        with the same key must render to the same prompt up to cosmetic choices.
    steps / wrong_steps: correct trace and the trace with a slip; wrong_labels marks
        the slip's step and every later one False.
    """

    key: str
    prompt: str
    answer: str
    final: str
    steps: list[str]
    wrong_steps: list[str]
    wrong_labels: list[bool]
    wrong_final: str


def format_solution(steps: list[str], final: str) -> str:
    """Render steps and a final answer as ``<think>s1; s2</think><answer>final</answer>``."""
    return f"<think>{STEP_SEPARATOR.join(steps)}</think><answer>{final}</answer>"


def extract_answer(completion: str) -> str | None:
    """The text of the last ``<answer>…</answer>`` in `completion`, stripped; None if absent.

    The last one counts because a model may restate a draft answer while reasoning; a
    completion that never closes the tag has no answer.
    """
    found = _ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def split_of(task_name: str, key: str, test_fraction: float) -> str:
    """ "train" or "test" for a canonical problem key, from a SHA-256 hash.

    The hash is uniform in [0, 1); keys below `test_fraction` go to test.
    """
    digest = hashlib.sha256(f"{task_name}|{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test_fraction else "train"


class Task:
    """Base class: a seeded generator of verifiable problems with difficulty levels.

    Subclasses set `name`, `max_difficulty` and implement `generate(rng, difficulty)`
    and `check(predicted, answer)`.

    test_fraction: share of the problem space reserved for the test split (by key hash).
    max_misses: consecutive draws that produce nothing new for the split before the
        problem space counts as exhausted (then examples repeat, see `examples`).
    """

    name: str = "task"
    max_difficulty: int = 1

    def __init__(self, *, test_fraction: float = 0.2, max_misses: int = 4000):
        if not 0.0 < test_fraction < 1.0:
            raise ConfigError(f"task {self.name!r}: test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction
        self.max_misses = max_misses

    # -- to implement -------------------------------------------------------------------
    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """Draw one problem of level `difficulty` using only `rng` (so seeds reproduce it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement generate()")

    def check(self, predicted: str, answer: str) -> bool:
        """Whether the extracted answer text `predicted` is right for ground truth `answer`."""
        raise NotImplementedError(f"{type(self).__name__} must implement check()")

    # -- shared behaviour ---------------------------------------------------------------
    def examples(self, split: str, n: int, seed: int = 0, difficulty: int | None = None) -> list[Example]:
        """`n` examples of `split`, deterministic in (task options, split, n, seed, difficulty).

        difficulty: a level in 1..max_difficulty, or None for a uniform mix of all levels
            (each example carries its own `difficulty`, e.g. for a curriculum).
        Distinct problems are drawn until `n` are found; when the split's problem space is
        smaller than `n` (tiny levels such as one-digit sums), the distinct problems repeat
        in order to fill `n` — ids stay unique, prompts then do not.
        """
        if split not in SPLITS:
            raise ConfigError(f"task {self.name!r}: split must be 'train' or 'test', got {split!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ConfigError(f"task {self.name!r}: n must be a non-negative int, got {n!r}")
        if difficulty is not None and (
            isinstance(difficulty, bool)
            or not isinstance(difficulty, int)
            or not 1 <= difficulty <= self.max_difficulty
        ):
            raise ConfigError(
                f"task {self.name!r}: difficulty must be 1..{self.max_difficulty} or None, got {difficulty!r}"
            )
        rng = random.Random(f"{self.name}:{seed}:{split}:{difficulty}")
        problems: list[tuple[int, Problem]] = []
        seen: set[str] = set()
        misses = 0
        while len(problems) < n and misses < self.max_misses:
            level = difficulty if difficulty is not None else rng.randint(1, self.max_difficulty)
            p = self.generate(rng, level)
            if p.key in seen or split_of(self.name, p.key, self.test_fraction) != split:
                misses += 1
                continue
            misses = 0
            seen.add(p.key)
            problems.append((level, p))
        if n and not problems:
            raise DataError(f"task {self.name!r}: no {split} problems at difficulty {difficulty}")
        out = []
        for i in range(n):
            level, p = problems[i % len(problems)]
            out.append(
                Example(
                    id=f"{self.name}-{split}-{i:06d}",
                    prompt=p.prompt,
                    answer=p.answer,
                    difficulty=level,
                    solution=format_solution(p.steps, p.final),
                    wrong_solution=format_solution(p.wrong_steps, p.wrong_final),
                    steps=list(p.wrong_steps),
                    step_labels=list(p.wrong_labels),
                    solution_steps=list(p.steps),
                )
            )
        return out

    def score(self, completion: str, answer: str) -> float:
        """1.0 if the ``<answer>`` in `completion` is correct for `answer`, else 0.0.

        A completion without an ``<answer>…</answer>`` scores 0.0. A malformed `answer`
        (ground truth) is a data bug and raises DataError.
        """
        predicted = extract_answer(completion)
        if predicted is None:
            return 0.0
        return 1.0 if self.check(predicted, answer) else 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, max_difficulty={self.max_difficulty})"
