import math
from itertools import combinations

import pytest
import torch

from posttrain.core.distill import (
    anneal,
    forward_kl_from_logits,
    generalized_jsd_from_logits,
    kdrl_kd_mask,
    reverse_kl_from_logits,
    reverse_kl_tokens,
)
from posttrain.core.evaluation import maj_at_k, majority_answer, pass_at_k
from posttrain.errors import ConfigError, DataError


def test_reverse_kl_tokens_is_unbiased_for_exact_reverse_kl():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(1, 1, 5, dtype=torch.float64), torch.randn(1, 1, 5, dtype=torch.float64)
    ps = torch.softmax(s_logits, -1)[0, 0]
    n = 100_000
    x = torch.multinomial(ps, n, replacement=True, generator=torch.Generator().manual_seed(0))
    est = reverse_kl_tokens(
        torch.log_softmax(s_logits, -1)[0, 0][x][None], torch.log_softmax(t_logits, -1)[0, 0][x][None]
    )
    exact = reverse_kl_from_logits(s_logits, t_logits).item()
    assert abs(est.mean().item() - exact) < 5 * est.std().item() / math.sqrt(n)


def test_forward_reverse_jsd_hand_values():
    # two-token vocab: student p=(0.5,0.5), teacher q=(0.9,0.1)
    s = torch.log(torch.tensor([[[0.5, 0.5]]], dtype=torch.float64))
    t = torch.log(torch.tensor([[[0.9, 0.1]]], dtype=torch.float64))
    fwd = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    rev = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert forward_kl_from_logits(s, t).item() == pytest.approx(fwd)
    assert reverse_kl_from_logits(s, t).item() == pytest.approx(rev)
    m = (0.7, 0.3)  # beta 0.5 mixture
    jsd = 0.5 * (0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    assert generalized_jsd_from_logits(s, t, beta=0.5).item() == pytest.approx(jsd)
    assert generalized_jsd_from_logits(s, t, beta=0.5).item() <= math.log(2)
    # JSD(beta)/beta -> forward KL as beta -> 0
    assert generalized_jsd_from_logits(s, t, beta=1e-5).item() / 1e-5 == pytest.approx(fwd, rel=1e-3)
    with pytest.raises(ConfigError, match="beta"):
        generalized_jsd_from_logits(s, t, beta=1.0)


def test_divergence_gradients_only_reach_student():
    torch.manual_seed(1)
    s = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    for fn in (
        forward_kl_from_logits,
        reverse_kl_from_logits,
        lambda a, b: generalized_jsd_from_logits(a, b, 0.3),
    ):
        fn(s, t).sum().backward()
    assert t.grad is None and torch.isfinite(s.grad).all()
    assert torch.autograd.gradcheck(lambda z: generalized_jsd_from_logits(z, t.detach(), 0.3), (s,))


def test_kdrl_mask_and_anneal():
    assert kdrl_kd_mask(torch.tensor([1.0, 0.0, 0.5]), 1.0).tolist() == [False, True, True]
    assert anneal(0, 1.0, 0.1, 100) == pytest.approx(1.0)
    assert anneal(50, 1.0, 0.1, 100) == pytest.approx(0.55)
    assert anneal(500, 1.0, 0.1, 100) == pytest.approx(0.1)
    assert anneal(50, 1.0, 0.0, 100, kind="cosine") == pytest.approx(0.5)
    assert anneal(25, 1.0, 0.0, 100, kind="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert anneal(3, 1.0, 0.2, 0) == 0.2
    with pytest.raises(ConfigError, match="kind"):
        anneal(1, 1.0, 0.0, 10, kind="exp")


def test_pass_at_k_against_enumeration():
    for n, c, k in [(5, 2, 1), (5, 2, 2), (6, 1, 3), (4, 0, 2), (4, 4, 1), (7, 3, 5)]:
        samples = [1] * c + [0] * (n - c)
        subsets = list(combinations(range(n), k))
        brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    vec = pass_at_k(torch.tensor([5, 6, 4]), torch.tensor([2, 1, 0]), 2)
    assert torch.allclose(
        vec, torch.tensor([pass_at_k(5, 2, 2), pass_at_k(6, 1, 2), 0.0], dtype=torch.float64)
    )
    assert pass_at_k(200, 100, 100) == pytest.approx(1.0)
    with pytest.raises(DataError, match="k <= n"):
        pass_at_k(3, 1, 5)


def test_maj_at_k():
    answers = [["4", "4", "5", None], ["7", "8", "8", "8"], [None, None, None, None], ["1", "2", "2", "1"]]
    labels = ["4", "7", "3", "1"]
    assert maj_at_k(answers, labels) == pytest.approx(2 / 4)  # tie in the last goes to "1" (first seen)
    assert maj_at_k(answers, labels, k=1) == pytest.approx(3 / 4)
    assert maj_at_k(answers, correct_fn=lambda a, i: int(a) % 2 == 0) == pytest.approx(2 / 4)
    assert majority_answer(["b", "a", "a", "b"]) == "b"
    with pytest.raises(DataError, match="k=9"):
        maj_at_k(answers, labels, k=9)
    with pytest.raises(ConfigError, match="exactly one"):
        maj_at_k(answers)
