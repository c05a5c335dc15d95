"""Multi-turn rollouts: token in, token out.

`MultiTurnEngine` wraps any single-turn engine (native, hf, vllm) and an environment
factory (data/envs). Per sample it alternates

    model turn  — sampled by the inner engine from the exact ids so far (prompt + every
                  earlier turn and observation); the sampled ids and their log-probs are
                  kept as they are
    observation — the environment's text for that turn, rendered as a ``tool`` message of
                  the tokenizer's chat template (`observation_text`) and tokenized once

until the environment ends the episode, `max_turns` model turns were taken, or the
trajectory reaches `max_total_tokens`. The Rollout's response is the concatenation
[turn_1, obs_1, turn_2, obs_2, ..., turn_k]: mask 1 and the sampler's log-probs on the
model's tokens, mask 0 and log-prob 0 on observation tokens. The model's text is
decoded only to hand it to the environment; the trained ids are the sampled ids, so
there is no tokenization drift between sampler and trainer, whatever decode→encode
would do. A trajectory cut by the turn limit or the token budget finishes with
"length" (so overlong masking applies); an observation after the last model turn is
dropped (nothing follows it to train).

Samples of a step run their turns in lockstep: turn k of every unfinished sample is one
batched generate call of the inner engine, so trajectories of different lengths and
turn counts batch together.

KV-cache continuation: an inner engine with `generate_cached` (the native engine) hands
back each row's keys/values, and turn k+1 pre-fills only the row's last sampled token and
its observation instead of the whole conversation (engines/rollout/native_cache.py: same
tokens, log-probs equal to float rounding). Engines without it (hf, vllm, or the native
engine behind a wrapper such as the thinking budget) re-encode by construction. A batch
that should continue but cannot (a row's cached ids are not a prefix of its sequence)
is re-encoded, warned once and counted as ``perf/fallback_kv_continuation``
(engines/fastpath.py). `continue_kv=False` always re-encodes (the benchmark's baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from posttrain.engines.encoding import observation_text  # noqa: F401  (re-exported: tests, tasks)
from posttrain.engines.fastpath import record_fallback
from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.engines.rollout.common import rollout_from_rows
from posttrain.engines.rollout.segments import SegmentSchedule, run_segments

# The call format of data/envs/tools.py ends a tool-calling turn.
TOOL_CALL_END = "</tool_call>"


class MultiTurnEngine:
    """Multi-turn sampling over `engine` (see module docstring).

    env_factory: () -> a fresh environment (one per trajectory).
    max_turns: model turns per trajectory. max_total_tokens: response tokens (model +
        observation) per trajectory; each turn may sample at most what is left, and at
        most `SamplingParams.max_new_tokens`.
    continue_kv: continue from the inner engine's KV cache between turns where it has
        `generate_cached` (module docstring); False re-encodes every turn.
    """

    def __init__(self, engine, tokenizer, env_factory: Callable[[], Any], *, max_turns: int = 4,
                 max_total_tokens: int = 256, continue_kv: bool = True):  # fmt: skip
        if max_turns < 1 or max_total_tokens < 1:
            raise ValueError("max_turns and max_total_tokens must be >= 1")
        self.engine = engine
        self.tokenizer = tokenizer
        self.env_factory = env_factory
        self.max_turns = max_turns
        self.max_total_tokens = max_total_tokens
        self.continue_kv = bool(continue_kv)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def sync_weights(self, model: nn.Module) -> None:
        self.engine.sync_weights(model)

    @property
    def continues_from_cache(self) -> bool:
        """Whether turns after the first continue from the inner engine's KV cache (asked
        for, and the engine has `generate_cached`; decided per call, so swapping
        `self.engine` is honoured)."""
        return self.continue_kv and callable(getattr(self.engine, "generate_cached", None))

    def tool_schemas(self) -> list[dict]:
        return list(self.env_factory().tool_schemas())

    def generate(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        rows: Sequence[dict] | None = None,
        segments: SegmentSchedule | None = None,
    ) -> Rollout:
        """`params.n` trajectories per prompt (token-id prompts, chat template applied).

        rows: one dict per prompt for `Environment.reset` (e.g. {"prompt", "answer", ...});
        default: the decoded prompt only.
        segments: partial rollouts (module docstring, "Segments"): every model turn generated
        in segments of at most `segments.tokens` new tokens, `segments.before(j)` giving the
        version of segment j; the Rollout then carries `versions` [B, T].
        """
        if params.return_keep_mask:
            raise ValueError("keep sampling masks are not supported for multi-turn rollouts")
        n, tok = params.n, self.tokenizer
        B = len(prompts) * n
        rows = list(rows) if rows is not None else [{"prompt": tok.decode(p)} for p in prompts]
        envs = [self.env_factory() for _ in range(B)]
        for i, env in enumerate(envs):
            env.reset(rows[i // n])
        history = [[{"role": "user", "content": str(rows[i // n].get("prompt", ""))}] for i in range(B)]
        ids = [[] for _ in range(B)]  # response ids so far (model + observation tokens)
        counts = [[] for _ in range(B)]  # 1 = model token, 0 = observation token
        logps = [[] for _ in range(B)]
        rewards = [[] for _ in range(B)]  # (token index, reward) per answered turn
        stats = {"turns": [0] * B, "tool_calls": [0] * B, "tool_errors": [0] * B, "return": [0.0] * B}
        finish = ["length"] * B
        stops = list(dict.fromkeys([*params.stop_strings, TOOL_CALL_END]))
        caches: list[Any] = [None] * B  # per sample: the inner engine's KV cache (continue_kv)
        cached = self.continues_from_cache
        seg = None if segments is None else _SegmentedTurns(self, segments, caches, cached)
        versions = [[] for _ in range(B)]  # per token: the policy version (segments only)
        active = list(range(B))
        for turn in range(self.max_turns):
            room = [self.max_total_tokens - len(ids[i]) for i in active]
            active = [i for i, r in zip(active, room) if r > 0]
            if not active:
                break
            budget = min(params.max_new_tokens, max(self.max_total_tokens - len(ids[i]) for i in active))
            turn_params = replace(params, n=1, max_new_tokens=budget, stop_strings=stops,
                                  seed=None if params.seed is None else params.seed + 7919 * turn)  # fmt: skip
            if turn == 0:
                order, seqs, row_caches = list(range(B)), list(prompts), None
                turn_params = replace(turn_params, n=n)
            else:
                order, seqs = active, [prompts[i // n] + ids[i] for i in active]
                row_caches = [caches[i] for i in active]
            if seg is None:
                ro = self._turn(seqs, turn_params, row_caches, order, caches, cached)
            else:
                ro = seg.turn(seqs, turn_params, order, continuing=turn > 0)
            next_active = []
            for j, i in enumerate(order):
                length = int(ro.mask[j].sum())
                length = min(length, self.max_total_tokens - len(ids[i]))
                new = ro.response_ids[j, :length].tolist()
                ids[i] += new
                counts[i] += [1] * len(new)
                logps[i] += ro.sampling_logprobs[j, :length].tolist()
                if seg is not None:  # padding of a turn's row holds its last version
                    versions[i] += ro.versions[j, :length].tolist()
                    seg.last[i] = int(ro.versions[j, length - 1] if length else ro.versions[j, -1])
                stats["turns"][i] += 1
                if ro.finish_reason[j] != "stop" or len(ids[i]) >= self.max_total_tokens:
                    finish[i] = "length" if ro.finish_reason[j] == "stop" else ro.finish_reason[j]
                    continue
                step = envs[i].step(ro.texts[j])
                if step.reward:
                    rewards[i].append((len(ids[i]) - 1, float(step.reward)))
                    stats["return"][i] += float(step.reward)
                stats["tool_calls"][i] += int(step.tool_call)
                stats["tool_errors"][i] += int(step.tool_error)
                if step.done:
                    finish[i] = "stop"
                    continue
                role = getattr(envs[i], "observation_role", "tool")
                history[i].append({"role": "assistant", "content": ro.texts[j]})
                obs = tok(observation_text(tok, history[i], step.observation, role), add_special_tokens=False)
                history[i].append({"role": role, "content": step.observation})
                if turn + 1 < self.max_turns and len(ids[i]) + len(obs["input_ids"]) < self.max_total_tokens:
                    ids[i] += obs["input_ids"]
                    counts[i] += [0] * len(obs["input_ids"])
                    logps[i] += [0.0] * len(obs["input_ids"])
                    if seg is not None:  # an observation carries the version of the token before it
                        versions[i] += [seg.last[i]] * len(obs["input_ids"])
                    next_active.append(i)
                # else: no room for the observation and another turn: cut here ("length")
            active = next_active
            for i in set(order) - set(active):  # finished: its cache is not needed any more
                caches[i] = None
        ro = self._assemble(prompts, n, ids, counts, logps, rewards, finish, stats)
        if seg is not None:
            ro.versions = seg.versions_tensor(versions, ro.mask.shape)
        return ro

    def _turn(self, seqs, params: SamplingParams, row_caches, order, caches, cached: bool) -> Rollout:
        """One batched turn: continued from the rows' caches where possible (turn 0:
        row_caches None), else re-encoded; stores the returned caches by sample."""
        if not cached:
            return self.engine.generate(seqs, params)
        if row_caches is not None:
            stale = [j for j, (s, c) in enumerate(zip(seqs, row_caches))
                     if c is None or len(s) <= len(c.ids) or s[: len(c.ids)] != c.ids]  # fmt: skip
            if stale:
                record_fallback("kv_continuation", "a sample's cached ids are not a prefix of its next turn's "
                                "sequence; the batch is re-encoded")  # fmt: skip
                return self.engine.generate(seqs, params)
        ro, got = self.engine.generate_cached(seqs, params, row_caches)
        for j, i in enumerate(order):
            caches[i] = got[j]
        return ro

    def _assemble(self, prompts, n, ids, counts, logps, rewards, finish, stats) -> Rollout:
        ro = rollout_from_rows(prompts, n, ids, counts, logps, finish, self.tokenizer)
        ro.turn_rewards = torch.zeros_like(ro.mask)  # [B, T]
        for i in range(len(ids)):
            for t, r in rewards[i]:
                ro.turn_rewards[i, t] += r
        ro.turn_stats = stats
        return ro


class _SegmentedTurns:
    """The model turns of one multi-turn `generate` call, each generated in segments by
    segments.py's `run_segments` over the inner engine (module docstring, "Segments").

    Holds the segment counter (running on across turns), the version of the segment being
    sampled, and per sample the version whose weights computed its KV cache (`stamps`): a
    turn continues from the caches only when every one of them was computed under the
    current version; after a sync the batch is re-encoded under the new weights.
    """

    def __init__(self, engine: MultiTurnEngine, schedule: SegmentSchedule, caches: list, cached: bool):
        self.engine, self.schedule, self.caches, self.cached = engine, schedule, caches, cached
        self.stamps: list[int | None] = [None] * len(caches)
        self.last: list[int] = [0] * len(caches)  # per sample: the version of its last token
        self.segment = 0  # the next segment's index j
        self.version = 0  # the version of the segment being sampled
        inner = engine.engine
        self.view = SimpleNamespace(tokenizer=engine.tokenizer, pad_id=engine.pad_id,
                                    config=getattr(inner, "config", None),
                                    context_length=getattr(inner, "context_length", None))  # fmt: skip

    def turn(
        self, seqs: list[list[int]], params: SamplingParams, order: list[int], *, continuing: bool
    ) -> Rollout:
        """One model turn of the samples `order` (turn 0: every sample, seqs = the prompts,
        params.n per prompt), generated in segments; the Rollout carries `versions`."""
        first = self.segment
        opening = [True]  # the turn's first segment may continue from the previous turn's caches

        def before(m: int) -> int:
            self.segment = first + m + 1
            self.version = int(self.schedule.before(first + m))
            return self.version

        def sample(call_seqs, seg_params, rows):
            samples = [order[r] for r in rows]
            row_caches = None
            if opening[0] and continuing:
                row_caches = [self.caches[i] for i in samples]
                if any(self.stamps[i] != self.version for i in samples if self.caches[i] is not None):
                    row_caches = None  # computed under older weights: re-encode (required, not a fallback)
            opening[0] = False
            ro = self.engine._turn(call_seqs, seg_params, row_caches, samples, self.caches, self.cached)
            for i in samples:
                self.stamps[i] = self.version
            return ro

        return run_segments(self.view, seqs, params, replace(self.schedule, before=before), sample)

    def versions_tensor(self, versions: list[list[int]], shape: torch.Size) -> torch.Tensor:
        """[B, T] long: each sample's per-token versions, padding = its last version."""
        out = torch.zeros(shape, dtype=torch.long)
        for i, v in enumerate(versions):
            out[i, : len(v)] = torch.tensor(v, dtype=torch.long)
            out[i, len(v) :] = self.last[i]
        return out


def turn_metrics(turn_stats: dict[str, list]) -> dict[str, float]:
    """Tool metrics over the samples of `Rollout.turn_stats` lists: mean model turns, the
    share of samples with a tool call, calls per sample, tool errors per call, and the
    environment's mean summed reward."""
    samples = max(1, len(turn_stats["turns"]))
    calls = sum(turn_stats["tool_calls"])
    return {
        "tools/turns_mean": sum(turn_stats["turns"]) / samples,
        "tools/call_rate": sum(1 for c in turn_stats["tool_calls"] if c) / samples,
        "tools/calls_per_sample": calls / samples,
        "tools/error_rate": sum(turn_stats["tool_errors"]) / max(1, calls),
        "env/return_mean": sum(turn_stats["return"]) / samples,
    }
