"""The transformers adapter (engines/hf_compat.py) and the no-silent-fallback rule
(engines/fastpath.py): on the supported stack the fast paths ARE taken for the Qwen2,
Llama and Qwen3 families, and a path given up is warned once and counted."""

import logging

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from posttrain.engines import hf_compat
from posttrain.engines.batching import build_sequences
from posttrain.engines.fastpath import (
    fallback_counts,
    fallback_metrics,
    record_fallback,
    reset_fallbacks,
)
from posttrain.engines.logprobs import sequence_logprobs
from posttrain.engines.models import build_preset, load_model
from posttrain.engines.rollout import SamplingParams, make_engine
from posttrain.engines.tokenizer import build_char_tokenizer

V = 64
_SHAPE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip


def _family(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**_SHAPE)).eval()
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**_SHAPE, head_dim=16)).eval()
    return build_preset("tiny", V).eval()


def _group_batch(G=4, P=6, T=5):
    """Two prompts x G samples: sharing skips (B - 2) * P of B * (P + T - 1) token-forwards."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (P,), generator=g).tolist() for _ in range(2)]
    rows = [p for p in prompts for _ in range(G)]
    resp = torch.randint(3, V, (len(rows), T), generator=g)
    return build_sequences(rows, resp, torch.ones(len(rows), T), 0)


@pytest.fixture(autouse=True)
def _fresh_counts():
    reset_fallbacks()
    yield
    reset_fallbacks()


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_shared_prompt_path_is_taken_on_the_installed_transformers(kind):
    model = _family(kind)
    decoder = model.get_decoder()
    assert hf_compat.cache_argument(decoder) in hf_compat.CACHE_ARGUMENTS
    rows = []
    handle = decoder.register_forward_pre_hook(
        lambda m, a, kw: rows.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        sequence_logprobs(model, _group_batch())
    finally:
        handle.remove()
    assert rows == [(2, 6), (8, 4)]  # 2 distinct prompts once, then the response columns
    assert fallback_counts() == {}
    assert fallback_metrics() == {
        "perf/fallback_shared_prompts": 0.0,
        "perf/fallback_sdpa": 0.0,
        "perf/fallback_kv_continuation": 0.0,
    }


class _OldSpelling(nn.Module):
    """A decoder with transformers < 5.25's signature, wrapping a real one."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None
    ):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **{hf_compat.cache_argument(self.inner): past_key_values}, use_cache=use_cache)  # fmt: skip


class _NoCache(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


class _Wrapped(nn.Module):
    def __init__(self, model, decoder):
        super().__init__()
        self.decoder, self.head = decoder, model.get_output_embeddings()

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


def test_both_spellings_of_the_cache_argument_share_prompts_with_the_same_numbers():
    model = _family("qwen2")
    batch = _group_batch()
    full, _ = sequence_logprobs(model, batch, share_prompts=False)
    old = _Wrapped(model, _OldSpelling(model.get_decoder()))
    assert hf_compat.cache_argument(old.decoder) == "past_key_values"
    shared_old, _ = sequence_logprobs(old, batch)
    shared_new, _ = sequence_logprobs(model, batch)
    torch.testing.assert_close(shared_old, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_new, full, atol=1e-5, rtol=0)
    assert fallback_counts() == {}


def test_a_decoder_without_a_cache_argument_is_warned_once_and_counted(caplog):
    model = _family("qwen2")
    wrapped = _Wrapped(model, _NoCache(model.get_decoder()))
    batch = _group_batch()
    full, _ = sequence_logprobs(model, batch, share_prompts=False)
    with caplog.at_level(logging.WARNING, logger="posttrain.fastpath"):
        for _ in range(3):
            out, _ = sequence_logprobs(wrapped, batch)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=0)  # same numbers, slower path
    warnings = [r for r in caplog.records if "shared_prompts" in r.getMessage()]
    assert len(warnings) == 1 and "takes no KV cache argument" in warnings[0].getMessage()
    assert fallback_counts() == {"shared_prompts": 3}
    assert fallback_metrics()["perf/fallback_shared_prompts"] == 3.0


def test_batches_that_do_not_repeat_prompts_are_not_fallbacks():
    model = _family("qwen2")
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, V, (6,), generator=g).tolist() for _ in range(4)]  # all distinct
    sequence_logprobs(
        model, build_sequences(rows, torch.randint(3, V, (4, 5), generator=g), torch.ones(4, 5), 0)
    )
    assert fallback_counts() == {}


def test_fallback_metrics_count_from_a_snapshot_and_unknown_paths_are_rejected():
    record_fallback("sdpa", "r")
    since = fallback_counts()
    record_fallback("sdpa", "r")
    record_fallback("sdpa", "other reason")
    assert fallback_metrics(since)["perf/fallback_sdpa"] == 2.0
    with pytest.raises(ValueError, match="unknown fast path"):
        record_fallback("shared_prompt", "typo")


def test_presets_load_with_sdpa_and_count_an_unrequested_eager_kernel(monkeypatch):
    load_model("tiny")
    assert fallback_counts() == {}
    import posttrain.engines.models as models

    real = models.build_preset

    def eager(*a, **kw):
        m = real(*a, **kw)
        m.config._attn_implementation = "eager"
        return m

    monkeypatch.setattr(models, "build_preset", eager)
    load_model("tiny")
    assert fallback_counts() == {"sdpa": 1}
    load_model("tiny", attn_implementation="eager")  # asked for: not a fallback
    assert fallback_counts() == {"sdpa": 1}


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_native_engine_drives_every_supported_family(kind):
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    shape = {**_SHAPE, "vocab_size": len(tok)}
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**shape, head_dim=16))
    else:
        model = build_preset("tiny", len(tok))
    engine = make_engine("native", model, tok)
    rollout = engine.generate(["1+2=", "3+4="], SamplingParams(n=2, max_new_tokens=4, seed=0))
    assert rollout.response_ids.shape[0] == 4
    # Its log-probs are the training forward's: the native path computed real numbers.
    lp, _ = sequence_logprobs(
        model, build_sequences(rollout.prompt_ids, rollout.response_ids, rollout.mask, 0)
    )
    torch.testing.assert_close(lp * rollout.mask, rollout.sampling_logprobs * rollout.mask, atol=1e-4, rtol=0)
