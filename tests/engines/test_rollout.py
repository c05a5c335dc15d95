import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from posttrain.engines.batching import build_sequences
from posttrain.engines.logprobs import sequence_logprobs
from posttrain.engines.rollout import SamplingParams, make_engine
from posttrain.engines.rollout.common import filter_logits, repetition_hit, sample_tokens
from posttrain.errors import ConfigError, ModelError
from tiny_models import small_family_model

PROMPTS = ["12+3=", "Sort: 3 1 2\n", "x"]  # different lengths exercise left padding


def _greedy(**kw):
    return SamplingParams(temperature=0.0, max_new_tokens=kw.pop("max_new_tokens", 24), **kw)


@pytest.mark.parametrize("engine", ["native", "hf"])
def test_same_seed_same_samples(tiny_model, char_tok, engine):
    eng = make_engine(engine, tiny_model, char_tok)
    p = SamplingParams(temperature=1.0, max_new_tokens=16, n=3, seed=7)
    a, b = eng.generate(PROMPTS, p), eng.generate(PROMPTS, p)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    c = eng.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=16, n=3, seed=8))
    assert not torch.equal(a.response_ids[:, :4], c.response_ids[:, :4])
    assert a.group_id.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert a.prompt_ids[4] == char_tok.encode(PROMPTS[1], add_special_tokens=False)


def test_greedy_native_equals_hf_token_for_token(tiny_model, char_tok):
    # Common characters as stop tokens make rows finish at different steps, which
    # exercises the native engine's batch compaction.
    stops = char_tok.convert_tokens_to_ids(["a", "="])
    for params in (_greedy(n=2), _greedy(stop_token_ids=stops, max_new_tokens=40)):
        nat = make_engine("native", tiny_model, char_tok).generate(PROMPTS, params)
        hf = make_engine("hf", tiny_model, char_tok).generate(PROMPTS, params)
        assert torch.equal(nat.response_ids, hf.response_ids)
        assert torch.equal(nat.mask, hf.mask)
        assert nat.finish_reason == hf.finish_reason and nat.texts == hf.texts
        torch.testing.assert_close(nat.sampling_logprobs, hf.sampling_logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_native_equals_hf_other_families(char_tok, kind):
    model = small_family_model(kind, len(char_tok))
    params = _greedy(max_new_tokens=16)
    nat = make_engine("native", model, char_tok).generate(PROMPTS, params)
    hf = make_engine("hf", model, char_tok).generate(PROMPTS, params)
    assert torch.equal(nat.response_ids, hf.response_ids)


@pytest.mark.parametrize("engine", ["native", "hf"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampling_logprobs_equal_training_logprobs(tiny_model, char_tok, engine, temperature):
    r = make_engine(engine, tiny_model, char_tok).generate(
        PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=20, n=2, seed=0)
    )
    batch = build_sequences(r.prompt_ids, r.response_ids, r.mask, char_tok.pad_token_id)
    train_lp, _ = sequence_logprobs(tiny_model, batch, temperature=temperature)
    diff = ((train_lp - r.sampling_logprobs) * r.mask).abs().max()
    assert diff < 1e-4
    assert (r.sampling_logprobs[r.mask == 0] == 0).all()


def test_keep_mask_matches_top_k_top_p_support(tiny_model, char_tok):
    params = SamplingParams(
        temperature=0.8, top_k=12, top_p=0.5, max_new_tokens=12, n=2, seed=3, return_keep_mask=True
    )
    for engine in ("native", "hf"):
        r = make_engine(engine, tiny_model, char_tok).generate(PROMPTS, params)
        keep = r.keep_mask  # [B, T, V]
        on = r.mask.bool()
        assert keep.shape == (*r.response_ids.shape, len(char_tok))
        assert (keep.sum(-1)[on] <= 12).all() and (keep.sum(-1)[on] >= 1).all()
        assert keep.gather(-1, r.response_ids[..., None]).squeeze(-1)[on].all()  # sampled inside
        # the trainer renormalises over the same support and gets the sampler's log-prob
        batch = build_sequences(r.prompt_ids, r.response_ids, r.mask, char_tok.pad_token_id)
        from posttrain.engines.logprobs import response_logits

        with torch.no_grad():
            z = response_logits(tiny_model, batch).float() / 0.8
        z = z.masked_fill(~keep, float("-inf"))
        lp = z.log_softmax(-1).gather(-1, r.response_ids[..., None]).squeeze(-1)
        torch.testing.assert_close(lp[on], r.sampling_logprobs[on], atol=1e-4, rtol=0)


def test_filter_logits_support_by_hand():
    z = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    _, keep = filter_logits(z, top_k=0, top_p=0.6)
    assert keep.tolist() == [[True, True, False, False]]  # 0.4 < 0.6, then 0.7 crosses it
    _, keep = filter_logits(z, top_k=0, top_p=0.7)
    assert keep.tolist() == [[True, True, False, False]]  # mass before token 3 is 0.7, not < 0.7
    _, keep = filter_logits(z, top_k=3, top_p=1.0)
    assert keep.tolist() == [[True, True, True, False]]
    _, keep = filter_logits(z, top_k=3, top_p=0.5)  # top-k first: [.4,.3,.2]/.9 -> .44 crosses .5
    assert keep.tolist() == [[True, True, False, False]]
    _, keep = filter_logits(z, top_k=0, top_p=0.05)
    assert keep.tolist() == [[True, False, False, False]]  # the most likely token always stays


def test_sampler_frequencies_match_renormalised_distribution():
    probs = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    logits = probs.log().expand(40000, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.75)
    tokens, lp, keep = sample_tokens(logits, params, g)
    # top-4 renormalised: [.35,.25,.2,.1]/.9; top-p 0.75 then keeps .389,.278,.222 (mass before .222 is .667)
    kept = torch.tensor([0.35, 0.25, 0.2])
    expected = kept / kept.sum()
    counts = torch.bincount(tokens, minlength=6).float()
    assert counts[3:].sum() == 0
    freq = counts[:3] / counts.sum()
    assert (freq - expected).abs().max() < 0.01  # ~4.5 standard errors at n=40000
    torch.testing.assert_close(lp, expected.log()[tokens], atol=1e-5, rtol=0)
    # temperature 0.5 sharpens: p^2 renormalised
    tokens, lp, _ = sample_tokens(logits, SamplingParams(temperature=0.5), g)
    sharp = probs**2 / (probs**2).sum()
    freq = torch.bincount(tokens, minlength=6).float() / tokens.numel()
    assert (freq - sharp).abs().max() < 0.01


@pytest.mark.parametrize("engine", ["native", "hf"])
def test_stop_strings_cut_exactly(tiny_model, char_tok, engine):
    eng = make_engine(engine, tiny_model, char_tok)
    full = eng.generate(PROMPTS[:1], _greedy(max_new_tokens=30))
    text = full.texts[0]
    stop = text[5:7]  # a 2-character string the greedy continuation does produce
    end = text.find(stop) + len(stop)
    cut = eng.generate(PROMPTS[:1], _greedy(max_new_tokens=30, stop_strings=["@@never", stop]))
    assert cut.finish_reason == ["stop"]
    assert cut.texts[0] == text[:end]
    assert int(cut.mask.sum()) == end  # char tokenizer: one token per character
    assert torch.equal(cut.response_ids[0, :end], full.response_ids[0, :end])


def test_repetition_hit_by_hand():
    h = torch.tensor([[1, 2, 1, 2, 1, 2], [1, 2, 3, 4, 5, 6], [7, 7, 7, 7, 7, 7]])
    assert repetition_hit(h, ngram=2, max_repeats=3).tolist() == [True, False, True]
    assert repetition_hit(h, ngram=2, max_repeats=4).tolist() == [False, False, True]  # 7-run: 5 overlapping
    assert repetition_hit(h[:, :3], ngram=2, max_repeats=3).tolist() == [False, False, False]


@pytest.mark.parametrize("engine", ["native", "hf"])
def test_repetition_detector_stops_a_looping_model(tiny_model, char_tok, engine):
    eng = make_engine(engine, tiny_model, char_tok)
    looping = eng.generate(PROMPTS, _greedy(max_new_tokens=24))
    assert looping.finish_reason == ["length"] * 3  # greedy random model falls into loops
    r = eng.generate(PROMPTS, _greedy(max_new_tokens=24, repetition_ngram=3, repetition_max_repeats=3))
    assert r.finish_reason == ["repetition"] * 3
    for i in range(3):
        n = int(r.mask[i].sum())
        assert n < 24
        assert torch.equal(r.response_ids[i, :n], looping.response_ids[i, :n])  # same tokens, cut early
        hist = r.response_ids[i : i + 1, :n]
        assert repetition_hit(hist, 3, 3).item() and not repetition_hit(hist[:, :-1], 3, 3).item()


def test_eos_is_included_in_mask_and_excluded_from_text(tiny_model, char_tok):
    with torch.no_grad():  # make EOS the greedy choice after the first generated token
        tiny_model.lm_head.weight[char_tok.eos_token_id] = (
            tiny_model.lm_head.weight[char_tok.eos_token_id] * 0
        )
    params = _greedy(max_new_tokens=8)
    r = make_engine("native", tiny_model, char_tok).generate(PROMPTS, params)
    hf = make_engine("hf", tiny_model, char_tok).generate(PROMPTS, params)
    assert r.texts == hf.texts and r.finish_reason == hf.finish_reason
    for i, reason in enumerate(r.finish_reason):
        n = int(r.mask[i].sum())
        if reason == "stop":
            assert r.response_ids[i, n - 1] == char_tok.eos_token_id
            assert char_tok.eos_token not in r.texts[i]
        assert (r.response_ids[i, n:] == char_tok.pad_token_id).all()


def test_length_capped_by_context(char_tok):
    from posttrain.engines.models import build_preset

    torch.manual_seed(0)
    model = build_preset("tiny", len(char_tok), max_position_embeddings=12).eval()
    r = make_engine("native", model, char_tok).generate(["abcdefgh", "ab"], _greedy(max_new_tokens=50))
    assert r.mask.sum(-1).tolist() == [4.0, 10.0] and r.finish_reason == ["length", "length"]


@pytest.mark.parametrize("engine", ["native", "hf"])
def test_prompt_errors_are_one_line(tiny_model, char_tok, engine):
    eng = make_engine(engine, tiny_model, char_tok)
    with pytest.raises(ModelError, match="prompt 1 is empty"):
        eng.generate(["ab", ""], _greedy())
    with pytest.raises(ModelError, match="prompt 0 has 2000 tokens, the model's context is 1024") as exc:
        eng.generate(["a" * 2000], _greedy())
    assert "\n" not in str(exc.value)
    with pytest.raises(ModelError, match="top_p"):
        eng.generate(["ab"], SamplingParams(top_p=0.0))


def test_unsupported_architecture_suggests_hf(char_tok):
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(char_tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    )
    with pytest.raises(ModelError, match="use engine 'hf'") as exc:
        make_engine("native", model, char_tok)
    assert "\n" not in str(exc.value)
    # ... and the hf engine does run it, with consistent sampling log-probs
    r = make_engine("hf", model.eval(), char_tok).generate(["ab"], SamplingParams(max_new_tokens=5, seed=0))
    assert r.mask.sum() >= 1
    with pytest.raises(ConfigError, match="Valid: hf, native, vllm"):
        make_engine("nativ", model, char_tok)


def test_vllm_missing_is_a_clear_error(tiny_model, char_tok):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm installed")
    except ImportError:
        pass
    with pytest.raises(ModelError, match=r"pip install 'posttrain\[vllm\]'"):
        make_engine("vllm", tiny_model, char_tok)


def test_native_shares_weights_with_the_policy(tiny_model, char_tok):
    eng = make_engine("native", tiny_model, char_tok)
    before = eng.generate(PROMPTS, _greedy(max_new_tokens=8))
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(-1.0)  # a "training step"
    eng.sync_weights(tiny_model)
    after = eng.generate(PROMPTS, _greedy(max_new_tokens=8))
    assert not torch.equal(before.response_ids, after.response_ids)
    assert tiny_model.training is False


@pytest.mark.gpu
def test_vllm_engine_matches_training_logprobs(char_tok, tmp_path):
    from posttrain.engines.models import load_model

    torch.manual_seed(0)
    model = load_model("tiny", tokenizer=char_tok, device="cuda")
    eng = make_engine("vllm", model, char_tok, gpu_memory_utilization=0.2)
    r = eng.generate(PROMPTS, SamplingParams(max_new_tokens=16, n=2, seed=0))
    batch = build_sequences(r.prompt_ids, r.response_ids, r.mask, char_tok.pad_token_id).to("cuda")
    lp, _ = sequence_logprobs(model, batch)
    assert ((lp.cpu() - r.sampling_logprobs) * r.mask).abs().max() < 1e-3
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    eng.sync_weights(model)
    lp2, _ = sequence_logprobs(model, batch)
    r2 = eng.generate(PROMPTS, SamplingParams(max_new_tokens=16, n=2, seed=0))
    assert not math.isclose(float(lp2.sum()), float(lp.sum()))
    assert r2.response_ids.shape[0] == 6


@pytest.mark.parametrize("engine", ["native", "hf"])
def test_ignore_eos_generates_exactly_max_new_tokens(tiny_model, char_tok, engine):
    with torch.no_grad():  # make EOS the likeliest token everywhere
        tiny_model.lm_head.weight[char_tok.eos_token_id] = tiny_model.lm_head.weight.sum(0)
        tiny_model.lm_head.weight[char_tok.eos_token_id] *= (
            10.0 / tiny_model.lm_head.weight[char_tok.eos_token_id].norm()
        )
    eng = make_engine(engine, tiny_model, char_tok)
    stopped = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, seed=0))
    assert "stop" in stopped.finish_reason
    r = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, seed=0, ignore_eos=True))
    assert r.mask.sum(-1).tolist() == [12.0] * 3 and r.finish_reason == ["length"] * 3


def test_vllm_engine_module_is_found_in_both_engine_layouts():
    """`sync_weights` loads weights straight into an in-process engine's model; the lookup
    follows vLLM's V1 layout (LLMEngine -> InprocClient -> EngineCore -> executor) and the
    older one (LLMEngine -> executor), with or without a worker wrapper, and reports a
    multiprocess engine (no model in this process) as AttributeError, which sends the
    weights by RPC instead. Stand-in objects: vLLM itself needs a GPU."""
    from types import SimpleNamespace as NS

    from posttrain.engines.rollout.vllm import engine_module

    model = torch.nn.Linear(2, 2)
    worker = NS(model_runner=NS(model=model))
    v1 = NS(llm_engine=NS(engine_core=NS(engine_core=NS(model_executor=NS(driver_worker=NS(worker=worker))))))
    old = NS(llm_engine=NS(model_executor=NS(driver_worker=worker)))
    assert engine_module(v1) is model
    assert engine_module(old) is model
    multiprocess = NS(llm_engine=NS(engine_core=NS(outputs_queue=None)))  # SyncMPClient: no engine here
    with pytest.raises(AttributeError):
        engine_module(multiprocess)
