"""The rollout-collection phase of one RL step (`collect`), and dense-reward placement.

`collect` runs the generate + reward phase of one step, including DAPO dynamic sampling
(drop zero-variance groups and keep generating, at most `max_gen_rounds` extra rounds,
until the batch is full). `dense_token_rewards` puts per-step rewards (a PRM's, an
environment's) on the token that ends each step (train/rl/dense.py). Building the roles is
train/rl/setup.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from posttrain.algos.spec import RLSpec
from posttrain.engines.batching import build_sequences
from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.errors import ConfigError
from posttrain.roles import (
    Generator,
    PromptItem,
    PromptSource,
    RewardRole,
    RLBatch,
)
from posttrain.train.config.rl import RLConfig
from posttrain.train.rl.dense import model_prompts
from posttrain.train.rl.prm_guide import prm_guide_metrics
from posttrain.train.rl.shards import _pad_cat, _success, sample_round

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- collection


def filter_by_difficulty(
    cfg: RLConfig, items: list[PromptItem], generator: Generator, rewards: RewardRole, tokenizer
) -> tuple[list[PromptItem], str | None]:
    """Kimi k1.5 / Qwen3 difficulty filter: keep prompts the initial policy rarely solves.

    Returns (kept items, the JSON record to write as difficulty_filter.json — None when it
    was read back from a resumed run).

    Samples k = data.difficulty_filter_k responses per prompt (the run's sampling settings),
    counts successes (see `_success`) and keeps prompts with at most
    data.difficulty_filter_max_solved of them. The kept ids are written to
    run_dir/difficulty_filter.json when training starts, and a resumed run reads them back instead of
    re-filtering with the (by then trained) policy, so resume stays exact.
    """
    import json

    from posttrain.data.selection import difficulty_filter

    path = Path(cfg.run.output_dir) / "difficulty_filter.json"
    if cfg.run.resume and path.exists():
        kept_ids = set(json.loads(path.read_text())["kept"])
        return [it for it in items if it.id in kept_ids], None
    k = cfg.data.difficulty_filter_k
    params = replace(_sampling_params(cfg, seed=cfg.run.seed * 7919 + 17), n=k)

    def count(batch_items: list[PromptItem], k: int) -> list[int]:
        counts = []
        for start in range(0, len(batch_items), max(1, cfg.rollout.prompts_per_step)):
            chunk = batch_items[start : start + cfg.rollout.prompts_per_step]
            ro = generator.generate([it.prompt_ids for it in chunk], params)
            samples = [chunk[int(g)] for g in ro.group_id]
            columns = {
                key: [it.columns.get(key) for it in samples]
                for key in {c for it in chunk for c in it.columns}
            }
            columns["response_length"] = ro.mask.sum(-1).long().tolist()
            columns["group_id"] = ro.group_id.tolist()
            columns["model_prompt"] = model_prompts(tokenizer, samples)
            res = rewards.score([it.text for it in samples], ro.texts, columns, 0)
            success = _success(res, res.scores.float(), cfg.data.success_reward) >= 0.5  # [B]
            counts += [int(success[ro.group_id == g].sum()) for g in range(len(chunk))]
        return counts

    result = difficulty_filter(items, count, k=k, max_successes=cfg.data.difficulty_filter_max_solved)
    if not result.kept:
        raise ConfigError(
            f"data.difficulty_filter_k={k}: every one of {len(items)} prompts was solved more than "
            f"{cfg.data.difficulty_filter_max_solved} times; raise data.difficulty_filter_max_solved or use harder data"
        )
    # Written by the trainer once the run starts writing (rundir.begin_run), never before:
    # a run that fails later must not touch an existing run's copy.
    record = json.dumps(
        {
            "k": k,
            "kept": [it.id for it in result.kept],
            "counts": dict(zip([it.id for it in items], result.counts)),
        }
    )
    log.info("difficulty filter: kept %d of %d prompts (k=%d)", len(result.kept), len(items), k)
    return result.kept, record


def _sampling_params(cfg: RLConfig, seed: int, *, keep_mask: bool = False) -> SamplingParams:
    ro = cfg.rollout
    return SamplingParams(
        temperature=ro.temperature,
        top_p=ro.top_p,
        top_k=ro.top_k,
        max_new_tokens=ro.max_new_tokens,
        stop_strings=list(ro.stop_strings),
        n=ro.group_size,
        seed=seed,
        return_keep_mask=keep_mask,
        repetition_ngram=ro.repetition_ngram,
    )


def _group_has_signal(
    scores: torch.Tensor, valid: torch.Tensor, group: torch.Tensor, n_groups: int
) -> torch.Tensor:
    """[n_groups] bool: the group has >= 2 valid samples whose scores differ (DAPO filter)."""
    keep = torch.zeros(n_groups, dtype=torch.bool)
    for g in range(n_groups):  # over prompts, not tokens: a handful per step
        s = scores[(group == g) & valid]
        keep[g] = s.numel() >= 2 and bool((s.max() - s.min()) > 0)
    return keep


def collect(
    cfg: RLConfig,
    spec: RLSpec,
    step: int,
    *,
    generator: Generator,
    rewards: RewardRole,
    prompts: PromptSource,
    tokenizer,
    version: int | None = None,
    before_segment: Callable[[int], None] | None = None,
) -> tuple[RLBatch, dict[str, float]]:
    """Generate and reward one step's batch; returns (RLBatch, metrics).

    Talks only to the roles it is given: `prompts` (which prompts, success feedback),
    `generator` (rollouts, its counters), `rewards` (scores, dense rewards); `tokenizer`
    decodes prompts for rewards and pads the batch.
    version: the policy version the generator is synced to (None = `step`, the synchronous
    loop's); it fills RLBatch.versions unless the rollout records its own per token
    (partial rollouts). before_segment: with rollout.partial_tokens, called before each
    segment to sync the generator (train/rl/async_rollouts.py).
    """
    version = step if version is None else version
    P = cfg.rollout.prompts_per_step
    source = prompts
    parts: list[
        tuple[list[int], Rollout, Any, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]
    ] = []
    all_scores, all_valid, per_reward, errors, dense_stats = [], [], {}, {}, {}
    turn_stats: dict[str, list[float]] = {}
    gen_s = reward_s = 0.0
    n_tokens = n_sampled = 0
    kept_groups = rounds = dropped = zero_var = seen_groups = 0
    guided = cfg.rollout.prm_guide.model_path is not None
    before = generator.counters() if guided or cfg.rollout.thinking_budget else {}
    successes: list[torch.Tensor] = []  # [b] per kept sample, for success-rate sampling
    while True:
        idx = source.next(P - kept_groups, step, rounds)
        items = source.get(idx)
        params = _sampling_params(
            cfg, seed=cfg.run.seed * 1_000_003 + step * 101 + rounds, keep_mask=spec.keep_sampling_mask
        )
        r = sample_round(
            cfg, step, items, params, seen_groups, generator=generator, rewards=rewards, tokenizer=tokenizer,
            before_segment=before_segment,
        )  # fmt: skip
        ro, scores, valid, success, dense = r.ro, r.scores, r.valid, r.success, r.dense
        versions = getattr(ro, "versions", None)  # [B, T] per token (partial rollouts)
        if versions is None:  # whole generations: every token from the generator's version
            versions = torch.full(ro.mask.shape, version, dtype=torch.long)
        gen_s += r.gen_s
        reward_s += r.reward_s
        n_tokens += int(ro.mask.sum())
        n_sampled += len(ro)
        for k, v in r.per_reward.items():
            per_reward.setdefault(k, []).append(v)
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + int(v)
        if ro.turn_stats is not None:
            for k, v in ro.turn_stats.items():
                turn_stats.setdefault(k, []).extend(v)
        for k, v in r.stats.items():
            dense_stats.setdefault(k, []).append(v)
        all_scores.append(scores)
        all_valid.append(valid)
        n_groups = len(items)
        # A group whose samples differ only in their dense rewards still carries signal.
        total = scores if dense is None else scores + dense.sum(-1)
        signal = _group_has_signal(total, valid, ro.group_id, n_groups)
        zero_var += int((~signal).sum())
        seen_groups += n_groups
        keep = signal if spec.dynamic_sampling else torch.ones(n_groups, dtype=torch.bool)
        rows = keep[ro.group_id]  # [B] samples of kept groups
        if spec.dynamic_sampling:
            dropped += int((~keep).sum())
        if rows.any():
            parts.append(
                (idx, ro, rows, torch.where(valid, scores, torch.zeros_like(scores)), valid, dense, versions)
            )
            successes.append(success[rows])
            kept_groups += int(keep.sum())
        rounds += 1
        if not spec.dynamic_sampling or kept_groups >= P or rounds > spec.max_gen_rounds:
            break
    if not parts:  # nothing had signal: train on the last round (all advantages are 0)
        successes.append(success)
        parts.append(
            (
                idx,
                ro,
                torch.ones(len(ro), dtype=torch.bool),
                torch.where(valid, scores, torch.zeros_like(scores)),
                valid,
                dense,
                versions,
            )
        )
    batch = _merge(parts, tokenizer.pad_token_id)
    scores_all = torch.cat(all_scores)
    valid_all = torch.cat(all_valid)
    good = scores_all[valid_all]
    lengths = batch.seq.response_mask.sum(-1)
    metrics: dict[str, float] = {
        "reward/mean": float(good.mean()) if good.numel() else float("nan"),
        "reward/std": float(good.std()) if good.numel() > 1 else 0.0,
        "reward/valid_frac": float(valid_all.float().mean()),
        "rollout/zero_var_group_frac": zero_var / max(1, seen_groups),
        "rollout/gen_rounds": rounds,
        "rollout/dropped_groups": dropped,
        "rollout/batch_groups": len({int(g) for g in batch.group_id}),
        "rollout/batch_size": len(batch),
        "rollout/length_mean": float(lengths.mean()),
        "rollout/length_max": float(lengths.max()),
        "rollout/truncated_frac": sum(r == "length" for r in batch.finish_reason) / max(1, len(batch)),
        "rollout/tokens_per_s": n_tokens / max(gen_s, 1e-9),
        "time/generate_s": gen_s,
        "time/reward_s": reward_s,
    }
    after = generator.counters() if before else {}
    if cfg.rollout.thinking_budget:  # share of this step's samples whose thinking was cut
        thinking_cut = after["thinking_cut"] - before["thinking_cut"]
        metrics["rollout/thinking_cut_frac"] = thinking_cut / max(1, n_sampled)
    if guided:  # rollout.prm_guide's running counts
        metrics.update(prm_guide_metrics(before["prm"], after["prm"], cfg.rollout.max_new_tokens))
    for k, vs in per_reward.items():
        v = torch.cat(vs)
        v = v[torch.isfinite(v)]
        metrics[f"reward/{k}"] = float(v.mean()) if v.numel() else float("nan")
    for k, n in errors.items():
        metrics[f"reward/errors_{k}"] = n
    for k, vs in dense_stats.items():
        sums, no_steps = torch.cat([v[0] for v in vs]), torch.cat([v[1] for v in vs])
        metrics[f"reward/{k}_dense_mean"] = float(sums.mean())
        metrics[f"reward/{k}_no_steps_frac"] = float(no_steps.float().mean())
    if turn_stats:  # multi-turn rollouts: every sample generated this step, dropped groups too
        n, calls = max(1, len(turn_stats["turns"])), sum(turn_stats["tool_calls"])
        metrics["tools/turns_mean"] = sum(turn_stats["turns"]) / n
        metrics["tools/call_rate"] = sum(c > 0 for c in turn_stats["tool_calls"]) / n
        metrics["tools/calls_per_sample"] = calls / n
        metrics["tools/error_rate"] = sum(turn_stats["tool_errors"]) / max(1, calls)
        metrics["env/return_mean"] = sum(turn_stats["return"]) / n
    if spec.teacher_mode == "none" or rewards.configured():
        ok = batch.valid.tolist()
        idx_list, succ = batch.item_index.tolist(), torch.cat(successes).tolist()
        source.update([i for i, v in zip(idx_list, ok) if v], [s for s, v in zip(succ, ok) if v])
    return batch, metrics


def _merge(parts, pad_id: int) -> RLBatch:
    """Concatenate the kept rows of every generation round into one RLBatch."""
    prompt_ids, resp, masks, slp, finish, texts, gids, items, scores, valids, keeps, dense, vers = (
        [] for _ in range(13)
    )
    offset = 0
    for idx, ro, rows, sc, ok, dr, ver in parts:
        r = rows.nonzero().squeeze(1)
        prompt_ids += [ro.prompt_ids[i] for i in r.tolist()]
        resp.append(ro.response_ids[r])
        masks.append(ro.mask[r].float())
        slp.append(ro.sampling_logprobs[r].float())
        finish += [ro.finish_reason[i] for i in r.tolist()]
        texts += [ro.texts[i] for i in r.tolist()]
        gids.append(ro.group_id[r] + offset)
        items.append(torch.tensor([idx[int(g)] for g in ro.group_id[r]], dtype=torch.long))
        scores.append(sc[r])
        valids.append(ok[r])
        if ro.keep_ids is not None:
            keeps.append(ro.keep_ids[r])
        if dr is not None:
            dense.append(dr[r])
        vers.append(ver[r])
        offset += len(idx)
    response_ids = _pad_cat(resp, pad_id).long()
    mask = _pad_cat(masks, 0.0)
    seq = build_sequences(prompt_ids, response_ids, mask, pad_id)
    valid = torch.cat(valids)
    keep_ids = None
    if keeps:  # [B, T, K]: rounds differ in T and K; −1 pads (no kept token, as after a row's end)
        width, k_max = mask.shape[1], max(k.shape[2] for k in keeps)
        keep_ids = torch.cat(
            [
                torch.nn.functional.pad(k, (0, k_max - k.shape[2], 0, width - k.shape[1]), value=-1)
                for k in keeps
            ],
            dim=0,
        )
    return RLBatch(
        seq=seq,
        mask=mask * valid.to(mask.dtype)[:, None],  # an excluded sample teaches nothing
        sampling_logprobs=_pad_cat(slp, 0.0),
        group_id=torch.cat(gids),
        scores=torch.cat(scores),
        valid=valid,
        item_index=torch.cat(items),
        finish_reason=finish,
        texts=texts,
        keep_ids=keep_ids,
        dense_rewards=_pad_cat(dense, 0.0) if dense else None,
        versions=_pad_cat(vers, 0).long(),
    )
