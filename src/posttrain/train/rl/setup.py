"""Building the RL loop's roles from an RLConfig.

`build_components` loads the policy/tokenizer and builds the roles: the policy learner,
the generator (`build_generator`: the rollout engine stack), the optional reference,
critic learner and teacher, the rewards and the prompt source. `plan` describes a run
without training it. The rollout-collection phase (`collect`, train/rl/collect.py) and
the dense-reward helpers (train/rl/dense.py) are re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.algos.spec import RLSpec
from posttrain.engines import distributed as dist
from posttrain.errors import ConfigError, ModelError
from posttrain.roles import (
    CriticLearner,
    Generator,
    PolicyLearner,
    PromptItem,
    PromptSource,
    RewardRole,
    ScoringRole,
)
from posttrain.train.common.alerts import describe
from posttrain.train.common.input_checks import check_context, check_fills_a_batch, check_reward_columns
from posttrain.train.config.rl import RLConfig, check_dense_reward, validate
from posttrain.train.rl import dp as rl_dp
from posttrain.train.rl.async_rollouts import describe_async

# The collection phase; re-exported: callers and tests import these from here.
from posttrain.train.rl.collect import collect, filter_by_difficulty  # noqa: F401
from posttrain.train.rl.dense import dense_token_rewards, model_prompts, step_token_index  # noqa: F401
from posttrain.train.rl.prm_guide import check_prm_guide_path, wrap_engine

# --------------------------------------------------------------------------- building


def _load_policy(cfg: RLConfig, tokenizer):
    from posttrain.train.common.loading import load_policy

    return load_policy(cfg.model, tokenizer)


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
    from posttrain.data.rewards import build_reward, is_dense

    specs, dense = [], set()
    for i, spec in enumerate(cfg.eval.rewards if key == "eval.rewards" else cfg.rewards):
        options = dict(spec.options)
        if spec.name == "task" and "task" not in options and cfg.data.task:
            options["task"] = cfg.data.task
        try:
            fn = build_reward(spec.name, **options)
        except TypeError as e:
            raise ConfigError(f"{key}[{i}] ({spec.name!r}): bad options {sorted(options)}: {e}") from None
        if is_dense(spec.name, options, fn):  # also a "module:function" reward that marks itself dense
            check_dense_reward(spec.name, cfg.algo.pieces().advantage, cfg.algo.method)
            dense.add(len(specs))
        specs.append((spec.name, fn, spec.weight, spec.start_step))
    ex = cfg.reward_exec
    return RewardRole(
        specs,
        dense=frozenset(dense),
        timeout_s=ex.timeout_s,
        max_workers=ex.max_workers,
        max_error_rate=ex.max_error_rate,
    )


def build_generator(cfg: RLConfig, model, tokenizer) -> Generator:
    """The Generator role over the engine stack of `cfg.rollout` / `cfg.env` for `model`:
    the engine, then a thinking budget, a PRM guide and a multi-turn environment driver,
    each only when configured."""
    from posttrain.engines.rollout import make_engine

    ro = cfg.rollout
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
    # In-process engines sample from the policy module itself; vLLM keeps its own weights.
    return Generator(engine, None if ro.engine == "vllm" else model, multi_turn=env_factory is not None)


def load_data(cfg: RLConfig) -> dict[str, Any]:
    """The tokenizer and the prompts, read and checked before any model is built: {"tokenizer",
    "train_items", "eval_examples", "task", "lengths"} (lengths: what `check_context` checks)."""
    from posttrain.engines.models import load_tokenizer

    check_prm_guide_path(cfg)
    ro = cfg.rollout
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path or cfg.model.preset)
    train_items, eval_examples, task = load_prompts(cfg, tokenizer)
    source = cfg.data.path or f"task {cfg.data.task!r}"
    check_fills_a_batch(len(train_items), ro.prompts_per_step, "rollout.prompts_per_step", source)
    check_reward_columns(cfg.rewards, train_items, source)
    lengths = [(f"prompt {it.id!r}", len(it.prompt_ids) + ro.max_new_tokens) for it in train_items]
    check_context(cfg.model.path or cfg.model.preset, lengths, _CONTEXT_KEY)  # before the model when it can
    return {"tokenizer": tokenizer, "train_items": train_items, "eval_examples": eval_examples, "task": task,
            "lengths": lengths}  # fmt: skip


_CONTEXT_KEY = "data.max_prompt_tokens (prompt) or rollout.max_new_tokens (response)"


def load_checked_policy(cfg: RLConfig, tokenizer, lengths) -> torch.nn.Module:
    """The policy module of cfg.model, checked to hold the longest prompt + response."""
    model = _load_policy(cfg, tokenizer)
    check_context(model, lengths, _CONTEXT_KEY)
    return model


def critic_model(cfg: RLConfig, policy_model, tokenizer) -> torch.nn.Module:
    """The critic's value model: from critic.path / critic.preset, else from the policy's
    weights (so it must be built before the policy is sharded)."""
    from posttrain.engines.models import build_value_model

    source = cfg.critic.path or cfg.critic.preset or policy_model
    # A zero head makes the critic start at V = 0: returns are learned from a neutral
    # baseline instead of a random one that would inject noise into the first advantages.
    return build_value_model(source, head_init_std=0.0, tokenizer=tokenizer, device=cfg.model.device)


def build_critic(cfg: RLConfig, spec: RLSpec, policy_model, tokenizer) -> CriticLearner:
    """The critic learner of one process (no torch.distributed sharding)."""
    return CriticLearner(critic_model(cfg, policy_model, tokenizer), cfg, spec)


def build_teacher(cfg: RLConfig, policy_model, tokenizer, *, shard: bool = False) -> ScoringRole:
    """The frozen teacher scorer (teacher.path / teacher.preset), same vocabulary as the policy;
    `shard`: FSDP2-sharded across the process group (torch.distributed)."""
    from posttrain.engines.models import load_model

    tsrc = cfg.teacher.path or cfg.teacher.preset
    tmodel = load_model(tsrc, device=cfg.model.device, tokenizer=tokenizer).eval()
    if tmodel.get_output_embeddings().weight.shape[0] != policy_model.get_output_embeddings().weight.shape[0]:
        raise ModelError(
            f"teacher {tsrc!r} has a different vocabulary from the policy; distillation needs one tokenizer"
        )
    for q in tmodel.parameters():
        q.requires_grad_(False)
    teacher = ScoringRole(tmodel, temperature=cfg.rollout.temperature)
    if shard:
        teacher.shard()
    return teacher


def build_rewarder(cfg: RLConfig) -> RewardRole:
    """The run's RewardRole (an empty one for pure distillation runs without rewards)."""
    return build_rewards(cfg) if cfg.rewards else RewardRole([], timeout_s=1, max_workers=1, max_error_rate=1)


def assemble(cfg: RLConfig, data: dict[str, Any], roles: dict[str, Any]) -> dict[str, Any]:
    """What `build_components` returns, from the loaded data and the built roles (policy,
    generator, reference, critic, teacher, rewards): runs the difficulty filter through the
    generator and rewards roles and makes the PromptSource."""
    train_items, filter_record = data["train_items"], None
    if cfg.data.difficulty_filter_k > 0:
        train_items, filter_record = filter_by_difficulty(
            cfg, train_items, roles["generator"], roles["rewards"], data["tokenizer"]
        )
    prompts = PromptSource(
        train_items, selection=cfg.data.selection, seed=cfg.run.seed, total_steps=cfg.steps
    )
    return {
        "tokenizer": data["tokenizer"],
        **roles,
        "prompts": prompts,
        "eval_examples": data["eval_examples"],
        "task": data["task"],
        "difficulty_filter_record": filter_record,
        # Held-out samples are scored with eval.rewards when given, else with the run's rewards.
        "eval_rewards": build_rewards(cfg, "eval.rewards") if cfg.eval.rewards else None,
    }


def build_components(cfg: RLConfig, spec: RLSpec) -> dict[str, Any]:
    """Every role of the loop for `cfg` with resolved method `spec` (see RLTrainer), in
    this process (train/rl/ray_backend.py builds the same roles in Ray actors)."""
    data = load_data(cfg)
    tokenizer = data["tokenizer"]
    model = load_checked_policy(cfg, tokenizer, data["lengths"])
    # The reference copies and the critic may start from the policy's weights: both are
    # built before the policy is sharded.
    reference = ScoringRole.reference_for(model, cfg.rollout.temperature) if spec.uses_reference else None
    sharded = dist.world_size() > 1
    if sharded and reference is not None and not reference.disable_adapter:
        reference.shard()  # before the next full copy is made: a lower peak
    value_model = critic_model(cfg, model, tokenizer) if spec.critic else None
    sampler, policy_dp, critic_dp = model, None, None
    if sharded:  # FSDP2 for the trained models; the generator samples from a plain copy
        sampler = rl_dp.sampling_copy(model)
        policy_dp = rl_dp.shard(model, "policy")
        critic_dp = rl_dp.shard(value_model, "critic") if value_model is not None else None
    elif cfg.rollout.max_staleness and cfg.rollout.engine != "vllm":  # vLLM keeps its own weights anyway
        # Asynchronous RL: the generator samples an older version while the learner trains.
        import copy

        sampler = copy.deepcopy(model)
    roles = {
        "policy": PolicyLearner(model, cfg, spec, dp=policy_dp),
        "generator": build_generator(cfg, sampler, tokenizer),
        "reference": reference,
        "critic": CriticLearner(value_model, cfg, spec, dp=critic_dp) if value_model is not None else None,
        "teacher": (
            build_teacher(cfg, model, tokenizer, shard=sharded) if spec.teacher_mode != "none" else None
        ),
        "rewards": build_rewarder(cfg),
    }
    return assemble(cfg, data, roles)


def model_summary(cfg: RLConfig, spec: RLSpec) -> list[str]:
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
    if spec.kl_placement != "none" and spec.kl_coef > 0:
        models.append("reference (frozen copy)" if m.lora_r == 0 else "reference (policy with adapters off)")
        if cfg.algo.ref_refresh_every:
            models[-1] = f"reference (reset to the policy every {cfg.algo.ref_refresh_every} steps)"
        copies += 1 if m.lora_r == 0 else 0
    if spec.critic:
        models.append("critic (trained)")
        copies += 1
    if spec.teacher_mode != "none":
        models.append(f"teacher (frozen: {cfg.teacher.path or cfg.teacher.preset})")
    if cfg.rollout.max_staleness and cfg.rollout.engine != "vllm" and cfg.backend == "process":
        # The generator's own copy, and up to max_staleness + 1 published weight snapshots.
        models.append("rollout copy of the policy (asynchronous)")
        copies += 2 + cfg.rollout.max_staleness
    if cfg.rollout.prm_guide.model_path is not None:
        g = cfg.rollout.prm_guide
        models.append(f"PRM (frozen: {g.model_path}; rollout guide, mode {g.mode})")
    lines = [f"  models: {', '.join(models)}"]
    if n is not None:
        # weights + AdamW moments (2x) + grads for trained models; weights only for frozen ones.
        trained = 1 + (1 if spec.critic else 0)
        est = n * bytes_per * copies + n * 4 * 3 * trained
        lines.append(f"  policy parameters: {n:,}; rough memory for weights/optimizer: {est / 2**20:.1f} MiB")
    else:
        lines.append(f"  policy: {source} (parameter count known after loading)")
    return lines


def plan(cfg: RLConfig) -> str:
    """Dry-run description: method pieces, models and sizes, memory estimate, steps, tokens."""
    spec = validate(cfg)
    ro = cfg.rollout
    batch = ro.prompts_per_step * ro.group_size
    lines = [f"posttrain rl — method {cfg.algo.method!r}, {cfg.steps} steps"]
    lines += [f"  {k}: {v}" for k, v in spec.as_dict().items()]
    lines += model_summary(cfg, spec)
    tokens = batch * ro.max_new_tokens
    lines.append(
        f"  batch: {ro.prompts_per_step} prompts x G={ro.group_size} = {batch} sequences, "
        f"<= {tokens} response tokens/step, <= {tokens * cfg.steps} in total"
    )
    lines.append(
        f"  updates: {spec.update_epochs} epoch(s) x {spec.num_minibatches} minibatch(es) per step "
        f"= {cfg.steps * spec.update_epochs * spec.num_minibatches} optimizer steps"
    )
    # TRPO's update makes no entropy pass (train/rl/trpo.py), so policy/entropy is not logged.
    logs_entropy = (cfg.log_entropy or spec.entropy_coef > 0) and spec.trust_region is None
    flags = dict(has_reference=spec.uses_reference, logs_entropy=logs_entropy, evaluates=cfg.eval.every > 0)
    lines.append("  " + describe(cfg.alerts, **flags))
    if cfg.backend == "ray":
        from posttrain.train.rl.ray_backend import describe_placement

        lines.append("  " + describe_placement(cfg, spec))
    lines.append("  " + describe_async(cfg))
    return "\n".join(lines)
