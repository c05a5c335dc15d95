import pytest
import torch

from posttrain.core.logprobs import entropy_from_logits, logprobs_from_logits
from posttrain.errors import ConfigError, DataError


def _reference(logits, tokens, tau):
    return torch.log_softmax(logits.double() / tau, -1).gather(-1, tokens[..., None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1024])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_logprobs_match_plain_log_softmax(chunk, tau):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    tokens = torch.randint(0, 11, (3, 5))
    out = logprobs_from_logits(logits, tokens, temperature=tau, chunk_size=chunk)
    assert out.shape == (3, 5)
    assert torch.allclose(out.double(), _reference(logits, tokens, tau), atol=1e-5)


def test_logprobs_gradient_matches_autograd_and_gradcheck():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 6, (2, 4))
    assert torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, tokens, 0.8, chunk_size=3), (logits,))
    w = torch.randn(2, 4, dtype=torch.float64)
    (g1,) = torch.autograd.grad((logprobs_from_logits(logits, tokens, 0.8, 3) * w).sum(), logits)
    (g2,) = torch.autograd.grad((_reference(logits, tokens, 0.8) * w).sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-10)


def test_entropy_values_and_gradcheck():
    uniform = torch.zeros(1, 2, 8)
    assert torch.allclose(entropy_from_logits(uniform), torch.full((1, 2), torch.log(torch.tensor(8.0))))
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    p = torch.softmax(logits / 1.3, -1)
    ref = -(p * p.log()).sum(-1)
    assert torch.allclose(entropy_from_logits(logits, 1.3, chunk_size=2), ref)
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, 1.3, chunk_size=4), (logits,))


def test_bf16_logits_safe():
    torch.manual_seed(3)
    logits = (torch.randn(2, 4, 50) * 30).bfloat16().requires_grad_()
    tokens = torch.randint(0, 50, (2, 4))
    out = logprobs_from_logits(logits, tokens)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and (out <= 0).all()
    assert torch.allclose(out.double(), _reference(logits.float(), tokens, 1.0), atol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()
    assert torch.isfinite(entropy_from_logits(logits)).all()


def test_bad_inputs():
    with pytest.raises(DataError, match="tokens shape"):
        logprobs_from_logits(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="temperature"):
        logprobs_from_logits(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), temperature=0)
