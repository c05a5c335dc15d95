"""Tokenizer, policy and value model from a `model:` config section: the one loader.

Every command builds its models here — `sft` / `dpo` (offline/commands.py), `rm` / `prm`,
`rl` (rl/setup.py), `eval` (evaluate.py) and `prm-annotate` — so a section means the same
model everywhere: `path` (a local directory or hub id) wins over `preset` (a random-init
architecture sized to the tokenizer), `tokenizer` overrides the model's own, and the
training-only fields (`gradient_checkpointing`, LoRA) apply where the section has them.

section: an InferenceModelSection, ValueModelSection or ModelSection
(train/config/sections.py); fields a section type lacks take their "off" value.
"""

from __future__ import annotations


def model_source(section) -> str:
    """What the section loads: `path` when set, else the preset name."""
    return section.path or section.preset


def load_section_tokenizer(section):
    """`section.tokenizer`, else the model's own; the character tokenizer for a preset."""
    from posttrain.engines.models import load_tokenizer

    return load_tokenizer(section.tokenizer or model_source(section))


def lora_options(section) -> dict | None:
    """The LoRA adapters of a ModelSection as `load_model` takes them; None when lora_r is 0."""
    if getattr(section, "lora_r", 0) <= 0:
        return None
    return {"r": section.lora_r, "alpha": section.lora_alpha, "target_modules": list(section.lora_target)}


def load_policy(section, tokenizer):
    """The causal LM of `section` (with its LoRA adapters, if any) for `tokenizer`."""
    from posttrain.engines.models import load_model

    return load_model(
        model_source(section),
        dtype=section.dtype,
        device=section.device,
        attn_implementation=section.attn_implementation,
        gradient_checkpointing=getattr(section, "gradient_checkpointing", False),
        lora=lora_options(section),
        tokenizer=tokenizer,
    )


def load_value_model(section, tokenizer, head_init_std: float):
    """The scalar-head model (reward model, PRM) of `section`; a new head is drawn with
    standard deviation `head_init_std` (a saved value model keeps its own)."""
    from posttrain.engines.models import build_value_model

    model = build_value_model(
        model_source(section),
        dtype=section.dtype,
        device=section.device,
        head_init_std=head_init_std,
        tokenizer=tokenizer,
        attn_implementation=section.attn_implementation,
    )
    if getattr(section, "gradient_checkpointing", False):
        model.gradient_checkpointing_enable()
    return model
