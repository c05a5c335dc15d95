"""Sampling-based evaluation metrics: unbiased pass@k and majority-vote maj@k."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence

import torch

from posttrain.errors import ConfigError, DataError


def pass_at_k(n: int | torch.Tensor, c: int | torch.Tensor, k: int) -> float | torch.Tensor:
    """Unbiased pass@k (Chen et al. 2021, "Evaluating LLMs Trained on Code", eq. 1):

        pass@k = 1 − C(n−c, k) / C(n, k)

    from n samples of which c are correct: the probability that a random size-k subset
    contains at least one correct sample. Ints use the stable product 1 − Π_{i=n−c+1}^{n}
    (1 − k/i) (no huge binomials); tensors [P] (one entry per problem) use lgamma.
    Args: n samples (n >= k), c correct (0 <= c <= n), k >= 1.
    Returns: float for int inputs, tensor [P] for tensor inputs (average it yourself).
    """
    if k < 1:
        raise ConfigError(f"pass_at_k: k must be >= 1, got {k!r}")
    if isinstance(n, torch.Tensor) or isinstance(c, torch.Tensor):
        n_t = torch.as_tensor(n, dtype=torch.float64)
        c_t = torch.as_tensor(c, dtype=torch.float64)
        if bool((n_t < k).any()) or bool((c_t < 0).any()) or bool((c_t > n_t).any()):
            raise DataError(f"pass_at_k: need k <= n and 0 <= c <= n for every problem (k={k})")
        wrong = n_t - c_t
        log_ratio = (
            torch.lgamma(wrong + 1)
            - torch.lgamma((wrong - k).clamp_min(0) + 1)
            - torch.lgamma(n_t + 1)
            + torch.lgamma(n_t - k + 1)
        )
        return torch.where(wrong < k, torch.ones_like(n_t), 1.0 - torch.exp(log_ratio))
    if not 0 <= c <= n or n < k:
        raise DataError(f"pass_at_k: need k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_answer(answers: Sequence[Hashable | None]) -> Hashable | None:
    """Most frequent non-None answer; ties go to the answer seen first. None if none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def maj_at_k(
    answers: Sequence[Sequence[Hashable | None]],
    labels: Sequence[Hashable] | None = None,
    k: int | None = None,
    *,
    correct_fn: Callable[[Hashable, int], bool] | None = None,
) -> float:
    """maj@k (self-consistency, Wang et al. 2023): per problem, the majority vote over the
    first k extracted answers is scored; returns the fraction of problems it gets right.

    Args:
        answers: per problem, the normalised final answers of its samples (None = no answer
            extracted; abstentions do not vote). P problems x n samples.
        labels: per problem, the reference answer compared with ==. Or give correct_fn.
        k: samples used per problem (default: all; must not exceed any problem's count).
        correct_fn: (majority_answer, problem_index) -> bool, e.g. a math verifier.
    Deviation: the first k samples are used (not an average over all size-k subsets), so
    for k < n the value is an unbiased but higher-variance estimate of maj@k.
    Problems with no answer at all count as wrong. Empty `answers` -> 0.0.
    """
    if (labels is None) == (correct_fn is None):
        raise ConfigError("maj_at_k: give exactly one of labels or correct_fn")
    if labels is not None and len(labels) != len(answers):
        raise DataError(f"maj_at_k: {len(answers)} problems in answers but {len(labels)} labels")
    if not answers:
        return 0.0
    right = 0
    for i, samples in enumerate(answers):
        use = len(samples) if k is None else k
        if use < 1 or use > len(samples):
            raise DataError(f"maj_at_k: problem {i} has {len(samples)} samples, cannot take k={use}")
        vote = majority_answer(samples[:use])
        if vote is None:
            continue
        ok = correct_fn(vote, i) if correct_fn is not None else vote == labels[i]
        right += bool(ok)
    return right / len(answers)
