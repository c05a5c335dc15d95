"""Models: named presets, loading/saving in Hugging Face format, and scalar-head models.

Everything here produces or consumes plain `transformers` models, so a checkpoint we
write loads with `AutoModelForCausalLM.from_pretrained` and a reward model we write loads
with `AutoModelForSequenceClassification.from_pretrained` — no posttrain-specific format.

Presets are Qwen2-shaped (RMSNorm, rotary, SwiGLU, grouped-query attention) so the same
code paths (native sampler, log-prob forward) serve both the tiny CPU models and real
Qwen2/Llama checkpoints.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from posttrain.engines.fastpath import record_fallback
from posttrain.errors import ModelError


@dataclass(frozen=True)
class Preset:
    """Shape of a Qwen2-style decoder. Parameter counts below assume the char vocab (~111)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    description: str


PRESETS: dict[str, Preset] = {
    # GQA (4 query heads, 2 kv heads) on purpose: the tests then exercise head repetition.
    "tiny": Preset(128, 2, 4, 2, 512, 1024, "~0.5M params; learns the synthetic tasks on a 2-core CPU"),
    # Matches the TRL comparison config of issue #8: hidden 256, 4 layers, 4 heads.
    "small": Preset(256, 4, 4, 4, 704, 1024, "~3.2M params; benchmark / TRL comparison size"),
    "base": Preset(512, 8, 8, 8, 1792, 2048, "~30M params; upper end of CPU experiments"),
}

# transformers >= 5.25 loads with use_kernels on by default and, on CUDA, replaces layers by
# kernels downloaded from the Hub when the model goes to .train() (found on a GPU machine:
# an offline run failed there, and even online the download is code from outside the run).
# posttrain fetches no code at run time: every load asks for the plain torch layers.
NO_HUB_KERNELS = {"use_kernels": False}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _unknown_preset(name: str) -> ModelError:
    return ModelError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")


def preset_config(name: str, vocab_size: int, **overrides) -> Qwen2Config:
    """The `Qwen2Config` of preset `name` for a vocabulary of `vocab_size` tokens.

    overrides: any Qwen2Config field (e.g. ``pad_token_id=0``, ``num_hidden_layers=1``).
    """
    if name not in PRESETS:
        raise _unknown_preset(name)
    if vocab_size <= 0:
        raise ModelError(f"preset {name!r}: vocab_size must be positive, got {vocab_size}")
    p = PRESETS[name]
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        intermediate_size=p.intermediate_size,
        max_position_embeddings=p.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=True,
    )
    fields.update(overrides)
    return Qwen2Config(**fields)


def build_preset(name: str, vocab_size: int, **overrides) -> PreTrainedModel:
    """A randomly initialised Qwen2ForCausalLM of preset `name` (float32, CPU, eval mode off).

    Initialisation draws from torch's global RNG, so the caller's `torch.manual_seed`
    fixes the weights. `overrides` go to the config (see `preset_config`).
    """
    config = preset_config(name, vocab_size, **overrides)
    # transformers picks sdpa when available; eager is kept only if asked for explicitly.
    return Qwen2ForCausalLM(config)


def _apply_tokenizer_ids(config, tokenizer: PreTrainedTokenizerBase | None) -> None:
    if tokenizer is None:
        return
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            setattr(config, key, value)


def _resolve_dtype(dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}, auto")
    return DTYPES[dtype]


def _is_local(name: str) -> bool:
    """Whether `name` can only mean a filesystem path (hub ids look like "org/model" or "gpt2")."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.endswith(os.sep)
        or name.count("/") >= 2
        or os.path.exists(name)
    )


def _check_name(name: str, what: str) -> None:
    """One-line ModelError for a missing local path or a near-miss preset name."""
    if _is_local(name):
        if not os.path.isdir(name):
            raise ModelError(
                f"{what} path {name!r} does not exist (and it is not a preset: {', '.join(PRESETS)})"
            )
        return
    close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.6)
    if close:
        raise ModelError(
            f"unknown model preset {name!r}; did you mean {close[0]!r}? valid presets: {', '.join(PRESETS)}"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_model(
    name_or_path_or_preset: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    lora: dict | object | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a preset name, a local directory or a hub id.

    A preset builds a random model whose vocabulary is ``len(tokenizer)`` (the char
    tokenizer when `tokenizer` is None). Anything else goes through
    `AutoModelForCausalLM.from_pretrained`. The tokenizer's pad/bos/eos ids are copied
    into the config so generation and sequence classification agree with it.

    lora: None, a dict ``{"r", "alpha", "target_modules", "dropout"}`` or a `peft`
        config; wraps the model with PEFT (optional extra, imported lazily).
    Raises ModelError (one line) for an unknown preset, a missing path, a failed load
    or a missing `peft`.
    """
    torch_dtype = _resolve_dtype(dtype)
    name = str(name_or_path_or_preset)
    if name in PRESETS:
        if tokenizer is None:
            from posttrain.engines.tokenizer import build_char_tokenizer

            tokenizer = build_char_tokenizer()
        model = build_preset(name, len(tokenizer))
        if attn_implementation is not None:
            model.config._attn_implementation = attn_implementation
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
    else:
        _check_name(name, "model")
        kwargs = {"dtype": torch_dtype, **NO_HUB_KERNELS}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(
                f"cannot load causal LM {name!r} (not a preset, not a local directory; hub load failed): "
                f"{_first_line(exc)}"
            ) from None
    if attn_implementation is None:
        _check_attention(model)
    _apply_tokenizer_ids(model.config, tokenizer)
    if model.generation_config is not None:
        _apply_tokenizer_ids(model.generation_config, tokenizer)
    model = model.to(device)
    if gradient_checkpointing:
        # transformers 5 renamed it; keep working on 4.x too.
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()
        model.config.use_cache = False  # the cache is useless (and warned about) under checkpointing
    if lora is not None:
        model = apply_lora(model, lora)
    return model


def _check_attention(model: PreTrainedModel) -> None:
    """Count a model that supports SDPA but was given another kernel without being asked.

    The log-prob forward passes no attention mask on unpadded batches so that SDPA takes
    its causal fast path; eager attention materialises [B, H, L, L] scores instead.
    """
    chosen = getattr(model.config, "_attn_implementation", None)
    if chosen == "eager" and getattr(model, "_supports_sdpa", False):
        record_fallback(
            "sdpa", f"{type(model).__name__} supports SDPA but transformers chose eager attention"
        )


def apply_lora(model: PreTrainedModel, lora: dict | object) -> PreTrainedModel:
    """Wrap `model` with PEFT LoRA adapters (Hu et al. 2021, "LoRA").

    lora: a dict with keys r (rank, default 8), alpha (default 2r), target_modules
        (default all attention + MLP projections), dropout (default 0) — or a ready
        `peft.LoraConfig`.
    """
    try:
        import peft
    except ImportError:
        raise ModelError("LoRA needs the optional 'peft' package: pip install 'posttrain[peft]'") from None
    if isinstance(lora, dict):
        unknown = set(lora) - {"r", "alpha", "target_modules", "dropout"}
        if unknown:
            raise ModelError(
                f"unknown LoRA option(s) {sorted(unknown)}; valid: r, alpha, target_modules, dropout"
            )
        r = int(lora.get("r", 8))
        cfg = peft.LoraConfig(
            r=r,
            lora_alpha=float(lora.get("alpha", 2 * r)),
            lora_dropout=float(lora.get("dropout", 0.0)),
            target_modules=lora.get("target_modules")
            or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
    else:
        cfg = lora
    return peft.get_peft_model(model, cfg)


def load_tokenizer(path_or_name: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer: ``"char"`` builds the char tokenizer; else `AutoTokenizer.from_pretrained`.

    A preset name also gives the char tokenizer (presets are built for it).
    """
    name = str(path_or_name)
    if name == "char" or name in PRESETS:
        from posttrain.engines.tokenizer import build_char_tokenizer

        return build_char_tokenizer()
    if _is_local(name) and not os.path.isdir(name):
        raise ModelError(
            f"path {name!r} does not exist (model.path / model.tokenizer; 'char' builds the char tokenizer)"
        )
    try:
        if _declares_plain_backend(name):
            # In a model directory AutoTokenizer follows config.json's model_type (qwen2 ->
            # Qwen2Tokenizer), whose pre-tokenizer drops the char tokenizer's whitespace
            # tokens. A saved plain `tokenizers` tokenizer is loaded as exactly that.
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(name)
        else:
            tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load tokenizer {name!r}: {_first_line(exc)}") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; eos is the usual stand-in
    return tok


def _declares_plain_backend(path: str) -> bool:
    """True when a local tokenizer_config.json names the plain `tokenizers` backend."""
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return False
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            declared = json.load(fh).get("tokenizer_class")
    except (OSError, ValueError):
        return False
    return declared in ("TokenizersBackend", "PreTrainedTokenizerFast")


def _atomic_save(path: str, write) -> None:
    """Write into a sibling temp dir, then swap it in, so a crash never leaves half a model."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=parent)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        # os.replace cannot replace a non-empty directory: move the old one aside first.
        old = os.path.join(parent, f".old-{uuid.uuid4().hex}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model inside a PEFT wrapper (LoRA merged on save)."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: str) -> None:
    """Save model (+ tokenizer) in Hugging Face format with safetensors, atomically.

    PEFT models are saved with their adapters merged, so the result is a plain checkpoint
    that `AutoModelForCausalLM.from_pretrained(path)` loads.
    """
    plain = _unwrap(model)

    def write(tmp: str) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    _atomic_save(path, write)


class ScalarHeadModel(nn.Module):
    """A decoder backbone + a linear head giving one scalar per position.

    Used as a critic (value of each state, PPO) and as a reward model (score of a
    sequence = value at its last real token, as in InstructGPT / Ouyang et al. 2022).
    It wraps a `*ForSequenceClassification` model with ``num_labels=1`` — which is exactly
    "backbone `.model` + bias-free linear `.score`" — so `save_value_model` writes a
    checkpoint that `AutoModelForSequenceClassification.from_pretrained` loads and scores
    identically (HF takes the logit at the last non-pad token).
    """

    def __init__(self, seq_cls: PreTrainedModel):
        super().__init__()
        if getattr(seq_cls.config, "num_labels", None) != 1:
            raise ModelError("ScalarHeadModel needs a sequence-classification model with num_labels=1")
        self.seq_cls = seq_cls
        self.config = seq_cls.config

    @property
    def backbone(self) -> nn.Module:
        return self.seq_cls.base_model

    @property
    def head(self) -> nn.Linear:
        return self.seq_cls.score

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, attention_mask, position_ids: [B, L] -> values [B, L] (float32)."""
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # [B, L, H]
        return self.head(hidden).squeeze(-1).float()  # [B, L]

    def score_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the head to already computed hidden states [..., H] -> [...] (float32)."""
        return self.head(hidden).squeeze(-1).float()

    def sequence_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Score per sequence [B]: the value at the last attended token of each row.

        Works for left- or right-padded [B, L] inputs (attention_mask is 1 on real tokens).
        """
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * attention_mask.long()).argmax(-1)  # [B]
        pos_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        values = self.forward(input_ids, attention_mask, pos_ids)  # [B, L]
        return values.gather(1, last[:, None]).squeeze(1)

    def gradient_checkpointing_enable(self, **kw) -> None:
        enable = getattr(self.seq_cls, "activation_checkpointing_enable", None)
        (enable or self.seq_cls.gradient_checkpointing_enable)(**kw)


def build_value_model(
    from_model_or_path: PreTrainedModel | str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    head_init_std: float | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    attn_implementation: str | None = None,
) -> ScalarHeadModel:
    """A ScalarHeadModel initialised from a causal LM (critic / reward-model init).

    from_model_or_path: a causal LM instance (its backbone weights are copied, the
        instance itself is left untouched), a saved sequence-classification checkpoint
        (loaded as-is, head included), a causal LM path, or a preset name.
    head_init_std: std of the normal init of the new head; default 1/sqrt(hidden+1)
        (the reward-head init used by Stiennon et al. 2020 / TRL). 0 gives a zero head,
        i.e. a critic that starts at V=0.
    attn_implementation: attention kernel of the value model (eager | sdpa |
        flash_attention_2); None = transformers' default.
    """
    torch_dtype = _resolve_dtype(dtype)
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if isinstance(from_model_or_path, str):
        name = from_model_or_path
        if name not in PRESETS and os.path.isdir(name):
            config = AutoConfig.from_pretrained(name)
            if any("SequenceClassification" in a for a in (config.architectures or [])):
                try:
                    seq_cls = AutoModelForSequenceClassification.from_pretrained(
                        name, dtype=torch_dtype, **attn, **NO_HUB_KERNELS
                    )
                except (OSError, ValueError, KeyError) as exc:
                    raise ModelError(f"cannot load value model {name!r}: {_first_line(exc)}") from None
                return ScalarHeadModel(seq_cls.to(device))
        lm = load_model(name, dtype=dtype, device="cpu", tokenizer=tokenizer)
    else:
        lm = _unwrap(from_model_or_path)
    config = lm.config.__class__.from_dict(lm.config.to_dict())
    config.num_labels = 1
    config.id2label, config.label2id = {0: "LABEL_0"}, {"LABEL_0": 0}
    config.problem_type = "regression"
    config.architectures = None
    _apply_tokenizer_ids(config, tokenizer)
    if config.pad_token_id is None:
        # HF sequence classification finds the last real token through pad_token_id.
        config.pad_token_id = config.eos_token_id
    try:
        seq_cls = AutoModelForSequenceClassification.from_config(config, **attn)
    except ValueError as exc:
        raise ModelError(
            f"no sequence-classification head for {config.model_type!r}: {_first_line(exc)}"
        ) from None
    missing, unexpected = seq_cls.base_model.load_state_dict(lm.base_model.state_dict(), strict=False)
    if missing:
        raise ModelError(f"backbone weights do not fit the value model: missing {missing[:3]}")
    std = head_init_std if head_init_std is not None else (config.hidden_size + 1) ** -0.5
    with torch.no_grad():
        seq_cls.score.weight.normal_(0.0, std) if std > 0 else seq_cls.score.weight.zero_()
    if torch_dtype != "auto":
        seq_cls = seq_cls.to(torch_dtype)
    return ScalarHeadModel(seq_cls.to(device))


def save_value_model(
    value_model: ScalarHeadModel, tokenizer: PreTrainedTokenizerBase | None, path: str
) -> None:
    """Save as ``<Arch>ForSequenceClassification`` (num_labels=1, pad_token_id set), atomically.

    `AutoModelForSequenceClassification.from_pretrained(path)` then returns the same
    per-sequence scores as `value_model.sequence_scores`.
    """
    if value_model.config.pad_token_id is None:
        raise ModelError("value model config has no pad_token_id; HF sequence scoring needs one")

    def write(tmp: str) -> None:
        value_model.seq_cls.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    _atomic_save(path, write)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (each tied tensor counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
