"""Which prompts to train on, and when: curriculum, success-rate sampling, filters.

- `Curriculum`: easy → hard by difficulty label, a schedule over training steps (Kimi
  k1.5 trains from easy to hard).
- `SuccessRateSampler`: Kimi k1.5's prioritized sampling, P(prompt) ∝ 1 − success rate,
  with prompts that are consistently solved retired from sampling.
- `difficulty_filter`: keep prompts a model fails in all k samples (Kimi k1.5 / Qwen3
  best-of-8 filtering), model-agnostic through a success-counting callable.
- `decontaminate`: overlaps between training and evaluation prompts (exact, whitespace-
  and case-normalized, and word n-gram), reported for removal.

All sampling is deterministic given a seed and the number of draws so far, so resuming
from `state_dict()` reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from posttrain.errors import ConfigError, DataError

T = TypeVar("T")


def _weighted_sample(rng: random.Random, keys: list, weights: list[float], n: int, replace: bool) -> list:
    """`n` keys drawn ∝ weights (all > 0). Without replacement: Efraimidis–Spirakis keys.

    Without replacement and `n` > len(keys), every key is taken once (in weighted-random
    order) and the rest are drawn with replacement, so a batch is always full.
    """
    if replace:
        return rng.choices(keys, weights=weights, k=n)
    # u^(1/w) ranks items so that the first m form a weighted sample without replacement.
    ranked = sorted(zip(keys, weights), key=lambda kw: rng.random() ** (1.0 / kw[1]), reverse=True)
    taken = [k for k, _ in ranked[:n]]
    if n > len(taken):
        taken += rng.choices(keys, weights=weights, k=n - len(taken))
    return taken


# --------------------------------------------------------------------------------------
# Curriculum
# --------------------------------------------------------------------------------------
class Curriculum:
    """Easy → hard over training steps, by each item's difficulty label.

    The sorted distinct labels L_0 < … < L_{K-1} are opened one stage at a time: at step s
    the stage is k(s) = min(K − 1, ⌊K · s / (ramp_fraction · total_steps)⌋), so the first
    `ramp_fraction` of training walks through the levels in equal stages and the rest
    trains at the last one.

    difficulties: one label per item (index i ↔ item i), e.g. [ex.difficulty for ex in examples].
    total_steps: training steps the schedule spans.
    ramp_fraction: share of `total_steps` spent reaching the hardest level, in (0, 1].
    mode: "cumulative" samples from every level ≤ the current one (no forgetting);
        "staged" samples only the current level.
    seed: sampling seed; `sample(step, n)` depends only on (seed, step), so resuming needs
        no state beyond the constructor arguments.
    """

    def __init__(
        self,
        difficulties: Sequence[int],
        total_steps: int,
        *,
        ramp_fraction: float = 0.8,
        mode: str = "cumulative",
        seed: int = 0,
    ):
        if not difficulties:
            raise DataError("curriculum: no items")
        if total_steps < 1:
            raise ConfigError(f"curriculum: total_steps must be >= 1, got {total_steps}")
        if not 0.0 < ramp_fraction <= 1.0:
            raise ConfigError(f"curriculum: ramp_fraction must be in (0, 1], got {ramp_fraction}")
        if mode not in ("cumulative", "staged"):
            raise ConfigError(f"curriculum: mode must be 'cumulative' or 'staged', got {mode!r}")
        self.difficulties = list(difficulties)
        self.levels = sorted(set(self.difficulties))
        self.total_steps = total_steps
        self.ramp_fraction = ramp_fraction
        self.mode = mode
        self.seed = seed
        self._by_level: dict[int, list[int]] = defaultdict(list)
        for i, d in enumerate(self.difficulties):
            self._by_level[d].append(i)

    def stage(self, step: int) -> int:
        """Index into `levels` of the hardest level open at `step`."""
        k = len(self.levels)
        return min(k - 1, int(k * step / (self.ramp_fraction * self.total_steps)))

    def level(self, step: int) -> int:
        """The hardest difficulty label open at `step`."""
        return self.levels[self.stage(step)]

    def eligible(self, step: int) -> list[int]:
        """Indices of the items that may be sampled at `step`, in index order."""
        stage = self.stage(step)
        open_levels = self.levels[: stage + 1] if self.mode == "cumulative" else [self.levels[stage]]
        return sorted(i for lvl in open_levels for i in self._by_level[lvl])

    def sample(self, step: int, n: int, *, replace: bool = False) -> list[int]:
        """`n` item indices for `step`, uniform over the eligible items."""
        pool = self.eligible(step)
        rng = random.Random(f"curriculum:{self.seed}:{step}")
        return _weighted_sample(rng, pool, [1.0] * len(pool), n, replace)


# --------------------------------------------------------------------------------------
# Kimi k1.5 success-rate sampling
# --------------------------------------------------------------------------------------
class SuccessRateSampler:
    """Sample prompts ∝ (1 − success rate); retire prompts that are consistently solved.

    Kimi k1.5 (§2.3.4 "prioritized sampling"): track each problem's success rate s_i and
    sample it with probability ∝ 1 − s_i, so solved problems stop using compute.

    ids: the prompt ids (unique), e.g. row["id"].
    prior_success: success rate assumed for a prompt never attempted (0 → full weight).
    decay: each update first multiplies a prompt's past counts by `decay`, so s_i is an
        exponentially weighted rate; 1.0 is the plain cumulative rate (the paper's).
    retire_threshold / min_attempts: a prompt with at least `min_attempts` (decayed)
        attempts and s_i ≥ retire_threshold is retired for good (never sampled again);
        a threshold above 1 disables retirement.
    exhausted: what `sample` does when every candidate is retired: "reset" un-retires all
        prompts and forgets their counts (a fresh pass), "error" raises DataError.
    seed: sampling seed; draw t uses an RNG seeded by (seed, t), so `state_dict()` (counts,
        retirements, draw counter) restores the exact sequence.

    Deviation: when all candidates have weight 0 but are not retired (s_i = 1 below
    `min_attempts`), they are sampled uniformly rather than not at all.
    """

    def __init__(
        self,
        ids: Sequence[str],
        *,
        prior_success: float = 0.0,
        decay: float = 1.0,
        retire_threshold: float = 1.0,
        min_attempts: float = 1.0,
        exhausted: str = "reset",
        seed: int = 0,
    ):
        ids = list(ids)
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"success-rate sampler: prompt id {dup!r} appears more than once")
        if not 0.0 <= prior_success <= 1.0:
            raise ConfigError(f"success-rate sampler: prior_success must be in [0, 1], got {prior_success}")
        if not 0.0 < decay <= 1.0:
            raise ConfigError(f"success-rate sampler: decay must be in (0, 1], got {decay}")
        if exhausted not in ("reset", "error"):
            raise ConfigError(
                f"success-rate sampler: exhausted must be 'reset' or 'error', got {exhausted!r}"
            )
        self.ids = ids
        self.prior_success = prior_success
        self.decay = decay
        self.retire_threshold = retire_threshold
        self.min_attempts = min_attempts
        self.exhausted = exhausted
        self.seed = seed
        self._index = {pid: i for i, pid in enumerate(ids)}
        self.attempts = [0.0] * len(ids)
        self.successes = [0.0] * len(ids)
        self.retired: set[str] = set()
        self.draws = 0

    def success_rate(self, pid: str) -> float:
        """s_i: decayed successes / decayed attempts, or `prior_success` before any attempt."""
        i = self._lookup(pid)
        return self.successes[i] / self.attempts[i] if self.attempts[i] > 0 else self.prior_success

    def _lookup(self, pid: str) -> int:
        try:
            return self._index[pid]
        except KeyError:
            raise DataError(f"success-rate sampler: unknown prompt id {pid!r}") from None

    def update(self, ids: Sequence[str], successes: Sequence[float]) -> None:
        """Record outcomes; ids may repeat (G samples of one prompt → G entries).

        successes: per entry, 1/True for solved, 0/False for failed, or a fraction in [0, 1].
        """
        if len(ids) != len(successes):
            raise DataError(f"success-rate sampler: {len(ids)} ids but {len(successes)} successes")
        grouped: dict[int, list[float]] = defaultdict(list)
        for pid, s in zip(ids, successes):
            s = float(s)
            if not 0.0 <= s <= 1.0:
                raise DataError(f"success-rate sampler: success {s} for {pid!r} is outside [0, 1]")
            grouped[self._lookup(pid)].append(s)
        for i, outcomes in grouped.items():
            self.attempts[i] = self.decay * self.attempts[i] + len(outcomes)
            self.successes[i] = self.decay * self.successes[i] + sum(outcomes)
            rate = self.successes[i] / self.attempts[i]
            if self.attempts[i] >= self.min_attempts and rate >= self.retire_threshold:
                self.retired.add(self.ids[i])

    def weight(self, pid: str) -> float:
        """Unnormalized sampling weight 1 − s_i; 0 for a retired prompt."""
        return 0.0 if pid in self.retired else 1.0 - self.success_rate(pid)

    def probabilities(self, candidates: Sequence[str] | None = None) -> dict[str, float]:
        """The distribution `sample` draws from, over `candidates` (default: all ids)."""
        pool = [p for p in (self.ids if candidates is None else candidates) if p not in self.retired]
        weights = [self.weight(p) for p in pool]
        total = sum(weights)
        if not pool:
            return {}
        if total <= 0:
            return {p: 1.0 / len(pool) for p in pool}
        return {p: w / total for p, w in zip(pool, weights)}

    def sample(self, n: int, *, candidates: Sequence[str] | None = None, replace: bool = False) -> list[str]:
        """`n` prompt ids ∝ 1 − success rate among non-retired `candidates` (default all).

        candidates: restrict the draw, e.g. to a curriculum's eligible items.
        replace: with replacement; without it a batch holds distinct prompts while enough
            have positive weight, then repeats.
        """
        probs = self.probabilities(candidates)
        if not probs:
            if self.exhausted == "error":
                raise DataError("success-rate sampler: every candidate prompt is retired (solved)")
            self.retired.clear()
            self.attempts = [0.0] * len(self.ids)
            self.successes = [0.0] * len(self.ids)
            probs = self.probabilities(candidates)
            if not probs:
                raise DataError("success-rate sampler: no candidate prompts")
        keys = [p for p, w in probs.items() if w > 0]
        rng = random.Random(f"success-rate:{self.seed}:{self.draws}")
        self.draws += 1
        return _weighted_sample(rng, keys, [probs[k] for k in keys], n, replace)

    def state_dict(self) -> dict:
        """JSON-serialisable state: counts, retirements, and the draw counter."""
        return {
            "ids": list(self.ids),
            "attempts": list(self.attempts),
            "successes": list(self.successes),
            "retired": sorted(self.retired),
            "draws": self.draws,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; the prompt ids must match this sampler's."""
        if list(state["ids"]) != self.ids:
            raise DataError("success-rate sampler: saved state is for a different set of prompt ids")
        self.attempts = [float(x) for x in state["attempts"]]
        self.successes = [float(x) for x in state["successes"]]
        self.retired = set(state["retired"])
        self.draws = int(state["draws"])


# --------------------------------------------------------------------------------------
# Best-of-k difficulty filter
# --------------------------------------------------------------------------------------
@dataclass
class FilterResult(Generic[T]):
    """kept: items that passed; counts: successes out of k for every input item (in order)."""

    kept: list[T]
    counts: list[int]
    kept_indices: list[int] = field(default_factory=list)


def difficulty_filter(
    items: Sequence[T],
    count_successes: Callable[[Sequence[T], int], Sequence[int]],
    *,
    k: int = 8,
    min_successes: int = 0,
    max_successes: int = 0,
) -> FilterResult[T]:
    """Keep items whose success count over k samples lies in [min_successes, max_successes].

    Kimi k1.5 / Qwen3: sample k = 8 answers per problem from the SFT model and keep only the
    problems it fails every time (the default, counts == 0), so RL spends compute on
    unsolved problems. Setting max_successes = k − 1 instead drops only always-solved ones.

    count_successes(items, k) -> one count in 0..k per item: the model-specific part
    (sample k completions per prompt, verify them). Keeps this function model-agnostic.
    """
    if k < 1:
        raise ConfigError(f"difficulty filter: k must be >= 1, got {k}")
    if not 0 <= min_successes <= max_successes <= k:
        raise ConfigError(
            f"difficulty filter: need 0 <= min_successes <= max_successes <= k, got {min_successes}, {max_successes}, k={k}"
        )
    counts = list(count_successes(items, k))
    if len(counts) != len(items):
        raise DataError(
            f"difficulty filter: count_successes returned {len(counts)} counts for {len(items)} items"
        )
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= k:
            raise DataError(f"difficulty filter: item {i} has success count {c!r}, expected an int in 0..{k}")
    kept_indices = [i for i, c in enumerate(counts) if min_successes <= c <= max_successes]
    return FilterResult(kept=[items[i] for i in kept_indices], counts=counts, kept_indices=kept_indices)


# --------------------------------------------------------------------------------------
# Decontamination
# --------------------------------------------------------------------------------------
def normalize_text(text: str, *, casefold: bool = True) -> str:
    """Whitespace runs collapsed to one space, ends stripped, optionally case-folded."""
    text = " ".join(text.split())
    return text.casefold() if casefold else text


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of already-normalized text (empty when it has fewer than n words)."""
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass
class Overlap:
    """One contaminated pair: how they match ("exact" | "normalized" | "ngram") and evidence."""

    train_index: int
    eval_index: int
    kind: str
    shared: str


@dataclass
class DecontaminationReport:
    """All overlaps found; each train item is reported once, with its strongest match."""

    overlaps: list[Overlap]
    n_train: int
    n_eval: int

    @property
    def contaminated_train(self) -> list[int]:
        """Indices of training prompts with an overlap (the ones to drop)."""
        return sorted({o.train_index for o in self.overlaps})

    @property
    def contaminated_eval(self) -> list[int]:
        """Indices of eval prompts that some training prompt overlaps."""
        return sorted({o.eval_index for o in self.overlaps})

    @property
    def clean_train(self) -> list[int]:
        """Indices of the training prompts with no overlap (the ones to keep)."""
        bad = set(self.contaminated_train)
        return [i for i in range(self.n_train) if i not in bad]

    def counts(self) -> dict[str, int]:
        """Number of overlapping training prompts per match kind."""
        out = {"exact": 0, "normalized": 0, "ngram": 0}
        for o in self.overlaps:
            out[o.kind] += 1
        return out

    def summary(self) -> str:
        """One line for logs/reports."""
        c = self.counts()
        return (
            f"{len(self.contaminated_train)} of {self.n_train} training prompts overlap "
            f"{len(self.contaminated_eval)} of {self.n_eval} eval prompts "
            f"(exact {c['exact']}, normalized {c['normalized']}, n-gram {c['ngram']})"
        )


def decontaminate(
    train_prompts: Sequence[str],
    eval_prompts: Sequence[str],
    *,
    ngram: int | None = 13,
    casefold: bool = True,
) -> DecontaminationReport:
    """Find training prompts that overlap evaluation prompts.

    Three tests, strongest first; a train prompt is reported with the first that hits
    (against the lowest-index eval prompt that matches it):
      exact: identical strings;
      normalized: identical after collapsing whitespace (and case-folding, `casefold`);
      ngram: they share a word `ngram`-gram after normalization (13-grams as in GPT-3's
        contamination study); None skips this test. Prompts shorter than `ngram` words
        can only match by the first two tests. Templated prompts (e.g. the word-problem
        task) share long template n-grams, so for them the n-gram test reports template
        reuse, not leaked problems: use exact/normalized (ngram=None) there.
    Cost: O(total words) with hash lookups, no pairwise comparison.
    """
    if ngram is not None and ngram < 1:
        raise ConfigError(f"decontaminate: ngram must be >= 1, got {ngram}")
    exact: dict[str, int] = {}
    normalized: dict[str, int] = {}
    grams: dict[tuple[str, ...], int] = {}
    for j, text in enumerate(eval_prompts):
        exact.setdefault(text, j)
        norm = normalize_text(text, casefold=casefold)
        normalized.setdefault(norm, j)
        for g in word_ngrams(norm, ngram) if ngram else ():
            grams.setdefault(g, j)
    overlaps = []
    for i, text in enumerate(train_prompts):
        if text in exact:
            overlaps.append(Overlap(i, exact[text], "exact", text))
            continue
        norm = normalize_text(text, casefold=casefold)
        if norm in normalized:
            overlaps.append(Overlap(i, normalized[norm], "normalized", norm))
            continue
        hits = [(grams[g], g) for g in (word_ngrams(norm, ngram) if ngram else ()) if g in grams]
        if hits:
            j, g = min(hits)
            overlaps.append(Overlap(i, j, "ngram", " ".join(g)))
    return DecontaminationReport(overlaps=overlaps, n_train=len(train_prompts), n_eval=len(eval_prompts))


__all__ = [
    "Curriculum",
    "DecontaminationReport",
    "FilterResult",
    "Overlap",
    "SuccessRateSampler",
    "decontaminate",
    "difficulty_filter",
    "normalize_text",
    "word_ngrams",
]
