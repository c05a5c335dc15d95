"""TRPO's natural step (study guide §4.1) against hand arithmetic and an explicit Fisher matrix."""

import pytest
import torch

from posttrain.core.trpo import conjugate_gradient, fisher_vector_product, flat, trust_region_step


def test_conjugate_gradient_solves_a_small_system_by_hand():
    # [[4,1,0],[1,3,0],[0,0,2]] x = [1,2,3]: the 2x2 block has det 11 -> x = (1/11, 7/11), x3 = 3/2
    A = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    x = conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), iters=3)
    assert x.tolist() == pytest.approx([1 / 11, 7 / 11, 1.5], abs=1e-9)
    # more iterations than dimensions: the converged answer stays (0/eps guards)
    x10 = conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), iters=10)
    assert x10.tolist() == pytest.approx([1 / 11, 7 / 11, 1.5], abs=1e-9)


def test_trust_region_step_by_hand():
    # F = diag(2, 8), x = (1, 1): xFx = 10; delta 0.05 -> beta = sqrt(0.1 / 10) = 0.1
    F = torch.diag(torch.tensor([2.0, 8.0], dtype=torch.float64))
    x = torch.tensor([1.0, 1.0], dtype=torch.float64)
    s = trust_region_step(x, F @ x, max_kl=0.05)
    assert s.tolist() == pytest.approx([0.1, 0.1])
    assert (0.5 * s @ F @ s).item() == pytest.approx(0.05)  # the quadratic KL model sits at delta
    assert trust_region_step(x, torch.zeros(2, dtype=torch.float64), 0.05).tolist() == [0.0, 0.0]


def _policy_kl(W, W_old, states):
    """Mean over states of KL(softmax(W_old s) || softmax(W s)) for a linear softmax policy."""
    logp_old = torch.log_softmax(states @ W_old.T, -1)  # [S, A]
    logp = torch.log_softmax(states @ W.T, -1)
    return (logp_old.exp() * (logp_old - logp)).sum(-1).mean()


def test_fisher_vector_products_and_cg_match_an_explicit_fisher_matrix():
    """Tiny policy: 3 actions, 2 features, 2 states. F = mean_s Σ_a π(a|s) ∇log π ∇log πᵀ,
    built explicitly from per-action gradients, equals the KL Hessian our products use."""
    torch.manual_seed(0)
    states = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    W_old = torch.randn(3, 2, dtype=torch.float64)
    W = W_old.clone().requires_grad_()
    D = W.numel()
    F = torch.zeros(D, D, dtype=torch.float64)
    for s in states:
        probs = torch.softmax(W_old @ s, -1)
        for a in range(3):
            (grad,) = torch.autograd.grad(torch.log_softmax(W @ s, -1)[a], W)
            F += probs[a] * torch.outer(grad.reshape(-1), grad.reshape(-1)) / len(states)
    kl_grad = flat(torch.autograd.grad(_policy_kl(W, W_old, states), [W], create_graph=True))
    v = torch.randn(D, dtype=torch.float64)
    torch.testing.assert_close(fisher_vector_product(kl_grad, [W], v, damping=0.0), F @ v)
    damping = 0.1
    fvp = lambda u: fisher_vector_product(kl_grad, [W], u, damping)  # noqa: E731
    torch.testing.assert_close(fvp(v), (F + damping * torch.eye(D, dtype=torch.float64)) @ v)
    g = torch.randn(D, dtype=torch.float64)
    x = conjugate_gradient(fvp, g, iters=D)
    torch.testing.assert_close(x, torch.linalg.solve(F + damping * torch.eye(D, dtype=torch.float64), g))
