"""PRM-guided early stop / truncate-and-resample (GRPO/PRM seed, "Advantages of PRM":
"Supports early stopping: If intermediate step scores keep dropping, can truncate and
resample"). A scripted inner engine and a stand-in PRM show by hand which step is cut,
what is resampled, the finish reasons and the counts; a real tiny model shows that a
resampled sample's ids and log-probs are what its sampler drew (== the training forward)."""

from __future__ import annotations

import itertools

import pytest
import torch

from posttrain.data.rewards.models import prm_reward
from posttrain.engines.batching import build_sequences
from posttrain.engines.logprobs import sequence_logprobs
from posttrain.engines.rollout import make_engine
from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.engines.rollout.prm_guide import PRM_STOP, PRMGuidedEngine, prm_verdict
from posttrain.engines.tokenizer import build_char_tokenizer
from posttrain.errors import ConfigError, ModelError

TOK = build_char_tokenizer()
EOS = TOK.eos_token


def _ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


class Attempts:
    """A RolloutEngine (n = 1) writing, per prompt, scripted attempts: a context that
    continues the last output goes on with the current attempt; any other context (a
    truncated prefix) moves to the next attempt, which must start with it. Stops like a
    real engine (right after the first stop string completed; EOS ends with "stop"). The
    k-th token of attempt a gets log-prob −(100a + k)/1000. Records every call."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.calls = script, []
        self.attempt = dict.fromkeys(script, 0)
        self.expected: dict[str, str] = {}

    def sync_weights(self, model):
        pass

    def generate(self, prompts, params: SamplingParams) -> Rollout:
        assert params.n == 1
        rows, lps, reasons = [], [], []
        for p in prompts:
            ctx = TOK.decode(p)
            q = next(k for k in self.script if ctx.startswith(k))
            done = ctx[len(q) :]
            if q in self.expected and self.expected[q] != ctx:
                self.attempt[q] += 1
            text = self.script[q][self.attempt[q]]
            assert text.startswith(done), (ctx, text)
            ids, why = _ids(text[len(done) :]), "stop"
            ends = [TOK.decode(ids).find(s) + len(s) for s in params.stop_strings if s in TOK.decode(ids)]
            if ends:
                ids = _ids(TOK.decode(ids)[: min(ends)])
            if len(ids) > params.max_new_tokens:
                why = "length"
            ids = ids[: params.max_new_tokens]
            start = len(_ids(done))
            lps.append([-(100 * self.attempt[q] + start + k) / 1000 for k in range(len(ids))])
            rows.append(ids)
            reasons.append(why)
            self.expected[q] = ctx + TOK.decode(ids)
            self.calls.append((ctx, TOK.decode(ids)))
        T = max(len(r) for r in rows)
        out = torch.zeros(len(rows), T, dtype=torch.long)
        mask, slp = torch.zeros(len(rows), T), torch.zeros(len(rows), T)
        for b, (r, lp) in enumerate(zip(rows, lps)):
            out[b, : len(r)], mask[b, : len(r)], slp[b, : len(r)] = torch.tensor(r), 1.0, torch.tensor(lp)
        texts = [TOK.decode(r).removesuffix(EOS) for r in rows]
        return Rollout([list(p) for p in prompts], out, mask, slp, reasons, torch.arange(len(rows)), texts)


SCORES = {
    "ok1": 0.9,
    "ok2": 0.8,
    "ok3": 0.7,
    "bad": 0.2,
    "s1": 0.9,
    "s2": 0.8,
    "s3": 0.7,
    "s5": 0.6,
    "s6": 0.5,
}


def stand_in_prm(prompts, step_lists):
    return [[SCORES[s] for s in steps] for steps in step_lists]


def _engine(inner, **rules):
    return PRMGuidedEngine(
        inner, TOK, prm_reward(scorer=stand_in_prm).scored_steps, step_separator="; ", **rules
    )


def test_verdict_by_hand():
    # threshold: the first step below it is bad, the one before it the last good
    assert prm_verdict([0.9, 0.4, 0.8], 0, 0.5, 0) == (2, 1)
    assert prm_verdict([0.3], 0, 0.5, 0) == (1, 0)
    assert prm_verdict([0.3, 0.9], 1, 0.5, 0) is None  # accepted steps are not judged again
    # patience 2: two drops in a row; the decline starts after the peak (step 2 here)
    assert prm_verdict([0.5, 0.6, 0.4, 0.3], 0, None, 2) == (4, 2)
    assert prm_verdict([0.5, 0.4, 0.6, 0.5], 0, None, 2) is None
    assert prm_verdict([0.9, 0.8, 0.7], 2, None, 2) == (3, 1)  # the run may start among accepted steps
    # both rules trip at step 3: the earlier cut (patience's step 1, not threshold's step 2)
    assert prm_verdict([0.9, 0.8, 0.3], 0, 0.5, 2) == (3, 1)


def test_stop_mode_ends_at_the_bad_step_by_hand():
    inner = Attempts(
        {"Q1": ["<think>ok1; ok2; bad; ok3</think>A" + EOS], "Q2": ["<think>ok1</think>B" + EOS]}
    )
    eng = _engine(inner, threshold=0.5)
    ro = eng.generate([_ids("Q1"), _ids("Q2")], SamplingParams(max_new_tokens=40, seed=0))
    assert ro.texts == ["<think>ok1; ok2; bad; ", "<think>ok1</think>B"]
    assert ro.finish_reason == [PRM_STOP, "stop"]
    # Q1 was written step by step: one round per step, from the exact text so far
    assert [c for c, _ in inner.calls if c.startswith("Q1")] == [
        "Q1", "Q1<think>ok1; ", "Q1<think>ok1; ok2; "
    ]  # fmt: skip
    n1 = len(_ids("<think>ok1; ok2; bad; "))
    assert ro.mask[0].sum() == n1 and ro.sampling_logprobs[0, :n1].tolist() == pytest.approx(
        [-k / 1000 for k in range(n1)]
    )
    assert eng.totals == {"samples": 2, "stopped": 1, "resampled": 0, "resamples": 0,
                          "tokens_saved": 40 - n1, "tokens_discarded": 0}  # fmt: skip


def test_resample_truncates_after_the_last_good_step_by_hand():
    inner = Attempts({"Q": ["<think>ok1; bad; ok3</think>A" + EOS, "<think>ok1; ok2</think>B" + EOS]})
    eng = _engine(inner, threshold=0.5, mode="resample", max_resamples=1)
    ro = eng.generate([_ids("Q")], SamplingParams(max_new_tokens=40))
    assert ro.texts == ["<think>ok1; ok2</think>B"] and ro.finish_reason == ["stop"]
    # the bad step 2 sends the sample back to "<think>ok1" (the end of step 1) and it goes on
    assert [c for c, _ in inner.calls] == [
        "Q", "Q<think>ok1; ", "Q<think>ok1", "Q<think>ok1; ", "Q<think>ok1; ok2</think>"
    ]  # fmt: skip
    kept = len(_ids("<think>ok1"))
    total = len(_ids("<think>ok1; ok2</think>B" + EOS))
    # kept prefix: attempt 0's log-probs; the rest: attempt 1's, at its own positions
    want = [-k / 1000 for k in range(kept)] + [-(100 + k) / 1000 for k in range(kept, total)]
    assert ro.sampling_logprobs[0, :total].tolist() == pytest.approx(want)
    assert ro.response_ids[0, :total].tolist() == _ids("<think>ok1; ok2</think>B" + EOS)
    discarded = len(_ids("<think>ok1; bad; ")) - kept
    assert eng.totals == {"samples": 1, "stopped": 0, "resampled": 1, "resamples": 1,
                          "tokens_saved": 0, "tokens_discarded": discarded}  # fmt: skip


def test_patience_and_exhausted_resamples_stop_by_hand():
    # s1 .9, s2 .8, s3 .7: two drops in a row at step 3 -> back to s1; then s5 .6, s6 .5
    # drop twice again from the kept s1, no resample left -> stopped there
    inner = Attempts({"Q": ["<think>s1; s2; s3; ok1</think>" + EOS, "<think>s1; s5; s6; ok1</think>" + EOS]})
    eng = _engine(inner, patience=2, mode="resample", max_resamples=1)
    ro = eng.generate([_ids("Q")], SamplingParams(max_new_tokens=60))
    assert ro.texts == ["<think>s1; s5; s6; "] and ro.finish_reason == [PRM_STOP]
    assert (eng.totals["resamples"], eng.totals["stopped"], eng.totals["resampled"]) == (1, 1, 1)
    assert eng.totals["tokens_discarded"] == len(_ids("<think>s1; s2; s3; ")) - len(_ids("<think>s1"))


def test_length_eos_and_stop_strings_across_rounds():
    inner = Attempts({
        "L": ["<think>ok1; ok2; ok3</think>A" + EOS],  # runs out of budget mid-step
        "S": ["<think>ok1; X ok2</think>" + EOS],  # the caller's stop "; X" spans two rounds
    })  # fmt: skip
    eng = _engine(inner, threshold=0.5)
    ro = eng.generate([_ids("L"), _ids("S")], SamplingParams(max_new_tokens=14, stop_strings=["; X"]))
    assert ro.texts[0] == TOK.decode(_ids("<think>ok1; ok2; ok3</think>A")[:14])
    assert ro.finish_reason == ["length", "stop"]
    assert ro.texts[1] == "<think>ok1; X"
    with pytest.raises(ModelError, match="keep masks"):
        eng.generate([_ids("L")], SamplingParams(return_keep_mask=True))
    with pytest.raises(ModelError, match="threshold or a patience"):
        _engine(inner)


@pytest.mark.parametrize("engine_name", ["native", "hf"])
def test_resampled_samples_carry_what_the_sampler_drew(engine_name, tiny_model, char_tok):
    """A random tiny model with "i" as the step separator (a frequent character, also inside
    special tokens: no think-block logic here, every piece counts): step 1
    scores 0.9, later steps 0.2, so every second step sends a sample back to its first.
    The returned ids are the kept prefix + what the last inner call sampled from it, and
    every sampling log-prob equals the training forward's."""
    inner = make_engine(engine_name, tiny_model, char_tok)
    calls = []

    class Recorder:
        def sync_weights(self, model):
            pass

        def generate(self, prompts, params):
            ro = inner.generate(prompts, params)
            calls.extend((list(p) if params.n == 1 else None, ro, j) for j, p in enumerate(prompts))
            return ro

    def scorer(prompts, completions):  # steps: the text's non-empty pieces between "i"s
        scores, ends = [], []
        for text in completions:
            cuts = list(itertools.accumulate(len(piece) + 1 for piece in text.split("i")))
            ends.append([c - 1 for c, piece in zip(cuts, text.split("i")) if piece])
            scores.append([0.9, *[0.2] * len(ends[-1])][: len(ends[-1])])
        return scores, ends

    eng = PRMGuidedEngine(Recorder(), char_tok, scorer, step_separator="i",
                          threshold=0.5, mode="resample", max_resamples=2)  # fmt: skip
    prompt = _ids("What is 2+3?")
    ro = eng.generate([prompt], SamplingParams(max_new_tokens=48, n=16, seed=1, ignore_eos=True))
    assert eng.totals["resamples"] >= 3 and eng.totals["tokens_discarded"] > 0
    seqs = build_sequences(ro.prompt_ids, ro.response_ids, ro.mask, char_tok.pad_token_id)
    train_lp, _ = sequence_logprobs(tiny_model, seqs)
    assert torch.allclose(train_lp * ro.mask, ro.sampling_logprobs, atol=1e-4)
    checked = 0
    for b in range(len(ro)):
        r = ro.response_ids[b, : int(ro.mask[b].sum())].tolist()
        for ctx, call_ro, j in calls:  # the call that wrote this sample's tail from a kept prefix
            if ctx is None or len(ctx) <= len(prompt) or ctx != prompt + r[: len(ctx) - len(prompt)]:
                continue
            m = len(ctx) - len(prompt)
            tail = call_ro.response_ids[j, : int(call_ro.mask[j].sum())].tolist()
            if tail and r[m:] == tail:
                assert (
                    ro.sampling_logprobs[b, m : len(r)].tolist()
                    == call_ro.sampling_logprobs[j, : len(tail)].tolist()
                )
                checked += 1
    assert checked >= 3


def test_rl_config_errors(tmp_path):
    from posttrain.train.config.loader import load_config
    from posttrain.train.rl.controller import RLConfig, plan

    prm = tmp_path / "prm"
    prm.mkdir()
    on = [f"rollout.prm_guide.model_path={prm}", "rollout.prm_guide.threshold=0.5"]
    for bad, key in (
        (["rollout.prm_guide.threshold=0.5"], "model_path"),
        ([f"rollout.prm_guide.model_path={prm}"], "threshold and/or patience"),
        ([f"rollout.prm_guide.model_path={prm}", "rollout.prm_guide.threshold=1.5"], "threshold"),
        ([*on, "rollout.prm_guide.max_resamples=2"], "max_resamples"),
        ([*on, "rollout.prm_guide.mode=resample", "rollout.prm_guide.max_resamples=0"], "max_resamples"),
        ([*on, "rollout.thinking_budget=8"], "thinking_budget"),
        ([*on, "env.name=tools"], "env.name"),
        ([*on, "rollout.repetition_ngram=3"], "repetition_ngram"),
    ):
        with pytest.raises(ConfigError, match=key) as err:
            plan(load_config(RLConfig, None, bad))
        assert "prm_guide" in str(err.value) and "\n" not in str(err.value)


def test_a_missing_prm_is_a_one_line_error_before_any_model(tmp_path, monkeypatch, capsys):
    from posttrain import cli

    monkeypatch.chdir(tmp_path)
    args = ["rl", "--rollout.prm_guide.model_path", "runs/none", "--rollout.prm_guide.threshold", "0.5"]
    assert cli.main([*args, "--dry-run"]) == 0  # a later stage's PRM need not exist yet to plan
    assert "PRM (frozen: runs/none; rollout guide, mode stop)" in capsys.readouterr().out
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rollout.prm_guide.model_path" in err and "runs/none" in err
