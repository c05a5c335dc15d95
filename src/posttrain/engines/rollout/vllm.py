"""The vllm rollout engine: an in-process `vllm.LLM`, for GPU runs (optional extra).

Written against vLLM's documented offline API (`LLM.generate` with token prompts,
`SamplingParams(logprobs=0)`, `logprobs_mode="processed_logprobs"` so the returned
log-prob of each sampled token is under the temperature-scaled, top-k/top-p
renormalised distribution — our Rollout contract; `LLM.sleep` / `LLM.wake_up` with
`enable_sleep_mode=True` for colocating with training). Weight updates push the policy's
state dict into the engine's model through its `load_weights`, the path RL frameworks
use for in-process engines. Not exercised on this CPU-only machine: the tests are marked
`gpu`.

Deviations: no keep mask (vLLM does not expose the sampling support), and repetition
detection is applied after generation (responses are cut where the loop is detected;
vLLM itself does not stop early).
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.engines.rollout.common import (
    LENGTH,
    RUNNING,
    FinishTracker,
    assemble_rollout,
    check_params,
    encode_prompts,
    eos_ids,
)
from posttrain.errors import ModelError


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise ModelError(
            "engine 'vllm' needs the optional vllm package (GPU): pip install 'posttrain[vllm]'; "
            "on CPU use engine 'native'"
        ) from None
    return vllm


class VLLMEngine:
    """Rollouts from an in-process vLLM engine built from the policy's weights.

    model: the policy (a transformers causal LM); it is saved once to a temp dir for vLLM
        to load (or pass `model_path` to load from an existing checkpoint).
    tokenizer: the policy's tokenizer (saved alongside for vLLM).
    gpu_memory_utilization: fraction of GPU memory vLLM may take (leave room for training
        when colocated). sleep_between_calls: offload weights / drop KV cache after each
        generate (vLLM sleep level 1) so training gets the memory back.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        model_path: str | None = None,
        gpu_memory_utilization: float = 0.4,
        dtype: str = "auto",
        max_model_len: int | None = None,
        sleep_between_calls: bool = False,
        seed: int = 0,
        **llm_kwargs,
    ):
        vllm = _import_vllm()
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.config = model.config
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.context_length = max_model_len or getattr(self.config, "max_position_embeddings", None)
        self._tmp = None
        if model_path is None:
            from posttrain.engines.models import save_model

            self._tmp = tempfile.TemporaryDirectory(prefix="posttrain-vllm-")
            model_path = os.path.join(self._tmp.name, "policy")
            save_model(model, tokenizer, model_path)
        self.sleep_between_calls = sleep_between_calls
        # Keep the engine core in this process so sync_weights can reach the model directly
        # (the documented switch; a user who set it explicitly keeps their choice).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            self.llm = vllm.LLM(
                model=model_path,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                enable_sleep_mode=sleep_between_calls,
                logprobs_mode="processed_logprobs",
                seed=seed,
                **llm_kwargs,
            )
        except TypeError as exc:
            if "logprobs_mode" in str(exc):
                raise ModelError(
                    "engine 'vllm' needs vllm >= 0.10.2 (LLM(logprobs_mode=...)) so sampling log-probs "
                    "follow temperature/top-p; upgrade vllm"
                ) from None
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"vllm could not start on {model_path!r}: {first}") from None
        self._asleep = False
        if sleep_between_calls:
            self.sleep()

    # -- colocation ------------------------------------------------------------------

    def sleep(self) -> None:
        """Free GPU memory for training: offload weights to CPU, drop the KV cache (level 1)."""
        if not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        """Bring weights back first, then the KV cache (avoids a peak with both plus training)."""
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    def _engine_model(self) -> nn.Module:
        """The nn.Module inside an in-process engine; AttributeError when the engine runs in
        another process (then `sync_weights` ships the weights by RPC)."""
        return engine_module(self.llm)

    def sync_weights(self, model: nn.Module) -> None:
        """Push the policy's current weights into the engine (names as in HF checkpoints).

        PEFT policies are merged first so vLLM receives plain weights.
        """
        if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        was_asleep = self._asleep
        if was_asleep:
            self.llm.wake_up(tags=["weights"])  # KV cache stays freed while loading
        weights = ((name, p.detach()) for name, p in model.state_dict().items())
        try:
            self._engine_model().load_weights(weights)
        except AttributeError:
            # Engine in a separate process: ship the weights through an RPC on each worker.
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            self.llm.collective_rpc(_load_weights_rpc, args=(state,))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with old weights
        if was_asleep:
            self.llm.sleep(level=1)

    # -- generation ------------------------------------------------------------------

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> Rollout:
        """Sample `params.n` responses per prompt (rows prompt-major), see `Rollout`."""
        check_params(params)
        if params.return_keep_mask:
            raise ModelError(
                "engine 'vllm' cannot return the sampling keep mask; use engine 'native' or 'hf'"
            )
        prompt_ids = encode_prompts(prompts, self.tokenizer, self.context_length)
        stop_ids = eos_ids(self.tokenizer, self.config, params)
        vsp = self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            stop_token_ids=stop_ids,
            stop=params.stop_strings or None,
            include_stop_str_in_output=True,
            ignore_eos=params.ignore_eos,
            seed=params.seed,
            logprobs=0,  # the sampled token's log-prob only
        )
        self.wake_up()
        try:
            outputs = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in prompt_ids], vsp, use_tqdm=False
            )
        finally:
            if self.sleep_between_calls:
                self.sleep()
        rows = [c for out in outputs for c in out.outputs]  # prompt-major, n per prompt
        T = max((len(c.token_ids) for c in rows), default=1) or 1
        B = len(rows)
        response = torch.full((B, T), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((B, T), dtype=torch.float32)
        for i, c in enumerate(rows):  # once per call, after generation
            ids = list(c.token_ids)
            response[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            if c.logprobs:
                logprobs[i, : len(ids)] = torch.tensor([lp[t].logprob for t, lp in zip(ids, c.logprobs)])
        lengths, codes = self._replay_finish(response, rows, params, stop_ids)
        return assemble_rollout(
            self, prompt_ids, params.n, response, lengths, logprobs, codes, params, stop_ids
        )

    def _replay_finish(self, response, rows, params, stop_ids):
        """Lengths/codes: vLLM's own length and finish reason, cut earlier on repetition."""
        B, T = response.shape
        lengths = torch.tensor([len(c.token_ids) for c in rows], dtype=torch.long)
        codes = torch.tensor([LENGTH if c.finish_reason == "length" else 1 for c in rows], dtype=torch.long)
        if params.repetition_ngram:
            tracker = FinishTracker(
                SamplingParams(
                    repetition_ngram=params.repetition_ngram,
                    repetition_max_repeats=params.repetition_max_repeats,
                ),
                [],
                int(response.max()) + 1,
                self.tokenizer,
                response.device,
            )
            seen = torch.zeros(B, dtype=torch.bool)
            for t in range(T):
                code = tracker.step(response[:, : t + 1], response[:, t], torch.zeros(B, dtype=torch.bool))
                hit = (code != RUNNING) & ~seen & (t + 1 < lengths)
                codes = torch.where(hit, code, codes)
                lengths = torch.where(hit, t + 1, lengths)
                seen |= code != RUNNING
        return lengths, codes


# Where an in-process engine keeps its model, from the LLM object: V1 with multiprocessing
# off (LLMEngine -> InprocClient -> EngineCore -> executor), then the older layout where
# the LLMEngine holds the executor itself. Each executor's driver worker may wrap the
# worker once more.
_ENGINE_PATHS = (
    ("llm_engine", "engine_core", "engine_core", "model_executor"),
    ("llm_engine", "model_executor"),
)


def engine_module(llm) -> nn.Module:
    """The model module of an in-process vLLM engine, or AttributeError when there is none
    reachable from this process (a multiprocess engine core)."""
    for path in _ENGINE_PATHS:
        obj = llm
        try:
            for name in path:
                obj = getattr(obj, name)
            worker = obj.driver_worker
        except AttributeError:
            continue
        worker = getattr(worker, "worker", worker)
        runner = getattr(worker, "model_runner", None)
        model = getattr(runner, "model", None)
        if isinstance(model, nn.Module):
            return model
    raise AttributeError("no in-process vLLM model reachable from this LLM object")


def _load_weights_rpc(worker, state):
    """Runs on each vLLM worker: load `state` (name -> tensor) into its model."""
    model = worker.model_runner.model
    device = next(model.parameters()).device
    model.load_weights((k, v.to(device)) for k, v in state.items())
