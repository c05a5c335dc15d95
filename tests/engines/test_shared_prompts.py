"""Shared-prompt scoring (engines/logprobs.py): running each distinct prompt once with a KV
cache must give the numbers and gradients of the full [B, L] forward, for every layout a
GRPO / DPO batch can have."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.engines.batching import build_sequences, group_micro_batches
from posttrain.engines.logprobs import response_hidden, sequence_logprobs, sequence_values
from posttrain.engines.models import build_preset, build_value_model
from posttrain.errors import DataError

PAD, V = 0, 64


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
        return LlamaForCausalLM(cfg).eval()
    return build_preset("tiny", V).eval()


def _batch(group_sizes, prompt_lens, T, seed=0, shuffle=True):
    """Groups of unequal size over prompts of different lengths (left padding), random
    right-padded response lengths, rows shuffled so groups are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in prompt_lens]
    rows = [p for p, k in zip(prompts, group_sizes) for _ in range(k)]
    if shuffle:
        rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
    B = len(rows)
    resp = torch.randint(3, V, (B, T), generator=g)  # [B, T]
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # [B, T]
    return build_sequences(rows, resp, mask, PAD)


class _Calls:
    """Records the [rows, columns] of every decoder forward."""

    def __init__(self, decoder):
        self.shapes = []
        self.handle = decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))

    def close(self):
        self.handle.remove()


def _scores_and_grads(model, batch, share, temperature, **kw):
    model.zero_grad(set_to_none=True)
    calls = _Calls(model.get_decoder())
    lp, ent = sequence_logprobs(
        model, batch, temperature=temperature, return_entropy=True, with_grad=True, share_prompts=share, **kw
    )
    calls.close()
    ((lp + 0.1 * ent) * batch.response_mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent.detach(), grads, calls.shapes


def _assert_same(a, b, mask):
    """Log-probs and entropy equal where the mask counts, gradients equal everywhere."""
    torch.testing.assert_close(a[0] * mask, b[0] * mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(a[1] * mask, b[1] * mask, atol=1e-5, rtol=0)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_equals_full_forward_with_grad(kind, temperature):
    model = _model(kind)
    batch = _batch([3, 1, 4, 2], [5, 9, 7, 9], T=6)
    full = _scores_and_grads(model, batch, False, temperature)
    shared = _scores_and_grads(model, batch, True, temperature)
    # The shared path really ran: 4 distinct prompts once, then 10 rows of T-1 columns.
    assert shared[3] == [(4, 9), (10, 5)] and full[3] == [(10, 14)]
    _assert_same(full, shared, batch.response_mask)


def test_no_shared_prompt_takes_the_full_forward():
    model = _model("qwen2")
    batch = _batch([1, 1, 1], [4, 6, 5], T=5)
    full = _scores_and_grads(model, batch, False, 1.0)
    auto = _scores_and_grads(model, batch, True, 1.0)
    assert auto[3] == full[3] == [(3, 10)]
    _assert_same(full, auto, batch.response_mask)


def test_one_response_token_and_identical_prompts():
    """T = 1 needs only the prompt pass; equal prompt lengths mean no attention mask."""
    model = _model("qwen2")
    batch = _batch([4, 4], [6, 6], T=1)
    full = _scores_and_grads(model, batch, False, 1.0)
    shared = _scores_and_grads(model, batch, True, 1.0)
    assert shared[3] == [(2, 6)]
    _assert_same(full, shared, batch.response_mask)


def test_micro_batches_keep_groups_and_restore_row_order():
    model = _model("qwen2")
    batch = _batch([3, 2, 3, 1], [5, 8, 6, 7], T=4)
    full = _scores_and_grads(model, batch, False, 1.0, micro_batch_size=4)
    shared = _scores_and_grads(model, batch, True, 1.0, micro_batch_size=4)
    # Groups (in order of first appearance) packed into <= 4 rows, never split: every
    # prompt runs exactly once over all micro-batches.
    prompt_rows = sum(r for r, c in shared[3] if c == batch.response_start)
    assert prompt_rows == 4
    _assert_same(full, shared, batch.response_mask)


def test_dpo_pairs_share_their_prompt():
    model = _model("qwen2")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (12, 9, 15)]
    resp = torch.randint(3, V, (6, 4), generator=g)
    mask = torch.tensor(
        [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0.0]]
    )
    batch = build_sequences(prompts * 2, resp, mask, PAD)  # chosen rows, then rejected rows
    full = _scores_and_grads(model, batch, False, 1.0)
    shared = _scores_and_grads(model, batch, True, 1.0)
    assert shared[3][0] == (3, 15)
    _assert_same(full, shared, mask)


def test_values_shared_equals_full():
    torch.manual_seed(0)
    vm = build_value_model(build_preset("tiny", V))
    batch = _batch([3, 2, 4], [6, 9, 4], T=5)
    calls = _Calls(vm.backbone)
    shared = sequence_values(vm, batch, with_grad=True)
    calls.close()
    full = sequence_values(vm, batch, with_grad=True, share_prompts=False)
    assert calls.shapes == [(3, 9), (9, 4)]
    m = batch.response_mask
    torch.testing.assert_close(shared * m, full * m, atol=1e-5, rtol=0)
    (shared * m).sum().backward()
    g_shared = [p.grad.clone() for p in vm.parameters()]
    vm.zero_grad(set_to_none=True)
    (full * m).sum().backward()
    for a, p in zip(g_shared, vm.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_in_training_falls_back():
    """HF drops the KV cache under activation checkpointing; sharing must step aside."""
    model = _model("qwen2")
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    batch = _batch([3, 3], [5, 7], T=4)
    calls = _Calls(model.get_decoder())
    hidden = response_hidden(model.get_decoder(), batch)
    calls.close()
    assert calls.shapes == [(6, 10)] and hidden.shape == (6, 4, 64 * 2)


def test_prompt_groups_tell_padding_from_a_real_pad_token():
    """A prompt that starts with the pad id is not the shorter, left-padded prompt."""
    resp = torch.tensor([[5, 6], [5, 6], [5, 6]])
    batch = build_sequences([[PAD, 7, 8], [7, 8], [7, 8]], resp, torch.ones(3, 2), PAD)
    assert torch.equal(batch.input_ids[0, :3], batch.input_ids[1, :3])
    first, inverse = batch.prompt_groups()
    assert len(first) == 2 and inverse[1] == inverse[2] != inverse[0]
    assert torch.equal(batch.input_ids[first][inverse, :3], batch.input_ids[:, :3])


def test_group_micro_batches_by_hand():
    inverse = torch.tensor([0, 1, 0, 2, 1, 0])  # group 0: rows 0,2,5; 1: rows 1,4; 2: row 3
    assert [b.tolist() for b in group_micro_batches(inverse, 3)] == [[0, 2, 5], [1, 4, 3]]
    assert [b.tolist() for b in group_micro_batches(inverse, 2)] == [[0, 2], [5], [1, 4], [3]]
    assert [b.tolist() for b in group_micro_batches(inverse, 6)] == [[0, 2, 5, 1, 4, 3]]
    with pytest.raises(DataError, match="size"):
        group_micro_batches(inverse, 0)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(1, 6), st.integers(1, 8))
def test_group_micro_batches_cover_rows_once(sizes, size, seed):
    g = torch.Generator().manual_seed(seed)
    inverse = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])[
        torch.randperm(sum(sizes), generator=g)
    ]
    parts = group_micro_batches(inverse, size)
    rows = torch.cat(parts)
    assert sorted(rows.tolist()) == list(range(len(inverse)))
    assert all(len(p) <= size for p in parts)
    # A group that fits in a micro-batch lands in exactly one of them.
    for grp, k in enumerate(sizes):
        if k <= size:
            assert sum(bool((inverse[p] == grp).any()) for p in parts) == 1


@settings(max_examples=6, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(2, 8)), min_size=1, max_size=4),
    st.integers(1, 5),
    st.integers(0, 1000),
)
def test_shared_equals_full_property(groups, T, seed):
    torch.manual_seed(0)
    model = build_preset("tiny", V, num_hidden_layers=1).eval()
    batch = _batch([k for k, _ in groups], [n for _, n in groups], T, seed=seed)
    m = batch.response_mask
    full, _ = sequence_logprobs(model, batch, share_prompts=False)
    shared, _ = sequence_logprobs(model, batch)
    torch.testing.assert_close(shared * m, full * m, atol=1e-5, rtol=0)


def test_no_prompt_column_is_a_model_error_with_micro_batches():
    from posttrain.engines.batching import SequenceBatch
    from posttrain.errors import ModelError

    ids = torch.ones(3, 2, dtype=torch.long)
    batch = SequenceBatch(ids, torch.ones_like(ids), torch.arange(2).expand(3, 2), 0, torch.ones(3, 2))
    with pytest.raises(ModelError, match="no prompt column"):
        sequence_logprobs(_model("qwen2"), batch, micro_batch_size=1)
