"""Native-engine KV-cache continuation between the turns of a multi-turn rollout
(engines/rollout/native_cache.py): the same tokens as re-encoding every turn, log-probs
equal to float rounding, a fallback that is warned once and counted."""

import logging

import pytest
import torch

from posttrain.data.envs import EnvStep, make_env
from posttrain.engines.fastpath import fallback_metrics, reset_fallbacks
from posttrain.engines.models import build_preset
from posttrain.engines.rollout import SamplingParams, make_engine
from posttrain.engines.rollout.multiturn import MultiTurnEngine
from posttrain.engines.tokenizer import build_char_tokenizer

# Sampling log-probs of the continued and the re-encoded path differ by float rounding only
# (keys/values computed one token at a time vs in one prefill): measured max 9.5e-7 here.
LOGPROB_TOL = 1e-5


TOK = build_char_tokenizer()


@pytest.fixture(scope="module")
def tok():
    return TOK


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_preset("tiny", len(TOK)).eval()


class Echo:
    """Answers turn k with an observation whose length grows with k, for 3 turns, so rows
    carry different cache lengths, observation lengths and turn counts."""

    tool_schemas = staticmethod(list)

    def reset(self, row):
        self.turns = []

    def step(self, turn):
        self.turns.append(turn)
        k = len(self.turns)
        return EnvStep(None if k >= 4 else f"obs {'x' * k} {k}", tool_call=True)


def _prompts(tok):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in ("What is 1+2?", "Hi", "Say a word")]


def _rollouts(engine_factory, tok, params, **kw):
    out = {}
    for continued in (False, True):
        eng = MultiTurnEngine(engine_factory(), tok, kw.get("env", Echo), max_turns=kw.get("turns", 4),
                              max_total_tokens=kw.get("total", 200), continue_kv=continued)  # fmt: skip
        assert eng.continues_from_cache is continued
        out[continued] = eng.generate(_prompts(tok), params)
    return out[False], out[True]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_continued_turns_sample_the_same_tokens_as_reencoding(tok, model, temperature):
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    params = SamplingParams(n=4, max_new_tokens=20, stop_token_ids=digits, seed=3, temperature=temperature)
    again, continued = _rollouts(lambda: make_engine("native", model, tok), tok, params)
    turns = again.turn_stats["turns"]
    assert len(set(turns)) > 1 and max(turns) >= 3  # the batch mixes turn counts
    assert continued.turn_stats == again.turn_stats and continued.finish_reason == again.finish_reason
    assert torch.equal(continued.response_ids, again.response_ids)
    assert torch.equal(continued.mask, again.mask)
    diff = (continued.sampling_logprobs - again.sampling_logprobs).abs().max()
    assert float(diff) <= LOGPROB_TOL


def test_generate_cached_continues_exactly_where_the_sequence_left_off(tok, model):
    """Engine level, rows of different cache and chunk lengths: the next-token log-probs of
    a continued call equal those of encoding the whole sequence (greedy, one step each)."""
    eng = make_engine("native", model, tok)
    prompts = _prompts(tok)
    first, caches = eng.generate_cached(prompts, SamplingParams(n=1, max_new_tokens=6, temperature=0.0,
                                                                stop_token_ids=list(range(len(tok)))))  # fmt: skip
    # Every token is a stop token: each row stops after one token, its cache covers the prompt.
    assert all(c is not None and c.ids == p for c, p in zip(caches, prompts))
    extra = [tok(s, add_special_tokens=False)["input_ids"] for s in ("abc", "a", "hello there")]
    seqs = [p + [int(first.response_ids[r, 0])] + e for r, (p, e) in enumerate(zip(prompts, extra))]
    params = SamplingParams(n=1, max_new_tokens=5, temperature=1.0, seed=11)
    cont, _ = eng.generate_cached(seqs, params, caches)
    full = eng.generate(seqs, params)
    assert torch.equal(cont.response_ids, full.response_ids)
    torch.testing.assert_close(cont.sampling_logprobs, full.sampling_logprobs, atol=LOGPROB_TOL, rtol=0)
    with pytest.raises(Exception, match="does not extend its cache"):
        eng.generate_cached([list(reversed(s)) for s in seqs], params, caches)


def test_tool_task_trajectories_match_with_and_without_continuation(tok, model):
    params = SamplingParams(n=2, max_new_tokens=40, seed=5)
    again, continued = _rollouts(lambda: make_engine("native", model, tok), tok, params,
                                 env=lambda: make_env("tools"), turns=2, total=120)  # fmt: skip
    assert torch.equal(continued.response_ids, again.response_ids)
    assert float((continued.sampling_logprobs - again.sampling_logprobs).abs().max()) <= LOGPROB_TOL


def test_engines_without_a_cache_reencode_by_construction(tok, model):
    reset_fallbacks()
    eng = MultiTurnEngine(make_engine("hf", model, tok), tok, Echo, max_turns=2, max_total_tokens=80)
    assert eng.continue_kv and not eng.continues_from_cache
    eng.generate(_prompts(tok)[:1], SamplingParams(n=2, max_new_tokens=8, seed=0))
    assert fallback_metrics()["perf/fallback_kv_continuation"] == 0.0


def test_a_batch_that_cannot_continue_is_reencoded_warned_once_and_counted(tok, model, caplog):
    """A cache whose ids are not a prefix of the row's next sequence: the batch re-encodes
    (same tokens as never continuing), one warning, one count per such turn."""
    from posttrain.engines.rollout.native import NativeEngine

    class Tampered(NativeEngine):
        def generate_cached(self, prompts, params, caches=None):
            ro, kept = super().generate_cached(prompts, params, caches)
            for c in kept:
                if c is not None:
                    c.ids = [c.ids[0] + 1, *c.ids[1:]]  # no longer the sequence's prefix
            return ro, kept

    digits = tok.convert_tokens_to_ids(list("0123456789"))
    params = SamplingParams(n=2, max_new_tokens=20, stop_token_ids=digits, seed=3)
    reset_fallbacks()
    with caplog.at_level(logging.WARNING, logger="posttrain.fastpath"):
        again, tampered = _rollouts(lambda: Tampered(model, tok), tok, params)
    assert torch.equal(tampered.response_ids, again.response_ids)
    assert torch.equal(tampered.sampling_logprobs, again.sampling_logprobs)  # re-encoded: bit-identical
    later_turns = max(again.turn_stats["turns"]) - 1
    assert fallback_metrics()["perf/fallback_kv_continuation"] == float(later_turns) >= 2
    assert sum("kv_continuation" in r.getMessage() for r in caplog.records) == 1


def test_no_unwritten_cache_slot_is_ever_read(tok, model, monkeypatch):
    """Caches allocated full of NaN instead of uninitialised memory: a slot read before it
    is written (e.g. the left padding of a shorter cached prefix) would turn a whole
    attention row into NaN even under a -inf mask (NaN - inf = NaN)."""
    from posttrain.engines.rollout.native import NativeEngine

    allocate = NativeEngine._empty_cache

    def poisoned(self, B, S, dtype, device):
        return tuple(
            [c.fill_(float("nan")) for c in caches] for caches in allocate(self, B, S, dtype, device)
        )

    monkeypatch.setattr(NativeEngine, "_empty_cache", poisoned)
    stops = tok.convert_tokens_to_ids(list("0123456789aeiou"))  # short turns of varied lengths
    params = SamplingParams(n=4, max_new_tokens=20, stop_token_ids=stops, seed=7)
    again, continued = _rollouts(lambda: make_engine("native", model, tok), tok, params, turns=6, total=300)
    assert bool(torch.isfinite(continued.sampling_logprobs).all()) and max(continued.turn_stats["turns"]) >= 4
    assert torch.equal(continued.response_ids, again.response_ids)
