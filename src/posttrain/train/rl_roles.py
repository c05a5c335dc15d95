"""Roles of the online RL loop, each behind a narrow interface (DESIGN.md §2).

The loop in `train/rl.py` only talks to these objects: a `PolicyRole` (trainable; log-probs
with or without grad), a `ScoringRole` for frozen models (reference, teacher), a
`CriticRole` (values), a `RewardRole` (scores), a `PromptSource` (which prompts, with a
resumable position) — so each could later live in a Ray actor without the loop changing.
`RLBatch` carries one step's data between them.
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from posttrain.core.logprobs import entropy_from_logits, logprobs_from_logits
from posttrain.engines.batching import SequenceBatch
from posttrain.engines.logprobs import response_logits, sequence_logprobs, sequence_values
from posttrain.errors import ConfigError, TrainingError

# --------------------------------------------------------------------------- the batch


@dataclass
class RLBatch:
    """One step's rollouts and everything computed from them. B sequences, T tokens.

    seq: the packed SequenceBatch (input_ids [B, L] ...; seq.response_mask is the raw
        rollout mask). mask: [B, T] loss mask (rollout mask × filters: invalid rewards,
        overlong masking). sampling_logprobs: [B, T] the sampler's log-probs.
    group_id: [B] long, one id per prompt. scores: [B] summed reward (0 where invalid),
        valid: [B] bool. item_index: [B] long, index of the prompt in the PromptSource.
    keep_mask: [B, T, V] bool sampler support (DeepSeek-V3.2 keep sampling mask) or None.
    dense_rewards: [B, T] weighted dense rewards of dense reward specs (PRM step
        marginals at each step's last token), not in `scores`; None without such specs.
    Filled by the scoring passes when needed: old_logprobs, ref_logprobs, values,
    teacher_logprobs ([B, T]); then advantages, returns ([B, T]).
    """

    seq: SequenceBatch
    mask: torch.Tensor
    sampling_logprobs: torch.Tensor
    group_id: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor
    item_index: torch.Tensor
    finish_reason: list[str]
    texts: list[str]
    keep_mask: torch.Tensor | None = None
    dense_rewards: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        """B, the number of sequences."""
        return self.mask.shape[0]

    def select(self, index: torch.Tensor) -> RLBatch:
        """Rows `index` ([k] long) of every per-sequence field (a minibatch / micro-batch)."""
        out = {}
        rows = index.tolist()
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
            elif isinstance(v, SequenceBatch):
                out[f.name] = v.select(index)
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in rows]
            else:
                out[f.name] = v[index]
        return replace(self, **out)


# --------------------------------------------------------------------------- model roles


def _support_logprobs(
    model: torch.nn.Module, seq: SequenceBatch, keep_mask: torch.Tensor, temperature: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs renormalised over the sampler's kept top-p/top-k support (DeepSeek-V3.2).

    keep_mask: [B, T, V] bool. Tokens outside the support get −inf logits, so the trainer's
    distribution is the same truncated one the sampler drew from. Materialises [B, T, V]
    logits, so keep micro-batches small when using it.
    """
    logits = response_logits(model, seq).float() / temperature  # [B, T, V]
    logits = logits.masked_fill(~keep_mask, float("-inf"))
    tokens = seq.response_ids
    logprobs = logprobs_from_logits(logits, tokens)
    ent = entropy_from_logits(logits.masked_fill(~keep_mask, -1e30)) if entropy else None
    return logprobs, ent


class PolicyRole:
    """The trained causal LM. `logprobs` is the only forward the loop calls on it.

    temperature: the sampler's τ (trainer and sampler must score the same distribution).
    micro_batch_size: rows per no-grad scoring forward (None = engine's automatic choice).
    """

    def __init__(self, model: torch.nn.Module, *, temperature: float, micro_batch_size: int | None = None):
        self.model = model
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable tensors (LoRA: adapters only)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def logprobs(
        self,
        seq: SequenceBatch,
        *,
        with_grad: bool = False,
        return_entropy: bool = False,
        keep_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[B, T] log π_θ of the responses (and [B, T] entropy if asked)."""
        if keep_mask is not None:
            ctx = nullcontext() if with_grad else torch.no_grad()
            with ctx:
                return _support_logprobs(self.model, seq, keep_mask, self.temperature, return_entropy)
        return sequence_logprobs(
            self.model,
            seq,
            temperature=self.temperature,
            micro_batch_size=None if with_grad else self.micro_batch_size,
            return_entropy=return_entropy,
            with_grad=with_grad,
        )


class ScoringRole:
    """A frozen model that scores tokens: the reference policy or the teacher.

    Built either from its own module (a frozen copy / a loaded teacher) or, for a LoRA
    policy, as "the policy with its adapters disabled" (no second copy of the weights).
    """

    def __init__(self, model: torch.nn.Module, *, temperature: float, disable_adapter: bool = False):
        self.model = model
        self.temperature = temperature
        self.disable_adapter = disable_adapter

    @classmethod
    def reference_for(cls, policy: torch.nn.Module, temperature: float) -> ScoringRole:
        """π_ref = the initial policy: adapter-disabled under LoRA, else a frozen deep copy."""
        if hasattr(policy, "disable_adapter"):  # a PEFT model: the base weights ARE π_ref
            return cls(policy, temperature=temperature, disable_adapter=True)
        ref = copy.deepcopy(policy).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return cls(ref, temperature=temperature)

    @torch.no_grad()
    def refresh_from(self, policy: torch.nn.Module) -> None:
        """Copy `policy`'s current weights into this frozen model (periodic π_ref reset)."""
        if self.disable_adapter:
            raise TrainingError("a LoRA reference (adapters off) cannot be refreshed from the policy")
        self.model.load_state_dict(policy.state_dict())

    @torch.no_grad()
    def logprobs(self, seq: SequenceBatch, micro_batch_size: int | None = None) -> torch.Tensor:
        """[B, T] log-probs of the batch's responses under this frozen model."""
        ctx = self.model.disable_adapter() if self.disable_adapter else nullcontext()
        with ctx:
            out, _ = sequence_logprobs(
                self.model, seq, temperature=self.temperature, micro_batch_size=micro_batch_size
            )
        return out


class CriticRole:
    """The value model V(s_t) (a ScalarHeadModel), trained alongside the policy."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def parameters(self) -> list[torch.nn.Parameter]:
        """The critic's trainable tensors."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def values(self, seq: SequenceBatch, *, with_grad: bool = False) -> torch.Tensor:
        """[B, T] values of the state before each response token (logprob alignment)."""
        return sequence_values(self.model, seq, with_grad=with_grad)


# --------------------------------------------------------------------------- rewards


class RewardRole:
    """The weighted reward sum of `cfg.rewards`, with rewards that switch on at a step.

    specs: list of (name, fn, weight, start_step). A reward whose start_step is in the
    future is left out of the runner for that step (Kimi k1.5 enables its length reward
    late), so it neither costs time nor changes the score.

    A reward fn with `fn.dense` true (the prm reward with dense=true) is not part of the
    summed score: `dense` returns its per-step scores and step end offsets, which the loop
    turns into token rewards. It runs in the caller's thread, without the runner's
    deadline: an error in it raises instead of excluding samples.
    """

    def __init__(
        self,
        specs: list[tuple[str, Any, float, int]],
        *,
        timeout_s: float,
        max_workers: int,
        max_error_rate: float,
    ):
        from posttrain.data.rewards import RewardRunner

        self._runner_cls = RewardRunner
        self.specs = specs
        self.options = {"timeout_s": timeout_s, "max_workers": max_workers, "max_error_rate": max_error_rate}
        self._runners: dict[tuple[str, ...], Any] = {}

    def active(self, step: int) -> list[tuple[str, Any, float, int]]:
        """The reward specs that count at `step` (start_step <= step)."""
        return [s for s in self.specs if step >= s[3]]

    def dense(self, prompts: list[str], completions: list[str], step: int):
        """[(name, weight, step scores, step ends)] of the dense rewards active at `step`:
        per completion, PRM(x, y≤t) for each step t and the step's end offset in the
        completion's characters (lists of equal length; empty without steps)."""
        out = []
        for name, fn, weight, _ in self.active(step):
            if getattr(fn, "dense", False):
                scores, ends = fn.scored_steps(prompts, completions)
                out.append((name, weight, scores, ends))
        return out

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list], step: int):
        """RewardResult of the scalar rewards active at `step` (scores [B], NaN where
        excluded); all zeros and valid when only dense rewards are active."""
        active = [s for s in self.active(step) if not getattr(s[1], "dense", False)]
        if not active:
            from posttrain.data.rewards.runner import RewardResult

            b = len(completions)
            return RewardResult(torch.zeros(b), {}, torch.ones(b, dtype=torch.bool), {})
        key = tuple(s[0] for s in active)
        if key not in self._runners:
            self._runners[key] = self._runner_cls([(n, f, w) for n, f, w, _ in active], **self.options)
        return self._runners[key].score(prompts, completions, columns)

    def close(self) -> None:
        """Release the runners' reward workers."""
        for runner in self._runners.values():
            close = getattr(runner, "close", None)
            if close is not None:
                close()


# --------------------------------------------------------------------------- prompts


@dataclass
class PromptItem:
    """One prompt: id, raw text (what rewards see), templated token ids, answer, extra columns."""

    id: str
    text: str
    prompt_ids: list[int]
    answer: str
    difficulty: int
    columns: dict[str, Any]


class PromptSource:
    """Which prompts each step sees, with a JSON-serialisable resumable position.

    selection:
      "shuffle": epochs over a seeded permutation (state: epoch, position).
      "curriculum": data.selection.Curriculum — easy→hard levels opened over `total_steps`
        (stateless: draws depend on (seed, step, refill round)).
      "success_rate": data.selection.SuccessRateSampler — Kimi k1.5 sampling ∝ 1 − success
        rate, solved prompts retired (`update` feeds back per-sample success).
    """

    def __init__(self, items: list[PromptItem], *, selection: str, seed: int, total_steps: int = 1):
        if not items:
            raise ConfigError("data: no training prompts (empty dataset or all prompts skipped)")
        self.items = items
        self.selection = selection
        self.seed = seed
        self.total_steps = total_steps
        self.epoch = 0
        self.position = 0
        self._order = self._make_order()
        self._sampler = None
        self._curricula: dict[int, Any] = {}
        if selection == "success_rate":
            from posttrain.data.selection import SuccessRateSampler

            self._sampler = SuccessRateSampler([it.id for it in items], seed=seed)
        self._index = {it.id: i for i, it in enumerate(items)}

    def _make_order(self) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.items)))
        rng.shuffle(order)
        return order

    def _curriculum(self, round_: int):
        if round_ not in self._curricula:
            from posttrain.data.selection import Curriculum

            # One sampler per refill round, so a refill draws different prompts than round 0.
            self._curricula[round_] = Curriculum(
                [it.difficulty for it in self.items], self.total_steps, seed=self.seed + 7919 * round_
            )
        return self._curricula[round_]

    def next(self, n: int, step: int = 0, round_: int = 0) -> list[int]:
        """Indices of the next n prompts (for RL step `step`, generation round `round_`)."""
        if self._sampler is not None:
            return [self._index[i] for i in self._sampler.sample(n)]
        if self.selection == "curriculum":
            return list(self._curriculum(round_).sample(step, n))
        out = []
        while len(out) < n:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._make_order()
            out.append(self._order[self.position])
            self.position += 1
        return out

    def update(self, indices: list[int], successes: list[float]) -> None:
        """Feed back per-sample success (success-rate sampling); a no-op otherwise."""
        if self._sampler is not None:
            self._sampler.update([self.items[i].id for i in indices], successes)

    def state_dict(self) -> dict:
        """JSON-serialisable position (epoch, position, success-rate sampler state)."""
        state: dict[str, Any] = {"epoch": self.epoch, "position": self.position}
        if self._sampler is not None:
            state["sampler"] = self._sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the position saved by `state_dict()`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._make_order()
        if self._sampler is not None and "sampler" in state:
            self._sampler.load_state_dict(state["sampler"])


class RunningMean:
    """EMA of past mean scores: the REINFORCE baseline b (Williams 1992), resumable.

    momentum: b ← momentum·b + (1 − momentum)·mean(scores); the first update sets b.
    """

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.value = 0.0
        self.initialised = False

    def update(self, mean_score: float) -> None:
        """Fold this batch's mean score into b (a non-finite mean is ignored)."""
        if not math.isfinite(mean_score):
            return
        if not self.initialised:
            self.value, self.initialised = mean_score, True
        else:
            self.value = self.momentum * self.value + (1.0 - self.momentum) * mean_score

    def state_dict(self) -> dict:
        """JSON-serialisable state for checkpoints."""
        return {"value": self.value, "initialised": self.initialised}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()`."""
        self.value, self.initialised = float(state["value"]), bool(state["initialised"])
