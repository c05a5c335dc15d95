"""One loader for every command's `model:` section (train/common/loading.py)."""

import torch

from posttrain.train.common.loading import (
    load_policy,
    load_section_tokenizer,
    load_value_model,
    lora_options,
    model_source,
)
from posttrain.train.config.sections import InferenceModelSection, ModelSection, ValueModelSection


def test_every_section_type_loads_the_same_preset_model_and_char_tokenizer():
    sections = [
        InferenceModelSection(preset="tiny"),
        ValueModelSection(preset="tiny"),
        ModelSection(preset="tiny"),
    ]
    weights = []
    for section in sections:
        tok = load_section_tokenizer(section)
        assert tok.encode("1+1") == load_section_tokenizer(sections[0]).encode("1+1")
        torch.manual_seed(0)
        model = load_policy(section, tok)
        assert model.get_output_embeddings().weight.shape[0] == len(tok)
        weights.append(model.state_dict())
    for other in weights[1:]:
        assert all(torch.equal(other[k], weights[0][k]) for k in weights[0])


def test_path_wins_over_preset_and_lora_only_where_the_section_has_it():
    assert model_source(ModelSection(path="/some/dir", preset="small")) == "/some/dir"
    assert model_source(ModelSection(preset="small")) == "small"
    assert lora_options(ModelSection(preset="tiny")) is None
    assert lora_options(InferenceModelSection(preset="tiny")) is None
    assert lora_options(ModelSection(preset="tiny", lora_r=4, lora_alpha=8, lora_target=["q_proj"])) == {
        "r": 4,
        "alpha": 8,
        "target_modules": ["q_proj"],
    }


def test_value_model_head_init_and_gradient_checkpointing():
    section = ValueModelSection(preset="tiny", gradient_checkpointing=True)
    model = load_value_model(section, load_section_tokenizer(section), head_init_std=0.0)
    heads = [p for n, p in model.named_parameters() if n.endswith("score.weight")]
    assert len(heads) == 1 and torch.count_nonzero(heads[0]) == 0  # a critic starting at V = 0
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
