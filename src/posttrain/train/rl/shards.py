"""One generation round of an RL step, sampled in contiguous prompt shards — and, under
torch.distributed, each rank sampling its own shards.

Why shards: a sampler draws its random numbers for the whole batch it is given, so the
samples of a prompt depend on which other prompts share its `generate` call. To make N
processes sample exactly what one process samples, the round's prompt list (the same on
every rank: a pure function of (seed, step, round)) is cut into `rollout.shards`
contiguous shards (0 = the number of processes); shard s is generated in its own call
with seed `base + s · SHARD_SEED_STRIDE` (shard 0 keeps the base seed, so one process
with one shard samples as before). Rank r of N generates and rewards shards
[r·S/N, (r+1)·S/N) — whole GRPO groups, since a shard is a set of prompts — and the
shards' results are all-gathered in shard order, so every rank then holds the round's
full result, identical to what one process with `rollout.shards = N` computes. A generator
that is a pool of rollout workers (`run_shards`, the Ray backend's, train/rl/ray_pool.py)
runs one process's shards concurrently, one shard per worker call, results in shard order.

Generation makes no collective calls (the generator samples from a plain, full copy of the
policy, train/rl/dp.py), so shards may differ in size (a dynamic-sampling refill round
asks for a number of prompts that need not divide by N).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial

import torch

from posttrain.engines import distributed as dist
from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.train.rl.dense import dense_token_rewards, model_prompts

SHARD_SEED_STRIDE = 7_919_000_003


@dataclass
class RoundResult:
    """What one generation round produced, B samples: the rollout, scores [B] (raw,
    NaN where invalid), valid [B] bool, success [B] in [0, 1], per_reward name -> [B],
    errors name -> count, dense [B, T] or None, stats name -> (sums [B], no_steps [B]),
    and the seconds spent generating and rewarding (the slowest shard's under N ranks)."""

    ro: Rollout
    scores: torch.Tensor
    valid: torch.Tensor
    success: torch.Tensor
    per_reward: dict[str, torch.Tensor]
    errors: dict[str, int]
    dense: torch.Tensor | None
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]]
    gen_s: float
    reward_s: float


def _pad_cat(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
    """Concatenate [b_i, T_i, ...] tensors along dim 0, right-padding dim 1 with `value`."""
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]]
        padded.append(torch.nn.functional.pad(t, pad, value=value))
    return torch.cat(padded, dim=0)


def _success(res, scores: torch.Tensor, reward_name: str | None) -> torch.Tensor:
    """[B] per-sample success in [0, 1] for success-rate sampling.

    With `data.success_reward` set, that reward's own value (e.g. accuracy's 0/1), so
    shaping terms (format, length) do not count as solving the prompt; otherwise the
    summed score clipped to [0, 1]. Non-finite values (excluded samples) become 0.
    """
    chosen = res.per_reward.get(reward_name) if reward_name is not None else None  # None: not active yet
    raw = chosen.float() if chosen is not None else scores
    return torch.nan_to_num(raw, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


def num_shards(cfg) -> int:
    """rollout.shards, or when it is 0 the number of processes (of rollout workers with
    backend: ray)."""
    if cfg.rollout.shards:
        return cfg.rollout.shards
    return cfg.ray.rollout_workers if cfg.backend == "ray" else dist.world_size()


def shard_bounds(n_items: int, shards: int) -> list[tuple[int, int]]:
    """[start, end) of each of `shards` contiguous shards of n_items (sizes differ by <= 1)."""
    base, extra = divmod(n_items, shards)
    bounds, start = [], 0
    for s in range(shards):
        end = start + base + (s < extra)
        bounds.append((start, end))
        start = end
    return bounds


def _one_shard(
    cfg, step, items, params, group_offset, *, generator, rewards, tokenizer, before_segment=None
) -> RoundResult:
    """Generate `items` (G samples each) in one call and reward them. With
    rollout.partial_tokens the call is `generate_in_segments` (segments of that many new
    tokens, `before_segment(j)` syncing the generator before segment j; with an environment,
    every model turn in segments, j running on across turns)."""
    t = time.perf_counter()
    env_rows = None
    if cfg.env.name is not None:  # the environment sees each prompt's row (answer, columns)
        env_rows = [{"prompt": it.text, "answer": it.answer, **it.columns} for it in items]
    if cfg.rollout.partial_tokens:  # a multi-turn generator segments each turn (multiturn.py)
        from posttrain.engines.rollout.segments import generate_in_segments

        ro = generate_in_segments(generator, [it.prompt_ids for it in items], params, rows=env_rows,
                                  segment_tokens=cfg.rollout.partial_tokens, before_segment=before_segment)  # fmt: skip
    else:
        ro = generator.generate([it.prompt_ids for it in items], params, rows=env_rows)
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    sample_items = [items[int(g)] for g in ro.group_id]
    columns: dict[str, list] = {}
    for key in sorted({k for it in items for k in it.columns}):
        columns[key] = [it.columns.get(key) for it in sample_items]
    # What length / group-aware rewards read (kimi_length, length_linear, dapo_overlong).
    columns["response_length"] = ro.mask.sum(-1).long().tolist()
    columns["group_id"] = (ro.group_id + group_offset).tolist()
    # The prompt exactly as the policy saw it (chat template applied): what reward and
    # process reward models trained by `posttrain rm` / `posttrain prm` score.
    columns["model_prompt"] = model_prompts(tokenizer, sample_items)
    if ro.turn_stats is not None:  # what the env_return reward reads
        columns["env_return"] = list(ro.turn_stats["return"])
    per_reward: dict[str, torch.Tensor] = {}
    errors: dict[str, int] = {}
    if rewards.configured():
        res = rewards.score([it.text for it in sample_items], ro.texts, columns, step)
        scores = res.scores.float()
        valid = res.valid.bool() & torch.isfinite(scores)
        success = _success(res, scores, cfg.data.success_reward)
        per_reward = {k: v.float() for k, v in res.per_reward.items()}
        errors = {k: int(v) for k, v in res.errors.items()}
    else:  # pure distillation: the teacher's dense reward is the only signal
        scores = torch.zeros(len(ro))
        valid = torch.ones(len(ro), dtype=torch.bool)
        success = scores
    dense, stats = dense_token_rewards(rewards, tokenizer, [it.prompt_ids for it in sample_items], ro, step)
    if cfg.env.dense_rewards and ro.turn_rewards is not None:  # each turn's reward at its last token
        dense = ro.turn_rewards if dense is None else dense + ro.turn_rewards
    return RoundResult(ro, scores, valid, success, per_reward, errors, dense, dict(stats), gen_s,
                       time.perf_counter() - t)  # fmt: skip


def _cat_rollouts(parts: list[tuple[int, Rollout]], pad_id: int) -> Rollout:
    """Concatenate shard rollouts; each part is (its first prompt's index in the round, rollout)."""
    ros = [ro for _, ro in parts]
    keep = [ro.keep_ids for ro in ros if ro.keep_ids is not None]
    keep_ids = None
    if keep:  # [B, T, K]: shards differ in T and K; −1 pads
        k_max = max(k.shape[2] for k in keep)
        keep_ids = _pad_cat([torch.nn.functional.pad(k, (0, k_max - k.shape[2]), value=-1) for k in keep], -1)
    turn_stats = None
    if ros[0].turn_stats is not None:
        turn_stats = {k: [v for ro in ros for v in ro.turn_stats[k]] for k in ros[0].turn_stats}
    out = Rollout(
        prompt_ids=[p for ro in ros for p in ro.prompt_ids],
        response_ids=_pad_cat([ro.response_ids for ro in ros], pad_id),
        mask=_pad_cat([ro.mask for ro in ros], 0.0),
        sampling_logprobs=_pad_cat([ro.sampling_logprobs for ro in ros], 0.0),
        finish_reason=[f for ro in ros for f in ro.finish_reason],
        group_id=torch.cat([ro.group_id + start for start, ro in parts]),
        texts=[t for ro in ros for t in ro.texts],
        keep_ids=keep_ids,
        turn_rewards=_pad_cat([ro.turn_rewards for ro in ros], 0.0)
        if ros[0].turn_rewards is not None
        else None,
        turn_stats=turn_stats,
    )
    if getattr(ros[0], "versions", None) is not None:  # partial rollouts: [B, T] version per token
        out = replace(out, versions=_pad_cat([ro.versions for ro in ros], 0))
    return out


def _cat_results(parts: list[tuple[int, RoundResult]], pad_id: int) -> RoundResult:
    """The round's result from its shards' results (in shard order)."""
    if len(parts) == 1:
        return parts[0][1]
    rs = [r for _, r in parts]
    cat = torch.cat
    dense = None
    if rs[0].dense is not None:
        dense = _pad_cat([r.dense for r in rs], 0.0)
    errors: dict[str, int] = {}
    for r in rs:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    return RoundResult(
        ro=_cat_rollouts([(start, r.ro) for start, r in parts], pad_id),
        scores=cat([r.scores for r in rs]),
        valid=cat([r.valid for r in rs]),
        success=cat([r.success for r in rs]),
        per_reward={k: cat([r.per_reward[k] for r in rs]) for k in rs[0].per_reward},
        errors=errors,
        dense=dense,
        stats={k: (cat([r.stats[k][0] for r in rs]), cat([r.stats[k][1] for r in rs])) for k in rs[0].stats},
        gen_s=max(r.gen_s for r in rs),
        reward_s=max(r.reward_s for r in rs),
    )


def _shard_job(cfg, step, items, params, seen_groups, start, rewards, tokenizer, before_segment, generator):
    """(start, the shard's RoundResult): `_one_shard` on the given generator."""
    return start, _one_shard(cfg, step, items, params, seen_groups + start, generator=generator,
                             rewards=rewards, tokenizer=tokenizer, before_segment=before_segment)  # fmt: skip


def sample_round(
    cfg,
    step: int,
    items,
    params: SamplingParams,
    seen_groups: int,
    *,
    generator,
    rewards,
    tokenizer,
    before_segment=None,
) -> RoundResult:
    """Generate and reward one round's `items` (the same list on every rank) in shards;
    every rank returns the whole round's result (see the module docstring)."""
    shards = num_shards(cfg)
    world, rank = dist.world_size(), dist.rank()
    per_rank = shards // world  # check_world (train/rl/dp.py) made shards a multiple of world
    jobs = []  # one per shard of this rank: generator -> (first prompt's index, its result)
    for s, (start, end) in enumerate(shard_bounds(len(items), shards)):
        if not rank * per_rank <= s < (rank + 1) * per_rank or end == start:
            continue
        seeded = replace(params, seed=None if params.seed is None else params.seed + s * SHARD_SEED_STRIDE)
        jobs.append(
            partial(
                _shard_job,
                cfg,
                step,
                items[start:end],
                seeded,
                seen_groups,
                start,
                rewards,
                tokenizer,
                before_segment,
            )  # fmt: skip
        )
    # A pool of rollout workers (the Ray backend's) runs the shards concurrently, each on one
    # of its workers; its results come back in shard order.
    run_shards = getattr(generator, "run_shards", None)
    mine = run_shards(jobs) if run_shards is not None else [job(generator) for job in jobs]
    if world > 1:
        dist.set_phase(f"step {step + 1} (gathering rollouts)")
        mine = [part for rank_parts in dist.all_gather_object(mine) for part in rank_parts]
        dist.set_phase(f"step {step + 1}")
    return _cat_results(mine, tokenizer.pad_token_id)
