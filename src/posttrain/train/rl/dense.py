"""Dense rewards on tokens: per-step rewards (a PRM's) placed on the token that ends each
step, and the prompts as the policy saw them (what reward models score). Used by
`collect` (train/rl/collect.py)."""

from __future__ import annotations

import bisect
import itertools

import torch

from posttrain.engines.rollout.base import Rollout
from posttrain.roles import PromptItem, RewardRole


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

    if not rewards.has_dense(step):
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
