"""On-disk cache of reference-model log-probs for preference optimization.

DPO-family losses need log π_ref(y | x) of every chosen and rejected completion. The
reference never changes during training, so we compute these once, before training,
and store them in a safetensors file keyed by

* the reference model's identity: for a directory, its resolved path plus the name,
  size and mtime of every file in it and the text of config.json (cheap: nothing is
  loaded); for an in-memory module, a SHA-256 of its parameters and buffers;
* the data: a SHA-256 of the exact token ids of every prompt / chosen / rejected
  sequence plus the tokenization settings that produced them.

A second run with the same reference and data reads the file and never builds or loads
the reference model. The file is written to a temp name and renamed, so an interrupted
run never leaves a truncated cache behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from posttrain.errors import ModelError

CACHE_VERSION = 1  # bump when the cached quantities change meaning


def default_cache_dir() -> Path:
    """$POSTTRAIN_CACHE/reference_logps, else ~/.cache/posttrain/reference_logps."""
    root = os.environ.get("POSTTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "posttrain")
    return Path(root) / "reference_logps"


def model_identity(model_or_path: torch.nn.Module | str | os.PathLike) -> str:
    """A string that changes whenever the reference model's weights could have changed.

    A path is identified without loading it (path, file sizes and mtimes, config.json
    text); a hub id that is not a local directory is identified by its name only, which is
    only as stable as the hub revision — pass a local path for a guaranteed key. A module
    is identified by hashing its tensors (exact, independent of where it came from).
    """
    if isinstance(model_or_path, torch.nn.Module):
        h = hashlib.sha256()
        for name, tensor in sorted(model_or_path.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return "module:" + h.hexdigest()
    path = Path(model_or_path)
    if not path.exists():
        return f"name:{model_or_path}"
    path = path.resolve()
    parts = [f"path:{path}"]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        parts.append(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns}")
    config = path / "config.json"
    if config.is_file():
        parts.append(config.read_text())
    return "\n".join(parts)


def data_digest(sequences: list[list[list[int]]], settings: dict) -> str:
    """SHA-256 over token-id sequences (any nesting of int lists) and settings (JSON)."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for group in sequences:
        h.update(b"[")
        for seq in group:
            h.update(json.dumps(seq, separators=(",", ":")).encode())
            h.update(b";")
        h.update(b"]")
    return h.hexdigest()


def cache_key(model_id: str, data_id: str) -> str:
    """File stem for one (reference, data) pair."""
    h = hashlib.sha256(f"v{CACHE_VERSION}\n{model_id}\n{data_id}".encode()).hexdigest()
    return h[:32]


def load_or_compute(
    cache_dir: str | os.PathLike,
    key: str,
    compute: Callable[[], dict[str, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], bool]:
    """Return (tensors, hit). On a miss call `compute()` and store its result atomically.

    compute: builds the reference, runs it, returns named CPU tensors (e.g.
        "chosen_logps" [N], "rejected_logps" [N]). It is only called on a miss, so the
        reference model is never constructed when the cache is warm.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / f"ref-{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path)), True
        except Exception as e:  # damaged file: stop rather than train against garbage
            raise ModelError(f"reference cache {path} is unreadable ({e}); delete it to recompute") from None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in compute().items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".ref-{key}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"version": str(CACHE_VERSION)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return tensors, False


def load_or_compute_json(
    cache_dir: str | os.PathLike, prefix: str, key: str, compute: Callable[[], dict]
) -> tuple[dict, bool]:
    """(object, hit) for JSON-serialisable data cached as `<prefix>-<key>.json`.

    Used for the preference pairs sampled from the policy (data.pairs=self): sampling
    thousands of completions costs more than the reference pass, and the same pairs serve
    every loss trained from the same model. Written to a temp file and renamed, like the
    log-prob cache.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{prefix}-{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()), True
        except ValueError as e:
            raise ModelError(f"cache file {path} is unreadable ({e}); delete it to recompute") from None
    obj = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{prefix}-{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return obj, False


def cached_reference_logps(cfg, policy, tokenizer, train_items, eval_items):
    """(ref_train [2N], ref_eval [2M], cache_hit) of a DPO config's pairs, from the cache or
    one reference pass (the reference: cfg.ref.path, else a copy of the untrained policy)."""
    from posttrain.train.offline.methods import reference_logps

    source = cfg.ref.path or cfg.model.path
    # A preset policy is random-init: identify it by its weights (built from run.seed).
    identity = model_identity(source) if source else model_identity(policy)
    seqs = [[it["prompt"], it["chosen"], it["rejected"]] for it in train_items + eval_items]
    digest = data_digest(seqs, {"n_train": len(train_items), "dtype": cfg.model.dtype, "temperature": 1.0})
    key = cache_key(identity, digest)

    def compute() -> dict[str, torch.Tensor]:
        if cfg.ref.path:
            from posttrain.engines.models import load_model

            ref = load_model(
                cfg.ref.path, dtype=cfg.model.dtype, device=cfg.model.device, tokenizer=tokenizer
            )
        else:
            ref = copy.deepcopy(policy)  # the policy before any update
        pad = tokenizer.pad_token_id
        out = {"train": reference_logps(ref, train_items, pad, cfg.ref.micro_batch_size)}
        if eval_items:
            out["eval"] = reference_logps(ref, eval_items, pad, cfg.ref.micro_batch_size)
        del ref
        return out

    tensors, hit = load_or_compute(cfg.ref.cache_dir or default_cache_dir(), key, compute)
    return tensors["train"], tensors.get("eval"), hit
