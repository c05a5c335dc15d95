"""A character-level tokenizer for the synthetic tasks, built locally as a real HF tokenizer.

Every character of printable ASCII (plus a few math symbols) is one token, so
``decode(encode(s)) == s`` for any string over that alphabet and the model never has to
learn sub-word boundaries. The tokenizer is a `tokenizers` BPE model with an empty merge
list (each character stays its own token), wrapped in `PreTrainedTokenizerFast`, so
`save_pretrained` / `AutoTokenizer.from_pretrained` round-trip it like any hub tokenizer.

Special tokens: ``<pad>`` (padding), ``<s>`` (bos), ``<|im_end|>`` (eos, also the end of a
chat turn, so generation stops at the end of the assistant turn without extra stop ids)
and ``<|im_start|>``. The R1 format markers ``<think>``, ``</think>``, ``<answer>``,
``</answer>`` are single atomic tokens that are *kept* by ``skip_special_tokens=True``
(deviation from "special" in the HF sense, on purpose: verifiers parse them from decoded
text, so dropping them on decode would silently break rewards).
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, IM_START = "<pad>", "<s>", "<|im_end|>", "<|im_start|>"
FORMAT_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
MATH_CHARS = "×÷√"
# string.printable ends with \x0b\x0c (vertical tab, form feed): harmless, and keeping
# them makes "all of printable ASCII" literally true.
BASE_CHARS = string.printable + MATH_CHARS

# Qwen-style turns. `enable_thinking=False` pre-fills an empty think block so the model
# answers directly (the "no-think mode" of hybrid reasoning models).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}"
    "{% endif %}"
)


def build_char_tokenizer(extra_chars: str = "", *, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer.

    extra_chars: characters to add to printable ASCII + "×÷√" (duplicates ignored).
    add_bos: prepend ``<s>`` whenever text is encoded with special tokens (a
        post-processor, the Llama / Gemma / Mistral convention: ``tok("ab")`` gives
        ``[bos, a, b]``); off by default, where the chat template renders the BOS itself.
    Returns a `PreTrainedTokenizerFast`; ids 0..3 are pad, bos, eos, im_start, then the
    four format tokens, then one id per character. Vocabulary size is `len(tokenizer)`.
    Unknown characters raise nothing at encode time but map to no token; use `extra_chars`
    for task alphabets beyond the defaults.
    """
    chars: list[str] = []
    for c in BASE_CHARS + extra_chars:
        if c not in chars:
            chars.append(c)
    specials = [PAD, BOS, EOS, IM_START]
    vocab = {tok: i for i, tok in enumerate(specials + list(FORMAT_TOKENS))}
    for c in chars:
        vocab[c] = len(vocab)
    # BPE with no merges == one token per character, with no pre-tokenizer splitting on
    # whitespace (whitespace is content here, e.g. "1 2 3" answers).
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.decoder = decoders.Fuse()  # concatenate characters; the default joins with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TOKENS])
    if add_bos:
        bos_id = vocab[BOS]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
