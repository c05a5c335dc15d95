"""`posttrain sft | rm | prm | dpo`: configs and entry points of the offline trainers.

All four commands share one loop (train/offline/loop.py); each builds its model(s), turns
rows into token ids (train/offline/data.py) and hands a method object
(train/offline/methods.py) to the loop. Entry points used by the CLI:

(The config dataclasses are in train/config/offline.py and re-exported here.)

    SFTConfig / run_sft(cfg) -> dict      supervised fine-tuning, completion-only loss
    RMConfig  / run_rm(cfg)  -> dict      outcome reward model (Bradley–Terry or pointwise)
    PRMConfig / run_prm(cfg) -> dict      step-level process reward model
    DPOConfig / run_dpo(cfg) -> dict      DPO / IPO / SimPO / LN-DPO / hinge
    plan(cfg) -> str                      what a run would do (for --dry-run)
"""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from posttrain.errors import ConfigError, DataError
from posttrain.train.common.input_checks import check_context, check_fills_a_batch, offline_tokens
from posttrain.train.common.loading import load_policy, load_section_tokenizer, load_value_model, model_source
from posttrain.train.config.loader import ModelSection
from posttrain.train.config.offline import (  # noqa: F401  (re-exported: the commands' configs)
    DPOConfig,
    GenerativeTrainSection,
    OfflineDataSection,
    OfflineTrainSection,
    PreferenceAlgoSection,
    PreferenceDataSection,
    PRMAlgoSection,
    PRMConfig,
    ReferenceSection,
    RMAlgoSection,
    RMConfig,
    SFTAlgoSection,
    SFTConfig,
    SFTDataSection,
)
from posttrain.train.offline.data import (
    KIND,
    encode_pairs,
    encode_sft,
    encode_steps,
    load_split,
    until_first_error,
)

# --------------------------------------------------------------------------- shared setup


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_context(m: ModelSection, items: list[dict]) -> None:
    """Sequences past the model's context window, refused before the model is built."""
    lengths = [(f"training row {i + 1}", offline_tokens(it)) for i, it in enumerate(items)]
    check_context(model_source(m), lengths, "data.max_prompt_tokens")


def _tag(items: list[dict], split: str) -> list[dict]:
    for i, it in enumerate(items):
        it["split"], it["idx"] = split, i
    return items


# --------------------------------------------------------------------------- entry points


def build_sft(cfg: SFTConfig, *, min_rows: int = 0):
    """(SFTMethod, tokenizer) for `cfg`: seeded model, tokenized train / held-out rows.

    min_rows: fewer usable training rows than this is a DataError raised before the model
    is built (run_* pass train.batch_size: a batch never repeats rows).
    """
    from posttrain.train.offline.methods import SFTMethod

    _seed_everything(cfg.run.seed)
    tokenizer = load_section_tokenizer(cfg.model)
    shortest = None
    if cfg.data.keep_shortest:
        from posttrain.train.long_to_short import shortest_per_prompt

        if not cfg.data.path:
            raise ConfigError(
                "data.keep_shortest picks among the rows of a data.path file (sampled completions)"
            )
        shortest = shortest_per_prompt
    split = load_split(cfg.data, KIND["sft"], messages=cfg.data.messages, transform=shortest)
    train_items = encode_sft(split.train, tokenizer, cfg.data, split.source)
    check_fills_a_batch(len(train_items), min_rows, "train.batch_size", split.source)
    _check_context(cfg.model, train_items)
    eval_items = encode_sft(split.eval, tokenizer, cfg.data, split.source + " (eval)") if split.eval else []
    model = load_policy(cfg.model, tokenizer)
    method = SFTMethod(
        cfg, model, tokenizer, train_items, eval_items, task=split.task, eval_examples=split.eval_examples
    )
    method.data_filter = split.filtered
    return method, tokenizer


def build_rm(cfg: RMConfig, *, min_rows: int = 0):
    """(RewardModelMethod, tokenizer) for `cfg`."""
    from posttrain.train.offline.methods import RewardModelMethod

    if cfg.algo.loss == "pointwise":
        return _build_pointwise_rm(cfg)
    if cfg.algo.baseline != "none":
        raise ConfigError("algo.baseline applies to algo.loss=pointwise; Bradley–Terry needs no baseline")
    _seed_everything(cfg.run.seed)
    tokenizer = load_section_tokenizer(cfg.model)
    split = load_split(cfg.data, KIND["rm"])
    margin = cfg.algo.margin_column
    train_items = encode_pairs(
        split.train, tokenizer, cfg.data, split.source, margin_column=margin, append_eos=False
    )
    check_fills_a_batch(len(train_items), min_rows, "train.batch_size", split.source)
    _check_context(cfg.model, train_items)
    eval_items = (
        encode_pairs(
            split.eval, tokenizer, cfg.data, split.source + " (eval)", margin_column=margin, append_eos=False
        )
        if split.eval
        else []
    )
    model = load_value_model(cfg.model, tokenizer, cfg.algo.head_init_std)
    method = RewardModelMethod(cfg, model, tokenizer, train_items, eval_items)
    return method, tokenizer


def _build_pointwise_rm(cfg: RMConfig):
    """(PointwiseRewardMethod, tokenizer): scored rows from a file or the task ("scored" kind)."""
    from posttrain.train.offline.scored import PointwiseRewardMethod, encode_scored

    if cfg.algo.margin_column:
        raise ConfigError("algo.margin_column is a Bradley–Terry pair margin; algo.loss=pointwise has none")
    _seed_everything(cfg.run.seed)
    tokenizer = load_section_tokenizer(cfg.model)
    split = load_split(cfg.data, "scored", score_column=cfg.algo.score_column)
    base = cfg.algo.baseline
    train_items = encode_scored(split.train, tokenizer, cfg.data, split.source, baseline=base)
    eval_items = (
        encode_scored(split.eval, tokenizer, cfg.data, split.source + " (eval)", baseline=base)
        if split.eval
        else []
    )
    model = load_value_model(cfg.model, tokenizer, cfg.algo.head_init_std)
    return PointwiseRewardMethod(cfg, model, tokenizer, train_items, eval_items), tokenizer


def build_prm(cfg: PRMConfig, *, min_rows: int = 0):
    """(PRMMethod, tokenizer) for `cfg`."""
    from posttrain.train.offline.methods import PRMMethod

    _seed_everything(cfg.run.seed)
    tokenizer = load_section_tokenizer(cfg.model)
    split = load_split(cfg.data, KIND["prm"])
    train_items = encode_steps(split.train, tokenizer, cfg.data, split.source)
    check_fills_a_batch(len(train_items), min_rows, "train.batch_size", split.source)
    _check_context(cfg.model, train_items)
    eval_items = encode_steps(split.eval, tokenizer, cfg.data, split.source + " (eval)") if split.eval else []
    traces = eval_items  # whole held-out traces for the first-wrong-step metrics
    if cfg.algo.until_first_error:
        train_items, eval_items = until_first_error(train_items), until_first_error(eval_items)
    model = load_value_model(cfg.model, tokenizer, cfg.algo.head_init_std)
    method = PRMMethod(cfg, model, tokenizer, train_items, eval_items, eval_traces=traces)
    return method, tokenizer


def build_dpo(cfg: DPOConfig):
    """(PreferenceMethod, tokenizer) for `cfg`; fills or reads the reference cache.

    The reference is loaded (or copied from the initial policy) only when the cache has no
    entry for this (reference, data) pair; method.reference_cache_hit says which (None
    for a reference-free loss).
    """
    from posttrain.algos.preference import check_options, needs_reference
    from posttrain.train.offline.methods import PreferenceMethod
    from posttrain.train.offline.scored import check_ranked, ranked_items

    use_ref = needs_reference(cfg.algo.loss)  # also fails on a typo before any work
    check_options(cfg.algo.loss, cfg.algo.options)
    if cfg.data.pairs == "self":
        _check_self_pairs(cfg.data)
    _seed_everything(cfg.run.seed)
    tokenizer = load_section_tokenizer(cfg.model)
    ranked = check_ranked(cfg.data, cfg.algo)
    if cfg.data.pairs == "long_short":
        split = _long_short_split(cfg.data)
    else:
        split = load_split(cfg.data, "ranked" if ranked else KIND["dpo"])
    model = load_policy(cfg.model, tokenizer)
    pair_counts = None
    if cfg.data.pairs == "self":
        split, pair_counts = _self_pairs(cfg, model, tokenizer, split)
    if ranked:
        train_items, eval_items = ranked_items(split, tokenizer, cfg.data, cfg.algo.pair_weighting)
    else:
        train_items = encode_pairs(split.train, tokenizer, cfg.data, split.source)
        eval_items = (
            encode_pairs(split.eval, tokenizer, cfg.data, split.source + " (eval)") if split.eval else []
        )
    train_items, eval_items = _tag(train_items, "train"), _tag(eval_items, "eval")
    ref_train = ref_eval = None
    hit = None
    if use_ref:
        from posttrain.train.offline.ref import cached_reference_logps

        ref_train, ref_eval, hit = cached_reference_logps(cfg, model, tokenizer, train_items, eval_items)
    method = PreferenceMethod(
        cfg,
        model,
        tokenizer,
        train_items,
        eval_items,
        ref_train,
        ref_eval,
        task=split.task,
        eval_examples=split.eval_examples,
    )
    method.reference_cache_hit = hit
    method.pair_counts = pair_counts
    return method, tokenizer


def _long_short_split(d):
    """Long-vs-short DPO pairs from a file of sampled completions (train/long_to_short.py)."""
    from posttrain.train.long_to_short import long_short_pairs

    if not d.path:
        raise ConfigError("data.pairs=long_short builds pairs from data.path, a file of sampled completions")

    def pairs(rows, source):
        return long_short_pairs(rows, source, long_ratio=d.long_ratio, max_pairs=d.pairs_per_prompt)

    return load_split(d, "completion", transform=pairs)


def _check_self_pairs(d) -> None:
    """Fail on a bad data.pairs=self setting before any model is built or sampled."""
    if d.path:
        raise ConfigError("data.pairs=self samples pairs for data.task's prompts; unset data.path to use it")
    if not d.task:
        raise ConfigError("data.pairs=self needs data.task (its verifier labels the samples)")
    if d.samples_per_prompt < 2:
        raise ConfigError(f"data.samples_per_prompt must be >= 2 to form pairs, got {d.samples_per_prompt}")
    if d.pairs_per_prompt < 1:
        raise ConfigError(f"data.pairs_per_prompt must be >= 1, got {d.pairs_per_prompt}")
    if d.sample_temperature <= 0:
        raise ConfigError(
            f"data.sample_temperature must be > 0 to draw different samples, got {d.sample_temperature}"
        )


def _self_pairs(cfg: DPOConfig, policy, tokenizer, split):
    """Replace the task's synthetic pairs by pairs sampled from the initial policy.

    Train pairs come from data.n_train train-split prompts, held-out pairs from the
    data.n_eval test-split prompts (the same ones task accuracy is measured on). Sampling
    is seeded by run.seed, so the pairs — and hence the reference-cache key, which hashes
    their token ids — are reproducible. The pairs themselves are cached next to the
    reference log-probs (`pairs-<key>.json`, keyed by the initial policy's identity and
    every sampling setting), so DPO, IPO and SimPO runs from one SFT model sample once.
    Returns (Split, {"train": counts, "eval": counts, "cache_hit": bool}).
    """
    from posttrain.train.offline.data import Split, self_generated_pairs
    from posttrain.train.offline.ref import cache_key, default_cache_dir, load_or_compute_json, model_identity

    d = cfg.data
    common = dict(
        samples_per_prompt=d.samples_per_prompt,
        pairs_per_prompt=d.pairs_per_prompt,
        temperature=d.sample_temperature,
        max_new_tokens=d.sample_max_new_tokens,
        keep_truncated=d.keep_truncated,
        batch_size=cfg.train.eval_batch_size,
    )
    source_model = cfg.model.path
    identity = model_identity(source_model) if source_model else model_identity(policy)
    settings = dict(common, task=d.task, task_options=d.task_options, difficulty=d.difficulty,
                    n_train=d.n_train, n_eval=d.n_eval, data_seed=d.seed, seed=cfg.run.seed,
                    dtype=cfg.model.dtype, tokenizer=cfg.model.tokenizer)  # fmt: skip
    key = cache_key(identity, json.dumps(settings, sort_keys=True, default=str))

    def sample() -> dict:
        train_examples = split.task.examples("train", d.n_train, seed=d.seed, difficulty=d.difficulty)
        train = self_generated_pairs(
            policy, tokenizer, split.task, train_examples, seed=cfg.run.seed, **common
        )
        held = self_generated_pairs(
            policy, tokenizer, split.task, split.eval_examples, seed=cfg.run.seed + 1, **common
        )
        return {"train": train, "eval": held}

    cached, hit = load_or_compute_json(cfg.ref.cache_dir or default_cache_dir(), "pairs", key, sample)
    (train_rows, train_counts), (eval_rows, eval_counts) = cached["train"], cached["eval"]
    if not train_rows:
        raise DataError(
            f"data.pairs=self: no train prompt of task {d.task} had both a correct and an incorrect sample "
            f"({train_counts['correct']}/{train_counts['samples']} samples correct); change the task "
            "difficulty or data.samples_per_prompt"
        )
    _seed_everything(cfg.run.seed)  # sampling consumed the global RNG; training starts from the seed
    source = f"task {d.task} (self-generated pairs)"
    out = Split(train_rows, eval_rows, source, split.task, split.eval_examples)
    return out, {"train": train_counts, "eval": eval_counts, "cache_hit": hit}


def run_sft(cfg: SFTConfig) -> dict:
    """Supervised fine-tuning; returns the loop summary (losses, eval, output paths)."""
    from posttrain.train.offline.loop import train_offline

    method, tokenizer = build_sft(cfg, min_rows=cfg.train.batch_size)  # refused before the model
    summary = train_offline(cfg, method, tokenizer=tokenizer)
    if method.data_filter is not None:
        summary["data_filter"] = method.data_filter
    return summary


def run_rm(cfg: RMConfig) -> dict:
    """Bradley–Terry reward model; run_dir/final loads with AutoModelForSequenceClassification."""
    from posttrain.train.offline.loop import train_offline

    method, tokenizer = build_rm(cfg, min_rows=cfg.train.batch_size)  # refused before the model
    return train_offline(cfg, method, tokenizer=tokenizer)


def run_prm(cfg: PRMConfig) -> dict:
    """Process reward model; run_dir/final holds the model and prm.json (separator)."""
    from posttrain.train.offline.loop import train_offline

    method, tokenizer = build_prm(cfg, min_rows=cfg.train.batch_size)  # refused before the model
    return train_offline(cfg, method, tokenizer=tokenizer)


def run_dpo(cfg: DPOConfig) -> dict:
    """Preference optimization; summary["reference_cache_hit"] tells whether the cache served."""
    from posttrain.train.offline.loop import train_offline

    method, tokenizer = build_dpo(cfg)
    summary = train_offline(cfg, method, tokenizer=tokenizer)
    summary["reference_cache_hit"] = method.reference_cache_hit
    if method.pair_counts is not None:
        summary["self_pairs"] = method.pair_counts
    return summary


def plan(cfg) -> str:
    """A human-readable plan of an offline run (printed by `posttrain <cmd> --dry-run`)."""
    kind = {SFTConfig: "sft", RMConfig: "rm", PRMConfig: "prm", DPOConfig: "dpo"}.get(type(cfg), "offline")
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    data = (
        f"file {d.path}"
        + (f" (held-out {d.eval_path})" if d.eval_path else f" (hold out {d.eval_fraction:.0%})")
        if d.path
        else f"task {d.task} difficulty {d.difficulty}: {d.n_train} train / {d.n_eval} held-out examples"
    )
    if d.path and d.keep_if:
        data += f", rows with {d.keep_if} = true only"
    steps = f"{t.steps} steps" if t.steps > 0 else f"{t.epochs} epochs"
    accum = max(1, -(-t.batch_size // t.micro_batch_size))
    lines = [
        f"posttrain {kind}",
        f"  model:  {m.path or 'preset ' + m.preset} ({m.dtype}, {m.device})"
        + (f", LoRA r={m.lora_r}" if getattr(m, "lora_r", 0) else ""),  # rm / prm: no LoRA keys
        f"  data:   {data} [{KIND.get(kind, '?')} rows]",
        f"  train:  {steps}, batch {t.batch_size} = {accum} x micro-batch {t.micro_batch_size}; eval every {t.eval_every}",
        f"  optim:  AdamW lr {o.lr:g} ({o.schedule}, warmup {o.warmup_steps}), clip {o.max_grad_norm:g}",
    ]
    if kind == "sft":
        lines.append(
            f"  algo:   completion-only NLL ({cfg.algo.aggregation})"
            + (", packed" if cfg.algo.packing else "")
            + (f", no-think share {d.no_think_fraction:g}" if d.no_think_fraction else "")
            + (", shortest row per prompt" if d.keep_shortest else "")
        )
    elif kind == "rm" and cfg.algo.loss == "pointwise":
        lines.append(
            f"  algo:   pointwise MSE on column {cfg.algo.score_column!r}"
            + (", minus each prompt's mean score" if cfg.algo.baseline == "prompt_mean" else "")
        )
    elif kind == "rm":
        lines.append(
            "  algo:   Bradley-Terry"
            + (f" with margin column {cfg.algo.margin_column!r}" if cfg.algo.margin_column else "")
        )
    elif kind == "prm":
        lines.append(
            f"  algo:   step BCE at separator {cfg.algo.step_separator!r}, threshold {cfg.algo.threshold:g}"
            + (", labels up to the first wrong step" if cfg.algo.until_first_error else "")
        )
    elif kind == "dpo":
        opts = ", ".join(f"{k}={v:g}" for k, v in cfg.algo.options.items())
        from posttrain.algos.preference import default_beta, needs_reference

        beta = cfg.algo.beta if cfg.algo.beta is not None else default_beta(cfg.algo.loss)
        lines.append(f"  algo:   {cfg.algo.loss} beta={beta:g}" + (f" ({opts})" if opts else ""))
        if d.format == "ranked":
            weighting = "weighted by score gap / mean gap" if cfg.algo.pair_weighting == "gap" else "weight 1"
            lines.append(f"  pairs:  every pair induced by each ranked list (s_i > s_j), {weighting}")
        if d.pairs == "long_short":
            lines.append(
                f"  pairs:  long-vs-short from {d.path}: shortest correct sample vs. longer wrong ones and correct "
                f"ones >= {d.long_ratio:g}x as long, <= {d.pairs_per_prompt} per prompt"
            )
        if d.pairs == "self" and not d.path:
            lines.append(
                f"  pairs:  self-generated: {d.samples_per_prompt} samples/prompt at T={d.sample_temperature:g} "
                f"from the initial policy, verifier-labelled, <= {d.pairs_per_prompt} (correct, incorrect) "
                "pairs per prompt"
            )
        if needs_reference(cfg.algo.loss):
            lines.append(
                f"  ref:    {cfg.ref.path or 'initial policy'}; log-probs cached in "
                f"{cfg.ref.cache_dir or '$POSTTRAIN_CACHE/reference_logps'}"
            )
        else:
            lines.append("  ref:    none (reference-free loss)")
    lines.append(f"  output: {cfg.run.output_dir} (metrics.jsonl, checkpoints/, final/)")
    return "\n".join(lines)
