import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.engines.batching import build_sequences
from posttrain.engines.logprobs import sequence_logprobs, sequence_values
from posttrain.engines.models import build_value_model
from posttrain.errors import DataError, ModelError

PAD = 0


def _rows():
    prompts = [[1, 3, 10, 11], [1, 12], [1, 3, 40]]
    responses = [[20, 21, 2], [22, 23, 24, 25], [30]]
    T = max(map(len, responses))
    resp = torch.tensor([r + [PAD] * (T - len(r)) for r in responses])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (T - len(r)) for r in responses])
    return prompts, responses, resp, mask


def test_build_sequences_layout_by_hand():
    prompts, _, resp, mask = _rows()
    b = build_sequences(prompts, resp, mask, PAD)
    assert b.response_start == 4
    assert b.input_ids.tolist() == [
        [1, 3, 10, 11, 20, 21, 2, 0],
        [0, 0, 1, 12, 22, 23, 24, 25],
        [0, 1, 3, 40, 30, 0, 0, 0],
    ]
    assert b.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 1, 1, 0],
        [0, 0, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 0, 0, 0],
    ]
    assert b.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 5, 6, 0],
        [0, 0, 0, 1, 2, 3, 4, 5],
        [0, 0, 1, 2, 3, 0, 0, 0],
    ]
    assert torch.equal(b.response_ids[:, :1], resp[:, :1])
    assert torch.equal(b.response_mask, mask)


def test_holes_in_mask_stay_attended():
    b = build_sequences([[1, 2]], torch.tensor([[5, 6, 7, 8]]), torch.tensor([[1.0, 0.0, 1.0, 0.0]]), PAD)
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0]]
    assert b.input_ids.tolist() == [[1, 2, 5, 6, 7, 0]]


def test_build_sequences_errors():
    with pytest.raises(DataError, match="prompt 1 is empty"):
        build_sequences([[1], []], torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), PAD)
    with pytest.raises(DataError, match="2 prompts for 3 responses"):
        build_sequences([[1], [2]], torch.zeros(3, 3, dtype=torch.long), torch.ones(3, 3), PAD)


def _reference_logprobs(model, prompts, responses, temperature):
    """One unpadded full forward per row, log-softmax over the whole vocab."""
    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = model(ids).logits[0] / temperature  # [L, V]
        logp = logits.log_softmax(-1)
        out.append([logp[len(p) - 1 + t, r[t]].item() for t in range(len(r))])
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_unpadded_forward(tiny_model, temperature):
    prompts, responses, resp, mask = _rows()
    b = build_sequences(prompts, resp, mask, PAD)
    lp, ent = sequence_logprobs(
        tiny_model, b, temperature=temperature, return_entropy=True, micro_batch_size=2
    )
    ref = _reference_logprobs(tiny_model, prompts, responses, temperature)
    for i, row in enumerate(ref):
        torch.testing.assert_close(lp[i, : len(row)], torch.tensor(row), atol=1e-5, rtol=0)
    assert lp.shape == ent.shape == mask.shape and lp.dtype == torch.float32
    assert not lp.requires_grad
    # entropy by hand for row 1, first response position
    with torch.no_grad():
        logits = (
            tiny_model(torch.tensor([prompts[1] + responses[1]])).logits[0, len(prompts[1]) - 1] / temperature
        )
    p = logits.softmax(-1)
    torch.testing.assert_close(ent[1, 0], -(p * p.log()).sum(), atol=1e-5, rtol=0)


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 3), st.integers(1, 10))
def test_micro_batch_size_does_not_change_results(mbs, budget_rows):
    torch.manual_seed(0)
    from posttrain.engines.models import build_preset

    model = build_preset("tiny", 64, num_hidden_layers=1).eval()
    prompts, _, resp, mask = _rows()
    b = build_sequences(prompts, resp, mask, PAD)
    full, _ = sequence_logprobs(model, b, micro_batch_size=3)
    part, _ = sequence_logprobs(model, b, micro_batch_size=mbs)
    auto, _ = sequence_logprobs(model, b, max_logit_elements=budget_rows * 4 * 64)
    torch.testing.assert_close(part, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(auto, full, atol=1e-6, rtol=0)


def test_with_grad_backpropagates(tiny_model):
    prompts, _, resp, mask = _rows()
    b = build_sequences(prompts, resp, mask, PAD)
    lp, _ = sequence_logprobs(tiny_model, b, with_grad=True)
    (lp * mask).sum().backward()
    grad = tiny_model.model.embed_tokens.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # the padding token's embedding never receives gradient: padding is not attended
    assert grad[PAD].abs().sum() == 0


def test_bad_temperature():
    with pytest.raises(ModelError, match="temperature"):
        sequence_logprobs(
            torch.nn.Linear(1, 1),
            build_sequences([[1]], torch.ones(1, 1).long(), torch.ones(1, 1), 0),
            temperature=0,
        )


def test_values_alignment(tiny_model):
    torch.manual_seed(0)
    vm = build_value_model(tiny_model)
    prompts, responses, resp, mask = _rows()
    b = build_sequences(prompts, resp, mask, PAD)
    values = sequence_values(vm, b, micro_batch_size=2)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            full = vm(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])[0]  # [L]
        # value before response token t = value at the prompt's last token + t
        torch.testing.assert_close(
            values[i, : len(r)], full[len(p) - 1 : len(p) - 1 + len(r)], atol=1e-5, rtol=0
        )


def test_gradient_matches_naive_full_forward(tiny_model):
    prompts, responses, resp, mask = _rows()
    b = build_sequences(prompts, resp, mask, PAD)
    lp, ent = sequence_logprobs(
        tiny_model, b, with_grad=True, return_entropy=True, temperature=0.9, micro_batch_size=2
    )
    ((lp + 0.1 * ent) * mask).sum().backward()
    ours = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    total = 0.0
    for p, r in zip(prompts, responses):  # unpadded rows, full-vocab log-softmax
        logits = tiny_model(torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) - 1 + len(r)] / 0.9
        logp = logits.log_softmax(-1)
        total = total + logp.gather(-1, torch.tensor(r)[:, None]).sum() - 0.1 * (logp.exp() * logp).sum()
    total.backward()
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_tiny_model_learns_through_sequence_logprobs(char_tok):
    """A few Adam steps on log-likelihood raise the response log-prob a lot (learning works)."""
    from posttrain.engines.models import build_preset

    torch.manual_seed(0)
    model = build_preset("tiny", len(char_tok))
    prompt = char_tok.encode("7*6=", add_special_tokens=False)
    answer = char_tok.encode("<think>7*6=42</think><answer>42</answer>", add_special_tokens=False)
    b = build_sequences([prompt], torch.tensor([answer]), torch.ones(1, len(answer)), char_tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        lp, _ = sequence_logprobs(model, b, with_grad=True)
        loss = -lp.mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final, _ = sequence_logprobs(model, b)
    assert first > 4.0 and -final.mean().item() < 0.5 * first
