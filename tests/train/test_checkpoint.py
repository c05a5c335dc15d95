"""train/common/checkpoint.py: atomic saves (exception and SIGKILL mid-save), bit-exact resume,
pruning, HF-loadable model directories."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from posttrain.errors import ConfigError, TrainingError
from posttrain.train.common import checkpoint as ckpt_mod
from posttrain.train.common.checkpoint import CheckpointManager
from posttrain.train.common.optim import build_optimizer, build_scheduler, guarded_step
from posttrain.train.config.loader import OptimSection


def tiny_lm(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg)


def _train(model, opt, sched, steps: int) -> list[float]:
    """Noisy training: the batch, dropout-like noise and a python/numpy draw all use global RNGs."""
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 40, (2, 6))
        scale = 1.0 + random.random() + float(np.random.rand())
        loss = model(x, labels=x).loss * scale
        loss.backward()
        guarded_step(model.parameters(), opt, sched, 1.0, loss=loss.detach())
        losses.append(loss.item())
    return losses


def _setup(seed=0):
    model = tiny_lm(seed)
    cfg = OptimSection(lr=1e-2, warmup_steps=2, schedule="cosine")
    opt = build_optimizer(model.parameters(), cfg)
    return model, opt, build_scheduler(opt, cfg, 8)


def _seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def test_resume_is_bit_exact(tmp_path):
    _seed_all(123)
    model, opt, sched = _setup()
    full = _train(model, opt, sched, 6)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    _seed_all(123)
    model, opt, sched = _setup()
    first = _train(model, opt, sched, 3)
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, models={"policy": model}, optimizers={"policy": opt}, schedulers={"policy": sched},
             state={"step": 3, "data_pos": 17})  # fmt: skip
    _train(model, opt, sched, 2)  # the crashed run wanders on, consuming RNG

    _seed_all(999)  # a new process would start from other RNG states and other weights
    model2, opt2, sched2 = _setup(seed=5)
    state = mgr.load(mgr.latest(), models={"policy": model2}, optimizers={"policy": opt2},
                     schedulers={"policy": sched2})  # fmt: skip
    assert state == {"step": 3, "data_pos": 17}
    rest = _train(model2, opt2, sched2, 3)
    assert first + rest == full
    for k, v in model2.state_dict().items():
        assert torch.equal(v, reference[k]), k


def test_model_dir_loads_with_from_pretrained(tmp_path):
    build_char_tokenizer = pytest.importorskip("posttrain.engines.tokenizer").build_char_tokenizer
    model = tiny_lm()
    tok = build_char_tokenizer()
    path = CheckpointManager(tmp_path).save(1, models={"policy": model}, tokenizer=tok)
    loaded = AutoModelForCausalLM.from_pretrained(path / "policy")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert (path / "policy" / "tokenizer_config.json").is_file()


def test_plain_module_and_tied_weights_round_trip(tmp_path):
    head = torch.nn.Linear(3, 2)
    model = tiny_lm()
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(7, models={"policy": model, "head": head})
    assert (path / "head" / "model.safetensors").is_file()
    head2, model2 = torch.nn.Linear(3, 2), tiny_lm(seed=1)
    mgr.load(path, models={"head": head2, "policy": model2}, restore_rng=False)
    assert torch.equal(head2.weight, head.weight)
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # still tied
    assert torch.equal(model2.lm_head.weight, model.lm_head.weight)
    with pytest.raises(TrainingError, match="has no model 'critic'"):
        mgr.load(path, models={"critic": head2})
    with pytest.raises(TrainingError, match="weights do not match model 'head'"):
        mgr.load(path, models={"head": torch.nn.Linear(3, 2, bias=False)})


def test_keep_n_pruning_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    assert mgr.latest() is None
    lin = torch.nn.Linear(2, 2)
    for step in (1, 2, 3, 4):
        mgr.save(step, models={"m": lin}, state={"step": step})
    assert [p.name for p in mgr.checkpoints()] == ["step-000003", "step-000004"]
    assert mgr.latest().name == "step-000004"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert CheckpointManager.step_of(mgr.latest()) == 4
    # re-saving an existing step (resume from it) replaces it atomically
    mgr.save(4, models={"m": lin}, state={"step": 4, "again": True})
    assert mgr.load(mgr.latest(), models={}) == {"step": 4, "again": True}
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 1"):
        CheckpointManager(tmp_path, keep=0)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        mgr.load(tmp_path / "nope", models={})


def test_failure_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=1)
    lin = torch.nn.Linear(2, 2)
    mgr.save(1, models={"m": lin}, state={"step": 1})
    original = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)

    def exploding_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", exploding_save_file)
    with pytest.raises(OSError, match="disk full"):
        mgr.save(2, models={"m": lin}, state={"step": 2})
    monkeypatch.undo()
    assert mgr.latest().name == "step-000001"
    assert [p.name for p in mgr.checkpoints()] == ["step-000001"]  # keep=1 did not prune it
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    fresh = torch.nn.Linear(2, 2)
    assert mgr.load(mgr.latest(), models={"m": fresh}) == {"step": 1}
    assert torch.equal(fresh.weight, original)


def test_state_must_be_json(tmp_path):
    with pytest.raises(TrainingError, match="not JSON-serialisable"):
        CheckpointManager(tmp_path).save(1, models={}, state={"x": object()})


def test_sigkill_mid_save_leaves_previous_loadable(tmp_path):
    """A real process killed with SIGKILL while writing step 2."""
    sentinel = tmp_path / "writing"
    script = textwrap.dedent(
        f"""
        import time, torch
        from posttrain.train.common import checkpoint as c
        mgr = c.CheckpointManager({str(tmp_path)!r}, keep=1)
        lin = torch.nn.Linear(4, 4)
        torch.nn.init.constant_(lin.weight, 1.0)
        mgr.save(1, models={{"m": lin}}, state={{"step": 1}})
        torch.nn.init.constant_(lin.weight, 2.0)
        real = c.save_file
        def slow(*a, **k):
            real(*a, **k)
            open({str(sentinel)!r}, "w").close()
            time.sleep(60)
        c.save_file = slow
        mgr.save(2, models={{"m": lin}}, state={{"step": 2}})
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 60
        while not sentinel.exists():
            assert proc.poll() is None, "writer exited early"
            assert time.monotonic() < deadline, "writer never reached the save"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    mgr = CheckpointManager(tmp_path, keep=1)
    assert list((tmp_path / "checkpoints").glob(".tmp-step-000002-*"))  # the torn attempt
    assert mgr.latest().name == "step-000001"
    lin = torch.nn.Linear(4, 4)
    assert mgr.load(mgr.latest(), models={"m": lin}) == {"step": 1}
    assert torch.equal(lin.weight, torch.ones(4, 4))
    # the next save cleans the torn temp dir up
    mgr.save(2, models={"m": lin}, state={"step": 2})
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert json.loads((mgr.latest() / "meta.json").read_text())["step"] == 2


def test_value_model_wrapper_saved_as_hf_sequence_classifier(tmp_path):
    """A plain nn.Module wrapping a HF model (ScalarHeadModel) is saved as that HF model."""
    from transformers import AutoModelForSequenceClassification

    models = pytest.importorskip("posttrain.engines.models")
    critic = models.build_value_model(tiny_lm(), head_init_std=0.5)
    path = CheckpointManager(tmp_path).save(2, models={"critic": critic})
    hf = AutoModelForSequenceClassification.from_pretrained(path / "critic")
    assert torch.equal(hf.score.weight, critic.head.weight)
    fresh = models.build_value_model(tiny_lm(seed=3), head_init_std=0.1)
    CheckpointManager(tmp_path).load(path, models={"critic": fresh}, restore_rng=False)
    for (k, a), b in zip(critic.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


class FakePeft(torch.nn.Module):
    """Mimics a PEFT model: frozen base + trainable adapter, save_pretrained writes adapters
    only under renamed keys."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(0)
        self.base = torch.nn.Linear(3, 3)
        self.base.requires_grad_(False)
        torch.manual_seed(seed)
        self.lora_A = torch.nn.Linear(3, 1, bias=False)
        self.peft_config = {"default": {}}

    def save_pretrained(self, path, safe_serialization=True):
        from safetensors.torch import save_file

        save_file(
            {"adapter.A": self.lora_A.weight.detach().contiguous()}, str(path / "adapter_model.safetensors")
        )


def test_peft_like_models_restore_trainable_weights(tmp_path):
    model = FakePeft(seed=1)
    path = CheckpointManager(tmp_path).save(1, models={"policy": model})
    assert (path / "policy" / "adapter_model.safetensors").is_file()
    other = FakePeft(seed=2)
    assert not torch.equal(other.lora_A.weight, model.lora_A.weight)
    CheckpointManager(tmp_path).load(path, models={"policy": other}, restore_rng=False)
    assert torch.equal(other.lora_A.weight, model.lora_A.weight)
    assert torch.equal(other.base.weight, model.base.weight)


@pytest.mark.gpu
def test_cuda_rng_restored(tmp_path):
    torch.cuda.manual_seed_all(7)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, models={})
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(99)
    mgr.load(mgr.latest(), models={})
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_cuda_rng_states_are_restored_by_device_index(monkeypatch):
    """The CUDA RNG states are matched to devices by the index in their names; "torch_cpu"
    has none and must not be parsed as one (a first GPU run failed every restore that way).
    CUDA is faked here so the CPU suite covers it; test_cuda_rng_restored is the real thing."""
    from posttrain.train.common import checkpoint as ckpt

    py, tensors = ckpt.rng_state()  # this process's states, before CUDA is faked
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device, s))
    states = {f"torch_cuda_{i}": torch.full((4,), i + 10, dtype=torch.uint8) for i in (1, 0, 2)}
    ckpt.set_rng_state(py, {**tensors, **states})
    assert sorted(restored) == [0, 1]  # device 2 does not exist here
    assert all(torch.equal(restored[i], states[f"torch_cuda_{i}"]) for i in (0, 1))
