"""Partial rollouts: one generation that continues, segment by segment, under newer weights.

Asynchronous RL (issue #19) lets generation run ahead of training; a long generation that
a weight update interrupts is not thrown away but continued under the new weights, and
every token records the policy version that sampled it. `generate_in_segments` is that
generation, written against the Generator role (roles/generator.py) only:

- segment j (j = 0, 1, ...) starts with `before_segment(j)`, where the caller may sync the
  generator to a newer policy version; `generator.version` read right after is the
  version of every token sampled in segment j;
- segment 0 samples `params.n` responses per prompt with at most `segment_tokens` new
  tokens; a sample that used its whole segment budget without finishing (no EOS / stop
  token / stop string / repetition, total below `params.max_new_tokens` and below the
  model's context) is *unfinished* and continues in segment j + 1 from its exact ids
  (prompt + response so far, never re-tokenised) with n = 1 and
  max_new_tokens = min(segment_tokens, remaining). The continuation's prompt is
  pre-filled under the weights of segment j + 1, so its tokens are exactly what that
  policy samples after the prefix;
- seeds: segment 0 uses `params.seed` itself (so one segment is a whole generation, bit
  for bit); segment j >= 1 uses `segment_seed(params.seed, j)`, the first 60 bits of
  SHA-256 of the text "<seed>:<j>" read as an integer. `params.seed` None stays None in
  every segment (the global RNG, as a whole generation).

The result is one Rollout shaped exactly like a whole generation's (per-sample
concatenation of the segments' ids / mask / sampling log-probs / keep ids, right-padded;
the finish reason of the sample's last segment; texts decoded from the full response ids)
plus `Rollout.versions` [B, T]: the policy version of each response token, and on padding
positions the version of the sample's last token (so per-row min / max need no mask).

Checks that span a boundary. An engine sees one segment's tokens as the response, so a
stop string whose characters straddle two segments, or an n-gram whose earlier repeats lie
in earlier segments, is invisible to it. After each continuation segment the full
response is re-checked position by position with the engines' own `StopStringMatcher`
and `repetition_hit`: the sample is cut right after the first token that completes a stop
string (finish "stop") or the repetition limit (finish "repetition"; stop wins at the
same token), exactly where a whole generation would have stopped. Tokens the engine
sampled after that point are dropped (they were sampled, never returned).

Deviation from a whole generation: the random draws differ (one stream per segment), so
with temperature > 0 the samples are different samples of the same distributions, not
the same samples; with temperature 0 (greedy) and unchanged weights they are the same
tokens up to floating-point differences between a prefill and a decode step. Engine
wrappers that themselves continue samples (the thinking budget, the PRM guide) see each
segment as a fresh generation, so their per-sample budgets restart per segment; the
caller's config validation must refuse them together with partial rollouts.

Multi-turn generators (an environment): `generate_in_segments` hands the schedule
(`SegmentSchedule`: the segment size and `before(j)` returning segment j's version) to the
multi-turn engine, which generates every model turn with `run_segments` — the loop above —
over its inner engine; the segment counter runs on across turns and a new turn starts a new
segment (engines/rollout/multiturn.py, "Segments").

Shapes: B = prompts x n samples, T = longest response, K = largest kept support.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.engines.rollout.common import (
    LENGTH,
    REASONS,
    StopStringMatcher,
    assemble_rollout,
    eos_ids,
    repetition_hit,
)

__all__ = ["SegmentSchedule", "generate_in_segments", "run_segments", "segment_seed"]

_CODES = {reason: code for code, reason in REASONS.items()}  # "stop" -> STOP, ...


def segment_seed(seed: int | None, segment: int) -> int | None:
    """The sampling seed of segment `segment`: `seed` for segment 0, else the first 60 bits
    of SHA-256("<seed>:<segment>") as an integer; None stays None (global RNG)."""
    if seed is None or segment == 0:
        return seed
    return int(hashlib.sha256(f"{seed}:{segment}".encode()).hexdigest()[:15], 16)


@dataclass
class _Sample:
    """One response being built: its prompt, the segments' pieces, and whether it is done."""

    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)  # per segment: [L] float32
    keep: list[torch.Tensor] = field(default_factory=list)  # per segment: keep ids [L, K]
    versions: list[int] = field(default_factory=list)  # per token
    version: int = 0  # of the last segment the sample was in (pads a sample of no tokens)
    reason: str = "length"
    done: bool = False


@dataclass(frozen=True)
class SegmentSchedule:
    """How a generation is cut into segments: at most `tokens` new tokens per segment, and
    `before(j)`, called before segment j is sampled, returning the policy version that
    samples it (it may sync newer weights first). What a multi-turn engine receives
    (engines/rollout/multiturn.py): its segment counter j runs on across turns."""

    tokens: int
    before: Callable[[int], int]


def generate_in_segments(
    generator,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    segment_tokens: int,
    before_segment: Callable[[int], None],
    rows: list[dict] | None = None,
) -> Rollout:
    """`params.n` samples per prompt, generated `segment_tokens` new tokens at a time (see the
    module docstring); returns the Rollout of a whole generation plus `versions` [B, T].

    generator: the Generator role (`generate(prompts, params)`, `version`, `multi_turn`,
        `engine_view()` with `tokenizer` / `pad_id` / `config` / `context_length`). prompts: token-id lists.
    before_segment(j): called before segment j is sampled (only when there is one to
        sample); it may `generator.sync(...)` to a newer policy version.
    rows: a multi-turn generator's per-prompt environment rows. A multi-turn generator
        generates each model turn in segments itself (`generate(..., segments=...)`,
        engines/rollout/multiturn.py), the counter j running on across turns.
    Raises ValueError for segment_tokens < 1.
    """
    if segment_tokens < 1:
        raise ValueError(f"generate_in_segments: segment_tokens must be >= 1, got {segment_tokens}")

    def before(j: int) -> int:
        before_segment(j)
        return int(generator.version)

    if generator.multi_turn:
        return generator.generate(
            prompts, params, rows=rows, segments=SegmentSchedule(segment_tokens, before)
        )
    return run_segments(
        generator.engine_view(),  # tokenizer, config, context length, pad id: no weights
        prompts,
        params,
        SegmentSchedule(segment_tokens, before),
        lambda seqs, seg_params, samples: generator.generate(seqs, seg_params),
    )


def run_segments(
    engine,
    prompts: list[list[int]],
    params: SamplingParams,
    schedule: SegmentSchedule,
    sample: Callable[[list[list[int]], SamplingParams, list[int]], Rollout],
) -> Rollout:
    """The segment loop of `generate_in_segments` over any single-turn sampler.

    engine: `tokenizer`, `pad_id`, `config` (or None), `context_length` (or None).
    sample(seqs, seg_params, samples): samples one segment; `samples` is the index of each
        sequence's sample (prompt-major, `params.n` per prompt): every sample in segment 0
        (seqs = the prompts, seg_params.n = params.n), the unfinished ones, in increasing
        order, after (seqs = prompt + response so far, n = 1).
    """
    context = getattr(engine, "context_length", None)
    checker = _BoundaryChecker(engine, params)
    samples = [_Sample(list(p)) for p in prompts for _ in range(params.n)]
    live = list(range(len(samples)))
    segment = 0
    while live:
        used = segment * schedule.tokens  # every live sample used every earlier segment's budget
        budget = min(schedule.tokens, params.max_new_tokens - used)
        version = int(schedule.before(segment))
        if segment == 0:
            seg_params = replace(params, max_new_tokens=budget)
            rollout = sample([list(p) for p in prompts], seg_params, list(live))
        else:
            seg_params = replace(params, n=1, max_new_tokens=budget, seed=segment_seed(params.seed, segment))
            rollout = sample([samples[i].prompt + samples[i].ids for i in live], seg_params, list(live))
        keep = rollout.keep_ids  # [b, T, K] or None (the Generator role's form of a keep mask)
        lengths = rollout.mask.sum(-1).long().tolist()
        for row, i in enumerate(live):
            sample_i, length = samples[i], lengths[row]
            new_ids = rollout.response_ids[row, :length].tolist()
            reason = rollout.finish_reason[row]
            if segment > 0:
                length, reason = checker.cut(sample_i.ids, new_ids, reason)
                new_ids = new_ids[:length]
            base = len(sample_i.ids)
            sample_i.ids += new_ids
            sample_i.logprobs.append(rollout.sampling_logprobs[row, :length])
            if keep is not None:
                sample_i.keep.append(keep[row, :length])
            sample_i.versions += [version] * length
            sample_i.version = version
            sample_i.reason = reason
            total = len(sample_i.ids)
            sample_i.done = not (
                reason == "length"
                and total - base == budget
                and total < params.max_new_tokens
                and (context is None or len(sample_i.prompt) + total < context)
            )
        live = [i for i in live if not samples[i].done]
        segment += 1
    return _assemble(samples, prompts, params, engine, checker.stop_ids)


class _BoundaryChecker:
    """Re-checks a continuation segment against the full response: stop strings that span
    the boundary and repetition counted over every segment (see the module docstring)."""

    def __init__(self, engine, params: SamplingParams):
        tokenizer = engine.tokenizer
        self.params = params
        self.stop_ids = eos_ids(tokenizer, getattr(engine, "config", None), params)
        vocab = getattr(getattr(engine, "config", None), "vocab_size", None) or len(tokenizer)
        self.strings = (
            StopStringMatcher(tokenizer, params.stop_strings, vocab) if params.stop_strings else None
        )

    def cut(self, before: list[int], new: list[int], reason: str) -> tuple[int, str]:
        """Tokens of `new` to keep and the finish reason, given the response ids `before` it
        and the engine's reason for `new`. The first token of `new` that completes a stop
        string or the repetition limit over before + new ends the sample there."""
        p = self.params
        if self.strings is None and not p.repetition_ngram:
            return len(new), reason
        full = torch.tensor(before + new, dtype=torch.long)[None]  # [1, base + L]
        base = len(before)
        # A stop string ending at token k of `new` with k >= max_len - 1 lies inside the
        # segment, where the engine's own matcher saw it; earlier ones may span the boundary.
        string_reach = min(len(new), self.strings.max_len - 1) if self.strings is not None else 0
        for k in range(len(new)):
            end = base + k + 1
            stop = k < string_reach and bool(self.strings.completed(full[:, :end], full[:, end - 1])[0])
            repeat = bool(p.repetition_ngram) and bool(
                repetition_hit(full[:, :end], p.repetition_ngram, p.repetition_max_repeats)[0]
            )
            if stop or repeat:
                engine_stop = k == len(new) - 1 and reason == "stop"
                return k + 1, "stop" if stop or engine_stop else "repetition"
        return len(new), reason


def _assemble(samples: list[_Sample], prompts, params: SamplingParams, engine, stop_ids) -> Rollout:
    """The Rollout of the finished samples through the engines' own `assemble_rollout`
    (padding, texts, finish reasons), plus the concatenated keep ids and the versions."""
    B, T = len(samples), max(len(s.ids) for s in samples)
    response_ids = torch.full((B, T), engine.pad_id, dtype=torch.long)
    sampling_logprobs = torch.zeros((B, T), dtype=torch.float32)
    versions = torch.zeros((B, T), dtype=torch.long)
    keep_ids = None
    if samples[0].keep:  # the Generator role hands keep masks on as keep ids [., K], -1 = none
        width = max(k.shape[-1] for s in samples for k in s.keep)
        keep_ids = torch.full((B, T, width), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        length = len(s.ids)
        response_ids[i, :length] = torch.tensor(s.ids, dtype=torch.long)
        sampling_logprobs[i, :length] = torch.cat(s.logprobs)
        versions[i, :length] = torch.tensor(s.versions, dtype=torch.long)
        versions[i, length:] = s.version
        at = 0
        for piece in s.keep:
            keep_ids[i, at : at + piece.shape[0], : piece.shape[-1]] = piece
            at += piece.shape[0]
    # codes only steer assemble_rollout's text cut (STOP); reasons are the samples' own
    codes = torch.tensor([_CODES.get(s.reason, LENGTH) for s in samples])
    lengths = torch.tensor([len(s.ids) for s in samples])
    rollout = assemble_rollout(
        engine, prompts, params.n, response_ids, lengths, sampling_logprobs, codes, params, stop_ids
    )
    reasons = [s.reason for s in samples]
    return replace(rollout, finish_reason=reasons, keep_ids=keep_ids, versions=versions)
