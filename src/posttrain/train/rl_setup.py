"""Building the RL loop's roles from an RLConfig, and the rollout-collection phase.

`build_components` loads the policy/tokenizer, the rollout engine, the optional reference,
critic and teacher, the rewards and the prompt source. `collect` runs the generate +
reward phase of one step, including DAPO dynamic sampling (drop zero-variance groups and
keep generating, at most `max_gen_rounds` extra rounds, until the batch is full).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from posttrain.engines.batching import build_sequences
from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.errors import ConfigError, ModelError
from posttrain.train.input_checks import check_context, check_fills_a_batch, check_reward_columns
from posttrain.train.prm_guide import check_prm_guide_path, prm_guide_metrics, wrap_engine
from posttrain.train.rl_checks import uses_reference
from posttrain.train.rl_config import RLConfig, check_dense_reward
from posttrain.train.rl_roles import (
    CriticRole,
    PolicyRole,
    PromptItem,
    PromptSource,
    RewardRole,
    RLBatch,
    ScoringRole,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- building


def _load_policy(cfg: RLConfig, tokenizer):
    from posttrain.engines.models import load_model

    m = cfg.model
    source = m.path or m.preset
    lora = None
    if m.lora_r > 0:
        lora = {"r": m.lora_r, "alpha": m.lora_alpha, "target_modules": list(m.lora_target)}
    model = load_model(
        source,
        dtype=m.dtype,
        device=m.device,
        attn_implementation=m.attn_implementation,
        gradient_checkpointing=m.gradient_checkpointing,
        lora=lora,
        tokenizer=tokenizer,
    )
    return model


def make_env_factory(cfg: RLConfig):
    """() -> a fresh environment of cfg.env (None without one)."""
    if cfg.env.name is None:
        return None
    from posttrain.data.envs import make_env

    options = dict(cfg.env.options)
    if cfg.env.name == "tools":
        options["tools"] = list(cfg.env.tools)
    return lambda: make_env(cfg.env.name, **options)


def _template(tokenizer, text: str, cfg: RLConfig) -> list[int]:
    from posttrain.engines.encoding import encode_prompt

    factory = make_env_factory(cfg)
    # Tool declarations go where the model's template puts them (e.g. Qwen's system block).
    tools = factory().tool_schemas() if factory is not None else None
    return encode_prompt(
        tokenizer,
        text,
        chat_template=cfg.data.chat_template,
        enable_thinking=cfg.data.enable_thinking,
        tools=tools,
    )


def _items_from_examples(examples, tokenizer, cfg: RLConfig) -> list[PromptItem]:
    return [
        PromptItem(
            id=ex.id,
            text=ex.prompt,
            prompt_ids=_template(tokenizer, ex.prompt, cfg),
            answer=ex.answer,
            difficulty=ex.difficulty,
            # The reference solution is for rewards that check the reasoning (step_credit).
            columns={"answer": ex.answer, "solution": ex.solution},
        )
        for ex in examples
    ]


def _items_from_rows(rows: list[dict], tokenizer, cfg: RLConfig, source: str) -> list[PromptItem]:
    col = cfg.data.prompt_column
    items = []
    for i, row in enumerate(rows):
        extra = {k: v for k, v in row.items() if k != col}
        items.append(
            PromptItem(
                id=str(row.get("id", f"{source}:{i}")),
                text=row[col],
                prompt_ids=_template(tokenizer, row[col], cfg),
                answer=str(row.get("answer", "")),
                difficulty=int(row.get("difficulty", 1) or 1),
                columns=extra,
            )
        )
    return items


def _check_lengths(items: list[PromptItem], cfg: RLConfig, where: str) -> list[PromptItem]:
    limit = cfg.data.max_prompt_tokens
    long = [it for it in items if len(it.prompt_ids) > limit]
    if long and cfg.data.long_prompts == "error":
        it = long[0]
        raise ConfigError(
            f"{where}: prompt {it.id!r} has {len(it.prompt_ids)} tokens after the chat template, over "
            f"data.max_prompt_tokens={limit} (raise it or set data.long_prompts=skip)"
        )
    return [it for it in items if len(it.prompt_ids) <= limit]


def load_prompts(cfg: RLConfig, tokenizer):
    """(train items, eval examples or items, task or None) from a task, dataset files, or
    the environment's own prompt rows (an env with `dataset_rows`, e.g. a game's openings)."""
    d = cfg.data
    factory = make_env_factory(cfg)
    if not d.path and not d.task and factory is not None:
        env, data_seed = factory(), cfg.run.seed if d.seed is None else d.seed
        where = f"environment {cfg.env.name!r}"
        train = _check_lengths(_items_from_rows(env.dataset_rows("train", d.n_train, data_seed), tokenizer, cfg, where),
                               cfg, where)  # fmt: skip
        test = (
            _items_from_rows(env.dataset_rows("test", d.n_test, data_seed), tokenizer, cfg, where)
            if d.n_test
            else []
        )
        return train, test, None
    if d.path:
        from posttrain.data.datasets import load_rows

        rows = load_rows(d.path, "prompt", prompt_column=d.prompt_column)
        train = _check_lengths(_items_from_rows(rows, tokenizer, cfg, d.path), cfg, d.path)
        test: list = []
        if d.test_path:
            test = _items_from_rows(
                load_rows(d.test_path, "prompt", prompt_column=d.prompt_column), tokenizer, cfg, d.test_path
            )
        task = None
        if d.task:
            from posttrain.data.tasks import get_task

            task = get_task(d.task, **d.task_options)
        return train, test, task
    from posttrain.data.tasks import get_task

    task = get_task(d.task, **d.task_options)
    data_seed = cfg.run.seed if d.seed is None else d.seed
    train_ex = task.examples("train", d.n_train, seed=data_seed, difficulty=d.difficulty)
    test_ex = task.examples("test", d.n_test, seed=data_seed, difficulty=d.difficulty) if d.n_test else []
    train = _check_lengths(_items_from_examples(train_ex, tokenizer, cfg), cfg, f"task {d.task!r}")
    return train, test_ex, task


def build_rewards(cfg: RLConfig, key: str = "rewards") -> RewardRole:
    """Each entry of `cfg.rewards` (or of `cfg.eval.rewards` with key="eval.rewards") ->
    build_reward(name, **options), run by a RewardRunner.

    The "task" reward verifies with `cfg.data.task` unless its options name a task.
    """
    from posttrain.data.rewards import build_reward

    specs = []
    for i, spec in enumerate(cfg.eval.rewards if key == "eval.rewards" else cfg.rewards):
        options = dict(spec.options)
        if spec.name == "task" and "task" not in options and cfg.data.task:
            options["task"] = cfg.data.task
        try:
            fn = build_reward(spec.name, **options)
        except TypeError as e:
            raise ConfigError(f"{key}[{i}] ({spec.name!r}): bad options {sorted(options)}: {e}") from None
        if getattr(fn, "dense", False):  # also a "module:function" reward that marks itself dense
            check_dense_reward(spec.name, cfg.algo.pieces()["advantage"], cfg.algo.method)
        specs.append((spec.name, fn, spec.weight, spec.start_step))
    ex = cfg.reward_exec
    return RewardRole(
        specs, timeout_s=ex.timeout_s, max_workers=ex.max_workers, max_error_rate=ex.max_error_rate
    )


def build_components(cfg: RLConfig, p: dict[str, Any]) -> dict[str, Any]:
    """Every role of the loop for `cfg` with resolved pieces `p` (see RLTrainer)."""
    from posttrain.engines.models import build_value_model, load_model, load_tokenizer
    from posttrain.engines.rollout import make_engine

    check_prm_guide_path(cfg)
    ro = cfg.rollout
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path or cfg.model.preset)
    # The data is read and checked before any model is built.
    train_items, eval_examples, task = load_prompts(cfg, tokenizer)
    source = cfg.data.path or f"task {cfg.data.task!r}"
    check_fills_a_batch(len(train_items), ro.prompts_per_step, "rollout.prompts_per_step", source)
    check_reward_columns(cfg.rewards, train_items, source)
    lengths = [(f"prompt {it.id!r}", len(it.prompt_ids) + ro.max_new_tokens) for it in train_items]
    key = "data.max_prompt_tokens (prompt) or rollout.max_new_tokens (response)"
    check_context(cfg.model.path or cfg.model.preset, lengths, key)  # before the model when it can
    model = _load_policy(cfg, tokenizer)
    check_context(model, lengths, key)
    policy = PolicyRole(model, temperature=ro.temperature)
    engine_options = {}
    if ro.engine == "vllm":  # validate refused these keys for the other engines
        engine_options = {
            "gpu_memory_utilization": ro.vllm_gpu_memory_utilization,
            "sleep_between_calls": ro.vllm_sleep_mode,
        }
    engine = make_engine(ro.engine, model, tokenizer, **engine_options)
    if ro.thinking_budget:
        from posttrain.engines.rollout.budget import ThinkingBudgetEngine

        engine = ThinkingBudgetEngine(engine, tokenizer, ro.thinking_budget, ro.thinking_end_phrase)
    engine = wrap_engine(engine, tokenizer, cfg)  # rollout.prm_guide (off: unchanged)
    env_factory = make_env_factory(cfg)
    if env_factory is not None:
        from posttrain.engines.rollout.multiturn import MultiTurnEngine

        engine = MultiTurnEngine(engine, tokenizer, env_factory, max_turns=cfg.env.max_turns,
                                 max_total_tokens=cfg.env.max_total_tokens)  # fmt: skip
    needs_ref = uses_reference(p)
    reference = ScoringRole.reference_for(model, ro.temperature) if needs_ref else None
    critic = None
    if p["critic"]:
        source = cfg.critic.path or cfg.critic.preset or model
        # A zero head makes the critic start at V = 0: returns are learned from a neutral
        # baseline instead of a random one that would inject noise into the first advantages.
        critic = CriticRole(
            build_value_model(source, head_init_std=0.0, tokenizer=tokenizer, device=cfg.model.device)
        )
    teacher = None
    if p["teacher_mode"] != "none":
        tsrc = cfg.teacher.path or cfg.teacher.preset
        tmodel = load_model(tsrc, device=cfg.model.device, tokenizer=tokenizer).eval()
        if tmodel.get_output_embeddings().weight.shape[0] != model.get_output_embeddings().weight.shape[0]:
            raise ModelError(
                f"teacher {tsrc!r} has a different vocabulary from the policy; distillation needs one tokenizer"
            )
        for q in tmodel.parameters():
            q.requires_grad_(False)
        teacher = ScoringRole(tmodel, temperature=ro.temperature)
    rewards = (
        build_rewards(cfg) if cfg.rewards else RewardRole([], timeout_s=1, max_workers=1, max_error_rate=1)
    )
    filter_record = None
    if cfg.data.difficulty_filter_k > 0:
        train_items, filter_record = filter_by_difficulty(cfg, train_items, engine, rewards)
    prompts = PromptSource(
        train_items, selection=cfg.data.selection, seed=cfg.run.seed, total_steps=cfg.steps
    )
    return {
        "tokenizer": tokenizer,
        "policy": policy,
        "engine": engine,
        "reference": reference,
        "critic": critic,
        "teacher": teacher,
        "rewards": rewards,
        "prompts": prompts,
        "eval_examples": eval_examples,
        "task": task,
        "difficulty_filter_record": filter_record,
        # Held-out samples are scored with eval.rewards when given, else with the run's rewards.
        "eval_rewards": build_rewards(cfg, "eval.rewards") if cfg.eval.rewards else None,
    }


def filter_by_difficulty(
    cfg: RLConfig, items: list[PromptItem], engine, rewards: RewardRole
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
    params = replace(_sampling_params(cfg, {"keep_sampling_mask": False}, seed=cfg.run.seed * 7919 + 17), n=k)

    def count(batch_items: list[PromptItem], k: int) -> list[int]:
        counts = []
        for start in range(0, len(batch_items), max(1, cfg.rollout.prompts_per_step)):
            chunk = batch_items[start : start + cfg.rollout.prompts_per_step]
            ro = engine.generate([it.prompt_ids for it in chunk], params)
            samples = [chunk[int(g)] for g in ro.group_id]
            columns = {
                key: [it.columns.get(key) for it in samples]
                for key in {c for it in chunk for c in it.columns}
            }
            columns["response_length"] = ro.mask.sum(-1).long().tolist()
            columns["group_id"] = ro.group_id.tolist()
            columns["model_prompt"] = model_prompts(engine.tokenizer, samples)
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


def model_summary(cfg: RLConfig, p: dict[str, Any]) -> list[str]:
    """Lines for `plan`: models that will exist, parameter counts, a memory estimate."""
    from posttrain.engines.models import PRESETS, count_parameters, load_model

    m = cfg.model
    source = m.path or m.preset
    if source in PRESETS:
        n = count_parameters(load_model(source))
    else:
        n = None
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}[m.dtype]
    models = ["policy (trained)"]
    copies = 1
    if p["kl_placement"] != "none" and p["kl_coef"] > 0:
        models.append("reference (frozen copy)" if m.lora_r == 0 else "reference (policy with adapters off)")
        if cfg.algo.ref_refresh_every:
            models[-1] = f"reference (reset to the policy every {cfg.algo.ref_refresh_every} steps)"
        copies += 1 if m.lora_r == 0 else 0
    if p["critic"]:
        models.append("critic (trained)")
        copies += 1
    if p["teacher_mode"] != "none":
        models.append(f"teacher (frozen: {cfg.teacher.path or cfg.teacher.preset})")
    if cfg.rollout.prm_guide.model_path is not None:
        g = cfg.rollout.prm_guide
        models.append(f"PRM (frozen: {g.model_path}; rollout guide, mode {g.mode})")
    lines = [f"  models: {', '.join(models)}"]
    if n is not None:
        # weights + AdamW moments (2x) + grads for trained models; weights only for frozen ones.
        trained = 1 + (1 if p["critic"] else 0)
        est = n * bytes_per * copies + n * 4 * 3 * trained
        lines.append(f"  policy parameters: {n:,}; rough memory for weights/optimizer: {est / 2**20:.1f} MiB")
    else:
        lines.append(f"  policy: {source} (parameter count known after loading)")
    return lines


# --------------------------------------------------------------------------- collection


def _pad_cat(tensors: list[torch.Tensor], value: float) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    padded = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors]
    return torch.cat(padded, dim=0)


def _sampling_params(cfg: RLConfig, p: dict, seed: int) -> SamplingParams:
    ro = cfg.rollout
    return SamplingParams(
        temperature=ro.temperature,
        top_p=ro.top_p,
        top_k=ro.top_k,
        max_new_tokens=ro.max_new_tokens,
        stop_strings=list(ro.stop_strings),
        n=ro.group_size,
        seed=seed,
        return_keep_mask=bool(p["keep_sampling_mask"]),
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


def collect(trainer, step: int) -> tuple[RLBatch, dict[str, float]]:
    """Generate and reward one step's batch; returns (RLBatch, metrics)."""
    cfg, p = trainer.cfg, trainer.p
    P = cfg.rollout.prompts_per_step
    source: PromptSource = trainer.prompts
    parts: list[tuple[list[int], Rollout, Any, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    all_scores, all_valid, per_reward, errors, dense_stats = [], [], {}, {}, {}
    turn_stats: dict[str, list[float]] = {}
    gen_s = reward_s = 0.0
    n_tokens = thinking_cut = n_sampled = 0
    kept_groups = rounds = dropped = zero_var = seen_groups = 0
    guided = cfg.rollout.prm_guide.model_path is not None
    prm_before = dict(trainer.engine.totals) if guided else {}  # rollout.prm_guide's running counts
    successes: list[torch.Tensor] = []  # [b] per kept sample, for success-rate sampling
    while True:
        idx = source.next(P - kept_groups, step, rounds)
        items = [source.items[i] for i in idx]
        params = _sampling_params(cfg, p, seed=cfg.run.seed * 1_000_003 + step * 101 + rounds)
        t = time.perf_counter()
        cut_before = getattr(trainer.engine, "cut_total", 0)
        if cfg.env.name is not None:  # the environment sees each prompt's row (answer, columns)
            env_rows = [{"prompt": it.text, "answer": it.answer, **it.columns} for it in items]
            ro = trainer.engine.generate([it.prompt_ids for it in items], params, rows=env_rows)
        else:
            ro = trainer.engine.generate([it.prompt_ids for it in items], params)
        thinking_cut += getattr(trainer.engine, "cut_total", 0) - cut_before
        gen_s += time.perf_counter() - t
        n_tokens += int(ro.mask.sum())
        n_sampled += len(ro)
        t = time.perf_counter()
        sample_items = [items[int(g)] for g in ro.group_id]
        columns: dict[str, list] = {}
        for key in sorted({k for it in items for k in it.columns}):
            columns[key] = [it.columns.get(key) for it in sample_items]
        # What length / group-aware rewards read (kimi_length, length_linear, dapo_overlong).
        columns["response_length"] = ro.mask.sum(-1).long().tolist()
        columns["group_id"] = (ro.group_id + seen_groups).tolist()
        # The prompt exactly as the policy saw it (chat template applied): what reward and
        # process reward models trained by `posttrain rm` / `posttrain prm` score.
        columns["model_prompt"] = model_prompts(trainer.tokenizer, sample_items)
        if ro.turn_stats is not None:  # what the env_return reward reads
            columns["env_return"] = list(ro.turn_stats["return"])
        if trainer.rewards.specs:
            res = trainer.rewards.score([it.text for it in sample_items], ro.texts, columns, step)
            scores = res.scores.float()
            valid = res.valid.bool() & torch.isfinite(scores)
            success = _success(res, scores, cfg.data.success_reward)
            for k, v in res.per_reward.items():
                per_reward.setdefault(k, []).append(v.float())
            for k, v in res.errors.items():
                errors[k] = errors.get(k, 0) + int(v)
        else:  # pure distillation: the teacher's dense reward is the only signal
            scores = torch.zeros(len(ro))
            valid = torch.ones(len(ro), dtype=torch.bool)
            success = scores
        dense, stats = dense_token_rewards(
            trainer.rewards, trainer.tokenizer, [it.prompt_ids for it in sample_items], ro, step
        )
        if cfg.env.dense_rewards and ro.turn_rewards is not None:  # each turn's reward at its last token
            dense = ro.turn_rewards if dense is None else dense + ro.turn_rewards
        if ro.turn_stats is not None:
            for k, v in ro.turn_stats.items():
                turn_stats.setdefault(k, []).extend(v)
        for k, v in stats.items():
            dense_stats.setdefault(k, []).append(v)
        reward_s += time.perf_counter() - t
        all_scores.append(scores)
        all_valid.append(valid)
        n_groups = len(items)
        # A group whose samples differ only in their dense rewards still carries signal.
        total = scores if dense is None else scores + dense.sum(-1)
        signal = _group_has_signal(total, valid, ro.group_id, n_groups)
        zero_var += int((~signal).sum())
        seen_groups += n_groups
        keep = signal if p["dynamic_sampling"] else torch.ones(n_groups, dtype=torch.bool)
        rows = keep[ro.group_id]  # [B] samples of kept groups
        if p["dynamic_sampling"]:
            dropped += int((~keep).sum())
        if rows.any():
            parts.append((idx, ro, rows, torch.where(valid, scores, torch.zeros_like(scores)), valid, dense))
            successes.append(success[rows])
            kept_groups += int(keep.sum())
        rounds += 1
        if not p["dynamic_sampling"] or kept_groups >= P or rounds > p["max_gen_rounds"]:
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
            )
        )
    batch = _merge(parts, trainer.tokenizer.pad_token_id)
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
    if cfg.rollout.thinking_budget:  # share of this step's samples whose thinking was cut
        metrics["rollout/thinking_cut_frac"] = thinking_cut / max(1, n_sampled)
    if guided:
        metrics.update(prm_guide_metrics(prm_before, trainer.engine.totals, cfg.rollout.max_new_tokens))
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
    if p["teacher_mode"] == "none" or trainer.rewards.specs:
        ok = batch.valid.tolist()
        idx_list, succ = batch.item_index.tolist(), torch.cat(successes).tolist()
        source.update([i for i, v in zip(idx_list, ok) if v], [s for s, v in zip(succ, ok) if v])
    return batch, metrics


def _success(res, scores: torch.Tensor, reward_name: str | None) -> torch.Tensor:
    """[B] per-sample success in [0, 1] for success-rate sampling.

    With `data.success_reward` set, that reward's own value (e.g. accuracy's 0/1), so
    shaping terms (format, length) do not count as solving the prompt; otherwise the
    summed score clipped to [0, 1]. Non-finite values (excluded samples) become 0.
    """
    chosen = res.per_reward.get(reward_name) if reward_name is not None else None  # None: not active yet
    raw = chosen.float() if chosen is not None else scores
    return torch.nan_to_num(raw, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


def _merge(parts, pad_id: int) -> RLBatch:
    """Concatenate the kept rows of every generation round into one RLBatch."""
    prompt_ids, resp, masks, slp, finish, texts, gids, items, scores, valids, keeps, dense = (
        [] for _ in range(12)
    )
    offset = 0
    for idx, ro, rows, sc, ok, dr in parts:
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
        if ro.keep_mask is not None:
            keeps.append(ro.keep_mask[r])
        if dr is not None:
            dense.append(dr[r])
        offset += len(idx)
    response_ids = _pad_cat(resp, pad_id).long()
    mask = _pad_cat(masks, 0.0)
    seq = build_sequences(prompt_ids, response_ids, mask, pad_id)
    valid = torch.cat(valids)
    keep_mask = None
    if keeps:
        width = mask.shape[1]
        keep_mask = torch.cat(
            [torch.nn.functional.pad(k, (0, 0, 0, width - k.shape[1]), value=True) for k in keeps], dim=0
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
        keep_mask=keep_mask,
        dense_rewards=_pad_cat(dense, 0.0) if dense else None,
    )


# --------------------------------------------------------------------------- dense rewards


def step_token_index(ends: list[int], token_lengths: list[int]) -> list[int]:
    """Index of the response token holding character end − 1, for each step end offset.

    token_lengths: decoded length of each response token, so token j covers characters
    [Σ_{i<j} len_i, Σ_{i≤j} len_i) of the response text. Exact for the char tokenizer and
    for any tokenizer whose tokens decode independently; a byte-level BPE token holding
    part of a multi-byte character decodes to U+FFFD (one character), so offsets after it
    can drift by a token. An offset past the decoded text maps to the last token;
    an empty response gives −1 (no token to put the reward on).
    """
    cum = list(itertools.accumulate(token_lengths))
    if not cum:
        return [-1] * len(ends)
    return [min(bisect.bisect_left(cum, e), len(cum) - 1) for e in ends]


def model_prompts(tokenizer, items: list[PromptItem]) -> list[str]:
    """Each item's prompt as the policy saw it: its templated prompt ids, decoded."""
    cache: dict[int, str] = {}
    out = []
    for it in items:
        key = id(it)
        if key not in cache:
            cache[key] = tokenizer.decode(it.prompt_ids, skip_special_tokens=False)
        out.append(cache[key])
    return out


def dense_token_rewards(
    rewards: RewardRole, tokenizer, prompt_ids: list[list[int]], ro: Rollout, step: int
) -> tuple[torch.Tensor | None, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Token rewards [B, T] of the dense rewards active at `step` (None when there are none).

    Each dense reward k gives weight_k · r_t, r_t = PRM(x, y≤t) − PRM(x, y≤t−1) (PRM(x, y≤0)
    = 0), at the sampled token that ends step t (`step_token_index` on the per-token decoded
    lengths of ro.response_ids). prompt_ids: the B prompts as the policy saw them (chat
    template applied); the PRM gets them decoded, the layout `posttrain prm` trains on,
    and a template that opens <think> is seen. Also returns, per reward name, ([B]
    unweighted sum of its r_t, [B] bool "the completion has no steps") for the metrics.
    """
    from posttrain.core.advantages import prm_token_rewards

    if not any(getattr(fn, "dense", False) for _, fn, _, _ in rewards.active(step)):
        return None, {}
    prompts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompt_ids]
    dense = rewards.dense(prompts, ro.texts, step)
    lengths = ro.mask.sum(-1).long().tolist()
    rows = [ro.response_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    decoded = {t: len(tokenizer.decode([t], skip_special_tokens=False)) for t in {t for r in rows for t in r}}
    token_lengths = [[decoded[t] for t in r] for r in rows]
    out = torch.zeros(ro.mask.shape)
    stats = {}
    for name, weight, scores, ends in dense:
        width = max(1, max(len(s) for s in scores))
        step_scores = torch.zeros(len(ro), width)
        index = torch.full((len(ro), width), -1, dtype=torch.long)  # -1: padding step
        for i, (sc, en) in enumerate(zip(scores, ends)):
            if sc:
                step_scores[i, : len(sc)] = torch.tensor(sc)
                index[i, : len(en)] = torch.tensor(step_token_index(en, token_lengths[i]))
        raw = prm_token_rewards(step_scores, index, ro.mask).float()  # [B, T]
        out += weight * raw
        stats[name] = (raw.sum(-1), torch.tensor([not sc for sc in scores]))
    return out, stats
