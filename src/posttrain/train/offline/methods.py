"""The four offline methods driven by train/offline/loop.py.

Each method holds its model(s) and tokenized data and implements the `OfflineMethod`
protocol: global step counts, micro-batch loss (via algos/), metric summaries, held-out
evaluation and the final Hugging Face export. Only train/ code calls .item() / float().
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from posttrain.algos.preference import preference_loss, sequence_logps
from posttrain.algos.prm import build_step_batch, first_wrong_step, largest_drop_step, prm_loss, step_logits
from posttrain.algos.reward_model import reward_model_loss
from posttrain.algos.sft import pack_examples, packed_logprobs, sft_loss
from posttrain.engines.batching import SequenceBatch, build_sequences
from posttrain.engines.logprobs import sequence_logprobs
from posttrain.errors import ConfigError


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B token lists -> (ids [B, T] right-padded with pad_id, mask [B, T] float)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.float32)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1.0
    return ids, mask


def completion_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device
) -> SequenceBatch:
    """build_sequences over token lists, moved to `device`."""
    ids, mask = _pad(completions, pad_id)
    return build_sequences(prompts, ids, mask, pad_id).to(device)


def pair_batch(items: list[dict], pad_id: int, device) -> SequenceBatch:
    """2B rows: chosen completions of the B items, then their rejected completions."""
    prompts = [it["prompt"] for it in items] * 2
    completions = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    return completion_batch(prompts, completions, pad_id, device)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


class _PolicyMethod:
    """What the methods that train the policy itself (SFT, DPO) share: the model under
    "policy", held-out task prompts for generative evaluation, a Hugging Face save."""

    def __init__(self, cfg, model, tokenizer, train_items, eval_items, task, eval_examples):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.models = {"policy": model}
        self.train_items, self.eval_items = train_items, eval_items
        self.task, self.eval_examples = task, list(eval_examples)
        self.pad_id = tokenizer.pad_token_id
        self.samples: list[dict] = []  # held-out generations of the last evaluation

    @property
    def model(self):
        return self.models["policy"]

    def save_final(self, path):
        from posttrain.engines.models import save_model

        save_model(self.model, self.tokenizer, str(path))


class SFTMethod(_PolicyMethod):
    """Completion-only NLL (algos/sft.py), plain or packed; eval loss + task accuracy."""

    name = "sft"

    def __init__(self, cfg, model, tokenizer, train_items, eval_items, task=None, eval_examples=()):
        if cfg.algo.packing and cfg.algo.aggregation != "token-mean":
            raise ConfigError("algo.packing needs algo.aggregation=token-mean (packed rows mix sequences)")
        super().__init__(cfg, model, tokenizer, train_items, eval_items, task, eval_examples)

    def step_counts(self, items):
        lengths = [len(it["completion"]) for it in items]
        return {"num_tokens": sum(lengths), "num_seqs": len(items), "max_len": max(lengths)}

    def loss(self, items, counts):
        prompts = [it["prompt"] for it in items]
        completions = [it["completion"] for it in items]
        if self.cfg.algo.packing:
            packed = pack_examples(
                prompts, completions, max_length=self.cfg.data.max_length, pad_id=self.pad_id
            )
            dev = _device(self.model)
            packed.input_ids, packed.position_ids = packed.input_ids.to(dev), packed.position_ids.to(dev)
            logprobs, mask = packed_logprobs(self.model, packed), packed.mask.to(dev)  # [B, L-1]
        else:
            batch = completion_batch(prompts, completions, self.pad_id, _device(self.model))
            logprobs, _ = sequence_logprobs(self.model, batch, with_grad=torch.is_grad_enabled())  # [B, T]
            mask = batch.response_mask
        return sft_loss(logprobs, mask, mode=self.cfg.algo.aggregation, **counts)

    def summarize(self, sums, prefix="sft"):
        return {
            f"{prefix}/nll": _ratio(sums["sft/nll_sum"], sums["sft/tokens"]),
            f"{prefix}/tokens": sums["sft/tokens"],
        }

    def evaluate(self):
        self.model.eval()
        loss, sums = _eval_sums(self, self.eval_items)
        # No held-out rows (a file with data.eval_fraction 0): loss and NLL are NaN.
        out = {"eval/loss": loss, "eval/nll": _ratio(sums.get("sft/nll_sum", 0.0), sums.get("sft/tokens", 0))}
        out.update(
            _accuracy(
                self, self.cfg, think_modes=(True, False) if self.cfg.data.no_think_fraction > 0 else (True,)
            )
        )
        return out


def _eval_sums(method, items):
    """(summed loss, summed metrics) over held-out items; (nan, zero sums) when there are none,
    so every held-out ratio is NaN (no rows) instead of a KeyError."""
    from posttrain.train.offline.loop import run_microbatches

    if not items:
        return float("nan"), defaultdict(float)
    return run_microbatches(method, items, method.cfg.train.eval_batch_size, train=False)


def _accuracy(method, cfg, think_modes=(True,)) -> dict[str, float]:
    """Held-out task accuracy of method.model via train/evaluate.evaluate_policy.

    Greedy pass@1 ("eval/accuracy"), format rate and length; with train.eval_temperature
    > 0 also the mean accuracy of train.eval_samples samples per prompt
    ("eval/accuracy_sampled": the policy as a distribution, which preference training
    moves even when the greedy arg-max does not flip). Empty without a task.
    """
    from posttrain.train.evaluate import evaluate_policy

    if method.task is None or not method.eval_examples or cfg.train.eval_generations <= 0:
        return {}
    examples = method.eval_examples[: cfg.train.eval_generations]
    common = dict(max_new_tokens=cfg.train.max_new_tokens, batch_size=cfg.train.eval_batch_size * 4)
    out = {}
    for think in think_modes:
        suffix = "" if think else "_no_think"
        res = evaluate_policy(method.model, method.tokenizer, examples, method.task, k=1, temperature=0.0,
                              enable_thinking=think, return_samples=True, **common)  # fmt: skip
        out[f"eval/accuracy{suffix}"] = res["accuracy"]
        out[f"eval/format_rate{suffix}"] = res["format_rate"]
        out[f"eval/length_mean{suffix}"] = res["length_mean"]
        method.samples = res["samples"][:8]
        if cfg.train.eval_temperature > 0:
            sampled = evaluate_policy(method.model, method.tokenizer, examples, method.task,
                                      k=cfg.train.eval_samples, temperature=cfg.train.eval_temperature,
                                      enable_thinking=think, **common)  # fmt: skip
            out[f"eval/accuracy_sampled{suffix}"] = sampled["accuracy"]
    return out


class RewardModelMethod:
    """Bradley–Terry reward model (algos/reward_model.py); saved as HF sequence classification."""

    name = "rm"

    def __init__(self, cfg, value_model, tokenizer, train_items, eval_items):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.models = {"reward_model": value_model}
        self.train_items, self.eval_items = train_items, eval_items
        self.pad_id = tokenizer.pad_token_id

    def step_counts(self, items):
        return {"num_pairs": len(items)}

    def loss(self, items, counts):
        model = self.models["reward_model"]
        batch = pair_batch(items, self.pad_id, _device(model))
        margin = None
        if self.cfg.algo.margin_column:
            margin = torch.tensor([it["margin"] for it in items], dtype=torch.float32, device=_device(model))
        loss, metrics = reward_model_loss(model, batch, margin=margin)
        metrics["rm/pairs"] = torch.tensor(float(len(items)))
        return loss.sum() / counts["num_pairs"], metrics

    def summarize(self, sums, prefix="rm"):
        n = sums["rm/pairs"]
        return {
            f"{prefix}/accuracy": _ratio(sums["rm/correct"], n),
            f"{prefix}/margin": _ratio(sums["rm/margin_sum"], n),
            f"{prefix}/chosen_score": _ratio(sums["rm/chosen_sum"], n),
            f"{prefix}/rejected_score": _ratio(sums["rm/rejected_sum"], n),
        }

    def evaluate(self):
        self.models["reward_model"].eval()
        loss, sums = _eval_sums(self, self.eval_items)
        out = {"eval/loss": loss}
        out.update(self.summarize(sums, prefix="eval/rm"))
        return out

    def save_final(self, path):
        from posttrain.engines.models import save_value_model

        save_value_model(self.models["reward_model"], self.tokenizer, str(path))


class PRMMethod:
    """Step-level BCE process reward model (algos/prm.py)."""

    name = "prm"

    def __init__(self, cfg, value_model, tokenizer, train_items, eval_items, eval_traces=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.models = {"prm": value_model}
        self.train_items, self.eval_items = train_items, eval_items
        # Whole held-out traces for the first-wrong-step metrics (eval_items may be cut
        # after the first wrong step, algo.until_first_error).
        self.eval_traces = eval_items if eval_traces is None else eval_traces
        self.pad_id = tokenizer.pad_token_id
        self.sep_ids = tokenizer(cfg.algo.step_separator, add_special_tokens=False)["input_ids"]

    def _batch(self, items, device):
        batch = build_step_batch(
            [it["prompt"] for it in items],
            [it["steps"] for it in items],
            [it["labels"] for it in items],
            separator_ids=self.sep_ids,
            pad_id=self.pad_id,
        )
        batch.seqs = batch.seqs.to(device)
        for name in ("step_index", "labels", "step_mask"):
            setattr(batch, name, getattr(batch, name).to(device))
        return batch

    def step_counts(self, items):
        return {"num_steps": sum(len(it["steps"]) for it in items)}

    def loss(self, items, counts):
        model = self.models["prm"]
        return prm_loss(model, self._batch(items, _device(model)), num_steps=counts["num_steps"])

    def summarize(self, sums, prefix="prm"):
        return {
            f"{prefix}/bce": _ratio(sums["prm/bce_sum"], sums["prm/steps"]),
            f"{prefix}/step_accuracy": _ratio(sums["prm/correct"], sums["prm/steps"]),
        }

    @torch.no_grad()
    def first_error_rate(self, items) -> dict[str, float]:
        """How often the PRM names the first wrong step, over traces that contain one.

        Two rules: "acc", the first step scored below algo.threshold (`first_wrong_step`),
        and "acc_drop", the step whose score fell most (`largest_drop_step`: the most
        negative marginal, no threshold). Two baselines to beat: "chance", a uniform guess
        among the trace's steps (mean of 1/S), and "majority", always answering the most
        common first-wrong position of these traces (what a PRM that learned only the
        label prior scores).
        """
        model = self.models["prm"]
        model.eval()
        hits = drop_hits = n = chance = 0.0
        truths: list[int] = []
        bs = self.cfg.train.eval_batch_size
        for start in range(0, len(items), bs):
            chunk = items[start : start + bs]
            probs = torch.sigmoid(step_logits(model, self._batch(chunk, _device(model)))).cpu()
            for row, it in enumerate(chunk):
                if all(it["labels"]):
                    continue
                truth = it["labels"].index(False)
                truths.append(truth)
                scores = probs[row, : len(it["steps"])].tolist()
                hits += first_wrong_step(scores, self.cfg.algo.threshold) == truth
                drop_hits += largest_drop_step(scores) == truth
                chance += 1.0 / len(it["steps"])
                n += 1
        majority = max((truths.count(t) for t in set(truths)), default=0)
        return {
            "eval/prm_first_error_acc": _ratio(hits, n),
            "eval/prm_first_error_acc_drop": _ratio(drop_hits, n),
            "eval/prm_first_error_chance": _ratio(chance, n),
            "eval/prm_first_error_majority": _ratio(majority, n),
        }

    def evaluate(self):
        self.models["prm"].eval()
        loss, sums = _eval_sums(self, self.eval_items)
        out = {"eval/loss": loss}
        out.update(self.summarize(sums, prefix="eval/prm"))
        out.update(self.first_error_rate(self.eval_traces))
        return out

    def save_final(self, path):
        from posttrain.engines.models import save_value_model

        save_value_model(self.models["prm"], self.tokenizer, str(path))
        meta = {"step_separator": self.cfg.algo.step_separator, "threshold": self.cfg.algo.threshold}
        (Path(path) / "prm.json").write_text(json.dumps(meta))


class PreferenceMethod(_PolicyMethod):
    """DPO-family training (algos/preference.py) against cached reference log-probs.

    ref_train / ref_eval: [2N] reference log-probs per item (chosen at i, rejected at
    N + i) or None for reference-free losses. Items carry their position as "idx".
    """

    name = "dpo"

    def __init__(
        self, cfg, model, tokenizer, train_items, eval_items, ref_train, ref_eval, task=None, eval_examples=()
    ):
        super().__init__(cfg, model, tokenizer, train_items, eval_items, task, eval_examples)
        self.ref = {"train": ref_train, "eval": ref_eval}

    def step_counts(self, items):
        return {"num_pairs": len(items)}

    def _ref_logps(self, items):
        table = self.ref[items[0]["split"]]
        if table is None:
            return None
        n = table.shape[0] // 2
        idx = torch.tensor([it["idx"] for it in items], dtype=torch.long)
        return torch.cat([table[idx], table[n + idx]])  # [2B]

    def loss(self, items, counts):
        batch = pair_batch(items, self.pad_id, _device(self.model))
        logprobs, _ = sequence_logprobs(self.model, batch, with_grad=torch.is_grad_enabled())  # [2B, T]
        logps, lengths = sequence_logps(logprobs, batch.response_mask)  # [2B], [2B]
        loss, metrics = preference_loss(
            logps,
            lengths,
            self._ref_logps(items),
            loss_name=self.cfg.algo.loss,
            beta=self.cfg.algo.beta,
            num_pairs=counts["num_pairs"],
            options=dict(self.cfg.algo.options),
            nll_weight=self.cfg.algo.nll_weight,
            weights=pair_weight_tensor(items),
        )
        metrics["pref/pairs"] = torch.tensor(float(len(items)))
        return loss, metrics

    def summarize(self, sums, prefix="pref"):
        n = sums["pref/pairs"]
        out = {
            f"{prefix}/accuracy": _ratio(sums["pref/correct"], n),
            f"{prefix}/reward_chosen": _ratio(sums["pref/reward_chosen_sum"], n),
            f"{prefix}/reward_rejected": _ratio(sums["pref/reward_rejected_sum"], n),
            f"{prefix}/margin": _ratio(sums["pref/margin_sum"], n),
            f"{prefix}/logps_chosen": _ratio(sums["pref/logps_chosen_sum"], n),
            f"{prefix}/logps_rejected": _ratio(sums["pref/logps_rejected_sum"], n),
            f"{prefix}/nll_chosen": _ratio(sums["pref/nll_chosen_sum"], n),
        }
        if "kl/tokens" in sums:
            key = "eval/kl_ref" if prefix.startswith("eval") else "kl/ref"
            out[key] = _ratio(sums["kl/ref_logratio_sum"], sums["kl/tokens"])
        return out

    def evaluate(self):
        self.model.eval()
        loss, sums = _eval_sums(self, self.eval_items)
        out = {"eval/loss": loss}
        out.update(self.summarize(sums, prefix="eval/pref"))
        out.update(_accuracy(self, self.cfg))
        return out


def pair_weight_tensor(items: list[dict]) -> torch.Tensor | None:
    """[B] loss weights of N-best pairs (items from ranked lists carry "weight"), else None."""
    if "weight" not in items[0]:
        return None
    return torch.tensor([it["weight"] for it in items], dtype=torch.float32)


def reference_logps(model, items: list[dict], pad_id: int, micro_batch_size: int) -> torch.Tensor:
    """Summed log-probs of every item's chosen and rejected completion under `model`: [2N].

    Layout: entry i is item i's chosen completion, entry N + i its rejected one.
    """
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(items), micro_batch_size):
            chunk = items[start : start + micro_batch_size]
            batch = pair_batch(chunk, pad_id, _device(model))
            logprobs, _ = sequence_logprobs(model, batch)
            logps, _ = sequence_logps(logprobs, batch.response_mask)
            chosen.append(logps[: len(chunk)].cpu())
            rejected.append(logps[len(chunk) :].cpu())
    return torch.cat(chosen + rejected)
