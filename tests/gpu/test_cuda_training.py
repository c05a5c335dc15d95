"""Training on a CUDA device (marked `gpu`: skipped without one; run them where a GPU is lent).

Every RL family and the offline trainers take a few steps with `model.device: cuda`, in
fp32 and bf16: the loop's tensors (rewards, advantages, masks) stay on the CPU while the
models run on the GPU (engines/batching.py `to_model_device`), the loss is finite and the
weights move. A first GPU run found that no RL update had ever run on CUDA (the packed batch
reached the model on the CPU); these tests pin the fix.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.train.config.loader import load_config
from posttrain.train.offline.commands import DPOConfig, SFTConfig, run_dpo, run_sft
from posttrain.train.rl.controller import RLTrainer
from rl_common import tiny_config, train_digit_teacher

pytestmark = pytest.mark.gpu

CASES = {
    "grpo_kl": ("grpo", "algo.kl_coef=0.05"),
    "grpo_top_p": ("grpo", "rollout.top_p=0.9", "algo.keep_sampling_mask=true"),
    "ppo": ("ppo",),
    "trpo": ("trpo",),
    "reinforce_pp": ("reinforce_pp",),
}


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in trainer.policy.model.state_dict().items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rl_updates_run_on_cuda(tmp_path, case, dtype):
    method, *extra = CASES[case]
    cfg = tiny_config(tmp_path, method, "model.device=cuda", f"model.dtype={dtype}", *extra, steps=2)
    trainer = RLTrainer(cfg)
    assert next(trainer.policy.model.parameters()).device.type == "cuda"
    before = _weights(trainer)
    for _ in range(2):
        metrics = trainer.step()
        assert all(v == v for k, v in metrics.items() if k.startswith(("policy/loss", "loss/"))), metrics
    after = _weights(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_kdrl_with_a_teacher_on_cuda(tmp_path):
    teacher = train_digit_teacher(tmp_path / "teacher", steps=5)
    cfg = tiny_config(tmp_path / "run", "kdrl", "model.device=cuda", f"teacher.path={teacher}", steps=2)
    trainer = RLTrainer(cfg)
    for _ in range(2):
        trainer.step()


def test_sft_then_dpo_on_cuda_bf16(tmp_path):
    common = ["--data.task", "arithmetic", "--data.difficulty", "1", "--model.device", "cuda",
              "--model.dtype", "bfloat16", "--train.eval_every", "0"]  # fmt: skip
    sft = load_config(
        SFTConfig, None, ["--run.output_dir", str(tmp_path / "sft"), "--train.steps", "5", *common]
    )
    run_sft(sft)
    dpo = load_config(DPOConfig, None, ["--run.output_dir", str(tmp_path / "dpo"), "--train.steps", "3",
                                        "--model.path", str(tmp_path / "sft" / "final"), *common])  # fmt: skip
    summary = run_dpo(dpo)
    assert summary["final"] is not None
