"""Probes behind the "where posttrain's GRPO step spends its time" findings (issue #8).

Each probe times one idea against the code path the RL loop runs today, on the same
shapes as the benchmark (P prompts x G samples, T response tokens), and checks that the
idea changes no numbers (log-probs and gradients equal within float tolerance). They are
measurements, not library code: shared-prompt scoring now lives in engines/logprobs.py
(`share_prompts`, on by default) and the probes compare it with `share_prompts=False`.

Shapes: B = P * G sequences, T response tokens, L = prompt + response columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from posttrain.engines.batching import SequenceBatch, build_sequences
from posttrain.engines.logprobs import sequence_logprobs


def median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def synthetic_group_batch(
    prompt_lens: list[int], group_size: int, T: int, vocab_lo: int = 10, vocab_hi: int = 100, seed: int = 0
) -> tuple[list[list[int]], SequenceBatch]:
    """Random prompts (one per entry of prompt_lens), each repeated G times, with random
    right-padded responses of random length <= T: the layout of one GRPO batch."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(vocab_lo, vocab_hi, (n,), generator=g).tolist() for n in prompt_lens]
    rows = [p for p in prompts for _ in range(group_size)]
    B = len(rows)
    response_ids = torch.randint(vocab_lo, vocab_hi, (B, T), generator=g)  # [B, T]
    lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # [B, T]
    return prompts, build_sequences(rows, response_ids, mask, pad_id=0)


def probe_shared_prefix(model, prompt_lens: list[int], group_size: int, T: int, repeats: int = 5) -> dict:
    """Time the loop's scoring forward (no grad) and learner forward+backward with the
    library's shared-prompt path (`sequence_logprobs` default) against the full [B, L]
    forward (`share_prompts=False`); report max |Δ log-prob| and max relative gradient
    difference so a speed-up never hides a numerical change."""
    _, seq = synthetic_group_batch(prompt_lens, group_size, T)
    mask = seq.response_mask

    def full(grad: bool):
        return sequence_logprobs(model, seq, with_grad=grad, share_prompts=False)[0]

    def shared(grad: bool):
        return sequence_logprobs(model, seq, with_grad=grad)[0]

    def grads(fn) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        (fn(True) * mask).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    with torch.no_grad():
        lp_diff = float(((full(False) - shared(False)).abs() * mask).max())
    g_full, g_shared = grads(full), grads(shared)
    grad_rel = max(float((a - b).abs().max() / (a.abs().max() + 1e-12)) for a, b in zip(g_full, g_shared))
    model.zero_grad(set_to_none=True)

    def fwd_bwd(fn):
        def run():
            (fn(True) * mask).sum().backward()

        return run

    out = {
        "B": len(seq),
        "prompt_tokens": sum(prompt_lens) * group_size,
        "response_columns": len(seq) * T,
        "score_full_s": median_time(lambda: full(False), repeats),
        "score_shared_s": median_time(lambda: shared(False), repeats),
        "update_full_s": median_time(fwd_bwd(full), repeats),
        "update_shared_s": median_time(fwd_bwd(shared), repeats),
        "max_abs_logprob_diff": lp_diff,
        "max_rel_grad_diff": grad_rel,
    }
    model.zero_grad(set_to_none=True)
    return out


def probe_prefill_share(engine, prompts: list[list[int]], group_size: int, T: int, repeats: int = 3) -> dict:
    """How much of a native-engine generate call is the prompt prefill (run on all B = P*G
    rows today, although only P distinct prompts exist): generate with 1 new token ~ the
    prefill alone, vs the full T tokens."""
    from posttrain.engines.rollout.base import SamplingParams

    one = SamplingParams(n=group_size, max_new_tokens=1, seed=0)
    full = SamplingParams(n=group_size, max_new_tokens=T, seed=0, ignore_eos=True)
    prefill_s = median_time(lambda: engine.generate(prompts, one), repeats)
    total_s = median_time(lambda: engine.generate(prompts, full), repeats)
    return {"prefill_s": prefill_s, "generate_s": total_s, "prefill_frac": prefill_s / total_s}


def probe_attention_mask(model, B: int, L: int, repeats: int = 5) -> dict:
    """HF forward cost of passing a 2-D attention mask (all ones) vs none: the mask
    switches SDPA away from its causal fast path although nothing is padded."""
    ids = torch.randint(10, 100, (B, L))
    ones = torch.ones(B, L, dtype=torch.long)
    with torch.no_grad():
        masked = median_time(lambda: model(input_ids=ids, attention_mask=ones), repeats)
        unmasked = median_time(lambda: model(input_ids=ids), repeats)
    return {"with_mask_s": masked, "without_mask_s": unmasked, "overhead": masked / unmasked - 1.0}


def probe_step_shared_prefix(rl_cfg_factory: Callable[[str], object], steps: int) -> dict:
    """The whole posttrain GRPO step with shared-prompt scoring switched off
    (`share_prompts=False` patched into train/rl_roles.py) and on (the default), back to
    back: median step and phase seconds and the per-step loss/reward of both runs (equal
    up to float noise: same seeds, same samples)."""
    import functools

    import posttrain.roles as roles
    from posttrain.train.rl.controller import RLTrainer

    results = {}
    original = roles.sequence_logprobs
    unshared = functools.partial(original, share_prompts=False)
    for name, fn in (("full_forward", unshared), ("shared_prompt", original)):
        roles.sequence_logprobs = fn
        try:
            trainer = RLTrainer(rl_cfg_factory(name))
            rows = []
            for _ in range(steps):
                t0 = time.perf_counter()
                m = trainer.step()
                rows.append({"step_s": time.perf_counter() - t0, "loss": m.get("loss/total"),
                             "reward": m.get("reward/mean"), "score_s": m.get("time/score_s"),
                             "update_s": m.get("time/update_s"), "generate_s": m.get("time/generate_s")})  # fmt: skip
        finally:
            roles.sequence_logprobs = original
        timed = rows[1:] if len(rows) > 1 else rows
        results[name] = {
            "median_step_s": sorted(r["step_s"] for r in timed)[len(timed) // 2],
            "median_score_s": sorted(r["score_s"] for r in timed)[len(timed) // 2],
            "median_update_s": sorted(r["update_s"] for r in timed)[len(timed) // 2],
            "median_generate_s": sorted(r["generate_s"] for r in timed)[len(timed) // 2],
            "rows": rows,
        }
    return results


def teacher_forced_warm_start(
    init_dir: Path,
    out_dir: Path,
    *,
    task_name: str,
    difficulty: int | None,
    steps: int,
    lr: float,
    batch_size: int = 32,
    n_examples: int = 2000,
    seed: int = 0,
    max_grad_norm: float = 1.0,
) -> Path:
    """The benchmark's own SFT warm start (the issue's fallback when run_sft is unusable).

    Plain teacher forcing on the task's reference solutions: prompt = chat template
    (thinking mode), target = Example.solution + EOS, loss = mean NLL over target tokens
    (token-mean over the batch), AdamW at a constant `lr`, gradient clipping at
    `max_grad_norm`, `steps` batches of `batch_size` examples drawn with replacement.
    Saved in HF format to out_dir/final (reused if present) and returned.
    """
    from posttrain.data.tasks import get_task
    from posttrain.engines.encoding import encode_prompt
    from posttrain.engines.models import load_model, load_tokenizer, save_model

    final = Path(out_dir) / "final"
    if (final / "config.json").is_file():
        return final
    torch.manual_seed(seed)
    model, tok = load_model(str(init_dir)), load_tokenizer(str(init_dir))
    examples = get_task(task_name).examples("train", n_examples, seed=seed, difficulty=difficulty)
    prompts = [encode_prompt(tok, e.prompt) for e in examples]  # as posttrain's trainers encode them
    targets = [tok(e.solution, add_special_tokens=False).input_ids + [tok.eos_token_id] for e in examples]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        T = max(len(targets[i]) for i in idx)
        response = torch.full((batch_size, T), tok.pad_token_id)  # [b, T]
        mask = torch.zeros(batch_size, T)  # [b, T]
        for r, i in enumerate(idx):
            response[r, : len(targets[i])] = torch.tensor(targets[i])
            mask[r, : len(targets[i])] = 1.0
        seq = build_sequences([prompts[i] for i in idx], response, mask, tok.pad_token_id)
        logprobs, _ = sequence_logprobs(model, seq, with_grad=True)  # [b, T]
        loss = -(logprobs * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
    save_model(model, tok, str(final))
    return final
