import string

from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from posttrain.engines.tokenizer import BASE_CHARS, FORMAT_TOKENS, build_char_tokenizer

TOK = build_char_tokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=BASE_CHARS, max_size=80))
def test_decode_encode_round_trip(s):
    ids = TOK.encode(s, add_special_tokens=False)
    assert TOK.decode(ids) == s
    # one token per character, except the format markers which are one token each
    assert len(ids) <= len(s)


def test_every_printable_char_and_math_symbol_is_one_token():
    for c in string.printable + "×÷√":
        assert len(TOK.encode(c, add_special_tokens=False)) == 1, repr(c)


def test_format_markers_are_single_tokens_kept_by_skip_special_tokens():
    s = "<think>1+1=2</think><answer>2</answer>"
    ids = TOK.encode(s, add_special_tokens=False)
    assert len(ids) == 4 + len("1+1=2") + 1
    for marker in FORMAT_TOKENS:
        assert TOK.convert_tokens_to_ids(marker) in ids
    assert TOK.decode(ids, skip_special_tokens=True) == s
    assert TOK.decode([TOK.eos_token_id, *ids, TOK.pad_token_id], skip_special_tokens=True) == s


def test_special_ids_are_distinct():
    ids = {TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id}
    assert len(ids) == 3 and None not in ids


def test_extra_chars_extend_vocab_without_duplicates():
    tok = build_char_tokenizer("αβa")
    assert len(tok) == len(TOK) + 2
    assert tok.decode(tok.encode("αβ a", add_special_tokens=False)) == "αβ a"


def test_chat_template_think_and_no_think():
    msgs = [{"role": "user", "content": "2+2?"}]
    think = TOK.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True, tokenize=False)
    no_think = TOK.apply_chat_template(
        msgs, add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    assert think == "<s><|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert no_think == think + "<think></think>"
    plain = TOK.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    assert plain == "<s><|im_start|>user\n2+2?<|im_end|>\n"


def test_save_and_auto_tokenizer_round_trip(tmp_path):
    TOK.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    s = "Compute 12×3 ÷ √4:\n\t<think>36/2</think><answer>18</answer>"
    assert loaded.encode(s, add_special_tokens=False) == TOK.encode(s, add_special_tokens=False)
    assert loaded.decode(loaded.encode(s, add_special_tokens=False)) == s
    msgs = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(
        msgs, add_generation_prompt=True, enable_thinking=False, tokenize=False
    ) == (TOK.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tokenize=False))
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (
        TOK.pad_token_id,
        TOK.eos_token_id,
        TOK.bos_token_id,
    )
