"""The generator role: the rollout engine stack behind `generate` and `sync`.

The engine stack (native | hf | vllm, optionally wrapped by a thinking budget, a PRM
guide and a multi-turn environment driver) is built by train/rl/setup.py
(`build_generator`); this role is what the controller and `collect` talk to.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch

from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.roles.batch import keep_ids_from_mask
from posttrain.roles.weights import WeightSource


class Generator:
    """Samples rollouts from the current policy weights.

    engine: the outermost engine of the stack (its `generate` takes `rows=` when it drives
        an environment). model: the module the engine samples from when it lives in this
        process (native / hf engines: the policy module itself), else None (vLLM keeps
        its own copy of the weights).
    version: the policy version the engine's weights are at (see `sync`).
    """

    def __init__(self, engine, model: torch.nn.Module | None, *, multi_turn: bool):
        self.engine = engine
        self.model = model
        self.multi_turn = multi_turn
        self.version = 0

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, rows: list[dict] | None = None, segments=None
    ) -> Rollout:
        """`params.n` samples per prompt (token-id prompts, chat template applied).

        rows: one dict per prompt for a multi-turn environment's `reset` (ignored by the
        engine when there is no environment, so pass None then). A [B, T, V] keep mask
        from the engine is handed on as `Rollout.keep_ids` [B, T, K] (keep_mask None), so
        what crosses this role's boundary is K/V the size.
        segments: a multi-turn engine's segment schedule (partial rollouts,
        engines/rollout/segments.py `SegmentSchedule`); None: whole turns.
        """
        if segments is not None and not self.multi_turn:
            raise ValueError(
                "Generator.generate: segments= is for multi-turn engines (see generate_in_segments)"
            )
        if self.multi_turn:
            extra = {} if segments is None else {"segments": segments}
            ro = self.engine.generate(prompts, params, rows=rows, **extra)
        else:
            ro = self.engine.generate(prompts, params)
        if ro.keep_mask is not None:
            ro = replace(ro, keep_ids=keep_ids_from_mask(ro.keep_mask), keep_mask=None)
        return ro

    def engine_view(self) -> SimpleNamespace:
        """What partial rollouts (engines/rollout/segments.py) read from the engine, as a small
        plain object: `tokenizer`, `config` (the model config, or None), `context_length`
        (or None) and `pad_id` — not the engine itself, which would carry the model's weights
        across a process boundary (a Ray rollout worker)."""
        e = self.engine
        return SimpleNamespace(
            tokenizer=e.tokenizer,
            config=getattr(e, "config", None),
            context_length=getattr(e, "context_length", None),
            pad_id=e.pad_id,
        )

    def counters(self) -> dict[str, dict[str, int] | int]:
        """Running totals of the engine wrappers (plain ints): "thinking_cut" (samples whose
        thinking the budget cut) and "prm" (the PRM guide's counts, {} without one)."""
        return {
            "thinking_cut": int(getattr(self.engine, "cut_total", 0)),
            "prm": dict(getattr(self.engine, "totals", {})),
        }

    def sync(self, weights: WeightSource) -> int:
        """Make the engine sample from `weights`; returns the bytes of weights it received
        (0 when its engine samples from the learner's own module: nothing is copied).

        A `SharedModule` goes to the engine's `sync_weights` (a no-op for the native / hf
        engines, which call that very module; vLLM copies its tensors). A snapshot (a
        `StateDictWeights`, e.g. after a process boundary) is loaded into the engine's
        in-process module, or handed to `sync_weights` of an engine that keeps its own
        weights (it reads `.state_dict()`).
        """
        module = getattr(weights, "module", None)
        received = 0
        if module is not None:
            self.engine.sync_weights(module)
            if module is not self.model:  # an engine with its own weights (vLLM) copies them
                received = _nbytes(weights.state_dict())
        elif self.model is not None:
            with torch.no_grad():
                self.model.load_state_dict(weights.state_dict())
            received = _nbytes(weights.state_dict())
        else:
            self.engine.sync_weights(weights)
            received = _nbytes(weights.state_dict())
        self.version = weights.version
        return received


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
