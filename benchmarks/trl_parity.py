"""Does posttrain's GRPO update equal TRL's on the same batch? (issue #8, "equal learning")

The time-to-accuracy runs in docs/benchmarks.md found TRL gaining more held-out accuracy per
step than posttrain with the same recipe. Before blaming noise, this script feeds ONE rollout
batch, sampled by posttrain's loop, through both frameworks' code and compares every piece
of the update that the two could disagree on:

  rewards      TRL's reward call (completions decoded with skip_special_tokens, as
               GRPOTrainer does) vs posttrain's summed, weighted scores
  mask         TRL's completion mask (up to and including the first EOS) vs our loss mask
  log-probs    TRL's training forward (`_get_per_token_logps_and_entropies`) vs the sampler's
  advantages   TRL's formula for the configured scale_rewards vs ours
  loss, grad   `GRPOTrainer.compute_loss` backward vs posttrain's `_micro_loss` backward
  optimizer    the optimizer TRL's Trainer builds vs ours (class and hyper-parameters)

  python benchmarks/trl_parity.py --model runs/vs_trl_tta/accuracy/tiny/sft/final \\
      --set lr=1e-4 --set format_weight=0.2 --set advantage_scale=batch --set beta=0 \\
      --set max_new_tokens=40 --set prompts_per_step=12 --set difficulty=2 \\
      --set "task_options={operators: '+-', trace: columns}" --set n_train=8000

At step 0 the policy is its own reference, so the KL term's gradient is zero and this
one-batch check cannot see it. `--replay K` covers that: posttrain trains K steps and TRL's
own `train()` is fed the very same batches; the weights after K steps are compared:

  python benchmarks/trl_parity.py --preset tiny --replay 8 --random-scores --set beta=0.04 \
      --set prompts_per_step=2 --set group_size=4 --set max_new_tokens=16 --set lr=1e-3

Without --model it builds the preset from random init (no SFT): the comparison holds for any
weights, but rewards are then nearly all zero. Needs the `bench` extra (TRL).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml

from posttrain.train.config.loader import load_config
from trlbench.bench import BenchConfig, prepare_model
from trlbench.runs import build_trl_trainer, rl_config_dict


def trl_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """TRL 1.16's GRPO advantage for contiguous groups of `group_size` (its documented rule):
    r - group mean, divided by the group's or the batch's unbiased std + 1e-4."""
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if scale == "group":
        std = grouped.std(1).repeat_interleave(group_size)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        return centred
    return centred / (std + 1e-4)


def trl_completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """GRPOTrainer's completion mask: 1 up to and including the first EOS, 0 after."""
    is_eos = completion_ids == eos_id
    first = torch.full((completion_ids.shape[0],), completion_ids.shape[1], dtype=torch.long)
    has = is_eos.any(1)
    first[has] = is_eos.int().argmax(1)[has]
    return (torch.arange(completion_ids.shape[1])[None, :] <= first[:, None]).int()


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _optimizer_summary(opt: torch.optim.Optimizer) -> dict:
    """Class and the hyper-parameters each parameter group really uses (not the defaults)."""
    keys = ("lr", "betas", "eps", "weight_decay")
    groups = [{k: g[k] for k in keys if k in g} | {"params": len(g["params"])} for g in opt.param_groups]
    return {"class": type(opt).__name__, "groups": groups}


def posttrain_trainer(cfg: BenchConfig, model_dir: Path, work: Path, steps: int):
    """posttrain's RLTrainer with the benchmark's GRPO recipe (`rl_config_dict`) in `work`."""
    from posttrain.train.rl.controller import RLConfig, RLTrainer

    torch.set_num_threads(cfg.threads)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "rl.yaml"
    path.write_text(yaml.safe_dump(rl_config_dict(cfg, model_dir, work / "pt", steps), sort_keys=False))
    return RLTrainer(load_config(RLConfig, path, []))


def trl_inputs(trl, cfg: BenchConfig, prompt_ids, prompt_mask, completion_ids, c_mask, advantages) -> dict:
    """The batch dict GRPOTrainer.compute_loss reads, as its `_generate_and_score_completions`
    builds it for a strictly on-policy step (no old log-probs); with beta > 0 TRL's own
    frozen reference model scores the completions."""
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": c_mask, "advantages": advantages, "num_items_in_batch": c_mask.sum(),
    }  # fmt: skip
    if cfg.beta > 0:
        with torch.no_grad():
            inputs["ref_per_token_logps"], _, _ = trl._get_per_token_logps_and_entropies(
                trl.ref_model,
                torch.cat([prompt_ids, completion_ids], 1),
                torch.cat([prompt_mask, c_mask], 1),
                completion_ids.shape[1],
            )
    return inputs


def _sequence_advantages(batch) -> torch.Tensor:
    """[B] per-sequence advantage of a GRPO batch (ours is per token, constant over a response)."""
    mask = batch.mask
    return torch.where(mask > 0, batch.advantages, torch.zeros(())).sum(-1) / mask.sum(-1).clamp(min=1)


def compare(
    cfg: BenchConfig, model_dir: Path, work: Path, step: int = 0, scores: torch.Tensor | None = None
) -> dict:
    """Both frameworks' update pieces on loop step `step`'s batch (see the module docstring).

    scores: [B] rewards replacing the sampled batch's (for both frameworks), e.g. random ones
    so that an untrained model, whose rewards are all 0, still gets a non-zero gradient.
    """
    from posttrain.train.rl.setup import collect

    pt = posttrain_trainer(cfg, model_dir, work, 300)
    batch, _ = collect(pt.cfg, pt.spec, step, generator=pt.generator, rewards=pt.rewards, prompts=pt.prompts,
                       tokenizer=pt.tokenizer)  # fmt: skip
    if scores is not None:
        batch.scores, batch.valid = scores.float(), torch.ones(len(batch), dtype=torch.bool)
    pt._score(batch)
    pt._advantages(batch, step)
    seq, mask = batch.seq, batch.mask
    B, T = mask.shape
    # posttrain's gradient on this batch: the loop's own micro-loss with global counts.
    counts = {"num_tokens": float(mask.sum()), "num_seqs": float((mask.sum(-1) > 0).sum()),
              "max_len": cfg.max_new_tokens}  # fmt: skip
    pt.policy.model.zero_grad()
    pt_loss, _ = pt.policy._micro_loss(batch, counts, step, pt.kl_ctl.value, pt._kd_coef(step))
    pt_loss.backward()
    g_pt = _grads(pt.policy.model)

    trl = build_trl_trainer(cfg, model_dir, work / "trl", gradient_checkpointing=False, steps=300)
    tok = trl.processing_class
    P = seq.response_start
    prompt_ids, prompt_mask = seq.input_ids[:, :P], seq.attention_mask[:, :P]
    completion_ids = seq.response_ids
    c_mask = trl_completion_mask(completion_ids, tok.eos_token_id)
    # TRL's rewards on the same completions: decoded as GRPOTrainer decodes them.
    texts = tok.batch_decode(
        completion_ids * c_mask + tok.pad_token_id * (1 - c_mask), skip_special_tokens=True
    )
    items = [pt.prompts.items[int(i)] for i in batch.item_index]
    prompts = [[{"role": "user", "content": it.text}] for it in items]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    answers = [it.answer for it in items]
    trl_rewards = torch.zeros(B)
    for fn, w in zip(trl.reward_funcs, trl.reward_weights.tolist(), strict=True):
        trl_rewards += w * torch.tensor(
            fn(prompts=prompts, completions=completions, answer=answers), dtype=torch.float
        )
    G = cfg.group_size
    order_ok = bool((batch.group_id.view(-1, G) == batch.group_id.view(-1, G)[:, :1]).all())
    trl_adv = trl_advantages(trl_rewards if scores is None else batch.scores, G, cfg.advantage_scale)
    pt_adv = _sequence_advantages(batch)

    model = trl.model
    model.train()
    with torch.no_grad():
        trl_logps, _, _ = trl._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, c_mask], 1), T
        )
    inputs = trl_inputs(trl, cfg, prompt_ids, prompt_mask, completion_ids, c_mask, trl_adv)
    trl.current_gradient_accumulation_steps = 1  # set by Trainer.train per accumulation window
    model.zero_grad()
    trl_loss = trl.compute_loss(model, inputs)
    trl_loss.backward()
    g_trl = _grads(model)
    opt = trl.create_optimizer()
    m = mask > 0
    return {
        "batch": {"sequences": B, "response_tokens": int(mask.sum()), "groups_contiguous": order_ok},
        "mask_equal": bool((c_mask.float() == mask).all()),
        "rewards_max_abs_diff": None
        if scores is not None
        else float((trl_rewards - batch.scores).abs().max()),
        "reward_mean": {"posttrain": float(batch.scores.mean()), "trl": float(trl_rewards.mean())},
        "advantage_max_abs_diff": float((trl_adv - pt_adv).abs().max()),
        "logprob_max_abs_diff_trl_vs_sampler": float((trl_logps - batch.sampling_logprobs)[m].abs().max()),
        "loss": {"posttrain": float(pt_loss.detach()), "trl": float(trl_loss.detach())},
        "grad_norm": {"posttrain": float(g_pt.norm()), "trl": float(g_trl.norm())},
        "grad_rel_l2_diff": float((g_pt - g_trl).norm() / g_trl.norm().clamp(min=1e-30)),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(g_pt, g_trl, dim=0)),
        "optimizer": {"posttrain": _optimizer_summary(pt.policy.optimizer), "trl": _optimizer_summary(opt)},
    }


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def replay(cfg: BenchConfig, model_dir: Path, work: Path, steps: int, random_scores: bool = False) -> dict:
    """`steps` whole training steps of both frameworks on the same batches; compare the weights.

    posttrain's loop runs `steps` GRPO steps and every batch it trains on is recorded
    (prompts, completions, mask, per-sequence advantages). TRL's GRPOTrainer then trains
    `steps` steps through its own `train()` (compute_loss, backward, gradient clipping,
    AdamW, learning-rate scheduler) with `_generate_and_score_completions` returning those
    batches in order. One-batch `compare` checks a single gradient; this checks what the
    optimizer state and the schedule make of a sequence of them. Reported: the relative
    L2 difference of the two weight updates, ||w_pt - w_trl|| / ||w_pt - w_0||.

    random_scores: replace each batch's rewards by uniform draws (seeded by the step), so an
    untrained model, which earns ~0 reward, still gets gradients.
    """
    pt = posttrain_trainer(cfg, model_dir, work, steps)
    w0 = _flat(pt.policy.model)
    recorded: list[dict] = []
    advantages, update = pt._advantages, pt._update

    def scored(batch, step):
        if random_scores:
            gen = torch.Generator().manual_seed(1000 + step)
            batch.scores = torch.rand(len(batch), generator=gen)
            batch.valid = torch.ones(len(batch), dtype=torch.bool)
        return advantages(batch, step)

    def recording(batch, step):
        seq, P = batch.seq, batch.seq.response_start
        recorded.append({
            "prompt_ids": seq.input_ids[:, :P].clone(), "prompt_mask": seq.attention_mask[:, :P].clone(),
            "completion_ids": seq.response_ids.clone(), "mask": batch.mask.long().clone(),
            "advantages": _sequence_advantages(batch).clone(),
        })  # fmt: skip
        return update(batch, step)

    pt._advantages, pt._update = scored, recording
    lrs_pt = []
    for _ in range(steps):
        lrs_pt.append(float(pt.policy.optimizer.param_groups[0]["lr"]))
        pt.step()
    w_pt = _flat(pt.policy.model)

    trl = build_trl_trainer(cfg, model_dir, work / "trl", gradient_checkpointing=False, steps=steps)
    feed = iter(recorded)

    def replayed(_generation_batch):
        b = next(feed)
        return trl_inputs(trl, cfg, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"],
                          b["advantages"])  # fmt: skip

    trl._generate_and_score_completions = replayed
    trl.train()
    w_trl = _flat(trl.model)
    delta = (w_pt - w0).norm()
    return {
        "steps": steps,
        "batches_replayed": steps - sum(1 for _ in feed),
        "response_tokens": [int(b["mask"].sum()) for b in recorded],
        "update_norm": {"posttrain": float(delta), "trl": float((w_trl - w0).norm())},
        "update_rel_l2_diff": float((w_pt - w_trl).norm() / delta.clamp(min=1e-30)),
        "weights_max_abs_diff": float((w_pt - w_trl).abs().max()),
        "lr_posttrain": lrs_pt,
    }


def sample_compare(cfg: BenchConfig, model_dir: Path, work: Path, n_prompts: int, rounds: int) -> dict:
    """Sampled task accuracy and length through TRL's own generation call and posttrain's engine.

    The same `n_prompts` training prompts, G = cfg.group_size samples each, `rounds` times:
    TRL tokenizes them with `_tokenize_prompts` and samples with `_generate_single_turn` (the
    calls GRPOTrainer makes, with its GenerationConfig and EOS ids); posttrain samples with
    its loop's rollout engine. Both are scored by TRL's reward function (the task verifier).
    Equal means (within sampling noise) say the two frameworks sample the same distribution.
    """
    import statistics

    from posttrain.engines.rollout.base import SamplingParams

    pt = posttrain_trainer(cfg, model_dir, work, 300)
    trl = build_trl_trainer(cfg, model_dir, work / "trl", gradient_checkpointing=False, steps=300)
    score, G, P = trl.reward_funcs[0], cfg.group_size, cfg.prompts_per_step
    items = pt.prompts.items[:n_prompts]
    out = {fw: {"correct": [], "length": []} for fw in ("trl", "posttrain")}
    for r in range(rounds):
        for start in range(0, len(items), P):
            chunk = items[start : start + P]
            conv = [[{"role": "user", "content": it.text}] for it in chunk]
            torch.manual_seed(1_000 * r + start)
            ids, _, _ = trl._tokenize_prompts(conv)
            completions, _ = trl._generate_single_turn([x for x in ids for _ in range(G)], None, {}, G)
            trl_texts = trl.processing_class.batch_decode(completions, skip_special_tokens=True)
            params = SamplingParams(n=G, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                    seed=1_000 * r + start)  # fmt: skip
            ro = pt.generator.generate([it.prompt_ids for it in chunk], params)
            prompts = [c for c in conv for _ in range(G)]
            answers = [it.answer for it in chunk for _ in range(G)]
            for fw, texts, lengths in (("trl", trl_texts, [len(c) for c in completions]),
                                       ("posttrain", ro.texts, ro.mask.sum(-1).tolist())):  # fmt: skip
                done = [[{"role": "assistant", "content": t}] for t in texts]
                out[fw]["correct"] += score(prompts=prompts, completions=done, answer=answers)
                out[fw]["length"] += lengths
    return {
        "samples": len(out["trl"]["correct"]),
        **{f"{fw}_accuracy": statistics.fmean(v["correct"]) for fw, v in out.items()},
        **{f"{fw}_mean_length": statistics.fmean(v["length"]) for fw, v in out.items()},
        "trl_generation_config": trl.generation_config.to_diff_dict(),
        "trl_eos_token_ids": list(trl.eos_token_ids),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory both frameworks start from")
    ap.add_argument(
        "--preset", default="tiny", help="preset built from random init when --model is not given"
    )
    ap.add_argument(
        "--steps", type=int, default=3, help="batches compared (loop steps 0..steps-1, fresh each)"
    )
    ap.add_argument(
        "--replay", type=int, default=0, metavar="K",
        help="instead: train K steps with posttrain, replay its batches through TRL's train(), compare weights",
    )  # fmt: skip
    ap.add_argument("--random-scores", action="store_true", help="--replay: uniform random rewards")
    ap.add_argument(
        "--sample", type=int, default=0, metavar="N",
        help="instead: sampled accuracy and length of N prompts x G through TRL's generation call and "
        "posttrain's engine (--steps rounds)",
    )  # fmt: skip
    ap.add_argument("--set", action="append", default=[], help="BenchConfig override key=value")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args()
    cfg = load_config(BenchConfig, None, ["threads=2", *args.set])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else prepare_model(args.preset, Path(tmp), cfg.run.seed)
        if args.sample:
            results = sample_compare(cfg, model_dir, Path(tmp) / "sample", args.sample, args.steps)
        elif args.replay:
            results = replay(cfg, model_dir, Path(tmp) / "replay", args.replay, args.random_scores)
        else:
            results = [{"step": step, **compare(cfg, model_dir, Path(tmp) / f"s{step}", step)}
                       for step in range(args.steps)]  # fmt: skip
    for r in results if isinstance(results, list) else [results]:
        print(json.dumps(r, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
