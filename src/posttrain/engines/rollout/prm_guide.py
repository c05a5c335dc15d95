"""PRM-guided rollouts: early stop, or truncate and resample, when step scores fall.

The GRPO/PRM seed ("Advantages of PRM": "Supports early stopping: If intermediate step
scores keep dropping, can truncate and resample"; the chapter summary's "early stopping"):
a process reward model scores each reasoning step as it is written, PRM(x, y_≤t), and a
sample whose steps go bad is not written to the end.

`PRMGuidedEngine` wraps any rollout engine and keeps the `RolloutEngine` contract. Samples
are generated step by step in lockstep rounds: every round is one batched generate call of
the inner engine from the exact ids so far (prompt + kept response ids; nothing is ever
re-encoded from text), stopping at the step separator or ``</think>``. After a round, the
samples that ended at a step boundary have their complete steps scored (one scorer call)
and `prm_verdict` judges the steps not judged yet:

* threshold: step t is bad when s_t < threshold; the last good step is t − 1;
* patience K: step t is bad when the K steps t−K+1..t each scored below the step before
  (K drops in a row); the last good step is t − K, the one the decline started from.
  Both rules on: the first step that trips either; if both trip there, the earlier cut.

Then, per sample, `mode`:

* "stop": the sample ends right there (its bad step kept: it is what was written) with
  finish reason "prm_stop"; the budget it did not use is counted as tokens saved;
* "resample": the response is truncated just after the last good step's text (every step
  if none is good) and sampling goes on from that exact prefix; a sample truncated
  `max_resamples` times is stopped ("prm_stop") at its next bad step.

The kept prefix keeps its sampler log-probs and the new tokens bring theirs, so the
returned ids and log-probs are exactly what the inner engine sampled for that prefix and
continuation (mask 1 everywhere: every token was sampled by the policy). Samples ending any
other way keep the inner engine's finish reason ("stop" at EOS or a caller's stop string,
"length" at max_new_tokens). Steps follow the "prm" reward's split (the <think> text, or the
whole text without a think block, cut on the separator); only steps followed by a separator
or ``</think>`` are judged, so a step is never judged half-written.

Cost: one inner generate call per step (the prompt and prefix are prefilled again each
round: an engine with prefix caching pays little) plus one PRM forward over each judged
sample per round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.engines.rollout.common import encode_prompts, rollout_from_rows
from posttrain.engines.thinking import THINK_END
from posttrain.errors import ModelError

PRM_STOP = "prm_stop"
MODES = ("stop", "resample")
# (model prompts, completions) -> (per-step scores PRM(x, y≤t), each step's end offset in
# the completion): the "prm" reward's `scored_steps`.
StepScorer = Callable[[list[str], list[str]], tuple[list[list[float]], list[list[int]]]]


def prm_verdict(
    scores: Sequence[float], judged: int, threshold: float | None, patience: int
) -> tuple[int, int] | None:
    """(bad step, last good step), 1-based, for the first step t > judged that trips a rule
    (see module doc), else None. scores: s_1..s_k of the complete steps; judged: how many
    leading steps were accepted before (they are not judged again, but a decline may start
    among them)."""
    for t in range(judged + 1, len(scores) + 1):
        cuts = []
        if threshold is not None and scores[t - 1] < threshold:
            cuts.append(t - 1)
        if patience and t > patience and all(scores[i] < scores[i - 1] for i in range(t - patience, t)):
            cuts.append(t - patience)
        if cuts:
            return t, min(cuts)
    return None


class PRMGuidedEngine:
    """A RolloutEngine whose samples a PRM stops or truncates and resamples (module doc).

    step_scorer: see `StepScorer`; step_separator: what ends a step (the PRM's).
    threshold / patience: the rules (None / 0 = off; at least one on).
    mode: "stop" | "resample"; max_resamples: truncations per sample in resample mode.
    """

    def __init__(self, inner, tokenizer, step_scorer: StepScorer, *, step_separator: str,
                 threshold: float | None = None, patience: int = 0, mode: str = "stop",
                 max_resamples: int = 0):  # fmt: skip
        if mode not in MODES:
            raise ModelError(f"PRM guide mode must be one of {', '.join(MODES)}, got {mode!r}")
        if threshold is None and patience < 1:
            raise ModelError("PRM guide needs a threshold or a patience >= 1")
        if not step_separator or max_resamples < 0 or (mode == "resample" and max_resamples < 1):
            raise ModelError("PRM guide: non-empty separator; max_resamples >= 1 in resample mode")
        self.inner, self.tokenizer, self.step_scorer = inner, tokenizer, step_scorer
        self.separator, self.threshold, self.patience = step_separator, threshold, patience
        self.max_resamples = max_resamples if mode == "resample" else 0
        # Over every generate call: samples, those stopped, those truncated at least once,
        # truncations, unused budget of stopped samples, tokens cut away by truncations.
        self.totals = dict.fromkeys(
            ("samples", "stopped", "resampled", "resamples", "tokens_saved", "tokens_discarded"), 0
        )

    def __getattr__(self, name):  # everything else (close, ...) is the inner engine's
        return getattr(self.inner, name)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.inner.sync_weights(model)

    def generate(self, prompts, params: SamplingParams) -> Rollout:
        if params.return_keep_mask:
            raise ModelError("PRM-guided rollouts cannot return keep masks")
        prompt_ids = encode_prompts(prompts, self.tokenizer, None)
        n, B, cap = params.n, len(prompt_ids) * params.n, params.max_new_tokens
        prompt_texts = [self.tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids]
        ids: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        finish = ["length"] * B
        judged, resamples = [0] * B, [0] * B
        stops = list(dict.fromkeys([*params.stop_strings, self.separator, THINK_END]))
        active, rnd = list(range(B)), 0
        while active:
            room = {i: cap - len(ids[i]) for i in active}
            round_params = replace(params, n=1, max_new_tokens=max(room.values()), stop_strings=stops,
                                   seed=None if params.seed is None else params.seed + 7919 * rnd)  # fmt: skip
            if rnd == 0:
                ro = self.inner.generate(prompt_ids, replace(round_params, n=n))
            else:
                ro = self.inner.generate([prompt_ids[i // n] + ids[i] for i in active], round_params)
            at_boundary = []
            for j, i in enumerate(active):
                length = int(ro.mask[j].sum())
                before = len(self._text(ids[i])) if ids[i] else 0
                ids[i] += ro.response_ids[j, : min(length, room[i])].tolist()
                logps[i] += ro.sampling_logprobs[j, : min(length, room[i])].tolist()
                text = ro.texts[j]
                if length > room[i]:  # sampled past this sample's own budget: cut there
                    continue
                if self._stop_across_rounds(i, ids, logps, before, params.stop_strings):
                    finish[i] = "stop"
                elif ro.finish_reason[j] != "stop" or any(text.endswith(s) for s in params.stop_strings):
                    finish[i] = ro.finish_reason[j]
                elif text.endswith((self.separator, THINK_END)):
                    at_boundary.append(i)
                else:
                    finish[i] = "stop"  # EOS
            active = self._judge(at_boundary, prompt_texts, n, ids, logps, judged, resamples, finish, cap)
            rnd += 1
        self.totals["samples"] += B
        self.totals["resampled"] += sum(r > 0 for r in resamples)
        masks = [[1.0] * len(r) for r in ids]  # every token was sampled by the policy
        return rollout_from_rows(prompt_ids, n, ids, masks, logps, finish, self.tokenizer)

    def _judge(self, rows, prompt_texts, n, ids, logps, judged, resamples, finish, cap) -> list[int]:
        """Score the complete steps of `rows`, act on the verdicts; return the rows that go on."""
        if not rows:
            return []
        texts = [self._text(ids[i]) for i in rows]
        scores, ends = self.step_scorer([prompt_texts[i // n] for i in rows], texts)
        go_on = []
        for i, text, sc, en in zip(rows, texts, scores, ends):
            if sc and not any(m in text[en[-1] :] for m in (self.separator, THINK_END)):
                sc, en = sc[:-1], en[:-1]  # the last step is not closed yet
            verdict = prm_verdict(sc, judged[i], self.threshold, self.patience)
            if verdict is None:  # (right after a truncation the kept last step is not closed yet)
                judged[i] = max(judged[i], len(sc))
                if len(ids[i]) < cap:
                    go_on.append(i)
                continue
            good = verdict[1]
            if resamples[i] < self.max_resamples:
                keep = self._tokens_for(ids[i], en[good - 1]) if good else 0
                self.totals["tokens_discarded"] += len(ids[i]) - keep
                self.totals["resamples"] += 1
                del ids[i][keep:], logps[i][keep:]
                judged[i], resamples[i] = good, resamples[i] + 1
                go_on.append(i)
            else:
                finish[i] = PRM_STOP
                self.totals["stopped"] += 1
                self.totals["tokens_saved"] += cap - len(ids[i])
        return go_on

    def _stop_across_rounds(self, i, ids, logps, before: int, stop_strings) -> bool:
        """A caller's stop string that began before this round and ends in it (the inner
        engine only sees its own round): cut right after it. True when one was found."""
        if not before or not stop_strings:
            return False
        full = self._text(ids[i])
        hits = [full.find(s, max(0, before - len(s) + 1)) + len(s) for s in stop_strings]
        hits = [end for end, s in zip(hits, stop_strings) if end - len(s) >= 0 and end - len(s) < before]
        if not hits:
            return False
        keep = self._tokens_for(ids[i], min(hits))
        del ids[i][keep:], logps[i][keep:]
        return True

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _tokens_for(self, ids: list[int], chars: int) -> int:
        """Fewest leading tokens of `ids` whose decoded text covers `chars` characters."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._text(ids[:mid])) >= chars:
                hi = mid
            else:
                lo = mid + 1
        return lo
