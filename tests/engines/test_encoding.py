"""Prompts keep the tokenizer's own BOS convention, once (issue #16, item 8)."""

from __future__ import annotations

import pytest

from posttrain.engines.encoding import encode_continuation, encode_prompt, encode_text
from posttrain.engines.rollout.common import encode_prompts
from posttrain.engines.scoring import reward_model_ids
from posttrain.engines.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def bos_tok():
    """A Llama-style tokenizer: prepends <s> to encoded text, no chat template."""
    tok = build_char_tokenizer(add_bos=True)
    tok.chat_template = None
    return tok


def test_bos_tokenizer_prepends_its_bos(bos_tok):
    assert bos_tok("2+3=")["input_ids"][0] == bos_tok.bos_token_id
    assert build_char_tokenizer()("2+3=")["input_ids"][0] != bos_tok.bos_token_id


def test_raw_text_gets_the_ids_tokenizer_gives(bos_tok):
    for text in ("2+3=", "Q: what is 7*8?\nA:"):
        assert encode_text(bos_tok, text) == bos_tok(text)["input_ids"]
        assert encode_prompt(bos_tok, text, chat_template=False) == bos_tok(text)["input_ids"]
        # No template on the tokenizer: chat_template=True falls back to the raw text.
        assert encode_prompt(bos_tok, text) == bos_tok(text)["input_ids"]
        assert encode_prompts([text], bos_tok, None) == [bos_tok(text)["input_ids"]]
    # A continuation never carries a BOS (it would sit in the middle of prompt + completion).
    assert bos_tok.bos_token_id not in encode_continuation(bos_tok, "<answer>5</answer>")


def test_bos_already_in_the_text_is_not_doubled(bos_tok):
    bos = bos_tok.bos_token_id
    ids = encode_text(bos_tok, "<s>2+3=")
    assert ids == bos_tok("2+3=")["input_ids"] and ids.count(bos) == 1


def test_chat_template_that_renders_bos_is_not_doubled():
    tok = build_char_tokenizer(add_bos=True)  # its template starts with {{ bos_token }}
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "2+3?"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.startswith("<s>")
    ids = encode_prompt(tok, "2+3?")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]


def test_appended_special_tokens_are_left_off():
    """A tokenizer that also appends EOS (add_eos_token): the prompt keeps BOS, not EOS."""
    from tokenizers import processors

    tok = build_char_tokenizer()
    tok.chat_template = None
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A <|im_end|>",
        special_tokens=[("<s>", tok.bos_token_id), ("<|im_end|>", tok.eos_token_id)],
    )
    assert tok("ab")["input_ids"][-1] == tok.eos_token_id
    assert encode_text(tok, "ab") == tok("ab")["input_ids"][:-1]


def test_reward_model_input_keeps_one_bos(bos_tok):
    """The RL loop passes the prompt decoded from its ids (BOS as text) or raw: same ids."""
    raw = reward_model_ids(bos_tok, "2+3=", "5")
    decoded = reward_model_ids(bos_tok, bos_tok.decode(bos_tok("2+3=")["input_ids"]), "5")
    assert raw == decoded == (bos_tok("2+3=")["input_ids"], encode_continuation(bos_tok, "5"))
