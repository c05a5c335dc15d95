"""Partial rollouts (engines/rollout/segments.py): a generation continued segment by segment,
each segment under the weights of the version recorded for its tokens."""

import copy

import pytest
import torch

from posttrain.engines.batching import build_sequences
from posttrain.engines.logprobs import sequence_logprobs
from posttrain.engines.rollout import SamplingParams, make_engine
from posttrain.engines.rollout.segments import generate_in_segments, segment_seed
from posttrain.roles.generator import Generator
from posttrain.roles.weights import StateDictWeights

PROMPTS_TEXT = ["12+3=", "Sort: 3 1 2\n", "x"]


def _prompts(tok):
    return [tok.encode(p, add_special_tokens=False) for p in PROMPTS_TEXT]


def _generator(model, tok, engine="native"):
    return Generator(make_engine(engine, model, tok), model, multi_turn=False)


def _no_sync(j):
    pass


def _teacher_forced(model, r, temperature):
    batch = build_sequences(r.prompt_ids, r.response_ids, r.mask, 0)
    lp, _ = sequence_logprobs(model, batch, temperature=temperature)
    return lp


def _assert_same_rollout(a, b):
    assert a.prompt_ids == b.prompt_ids
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.sampling_logprobs, b.sampling_logprobs)
    assert a.finish_reason == b.finish_reason and a.texts == b.texts
    assert torch.equal(a.group_id, b.group_id)
    for name in ("keep_mask", "keep_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


@pytest.mark.parametrize("engine", ["native", "hf"])
def test_each_token_sampled_under_the_weights_of_its_version(tiny_model, char_tok, engine):
    model_a = copy.deepcopy(tiny_model)
    model_b = copy.deepcopy(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = {0: model_a.state_dict(), 1: model_b.state_dict()}
    gen = _generator(tiny_model, char_tok, engine)
    calls = []

    def before(j):  # version j: segment 0 under A, every later segment under B
        calls.append(j)
        gen.sync(StateDictWeights(j, {k: v.clone() for k, v in weights[min(j, 1)].items()}))

    temperature = 0.7
    params = SamplingParams(temperature=temperature, max_new_tokens=11, n=2, seed=3, ignore_eos=True)
    r = generate_in_segments(gen, _prompts(char_tok), params, segment_tokens=4, before_segment=before)
    assert calls == [0, 1, 2]  # 4 + 4 + 3 tokens
    assert r.mask.sum(-1).tolist() == [11.0] * 6 and r.finish_reason == ["length"] * 6
    seg0 = r.versions == 0
    later = r.versions >= 1
    lp_a = _teacher_forced(model_a, r, temperature)
    lp_b = _teacher_forced(model_b, r, temperature)
    assert (lp_a - r.sampling_logprobs)[seg0].abs().max() < 1e-4
    assert (lp_b - r.sampling_logprobs)[later].abs().max() < 1e-4
    # the two weight sets really disagree on those tokens (so the check above can fail)
    assert (lp_a - r.sampling_logprobs)[later].abs().max() > 1e-2
    assert (lp_b - r.sampling_logprobs)[seg0].abs().max() > 1e-2


def test_versions_change_exactly_at_segment_boundaries(tiny_model, char_tok):
    gen = _generator(tiny_model, char_tok)

    def before(j):  # versions 0, 2, 4, ...: a jump of two (staleness may skip versions)
        gen.sync(StateDictWeights(2 * j, {k: v.clone() for k, v in tiny_model.state_dict().items()}))

    params = SamplingParams(max_new_tokens=13, n=3, seed=0)
    r = generate_in_segments(gen, _prompts(char_tok), params, segment_tokens=3, before_segment=before)
    lengths = r.mask.sum(-1).long().tolist()
    assert any(n > 3 for n in lengths)  # some sample crossed a boundary
    for i, n in enumerate(lengths):
        expected = 2 * (torch.arange(n) // 3)
        assert torch.equal(r.versions[i, :n], expected)
        assert (r.versions[i, n:] == expected[-1]).all()  # padding: the last token's version
        assert (r.versions[i].diff() >= 0).all()
    assert r.versions.dtype == torch.long and r.versions.shape == r.response_ids.shape


@pytest.mark.parametrize("engine", ["native", "hf"])
@pytest.mark.parametrize("segment_tokens", [16, 40])
def test_one_segment_is_a_whole_generation_bit_for_bit(tiny_model, char_tok, engine, segment_tokens):
    gen = _generator(tiny_model, char_tok, engine)
    gen.version = 5
    params = SamplingParams(
        temperature=0.9, top_k=20, max_new_tokens=16, n=3, seed=11, return_keep_mask=True, stop_strings=["1"]
    )
    whole = gen.generate(_prompts(char_tok), params)
    calls = []
    r = generate_in_segments(
        gen, _prompts(char_tok), params, segment_tokens=segment_tokens, before_segment=calls.append
    )
    assert calls == [0]
    _assert_same_rollout(r, whole)
    assert (r.versions == 5).all()


def _greedy(**kw):
    return SamplingParams(temperature=0.0, **kw)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"n": 2, "stop_strings": ["=S", "OF", "XX"], "top_k": 5, "return_keep_mask": True},
        {"repetition_ngram": 3, "repetition_max_repeats": 2, "stop_token_ids": [5]},
    ],
)
def test_greedy_segments_equal_a_whole_greedy_generation(tiny_model, char_tok, options):
    """Unchanged weights at temperature 0: the segments must pick the same tokens as one
    generation, stop where it stops, and report the same finish reasons and texts."""
    gen = _generator(tiny_model, char_tok)
    params = _greedy(max_new_tokens=20, **options)
    whole = gen.generate(_prompts(char_tok), params)
    assert whole.finish_reason != ["length"] * len(whole) or not options  # the options do stop samples
    for seg in (1, 3, 7):
        r = generate_in_segments(gen, _prompts(char_tok), params, segment_tokens=seg, before_segment=_no_sync)
        assert torch.equal(r.response_ids, whole.response_ids) and torch.equal(r.mask, whole.mask)
        assert r.finish_reason == whole.finish_reason and r.texts == whole.texts
        torch.testing.assert_close(r.sampling_logprobs, whole.sampling_logprobs, atol=1e-4, rtol=0)
        assert (r.keep_ids is None) == (whole.keep_ids is None)
        if whole.keep_ids is not None:
            assert torch.equal(r.keep_ids, whole.keep_ids)


def test_stop_string_spanning_a_boundary_stops_where_a_whole_generation_does(tiny_model, char_tok):
    gen = _generator(tiny_model, char_tok)
    prompts = _prompts(char_tok)[:1]
    text = gen.generate(prompts, _greedy(max_new_tokens=30)).texts[0]  # char tokenizer: 1 token = 1 char
    # a boundary b where the 2-character string text[b-1:b+1] first occurs straddling it
    seg = next(b for b in range(2, 20) if text.find(text[b - 1 : b + 1]) == b - 1)
    stop = text[seg - 1 : seg + 1]
    params = _greedy(max_new_tokens=30, stop_strings=[stop])
    whole = gen.generate(prompts, params)
    assert whole.finish_reason == ["stop"] and whole.mask.sum().item() == seg + 1
    r = generate_in_segments(gen, prompts, params, segment_tokens=seg, before_segment=_no_sync)
    assert r.finish_reason == ["stop"] and r.texts == whole.texts == [text[: seg + 1]]
    assert torch.equal(r.response_ids, whole.response_ids) and torch.equal(r.mask, whole.mask)
    assert r.versions.tolist() == [[0] * (seg + 1)]


def test_repetition_counts_ngrams_of_earlier_segments(tiny_model, char_tok):
    gen = _generator(tiny_model, char_tok)
    params = _greedy(max_new_tokens=24, repetition_ngram=2, repetition_max_repeats=3)
    whole = gen.generate(_prompts(char_tok), params)
    assert "repetition" in whole.finish_reason  # greedy random model falls into loops
    lengths = whole.mask.sum(-1).long()
    seg = 3
    assert (lengths > seg).any()  # some repeats are in an earlier segment than the stop
    r = generate_in_segments(gen, _prompts(char_tok), params, segment_tokens=seg, before_segment=_no_sync)
    assert r.finish_reason == whole.finish_reason
    assert torch.equal(r.response_ids, whole.response_ids) and torch.equal(r.mask, whole.mask)


def test_eos_exactly_at_the_segment_budget_finishes_the_sample(tiny_model, char_tok):
    gen = _generator(tiny_model, char_tok)
    prompts = _prompts(char_tok)[:1]
    ids = gen.generate(prompts, _greedy(max_new_tokens=30)).response_ids[0].tolist()
    seg = next(b for b in range(2, 20) if ids.index(ids[b - 1]) == b - 1)  # token first seen at b-1
    calls = []
    params = _greedy(max_new_tokens=30, stop_token_ids=[ids[seg - 1]])
    r = generate_in_segments(gen, prompts, params, segment_tokens=seg, before_segment=calls.append)
    assert calls == [0]  # finished by the stop token, not continued
    assert r.finish_reason == ["stop"] and r.mask.sum().item() == seg
    assert r.response_ids[0].tolist() == ids[:seg]


def test_lengths_and_finish_reasons(tiny_model, char_tok):
    gen = _generator(tiny_model, char_tok)
    eos = char_tok.eos_token_id
    with torch.no_grad():  # make EOS likely so that samples end at many different steps
        tiny_model.lm_head.weight[eos] = tiny_model.lm_head.weight[eos] * 0
    seen = set()
    for seg, max_new, seed in ((3, 10, 0), (4, 9, 1), (5, 5, 2), (2, 7, 3)):
        params = SamplingParams(max_new_tokens=max_new, n=4, seed=seed)
        r = generate_in_segments(gen, _prompts(char_tok), params, segment_tokens=seg, before_segment=_no_sync)
        for i, reason in enumerate(r.finish_reason):
            n = int(r.mask[i].sum())
            assert 1 <= n <= max_new and (r.mask[i, :n] == 1).all() and (r.mask[i, n:] == 0).all()
            assert (r.response_ids[i, n:] == char_tok.pad_token_id).all()
            assert (r.sampling_logprobs[i, n:] == 0).all()
            assert reason == ("stop" if r.response_ids[i, n - 1] == eos else "length")
            assert reason == "stop" or n == max_new
            assert eos not in r.response_ids[i, : n - 1].tolist()  # nothing continued past EOS
            seen.add((reason, n > seg))
    assert {("stop", True), ("stop", False), ("length", True)} <= seen


def test_context_limit_finishes_without_continuing(char_tok):
    from posttrain.engines.models import build_preset

    torch.manual_seed(0)
    model = build_preset("tiny", len(char_tok), max_position_embeddings=12).eval()
    gen = _generator(model, char_tok)
    prompts = [char_tok.encode(p, add_special_tokens=False) for p in ("abcdefgh", "ab")]
    params = _greedy(max_new_tokens=50)
    r = generate_in_segments(gen, prompts, params, segment_tokens=3, before_segment=_no_sync)
    assert r.mask.sum(-1).tolist() == [4.0, 10.0] and r.finish_reason == ["length", "length"]


def test_keep_ids_are_concatenated_across_segments(tiny_model, char_tok):
    gen = _generator(tiny_model, char_tok)
    params = SamplingParams(temperature=0.8, top_k=7, max_new_tokens=10, n=2, seed=4, return_keep_mask=True)
    r = generate_in_segments(gen, _prompts(char_tok), params, segment_tokens=3, before_segment=_no_sync)
    assert r.keep_mask is None and r.keep_ids.shape[:2] == r.response_ids.shape
    on = r.mask.bool()
    kept = r.keep_ids >= 0
    assert (kept.sum(-1)[on] == 7).all() and not kept[~on].any()
    assert (r.keep_ids == r.response_ids[..., None]).any(-1)[on].all()  # sampled inside its support


def test_same_seed_same_samples_and_segment_seeds(tiny_model, char_tok):
    gen = _generator(tiny_model, char_tok)
    params = SamplingParams(max_new_tokens=12, n=2, seed=7, ignore_eos=True)
    run = lambda p: generate_in_segments(
        gen, _prompts(char_tok), p, segment_tokens=4, before_segment=_no_sync
    )  # noqa: E731
    a, b = run(params), run(params)
    _assert_same_rollout(a, b)
    c = run(SamplingParams(max_new_tokens=12, n=2, seed=8, ignore_eos=True))
    assert not torch.equal(a.response_ids[:, 4:], c.response_ids[:, 4:])
    assert segment_seed(7, 0) == 7 and segment_seed(None, 3) is None
    seeds = [segment_seed(7, j) for j in range(1, 6)] + [segment_seed(8, 1)]
    assert len(set(seeds)) == 6 and all(0 <= s < 2**60 for s in seeds)
    # the continuation draws are not the whole generation's (a new stream per segment)
    whole = gen.generate(_prompts(char_tok), params)
    assert torch.equal(a.response_ids[:, :4], whole.response_ids[:, :4])
    assert not torch.equal(a.response_ids[:, 4:], whole.response_ids[:, 4:])


def test_refuses_a_bad_segment_size(tiny_model, char_tok):
    """(Multi-turn generators are segmented by their own engine: tests/engines/test_multiturn_segments.py.)"""
    gen = _generator(tiny_model, char_tok)
    with pytest.raises(ValueError, match="segment_tokens must be >= 1, got 0"):
        generate_in_segments(
            gen, _prompts(char_tok), SamplingParams(), segment_tokens=0, before_segment=_no_sync
        )
