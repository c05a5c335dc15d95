"""Reference log-prob cache: keys, atomic writes, hits never call compute."""

from __future__ import annotations

import os

import pytest
import torch

from posttrain.errors import ModelError
from posttrain.train.offline.ref import cache_key, data_digest, load_or_compute, model_identity


def test_model_identity_of_a_directory_tracks_its_files(tmp_path):
    d = tmp_path / "ref"
    d.mkdir()
    (d / "config.json").write_text('{"hidden_size": 8}')
    (d / "model.safetensors").write_bytes(b"x" * 10)
    first = model_identity(d)
    assert model_identity(str(d)) == first  # str and Path agree; nothing is loaded
    os.utime(d / "model.safetensors", ns=(1, 1))
    assert model_identity(d) != first  # re-saved weights -> new identity
    assert model_identity(tmp_path / "missing").startswith("name:")


def test_model_identity_of_a_module_hashes_its_weights():
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert model_identity(a) == model_identity(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-6
    assert model_identity(a) != model_identity(b)


def test_data_digest_is_sensitive_to_tokens_grouping_and_settings():
    base = data_digest([[[1, 2], [3]], [[4]]], {"dtype": "float32"})
    assert base == data_digest([[[1, 2], [3]], [[4]]], {"dtype": "float32"})
    assert base != data_digest([[[1, 2], [4]], [[4]]], {"dtype": "float32"})
    assert base != data_digest([[[1], [2, 3]], [[4]]], {"dtype": "float32"})  # same tokens, other split
    assert base != data_digest([[[1, 2], [3]], [[4]]], {"dtype": "bfloat16"})
    assert cache_key("m", base) != cache_key("m2", base)


def test_load_or_compute_writes_once_and_hits_without_computing(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"train": torch.tensor([-1.5, -2.0]), "eval": torch.tensor([-3.0])}

    first, hit = load_or_compute(tmp_path, "k1", compute)
    assert not hit and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref-k1.safetensors"]  # no temp files left

    def must_not_run():
        raise AssertionError("reference recomputed on a cache hit")

    again, hit = load_or_compute(tmp_path, "k1", must_not_run)
    assert hit
    for k in first:
        assert torch.equal(first[k], again[k])


def test_failed_compute_leaves_no_cache_entry(tmp_path):
    def broken():
        raise RuntimeError("reference crashed")

    with pytest.raises(RuntimeError):
        load_or_compute(tmp_path, "k2", broken)
    assert not list(tmp_path.glob("ref-k2*"))


def test_damaged_cache_file_is_a_one_line_error(tmp_path):
    (tmp_path / "ref-k3.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="unreadable") as err:
        load_or_compute(tmp_path, "k3", lambda: {})
    assert "\n" not in str(err.value)
