"""The core pieces compose into learning: a tiny softmax policy improves under them."""

import torch

from posttrain.core.advantages import ADVANTAGES
from posttrain.core.kl import KL_ESTIMATORS
from posttrain.core.masking import aggregate
from posttrain.core.policy_losses import POLICY_LOSSES
from posttrain.core.preference import PREFERENCE_LOSSES


def _expected_reward(logits, reward_table):
    return (torch.softmax(logits, -1) * reward_table).sum(-1).mean()


def test_grpo_ppo_k3_improves_a_contextual_bandit():
    # 4 "prompts", 6 actions, a different correct action per prompt; 3-token responses where
    # every token is an action and the score is the fraction of correct tokens.
    torch.manual_seed(0)
    n_prompts, n_actions, group, t = 4, 6, 8, 3
    correct = torch.tensor([0, 3, 5, 1])
    table = torch.nn.functional.one_hot(correct, n_actions).double()
    logits = torch.zeros(n_prompts, n_actions, dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(n_prompts, n_actions, dtype=torch.float64)
    opt = torch.optim.Adam([logits], lr=0.1)
    before = _expected_reward(logits.detach(), table).item()
    prompt = torch.arange(n_prompts).repeat_interleave(group)  # [B]
    for _ in range(25):
        with torch.no_grad():
            probs = torch.softmax(logits[prompt], -1)
            actions = torch.multinomial(probs, t, replacement=True)  # [B, T]
            scores = (actions == correct[prompt, None]).double().mean(-1)
            old = torch.log_softmax(logits[prompt], -1).gather(-1, actions)
        mask = torch.ones_like(old)
        adv, _ = ADVANTAGES["grpo"](scores=scores, mask=mask, group_id=prompt)
        for _epoch in range(2):
            lp = torch.log_softmax(logits[prompt], -1).gather(-1, actions)
            loss_t, _ = POLICY_LOSSES["ppo"](lp, old, adv, mask, clip_eps_high=0.28)
            ref_lp = torch.log_softmax(ref[prompt], -1).gather(-1, actions)
            kl = KL_ESTIMATORS["k3"](lp, ref_lp)
            loss = aggregate(loss_t, mask, "token-mean") + 0.01 * aggregate(kl, mask, "token-mean")
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = _expected_reward(logits.detach(), table).item()
    assert before == 1 / n_actions
    assert after > 0.6, (before, after)


def test_dpo_moves_probability_to_chosen():
    torch.manual_seed(0)
    logits = torch.zeros(2, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.zeros(2, 5, dtype=torch.float64), -1)
    chosen, rejected = torch.tensor([1, 4]), torch.tensor([2, 0])
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(50):
        logp = torch.log_softmax(logits, -1)
        rows = torch.arange(2)
        loss, m = PREFERENCE_LOSSES["dpo"](
            logp[rows, chosen], logp[rows, rejected], ref[rows, chosen], ref[rows, rejected], beta=0.5
        )
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    p = torch.softmax(logits.detach(), -1)
    assert (p[torch.arange(2), chosen] > 0.35).all() and (p[torch.arange(2), rejected] < 0.05).all()
    assert m["pref/accuracy"].item() == 1.0
