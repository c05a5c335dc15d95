"""SFT / PRM / reward-model / preference building blocks against hand arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algos.prm import (
    build_step_batch,
    first_wrong_step,
    largest_drop_step,
    prm_loss,
    score_steps,
    step_logits,
)
from posttrain.algos.sft import pack_examples, packed_logprobs, render_prompt, sft_loss, strip_thinking
from posttrain.engines.batching import build_sequences
from posttrain.engines.logprobs import sequence_logprobs
from posttrain.engines.models import build_preset, build_value_model
from posttrain.engines.tokenizer import build_char_tokenizer
from posttrain.errors import DataError

PAD = 0


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    torch.manual_seed(0)
    return build_preset("tiny", len(tok), num_hidden_layers=1).eval()


# ----------------------------------------------------------------------------- SFT


def test_sft_loss_token_mean_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, metrics = sft_loss(logprobs, mask)
    # prompt/padding tokens (mask 0) never count: (1 + 2 + 4) / 3
    assert loss.item() == pytest.approx(7.0 / 3.0)
    assert metrics["sft/nll_sum"].item() == pytest.approx(7.0)
    assert metrics["sft/tokens"].item() == 3.0


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 10_000))
def test_sft_loss_microbatch_sum_equals_full_batch(batch, width, seed):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(batch, width, generator=g) * 3
    mask = (torch.rand(batch, width, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    counts = {"num_tokens": int(mask.sum()), "num_seqs": batch, "max_len": width}
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        full, _ = sft_loss(logprobs, mask, mode=mode, **counts)
        parts = sum(
            sft_loss(logprobs[i : i + 1], mask[i : i + 1], mode=mode, **counts)[0] for i in range(batch)
        )
        assert parts.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)


def test_pack_examples_layout_by_hand():
    packed = pack_examples([[1, 2], [3], [4, 5, 6]], [[7, 8], [9], [10]], max_length=6, pad_id=PAD)
    # first fit: row 0 = ex0 (4 tokens) + ex1 (2 tokens); ex2 (4 tokens) opens row 1
    assert packed.input_ids.tolist() == [[1, 2, 7, 8, 3, 9], [4, 5, 6, 10, PAD, PAD]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]]
    # mask[t] = 1 when input_ids[t+1] is a completion token
    assert packed.mask.tolist() == [[0, 1, 1, 0, 1], [0, 0, 1, 0, 0]]


def test_pack_examples_rejects_overlong_example():
    with pytest.raises(DataError, match="example 1: 5 tokens"):
        pack_examples([[1], [1, 2, 3]], [[2], [4, 5]], max_length=4, pad_id=PAD)


def test_packed_logprobs_equal_unpacked(tiny, tok):
    """Block-diagonal attention: packing must not let examples see each other."""
    prompts = [
        tok(render_prompt(tok, q), add_special_tokens=False)["input_ids"] for q in ("What is 2+1?", "9-4?")
    ]
    comps = [
        tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for c in ("<answer>3</answer>", "5")
    ]
    packed = pack_examples(prompts, comps, max_length=256, pad_id=tok.pad_token_id)
    assert packed.input_ids.shape[0] == 1  # both in one row
    with torch.no_grad():
        lp_packed = packed_logprobs(tiny, packed)[0][packed.mask[0] > 0]
        width = max(map(len, comps))
        ids = torch.full((2, width), tok.pad_token_id)
        mask = torch.zeros(2, width)
        for i, c in enumerate(comps):
            ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1.0
        lp, _ = sequence_logprobs(tiny, build_sequences(prompts, ids, mask, tok.pad_token_id))
    torch.testing.assert_close(lp_packed, lp[mask > 0], atol=1e-5, rtol=1e-5)


def _logprobs_and_embeddings(model, packed):
    """`packed_logprobs(model, packed)` and the input embeddings it ran on, kept with
    retain_grad so a test can read which positions a loss's gradient reaches."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["embeds"] = output

    handle = model.get_input_embeddings().register_forward_hook(keep)
    try:
        logprobs = packed_logprobs(model, packed)
    finally:
        handle.remove()
    return logprobs, captured["embeds"]


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("derives_block_mask", [True, False])
def test_packed_example_cannot_attend_to_another(tok, kernel, derives_block_mask, monkeypatch):
    """The gradient of example A's loss w.r.t. example B's embeddings is exactly zero, B
    packed before A in the same row — also when transformers derives no block mask from the
    position ids (what versions before packed-sequence detection do; simulated here)."""
    import transformers.masking_utils as masking_utils

    if not derives_block_mask:
        monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    torch.manual_seed(0)
    model = build_preset("tiny", len(tok), num_hidden_layers=2, attn_implementation=kernel)
    b_prompt, b_comp = [5, 6, 7], [8, 9]
    a_prompt, a_comp = [10, 11], [12, 13, 14]
    packed = pack_examples([b_prompt, a_prompt], [b_comp, a_comp], max_length=32, pad_id=PAD)
    assert packed.input_ids.shape[0] == 1
    logprobs, embeds = _logprobs_and_embeddings(model, packed)  # [1, L-1], [1, L, H]
    n_b = len(b_prompt) + len(b_comp)
    a_targets = packed.mask.clone()
    a_targets[:, : n_b - 1] = 0.0  # only example A's completion tokens
    assert a_targets.sum() == len(a_comp)
    (-(logprobs * a_targets).sum()).backward()
    grad = embeds.grad[0]  # [L, H]
    assert torch.count_nonzero(grad[:n_b]) == 0  # B's embeddings: exactly no influence on A
    assert torch.count_nonzero(grad[n_b:]) > 0


def test_strip_thinking_and_no_think_prompt(tok):
    assert strip_thinking("<think>2+1=3</think><answer>3</answer>") == "<answer>3</answer>"
    assert strip_thinking("<answer>3</answer>") == "<answer>3</answer>"
    assert render_prompt(tok, "hi", enable_thinking=False).endswith("<think></think>")
    assert not render_prompt(tok, "hi").endswith("</think>")


# ----------------------------------------------------------------------------- PRM


def test_build_step_batch_indices_by_hand():
    batch = build_step_batch(
        [[1, 2, 3], [4]],
        [[[10, 11], [12]], [[13]]],
        [[True, False], [True]],
        separator_ids=[98, 99],
        pad_id=PAD,
    )
    # completion 0 = 10 11 98 99 12 98 99 -> steps end at the last separator token: 3, 6
    assert batch.seqs.response_ids[0].tolist() == [10, 11, 98, 99, 12, 98, 99]
    assert batch.step_index.tolist() == [[3, 6], [2, 0]]
    assert batch.step_mask.tolist() == [[1, 1], [1, 0]]
    assert batch.labels.tolist() == [[1, 0], [1, 0]]
    cols = batch.step_index + batch.seqs.response_start
    assert batch.seqs.input_ids.gather(1, cols)[0].tolist() == [99, 99]


def test_build_step_batch_label_mismatch_is_one_line_error():
    with pytest.raises(DataError, match="trace 0: 2 steps but 1 labels"):
        build_step_batch([[1]], [[[2], [3]]], [[True]], separator_ids=[9], pad_id=PAD)


class _FixedValues(torch.nn.Module):
    """A 'value model' returning preset per-position values (for hand arithmetic)."""

    def __init__(self, values):
        super().__init__()
        self.values = values
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.values + self.p


def test_prm_loss_bce_by_hand():
    batch = build_step_batch([[1]], [[[2], [3]]], [[True, False]], separator_ids=[9], pad_id=PAD)
    # input: [1 | 2 9 3 9]; step ends at completion cols 1 and 3 -> input cols 2 and 4
    values = torch.tensor([[0.0, 0.0, 2.0, 0.0, -1.0]])
    loss, metrics = prm_loss(_FixedValues(values), batch)
    expected = (
        -math.log(torch.sigmoid(torch.tensor(2.0)).item())
        - math.log(1 - torch.sigmoid(torch.tensor(-1.0)).item())
    ) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["prm/correct"].item() == 2.0  # σ(2) > .5 labelled True, σ(-1) < .5 labelled False
    # with a global step count of 4 (other micro-batches hold 2 more) the share halves
    assert prm_loss(_FixedValues(values), batch, num_steps=4)[0].item() == pytest.approx(
        expected / 2, rel=1e-6
    )


def test_prm_loss_gradient_matches_bce_derivative():
    batch = build_step_batch([[1]], [[[2], [3]]], [[True, False]], separator_ids=[9], pad_id=PAD)
    values = torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.3]], requires_grad=True)
    model = _FixedValues(values)
    loss, _ = prm_loss(model, batch)
    loss.backward()
    # d/dz BCE = σ(z) − y, averaged over 2 steps; the shared offset p gets the sum
    expected = ((torch.sigmoid(torch.tensor(0.5)) - 1) + torch.sigmoid(torch.tensor(0.3))) / 2
    assert model.p.grad.item() == pytest.approx(expected.item(), rel=1e-5)


def test_first_wrong_step():
    assert first_wrong_step([0.9, 0.8, 0.2, 0.7]) == 2
    assert first_wrong_step([0.9, 0.6]) is None
    assert first_wrong_step([0.9, 0.6], threshold=0.7) == 1


def test_largest_drop_step():
    # drops from PRM(≤0) = 1: 0.1, 0.3, 0.2 -> step 1, although no score is below 0.5
    assert largest_drop_step([0.9, 0.6, 0.4]) == 1
    assert largest_drop_step([0.2, 0.1]) == 0  # 1 -> 0.2 is the largest fall
    assert largest_drop_step([0.9, 0.95, 0.9]) == 0  # ties go to the earlier step (0.1 each)
    assert largest_drop_step([0.5, 0.9], initial=0.4) == 0  # nothing falls: the smallest rise
    assert largest_drop_step([]) is None


def test_score_steps_matches_step_logits(tok):
    torch.manual_seed(0)
    prm = build_value_model("tiny", tokenizer=tok).eval()
    scores = score_steps(
        prm,
        tok,
        ["What is 2+3?", "What is 1+1?", "x"],
        [["2+3=5"], ["1+1=2", "2=2"], []],
        apply_chat_template=True,
    )
    assert [len(s) for s in scores] == [1, 2, 0]
    assert all(0.0 < s < 1.0 for row in scores for s in row)
    # same number as a direct forward over the training layout
    p = tok(render_prompt(tok, "What is 1+1?"), add_special_tokens=False)["input_ids"]
    steps = [tok(s, add_special_tokens=False)["input_ids"] for s in ("1+1=2", "2=2")]
    batch = build_step_batch(
        [p],
        [steps],
        None,
        separator_ids=tok("; ", add_special_tokens=False)["input_ids"],
        pad_id=tok.pad_token_id,
    )
    with torch.no_grad():
        direct = torch.sigmoid(step_logits(prm, batch))[0].tolist()
    assert scores[1] == pytest.approx(direct, abs=1e-6)
    # batching must not change scores (left padding is masked)
    alone = score_steps(prm, tok, [render_prompt(tok, "What is 1+1?")], [["1+1=2", "2=2"]])  # pre-rendered
    assert alone[0] == pytest.approx(scores[1], abs=1e-5)


# ----------------------------------------------------------------------------- preference options


def test_preference_options_are_read_from_the_loss_signature():
    from posttrain.algos.preference import loss_options

    assert loss_options("dpo") == ["label_smoothing"]
    assert sorted(loss_options("simpo")) == ["gamma", "label_smoothing"]
    assert loss_options("ipo") == []


@pytest.mark.parametrize(
    ("loss", "options", "expected"),
    [
        ("simpo", {"gama": 0.5}, "'gama' is not an option of preference loss 'simpo'. Did you mean 'gamma'?"),
        ("dpo", {"label_smothing": 0.1}, "Did you mean 'label_smoothing'? Valid: label_smoothing"),
        ("ipo", {"label_smoothing": 0.1}, "Valid: none"),
    ],
)
def test_misspelt_preference_option_is_a_one_line_config_error(loss, options, expected):
    from posttrain.algos.preference import check_options, preference_loss
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="algo.options") as err:
        check_options(loss, options)
    assert expected in str(err.value) and "\n" not in str(err.value)
    logps, lengths = torch.tensor([-1.0, -2.0]), torch.tensor([2.0, 2.0])
    with pytest.raises(ConfigError, match="algo.options"):  # the training path checks too
        preference_loss(logps, lengths, logps, loss_name=loss, beta=None, num_pairs=1, options=options)
    check_options(loss, {})  # no options is always fine


def test_valid_preference_option_changes_the_loss():
    from posttrain.algos.preference import preference_loss

    logps, lengths = torch.tensor([-1.0, -3.0]), torch.tensor([1.0, 1.0])  # one pair: chosen, rejected
    plain, _ = preference_loss(logps, lengths, None, loss_name="simpo", beta=2.0, num_pairs=1)
    shifted, _ = preference_loss(
        logps, lengths, None, loss_name="simpo", beta=2.0, num_pairs=1, options={"gamma": 1.0}
    )
    # SimPO: −log σ(β(−1 − (−3)) − γ) = −log σ(4 − γ); γ 0.5 (default) vs. 1.0
    assert plain.item() == pytest.approx(math.log1p(math.exp(-3.5)), rel=1e-5)
    assert shifted.item() == pytest.approx(math.log1p(math.exp(-3.0)), rel=1e-5)


def test_packed_examples_get_exactly_zero_gradient_from_each_other(tok):
    """Packing's isolation, checked where it matters: the gradient of the later example B's
    loss with respect to the earlier example A's input embeddings is exactly 0 (a plain
    causal mask would let B attend to A), on the installed transformers (the block mask is
    derived from restarting position ids)."""
    torch.manual_seed(0)
    model = build_preset("tiny", len(tok))  # two layers: a leak would pass through both
    a, b = [5, 6, 7, 8], [9, 10, 11]
    packed = pack_examples([a[:2], b[:1]], [a[2:], b[1:]], max_length=16, pad_id=tok.pad_token_id)
    assert packed.input_ids.shape == (1, 7)  # A in columns 0-3, B in 4-6
    logprobs, embeds = _logprobs_and_embeddings(model, packed)  # [1, 6], [1, 7, H]
    assert packed.mask[0].tolist() == [0, 1, 1, 0, 1, 1]
    logprobs[0, 4:6].sum().backward()  # B's two completion targets (tokens at columns 5, 6)
    grad = embeds.grad[0]  # [7, H]
    assert grad[4:6].abs().sum() > 0
    assert torch.equal(grad[:4], torch.zeros_like(grad[:4]))
    embeds.grad = None
    model.zero_grad()


def test_dpo_training_loss_and_gradient_equal_trl_on_unbatched_forwards(tok):
    """The offline DPO path (PreferenceMethod.loss: padded pair batch with shared prompts,
    reference log-probs looked up by item index in the [chosen N | rejected N] table of
    `reference_logps`) gives the loss and gradient of TRL's sigmoid DPO loss,
    −log σ(β((log π − log π_ref)(y_w) − (log π − log π_ref)(y_l))), with every sequence
    log-prob summed by TRL's own selective_log_softmax over one unpadded forward per
    sequence. Catches a shifted completion mask, a padding leak, or a reference table
    read at the wrong index or with chosen / rejected swapped."""
    import copy
    from types import SimpleNamespace

    trl_utils = pytest.importorskip("trl.trainer.utils")
    from posttrain.engines.encoding import encode_continuation, encode_prompt
    from posttrain.train.offline.methods import PreferenceMethod, reference_logps

    torch.manual_seed(0)
    policy = build_preset("tiny", len(tok), num_hidden_layers=1).eval()
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy, so every ratio is non-zero
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eos = tok.eos_token_id
    rows = [("What is 7-3?", "4", "2"), ("What is 12+9?", "21", "2l"), ("Sort 3 1 2", "1 2 3", "3 2 1 0")]
    items = [
        {"prompt": encode_prompt(tok, p), "chosen": encode_continuation(tok, c) + [eos],
         "rejected": encode_continuation(tok, r) + [eos], "split": "train", "idx": i}
        for i, (p, c, r) in enumerate(rows)
    ]  # fmt: skip
    beta = 0.1
    cfg = SimpleNamespace(algo=SimpleNamespace(loss="dpo", beta=beta, options={}, nll_weight=0.0))
    table = reference_logps(ref, items, tok.pad_token_id, micro_batch_size=2)  # [2N]
    method = PreferenceMethod(cfg, policy, tok, items, [], table, None)
    batch_items = [items[2], items[0]]  # an optimizer micro-batch in another order than the table
    loss, metrics = method.loss(batch_items, {"num_pairs": len(batch_items)})
    loss.backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    def trl_logp(model, prompt, completion):  # TRL: logits[:, :-1] scored against ids[:, 1:]
        ids = torch.tensor([prompt + completion])
        per_token = trl_utils.selective_log_softmax(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
        return per_token[0, len(prompt) - 1 :].sum()

    def logratio(it, key):
        with torch.no_grad():
            r = trl_logp(ref, it["prompt"], it[key])
        return trl_logp(policy, it["prompt"], it[key]) - r

    delta = torch.stack([logratio(it, "chosen") - logratio(it, "rejected") for it in batch_items])
    expected = -torch.nn.functional.logsigmoid(beta * delta).mean()  # TRL loss_type="sigmoid"
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert metrics["pref/correct"].item() == (delta > 0).sum().item()
    assert metrics["pref/margin_sum"].item() == pytest.approx(beta * delta.sum().item(), abs=1e-5)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
