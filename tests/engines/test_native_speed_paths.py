"""The native engine's fast paths give the same answers as the plain ones.

- prefill dedupe: n > 1 (and repeated prompts) pre-fill each distinct prompt once, then
  copy its cache; results must match generating each prompt on its own;
- lazy eviction: finished rows stay in the batch for a while; outputs must not change;
- the inverse-CDF sampler never draws a zero-probability token and is deterministic.
"""

import pytest
import torch

from posttrain.engines.batching import build_sequences
from posttrain.engines.logprobs import sequence_logprobs
from posttrain.engines.rollout import SamplingParams, make_engine
from posttrain.engines.rollout import native as native_mod
from posttrain.engines.rollout.common import inverse_cdf_draw
from tiny_models import small_family_model

PROMPTS = ["12+3=", "Sort: 3 1 2\n", "x"]  # three different lengths: left padding differs


def test_dedupe_greedy_matches_one_prompt_at_a_time(tiny_model, char_tok):
    params = SamplingParams(temperature=0.0, max_new_tokens=20, n=3)
    eng = make_engine("native", tiny_model, char_tok)
    r = eng.generate(PROMPTS, params)
    for i, prompt in enumerate(PROMPTS):
        alone = eng.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=20, n=1))
        for row in range(3 * i, 3 * i + 3):
            assert r.group_id[row] == i
            assert torch.equal(r.response_ids[row], alone.response_ids[0])
            assert torch.equal(r.mask[row], alone.mask[0])
            torch.testing.assert_close(
                r.sampling_logprobs[row], alone.sampling_logprobs[0], atol=1e-5, rtol=0
            )


def test_repeated_prompts_with_n1_equal_n_copies(tiny_model, char_tok):
    # the same prompt listed twice (n = 1) is also pre-filled once; rows keep their order
    eng = make_engine("native", tiny_model, char_tok)
    p = SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)
    listed = eng.generate([PROMPTS[0], PROMPTS[2], PROMPTS[0]], p)
    assert listed.group_id.tolist() == [0, 1, 2]
    assert listed.prompt_ids[0] == listed.prompt_ids[2] != listed.prompt_ids[1]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    g = eng.generate([PROMPTS[0], PROMPTS[2], PROMPTS[0]], greedy)
    assert torch.equal(g.response_ids[0], g.response_ids[2])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_dedupe_sampler_logprobs_equal_training_logprobs(tiny_model, char_tok, temperature):
    r = make_engine("native", tiny_model, char_tok).generate(
        PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=24, n=4, seed=2)
    )
    # copies of one prompt sample different continuations from the shared cache
    assert not torch.equal(r.response_ids[0], r.response_ids[1])
    batch = build_sequences(r.prompt_ids, r.response_ids, r.mask, char_tok.pad_token_id)
    train_lp, _ = sequence_logprobs(tiny_model, batch, temperature=temperature)
    assert ((train_lp - r.sampling_logprobs) * r.mask).abs().max() < 1e-4


def test_eviction_policy_does_not_change_outputs(tiny_model, char_tok, monkeypatch):
    # Common characters as stop tokens: rows finish at many different steps.
    stops = char_tok.convert_tokens_to_ids(["a", "=", "1", " "])
    params = SamplingParams(temperature=1.0, max_new_tokens=40, n=4, seed=11, stop_token_ids=stops)
    eng = make_engine("native", tiny_model, char_tok)
    results = []
    for fraction in (1, 8, 10**9):  # evict at the first finish / at 1/8 dead / never
        monkeypatch.setattr(native_mod, "EVICT_FRACTION", fraction)
        results.append(eng.generate(PROMPTS, params))
    base = results[0]
    lengths = base.mask.sum(-1)
    assert len(set(lengths.tolist())) > 3 and "stop" in base.finish_reason  # rows did finish apart
    for r in results[1:]:
        assert torch.equal(r.response_ids, base.response_ids) and r.finish_reason == base.finish_reason
        torch.testing.assert_close(r.sampling_logprobs, base.sampling_logprobs, atol=1e-5, rtol=0)


def test_inverse_cdf_never_draws_outside_the_support():
    # zero-probability tokens first, last and in between; one token carries nearly all mass
    p = torch.tensor([0.0, 0.3, 0.0, 0.0, 0.7 - 1e-30, 1e-30, 0.0])
    logp = p.log().expand(20000, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    tokens = inverse_cdf_draw(logp, g)
    counts = torch.bincount(tokens, minlength=7)
    assert counts[[0, 2, 3, 6]].sum() == 0
    assert abs(counts[1].item() / 20000 - 0.3) < 0.015  # ~4.6 standard errors
    # same generator state -> same draws; a new seed -> different draws
    a = inverse_cdf_draw(logp, torch.Generator().manual_seed(3))
    b = inverse_cdf_draw(logp, torch.Generator().manual_seed(3))
    c = inverse_cdf_draw(logp, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_inverse_cdf_uniform_at_its_extremes():
    # u = 0 must give the first positive-probability token, u -> 1 the last one
    logp = torch.tensor([[0.0, 0.5, 0.5, 0.0]]).log()
    for value, expected in ((0.0, 1), (1.0 - 2**-53, 2), (0.5 - 2**-30, 1), (0.5, 2)):
        u = torch.tensor([value], dtype=torch.float64)
        assert inverse_cdf_draw(logp, None, u).tolist() == [expected]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_dedupe_other_families_and_one_token_prompts(char_tok, kind):
    # Llama (no qkv bias) and Qwen3 (per-head q/k norm: the unfused path); one-token prompts
    # make the prefill a single query, which must still take the prefill path.
    model = small_family_model(kind, len(char_tok))
    eng = make_engine("native", model, char_tok)
    for prompts in (["x", "y"], PROMPTS):
        r = eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10, n=2))
        hf = make_engine("hf", model, char_tok).generate(
            prompts, SamplingParams(temperature=0.0, max_new_tokens=10)
        )
        assert torch.equal(r.response_ids[0::2], hf.response_ids) and torch.equal(
            r.response_ids[1::2], hf.response_ids
        )


def test_lora_wrapped_policy_matches_training_logprobs(char_tok):
    # LoRA-wrapped projections take the unfused (module-call) path of the native engine.
    pytest.importorskip("peft")
    from posttrain.engines.models import load_model

    torch.manual_seed(0)
    model = load_model("tiny", tokenizer=char_tok, lora={"r": 4, "alpha": 8})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # make the adapter change the outputs
    model.eval()
    r = make_engine("native", model, char_tok).generate(
        PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=16, n=3, seed=4)
    )
    batch = build_sequences(r.prompt_ids, r.response_ids, r.mask, char_tok.pad_token_id)
    train_lp, _ = sequence_logprobs(model, batch)
    assert ((train_lp - r.sampling_logprobs) * r.mask).abs().max() < 1e-4
