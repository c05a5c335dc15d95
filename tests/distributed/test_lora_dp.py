"""LoRA under torch.distributed (train/offline/dp.py, train/rl/dp.py): the PEFT-wrapped
model is sharded with FSDP2 (frozen base included), only the adapters train.

As for full fine-tuning, 2 processes reproduce 1 process on the same global batch (final
weights within 1e-5 relative, same metrics rows); checkpoints hold the adapters alone, as a
one-process LoRA checkpoint does, and resume at the other world size; `final/` is the merged
model in Hugging Face format, as one process writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_offline_dp import DPO, SFT, WEIGHT_RTOL, _from_step4, posttrain, relative_gap, rows, weights
from test_offline_dp import assert_same_rows as assert_same_offline_rows
from test_rl_dp import GRPO, _from_step2, assert_same_rows, rl

LORA = ["--model.lora_r", "4"]


def dcp_keys(checkpoint: Path) -> list[str]:
    """The tensor keys of a sharded checkpoint's DCP metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(str(checkpoint / "dcp")).read_metadata().state_dict_metadata)


def assert_adapters_only(checkpoint: Path, name: str = "policy") -> None:
    """The sharded checkpoint holds the model's LoRA tensors alone (and their optimizer state)."""
    model_keys = [k for k in dcp_keys(checkpoint) if k.startswith(f"model/{name}.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys[:5]


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
def test_sft_lora_two_processes_match_one_and_resume_at_the_other_world_size(tmp_path):
    args = [*SFT, *LORA]
    one, two = tmp_path / "one", tmp_path / "two"
    posttrain("sft", *args, "--run.output_dir", str(one))
    posttrain("sft", *args, "--run.output_dir", str(two), nproc=2)
    assert_same_offline_rows(rows(one), rows(two))
    assert relative_gap(weights(one), weights(two)) < WEIGHT_RTOL
    # one process checkpoints the adapters (PEFT files); 2 processes their shards, no base
    assert (one / "checkpoints" / "step-000004" / "policy" / "adapter_model.safetensors").is_file()
    assert_adapters_only(two / "checkpoints" / "step-000004")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(two / "final")  # merged, plain HF, as one process
    assert not any("lora" in k for k in merged.state_dict())
    for source, nproc in ((two, 1), (one, 2)):
        run = _from_step4(source, tmp_path / f"resumed-{nproc}")
        posttrain("sft", *args, "--run.output_dir", str(run), "--resume", nproc=nproc)
        assert json.loads((run / "summary.json").read_text())["resumed_from"] == 4
        assert relative_gap(weights(one), weights(run)) < WEIGHT_RTOL
        assert_same_offline_rows(rows(one), rows(run))


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
def test_dpo_lora_two_processes_match_one(tmp_path):
    """DPO + LoRA: the reference is the policy with its adapters off (sharded with it)."""
    args = [*DPO, *LORA, "--ref.cache_dir", str(tmp_path / "ref")]
    posttrain("dpo", *args, "--run.output_dir", str(tmp_path / "one"))
    posttrain("dpo", *args, "--run.output_dir", str(tmp_path / "two"), nproc=2)
    assert_same_offline_rows(rows(tmp_path / "one"), rows(tmp_path / "two"))
    assert relative_gap(weights(tmp_path / "one"), weights(tmp_path / "two")) < WEIGHT_RTOL


@pytest.mark.slow  # minutes on 2 cores: runs in CI's slow (blocking) suite
def test_grpo_lora_two_processes_match_one_and_resume_in_one_process(tmp_path):
    """GRPO + LoRA (KL to the adapters-off reference): the generator's plain copy receives
    the policy's weights after each update; checkpoints resume at the other world size."""
    args = [*GRPO, *LORA]
    one, two = tmp_path / "one", tmp_path / "two"
    rl(*args, "--run.output_dir", str(one))
    rl(*args, "--run.output_dir", str(two), nproc=2)
    assert_same_rows(rows(one), rows(two))
    assert relative_gap(weights(one), weights(two)) < WEIGHT_RTOL
    assert_adapters_only(two / "checkpoints" / "step-000002")
    # 2 -> 1, and 1 -> 2: a one-process checkpoint's adapters (PEFT files) into the shards
    for source, nproc in ((two, 1), (one, 2)):
        run = _from_step2(source, tmp_path / f"resumed-{nproc}")
        rl(*args, "--run.output_dir", str(run), "--run.resume", "true", nproc=nproc, torchrun=nproc > 1)
        assert json.loads((run / "summary.json").read_text())["resumed_from"] == 1
        assert relative_gap(weights(one), weights(run)) < WEIGHT_RTOL
        assert_same_rows(rows(one), rows(run))
