"""Atomic, resumable checkpoints: models in Hugging Face format, optimizer/scheduler
state, every RNG, and a JSON training state.

Layout of ``run_dir/checkpoints/``::

    step-000120/            a complete checkpoint (never modified after the rename)
      policy/               model.save_pretrained(safe_serialization=True) + tokenizer,
                            so ``AutoModelForCausalLM.from_pretrained(".../policy")`` works;
                            a wrapper holding one HF model (the critic's ScalarHeadModel) is
                            saved as that inner model; a PEFT model as its adapters plus
                            trainable.safetensors (what resuming needs); any other module
                            as a single model.safetensors
      optimizers/<name>.pt  optimizer.state_dict() (tensors + numbers only)
      schedulers/<name>.pt  scheduler.state_dict()
      rng.json, rng.safetensors   python / numpy / torch (CPU, every CUDA device) RNG states
      state.json            the caller's counters, data position, controllers
      meta.json             written last inside the temp dir: marks the checkpoint complete
    latest                  text file naming the newest complete checkpoint

Crash safety: a checkpoint is assembled in ``.tmp-step-...`` and renamed into place
(`os.replace`, atomic on POSIX); ``latest`` is rewritten via temp file + rename only after
that; older checkpoints are pruned only after ``latest`` points at the new one. A process
killed at any instant therefore leaves the previous checkpoint loadable.

Under torch.distributed with N > 1 processes every rank calls `save` and the checkpoint is
written with torch.distributed.checkpoint, each rank writing its own shards of the sharded
models and optimizers (layout and atomicity: train/common/sharded_checkpoint.py); `load`
reads either format at any world size. One process writes and reads the layout above.

Loading a one-process checkpoint never unpickles arbitrary objects: weights come from
safetensors, state and python/numpy RNG from JSON, optimizer state through
``torch.load(weights_only=True)``. A sharded checkpoint's ``dcp/.metadata`` is read by
torch.distributed.checkpoint's own reader, which unpickles it: resume only from sharded
checkpoints you trust (ones your own runs wrote).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model

from posttrain.engines import distributed as dist
from posttrain.errors import ConfigError, PosttrainError, TrainingError

_STEP_RE = re.compile(r"^step-(\d+)$")
FORMAT_VERSION = 1


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable across power loss; harmless where directories can't be opened.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same directory + `os.replace`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Capture every global RNG: (JSON-able python/numpy state, torch state tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    py = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return py, tensors


def set_rng_state(py: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore the states captured by `rng_state` (CUDA states only for devices present)."""
    p = py["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    n = py["numpy"]
    np.random.set_state(
        (n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        names = [k for k in tensors if k.startswith("torch_cuda_")]  # filter first: "torch_cpu" has no index
        cuda = [tensors[k] for k in sorted(names, key=lambda k: int(k.rsplit("_", 1)[-1]))]
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device=i)


def write_rng(folder: Path, json_name: str, tensors_name: str) -> None:
    """This process's RNG states (`rng_state`) into `folder`/json_name and /tensors_name."""
    py, tensors = rng_state()
    (folder / json_name).write_text(json.dumps(py))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / tensors_name))


def write_meta(folder: Path, step: int, models: dict, written: dict, optimizers: dict, schedulers: dict,
               **extra) -> None:  # fmt: skip
    """meta.json, written last (atomically): marks the checkpoint in `folder` complete."""
    meta = {
        "step": step,
        "format": FORMAT_VERSION,
        "models": sorted(models),
        "model_formats": written,
        "optimizers": sorted(optimizers),
        "schedulers": sorted(schedulers),
        **extra,
    }
    atomic_write_text(folder / "meta.json", json.dumps(meta))


# --------------------------------------------------------------------------- models


TRAINABLE_FILE = "trainable.safetensors"


def _is_peft(module: torch.nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "save_pretrained")


def _hf_inner(module: torch.nn.Module) -> tuple[torch.nn.Module, str] | None:
    """The Hugging Face model that holds all of `module`'s weights, with its attribute name.

    Wrappers such as the engines' ScalarHeadModel (a `*ForSequenceClassification` inside a
    plain nn.Module) are saved as their inner HF model so that `from_pretrained` reads the
    checkpoint directly; "" means `module` itself is the HF model.
    """
    if hasattr(module, "save_pretrained"):
        return module, ""
    own = {id(p) for p in module.parameters()}
    for name, child in module.named_children():
        if hasattr(child, "save_pretrained") and {id(p) for p in child.parameters()} == own:
            return child, name
    return None


@contextlib.contextmanager
def _quiet_hf_progress():
    """Hide transformers' per-save "Writing model shards" bars, which would interleave with
    the training progress bar at every checkpoint; restores the previous setting."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _save_module(module: torch.nn.Module, path: Path, tokenizer: Any) -> dict:
    """Write one model; returns how it was written (stored in meta.json for loading)."""
    path.mkdir(parents=True)
    with _quiet_hf_progress():
        return _write_module(module, path, tokenizer)


def _write_module(module: torch.nn.Module, path: Path, tokenizer: Any) -> dict:
    if _is_peft(module):
        # PEFT's save_pretrained writes adapters only, under renamed keys (loadable with
        # PeftModel.from_pretrained); resuming needs the trainable tensors under their
        # module names, so those go alongside. Frozen base weights come from model.path.
        module.save_pretrained(path, safe_serialization=True)
        trainable = {k: p.detach().contiguous() for k, p in module.named_parameters() if p.requires_grad}
        save_file(trainable, str(path / TRAINABLE_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return {"format": "peft"}
    inner = _hf_inner(module)
    if inner is not None:
        hf, attr = inner
        hf.save_pretrained(path, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return {"format": "hf", "attr": attr}
    # save_model dedups shared tensors (tied weights) that save_file would reject.
    save_model(module, str(path / "model.safetensors"))
    return {"format": "safetensors"}


def _load_module(module: torch.nn.Module, path: Path, name: str, how: dict) -> None:
    if how.get("format") == "peft":
        state = load_file(str(path / TRAINABLE_FILE))
        result = module.load_state_dict(state, strict=False)
        need = {k for k, p in module.named_parameters() if p.requires_grad}
        if result.unexpected_keys or need - state.keys():
            raise TrainingError(
                f"checkpoint {path}: adapter weights do not match model {name!r} "
                f"(missing {sorted(need - state.keys())[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
            )
        return
    if how.get("format") == "hf" and how.get("attr"):
        inner = getattr(module, how["attr"], None)
        if inner is None:
            raise TrainingError(f"checkpoint {path}: model {name!r} has no submodule {how['attr']!r}")
        module = inner
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TrainingError(f"checkpoint {path.parent}: model {name!r} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    result = module.load_state_dict(state, strict=False)
    # save_pretrained / save_model drop one name of each tied pair; a missing key is fine
    # only when another name of the very same Parameter was loaded.
    owners: dict[int, set[str]] = {}
    for pname, p in module.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(pname)
    by_name = {pname: id(p) for pname, p in module.named_parameters(remove_duplicate=False)}
    missing = [k for k in result.missing_keys if k not in by_name or not (owners[by_name[k]] & state.keys())]
    if missing or result.unexpected_keys:
        raise TrainingError(
            f"checkpoint {path}: weights do not match model {name!r} "
            f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
        )


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Writes and finds checkpoints under ``run_dir/checkpoints``; keeps the newest `keep`."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ConfigError(f"run.keep_checkpoints must be >= 1, got {keep}")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = keep

    # ------------------------------------------------------------------ listing
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (meta.json present), oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (p / "meta.json").is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the `latest` pointer, else the highest step dir.

        A re-save interrupted between its two renames is completed first (see `recover`).
        """
        self.recover()
        pointer = self.dir / "latest"
        if pointer.is_file():
            target = self.dir / pointer.read_text().strip()
            if (target / "meta.json").is_file():
                return target
        found = self.checkpoints()
        return found[-1] if found else None

    @staticmethod
    def step_of(path: str | os.PathLike) -> int:
        """The step number encoded in a checkpoint directory name."""
        m = _STEP_RE.match(Path(path).name)
        if not m:
            raise ConfigError(f"not a checkpoint directory (expected step-NNNNNN): {path}")
        return int(m.group(1))

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        *,
        models: dict[str, torch.nn.Module],
        tokenizer: Any = None,
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        schedulers: dict[str, Any] | None = None,
        state: dict | None = None,
        sharded: bool | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically and return its directory.

        models: name -> module (HF models via save_pretrained + tokenizer; other modules as
            a single model.safetensors).
        tokenizer: saved inside every HF model directory so each loads standalone.
        optimizers / schedulers: name -> object with state_dict().
        state: JSON-serialisable dict (counters, data position, controller states).
        sharded: None (default) = the sharded format (train/common/sharded_checkpoint.py,
            called on every rank) when the process group has more than one rank, else the
            one-process format; False = the one-process format from this process alone,
            with full models (benchmarks/checkpoint_save.py measures that gathered way).
        """
        state = dict(state or {})
        try:
            state_text = json.dumps(state, indent=1, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TrainingError(f"checkpoint state for step {step} is not JSON-serialisable: {e}") from None
        if dist.world_size() > 1 if sharded is None else sharded:
            from posttrain.train.common.sharded_checkpoint import save_sharded

            return save_sharded(
                self, step, models=models, tokenizer=tokenizer, optimizers=dict(optimizers or {}),
                schedulers=dict(schedulers or {}), state_text=state_text,
            )  # fmt: skip
        self.dir.mkdir(parents=True, exist_ok=True)
        self.recover()
        name = f"step-{step:06d}"
        final = self.dir / name
        tmp = self.dir / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        try:
            written = {
                mname: _save_module(module, tmp / mname, tokenizer) for mname, module in models.items()
            }
            for sub, objs in (("optimizers", optimizers or {}), ("schedulers", schedulers or {})):
                (tmp / sub).mkdir()
                for oname, obj in objs.items():
                    torch.save(obj.state_dict(), tmp / sub / f"{oname}.pt")
            write_rng(tmp, "rng.json", "rng.safetensors")
            (tmp / "state.json").write_text(state_text)
            for f in tmp.rglob("*"):
                if f.is_file():
                    _fsync_file(f)
            write_meta(tmp, step, models, written, optimizers or {}, schedulers or {})
            self._rename_into_place(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._publish(final)
        return final

    def _rename_into_place(self, tmp: Path, final: Path) -> None:
        """Rename the complete temp directory `tmp` to `final` (atomic)."""
        if final.exists():
            # Re-saving a step (e.g. after resuming from it): move the old copy aside so
            # the rename below is a plain atomic replace of a non-existent name.
            old = self.dir / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.dir)

    def _publish(self, final: Path) -> None:
        """Point `latest` at the renamed checkpoint `final`, then prune the oldest."""
        atomic_write_text(self.dir / "latest", final.name + "\n")
        self._prune(keep_also=final)

    def recover(self) -> None:
        """Finish or undo what a process killed inside `save` left behind.

        Re-saving an existing step moves the old copy to ``.old-step-N-*`` and then renames
        the new one (``.tmp-step-N-*``) into place; a kill between the two renames leaves
        no ``step-N``. The complete new copy (meta.json present) is renamed into place, else
        the old one is put back; any other temp directory is incomplete and removed.
        Called under the run directory's lock (rundir.run_lock).
        """
        if not self.dir.is_dir():
            return
        for prefix in (".tmp-", ".old-"):
            for p in sorted(self.dir.glob(f"{prefix}step-*")):
                name = p.name[len(prefix) :].rsplit("-", 1)[0]
                final = self.dir / name
                if _STEP_RE.match(name) and (p / "meta.json").is_file() and not final.exists():
                    os.replace(p, final)
                    _fsync_dir(self.dir)
                else:
                    shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.glob(".latest.tmp-*"):  # a pointer rewrite cut short
            p.unlink(missing_ok=True)

    def _prune(self, keep_also: Path) -> None:
        found = self.checkpoints()
        for p in found[: max(0, len(found) - self.keep)]:
            if p != keep_also:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(
        self,
        path: str | os.PathLike,
        *,
        models: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        schedulers: dict[str, Any] | None = None,
        restore_rng: bool = True,
    ) -> dict:
        """Load weights/optimizer/scheduler state in place, restore RNGs, return state.json.

        Every name asked for must exist in the checkpoint (a TrainingError names the one
        that does not); names in the checkpoint that are not asked for are ignored, so e.g.
        evaluation can load only the policy.
        """
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise ConfigError(f"not a complete checkpoint (no meta.json): {path}")
        try:
            return self._load(path, models, optimizers, schedulers, restore_rng)
        except PosttrainError:
            raise
        except Exception as e:  # a truncated or altered file: name it instead of a traceback
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise TrainingError(
                f"checkpoint {path} is damaged ({type(e).__name__}: {first}); remove it to resume from an older one"
            ) from None

    def _load(self, path: Path, models, optimizers, schedulers, restore_rng: bool) -> dict:
        try:
            meta = json.loads((path / "meta.json").read_text())
            meta["models"], meta["step"]  # noqa: B018 - the keys every checkpoint has
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"checkpoint {path} is damaged: meta.json unreadable ({e!r:.80})") from None
        sharded = meta.get("sharded", {"models": [], "optimizers": {}})
        for mname, module in models.items():
            if mname not in meta["models"]:
                raise TrainingError(f"checkpoint {path} has no model {mname!r} (has {meta['models']})")
            if mname not in sharded["models"]:
                _load_module(module, path / mname, mname, meta.get("model_formats", {}).get(mname, {}))
        if "sharded" in meta:  # written by N processes: DCP shards, read at this world size
            from posttrain.train.common.sharded_checkpoint import load_sharded

            load_sharded(path, meta, models, optimizers or {})
        for sub, objs in (("optimizers", optimizers or {}), ("schedulers", schedulers or {})):
            for oname, obj in objs.items():
                if sub == "optimizers" and oname in sharded["optimizers"]:
                    continue
                f = path / sub / f"{oname}.pt"
                if not f.is_file():
                    raise TrainingError(f"checkpoint {path} has no {sub[:-1]} {oname!r}")
                obj.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
        if restore_rng:
            from posttrain.train.common.sharded_checkpoint import load_rng

            set_rng_state(*load_rng(path))  # this rank's states, else rank 0's
        return json.loads((path / "state.json").read_text())
