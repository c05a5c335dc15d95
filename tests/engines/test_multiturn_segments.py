"""Partial rollouts of multi-turn trajectories (engines/rollout/multiturn.py with a
segments.py `SegmentSchedule`): every model turn generated in segments, the segment counter
running on across turns, each token recording the policy version that sampled it, and KV
caches of older weights never reused after a sync."""

import copy

import pytest
import torch

from posttrain.data.envs import EnvStep
from posttrain.engines.batching import build_sequences
from posttrain.engines.fastpath import fallback_metrics, reset_fallbacks
from posttrain.engines.logprobs import sequence_logprobs
from posttrain.engines.rollout import SamplingParams, make_engine
from posttrain.engines.rollout.multiturn import MultiTurnEngine
from posttrain.engines.rollout.segments import generate_in_segments
from posttrain.roles.generator import Generator
from posttrain.roles.weights import StateDictWeights

PROMPTS_TEXT = ["What is 1+2?", "Hi", "Say a word"]


class Echo:
    """Answers every turn with an observation (growing with the turn) and a reward of 0.25
    per turn; ends the episode at the fourth turn."""

    tool_schemas = staticmethod(list)

    def reset(self, row):
        self.turns = 0

    def step(self, turn):
        self.turns += 1
        k = self.turns
        return EnvStep(None if k >= 4 else f"obs {'x' * k} {k}", reward=0.25, tool_call=True)


def _prompts(tok):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS_TEXT]


def _params(tok, **kw):
    digits = tok.convert_tokens_to_ids(list("0123456789"))  # stops: turns of varied lengths
    return SamplingParams(**{"n": 3, "max_new_tokens": 10, "stop_token_ids": digits, "seed": 3, **kw})


def _generator(model, tok, *, continue_kv=True, turns=4, total=200):
    engine = MultiTurnEngine(make_engine("native", model, tok), tok, Echo, max_turns=turns,
                             max_total_tokens=total, continue_kv=continue_kv)  # fmt: skip
    return Generator(engine, model, multi_turn=True)


def _two_weight_sets(model):
    """(A, B): the model's weights and a perturbed copy, as state dicts."""
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {k: v.clone() for k, v in model.state_dict().items()}, other.state_dict()


def _teacher_forced(model, ro, temperature=1.0):
    """[B, T] log-probs of the response under `model`, the whole prefix encoded at once."""
    batch = build_sequences(ro.prompt_ids, ro.response_ids, ro.mask, 0)
    lp, _ = sequence_logprobs(model, batch, temperature=temperature)
    return lp


def _turn_runs(mask_row: torch.Tensor) -> list[list[int]]:
    """Positions of each model turn: the runs of mask 1 (observations in between are mask 0)."""
    runs, current = [], []
    for t, m in enumerate(mask_row.tolist()):
        if m > 0:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("continue_kv", [True, False])
@pytest.mark.parametrize("segment_tokens", [10, 64])
def test_one_segment_per_turn_is_the_plain_multi_turn_generate_bit_for_bit(
    tiny_model, char_tok, continue_kv, segment_tokens
):
    gen = _generator(tiny_model, char_tok, continue_kv=continue_kv)
    gen.version = 5
    params = _params(char_tok)
    plain = gen.generate(_prompts(char_tok), params)
    assert max(plain.turn_stats["turns"]) >= 3 and len(set(plain.turn_stats["turns"])) > 1
    reset_fallbacks()
    calls = []
    ro = generate_in_segments(gen, _prompts(char_tok), params, segment_tokens=segment_tokens,
                              before_segment=calls.append)  # fmt: skip
    assert calls == list(range(max(plain.turn_stats["turns"])))  # one segment per (lockstep) turn
    assert ro.prompt_ids == plain.prompt_ids
    for name in ("response_ids", "mask", "sampling_logprobs", "turn_rewards", "group_id"):
        assert torch.equal(getattr(ro, name), getattr(plain, name)), name
    assert ro.turn_rewards.sum() > 0  # the environment's rewards are in the comparison
    assert ro.turn_stats == plain.turn_stats
    assert ro.finish_reason == plain.finish_reason and ro.texts == plain.texts
    assert plain.versions is None and ro.versions.shape == ro.mask.shape and (ro.versions == 5).all()
    assert fallback_metrics()["perf/fallback_kv_continuation"] == 0.0


def test_versions_change_exactly_at_segment_and_turn_boundaries(tiny_model, char_tok):
    """before_segment(j) sets version j (same weights): each token's version is its segment.
    Token t of a turn lies in segment (the turn's first) + t // S, all samples of a turn start
    in the same segment (lockstep), and a new turn always starts a new segment."""
    gen = _generator(tiny_model, char_tok)
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    S = 3

    def before(j):
        gen.sync(StateDictWeights(j, state))

    ro = generate_in_segments(
        gen, _prompts(char_tok), _params(char_tok), segment_tokens=S, before_segment=before
    )
    first_of_turn: dict[int, int] = {}
    crossed = False
    for i in range(len(ro)):
        v, runs = ro.versions[i], _turn_runs(ro.mask[i])
        assert len(runs) == ro.turn_stats["turns"][i]
        previous_last = -1
        for k, run in enumerate(runs):
            start = int(v[run[0]])
            assert first_of_turn.setdefault(k, start) == start  # lockstep turns
            assert torch.equal(v[run], start + torch.arange(len(run)) // S)
            assert start > previous_last  # a turn starts a new segment
            previous_last = int(v[run[-1]])
            crossed |= len(run) > S
            if k + 1 < len(runs):  # the observation after the turn: the version of its last token
                assert (v[run[-1] + 1 : runs[k + 1][0]] == previous_last).all()
                assert (ro.mask[i, run[-1] + 1 : runs[k + 1][0]] == 0).all()
        end = int(ro.mask[i].nonzero().max()) + 1
        assert (v[end:] == v[end - 1]).all()  # padding: the last token's version
    assert crossed and len(first_of_turn) >= 3  # turns longer than a segment, several turns


def test_each_token_is_sampled_by_the_weights_of_its_version(tiny_model, char_tok):
    """Weights B from segment 2 on: tokens of segments >= 2 carry version 1 and their sampling
    log-probs are B's under teacher forcing of the whole prefix; earlier tokens are A's."""
    a, b = _two_weight_sets(tiny_model)
    model_a, model_b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    model_a.load_state_dict(a)
    model_b.load_state_dict(b)
    gen = _generator(tiny_model, char_tok)
    versions_called = []

    def before(j):
        version = int(j >= 2)
        versions_called.append(version)
        gen.sync(StateDictWeights(version, a if version == 0 else b))

    ro = generate_in_segments(
        gen, _prompts(char_tok), _params(char_tok), segment_tokens=4, before_segment=before
    )
    assert 0 in versions_called and 1 in versions_called
    on = ro.mask > 0
    old, new = on & (ro.versions == 0), on & (ro.versions == 1)
    assert old.any() and new.any()
    lp_a, lp_b = _teacher_forced(model_a, ro), _teacher_forced(model_b, ro)
    assert (lp_a - ro.sampling_logprobs)[old].abs().max() < 1e-4
    assert (lp_b - ro.sampling_logprobs)[new].abs().max() < 1e-4
    # the two weight sets disagree on those tokens, so the checks above can fail
    assert (lp_a - ro.sampling_logprobs)[new].abs().max() > 1e-2
    assert (lp_b - ro.sampling_logprobs)[old].abs().max() > 1e-2


def test_a_sync_between_turns_drops_the_kv_caches_of_the_old_weights(tiny_model, char_tok, monkeypatch):
    """One segment per turn, weights B from the second turn: turn 2 re-encodes its whole
    prefix under B (its log-probs are B's teacher-forced ones), turn 3 (same version as
    turn 2) continues from the caches again; neither is counted as a fallback."""
    from posttrain.engines.rollout.native import NativeEngine

    a, b = _two_weight_sets(tiny_model)
    model_b = copy.deepcopy(tiny_model)
    model_b.load_state_dict(b)
    gen = _generator(tiny_model, char_tok)
    continued = []  # per generate_cached call: did it continue from caches?
    original = NativeEngine.generate_cached

    def spy(self, prompts, params, caches=None):
        continued.append(caches is not None)
        return original(self, prompts, params, caches)

    monkeypatch.setattr(NativeEngine, "generate_cached", spy)

    def before(j):
        gen.sync(StateDictWeights(int(j >= 1), a if j == 0 else b))

    reset_fallbacks()
    ro = generate_in_segments(
        gen, _prompts(char_tok), _params(char_tok), segment_tokens=64, before_segment=before
    )
    assert continued[:3] == [False, False, True]  # turn 1, turn 2 (after the sync), turn 3
    assert fallback_metrics()["perf/fallback_kv_continuation"] == 0.0
    new = (ro.mask > 0) & (ro.versions == 1)
    assert new.any()
    lp_b = _teacher_forced(model_b, ro)
    assert (lp_b - ro.sampling_logprobs)[new].abs().max() < 1e-4


def test_greedy_segments_pick_the_tokens_of_the_plain_generate(tiny_model, char_tok):
    """Unchanged weights at temperature 0: turns cut into segments of 1, 3 or 4 tokens stop
    where the plain multi-turn generate stops and hold the same tokens and environment turns."""
    gen = _generator(tiny_model, char_tok)
    params = _params(char_tok, temperature=0.0, n=1, stop_strings=["a "])
    plain = gen.generate(_prompts(char_tok), params)
    for S in (1, 3, 4):
        ro = generate_in_segments(
            gen, _prompts(char_tok), params, segment_tokens=S, before_segment=lambda j: None
        )
        assert torch.equal(ro.response_ids, plain.response_ids) and torch.equal(ro.mask, plain.mask)
        assert ro.turn_stats == plain.turn_stats and ro.finish_reason == plain.finish_reason
        torch.testing.assert_close(ro.sampling_logprobs, plain.sampling_logprobs, atol=1e-4, rtol=0)


def test_segments_are_refused_by_a_single_turn_generator(tiny_model, char_tok):
    gen = Generator(make_engine("native", tiny_model, char_tok), tiny_model, multi_turn=False)
    with pytest.raises(ValueError, match="multi-turn"):
        gen.generate(_prompts(char_tok), _params(char_tok), segments=object())
