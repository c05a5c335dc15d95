import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.engines import models as M
from posttrain.errors import ModelError


def test_preset_sizes(char_tok):
    sizes = {name: M.count_parameters(M.build_preset(name, len(char_tok))) for name in ("tiny", "small")}
    assert 0.4e6 < sizes["tiny"] < 0.6e6
    assert 3.0e6 < sizes["small"] < 3.5e6
    cfg = M.preset_config("base", len(char_tok))
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (512, 8)
    small = M.preset_config("small", len(char_tok))
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads) == (256, 4, 4)


def test_preset_init_follows_callers_seed(char_tok):
    torch.manual_seed(3)
    a = M.build_preset("tiny", len(char_tok))
    torch.manual_seed(3)
    b = M.build_preset("tiny", len(char_tok))
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na


def test_unknown_preset_lists_valid():
    with pytest.raises(ModelError, match="valid presets: tiny, small, base") as exc:
        M.build_preset("tiyn", 10)
    assert "\n" not in str(exc.value)


def test_missing_model_path_is_one_line_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as exc:
        M.load_model(str(tmp_path / "nope"))
    assert "\n" not in str(exc.value)
    with pytest.raises(ModelError, match="did you mean 'small'"):
        M.load_model("smal")
    with pytest.raises(ModelError, match="does not exist"):
        M.load_tokenizer(str(tmp_path / "nope"))


def test_bad_dtype_and_missing_peft():
    with pytest.raises(ModelError, match="unknown dtype"):
        M.load_model("tiny", dtype="float8")
    try:
        import peft  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match="peft"):
            M.load_model("tiny", lora={"r": 4})


def test_load_preset_sets_tokenizer_ids_and_options(char_tok):
    model = M.load_model("tiny", tokenizer=char_tok, dtype="bfloat16", gradient_checkpointing=True)
    assert model.config.pad_token_id == char_tok.pad_token_id
    assert model.config.eos_token_id == char_tok.eos_token_id
    assert next(model.parameters()).dtype == torch.bfloat16
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_save_from_pretrained_identical_logits(tiny_model, char_tok, tmp_path):
    path = tmp_path / "ckpt"
    M.save_model(tiny_model, char_tok, str(path))
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    ids = torch.tensor([char_tok.encode("12+30=", add_special_tokens=False)])
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, tiny_model(ids).logits)
    ours = M.load_model(str(path))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, tiny_model(ids).logits)
    assert M.load_tokenizer(str(path)).encode("1+1") == char_tok.encode("1+1")
    # we load what transformers writes, and saving over an existing checkpoint replaces it
    reloaded.save_pretrained(tmp_path / "hf")
    assert isinstance(M.load_model(str(tmp_path / "hf")), type(tiny_model))
    M.save_model(reloaded, None, str(path))
    assert not (path / "tokenizer.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left


def test_failed_save_keeps_previous_checkpoint(tiny_model, char_tok, tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    M.save_model(tiny_model, char_tok, str(path))
    before = (path / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(char_tok, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        M.save_model(tiny_model, char_tok, str(path))
    assert (path / "model.safetensors").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_value_model_matches_hf_sequence_classification(tiny_model, char_tok, tmp_path):
    torch.manual_seed(1)
    vm = M.build_value_model(tiny_model, tokenizer=char_tok)
    # backbone copied from the policy, policy untouched
    torch.testing.assert_close(vm.backbone.embed_tokens.weight, tiny_model.model.embed_tokens.weight)
    assert vm.backbone.embed_tokens.weight.data_ptr() != tiny_model.model.embed_tokens.weight.data_ptr()
    pad = char_tok.pad_token_id
    rows = [char_tok.encode(s, add_special_tokens=False) for s in ("1+2=3", "10+20=30!")]
    L = max(map(len, rows))
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])  # left padded
    attn = (ids != pad).long()
    ours = vm.sequence_scores(ids, attn)
    M.save_value_model(vm, char_tok, str(tmp_path / "rm"))
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == pad
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=attn).logits.squeeze(-1)
    torch.testing.assert_close(ours.detach(), theirs, atol=1e-5, rtol=1e-5)
    # and our loader gives the same model back, head included
    again = M.build_value_model(str(tmp_path / "rm"))
    torch.testing.assert_close(again.sequence_scores(ids, attn).detach(), theirs, atol=1e-5, rtol=1e-5)


def test_value_model_zero_head_gives_zero_values(tiny_model):
    vm = M.build_value_model(tiny_model, head_init_std=0.0)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(vm(ids, torch.ones_like(ids)), torch.zeros(1, 3))


def test_lora_wraps_and_saves_merged(char_tok, tmp_path):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    model = M.load_model("tiny", tokenizer=char_tok, lora={"r": 4, "alpha": 8})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make the adapter matter
    ids = torch.tensor([[5, 6, 7, 8]])
    M.save_model(model, char_tok, str(tmp_path / "m"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_loaded_models_never_fetch_hub_kernels(tiny_model, char_tok, tmp_path):
    """transformers >= 5.25 turns use_kernels on by default and then, on CUDA, swaps layers
    for kernels downloaded from the Hub at .train() (a GPU run failed offline on it): every
    posttrain load keeps the plain torch layers, the policy and the value model alike."""
    M.save_model(tiny_model, char_tok, str(tmp_path / "m"))
    policy = M.load_model(str(tmp_path / "m"), tokenizer=char_tok)
    assert getattr(policy, "use_kernels", False) is False
    value = M.build_value_model(str(tmp_path / "m"), tokenizer=char_tok)
    M.save_value_model(value, char_tok, str(tmp_path / "v"))
    reloaded = M.build_value_model(
        str(tmp_path / "v"), tokenizer=char_tok
    )  # the sequence-classification load
    for model in (value, reloaded):
        assert all(getattr(m, "use_kernels", False) is False for m in model.modules())
