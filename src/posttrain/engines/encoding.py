"""Text -> token ids with the tokenizer's own special-token convention.

Every place that turns a prompt into ids (the RL loop, rollout engines given strings, the
offline trainers, evaluation, reward-model and PRM scoring) goes through `encode_prompt`
/ `encode_text`, so a model sees the same ids in training, rewards and evaluation:

* a text that *starts* a sequence gets the tokens the tokenizer itself puts in front of
  text (its BOS for Llama / Gemma / Mistral-style tokenizers; nothing for Qwen-style
  ones), exactly what ``tokenizer(text)`` gives — once: a text that already starts with
  them (a chat template that renders ``{{ bos_token }}``, a prompt decoded from ids that
  carried the BOS) is not given a second copy;
* tokens a tokenizer appends after text (an ``add_eos_token`` EOS) are left off: a
  prompt is followed by its completion, and a special token there would sit in the
  middle of prompt + completion;
* a continuation (a completion, a step, a separator) is tokenized with no special tokens
  (`encode_continuation`).
"""

from __future__ import annotations

from posttrain.errors import DataError


def render_prompt(
    tokenizer, prompt: str | list[dict], enable_thinking: bool = True, tools: list[dict] | None = None
) -> str:
    """The text the model sees before its completion: the chat template with a generation prompt.

    prompt: a user message string, or a conversation (list of {"role", "content"} dicts)
        ending before the assistant turn to be trained or generated.
    enable_thinking: Qwen3 thinking-mode switch; False makes the template open an empty
        <think></think> so the model answers directly (thinking-mode fusion).
    tools: tool declarations (JSON schemas) the template renders where the model expects
        them (multi-turn tool use, data/envs); None = no tools.
    A tokenizer without a chat template gets a plain string prompt unchanged.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        if isinstance(prompt, str):
            return prompt
        raise DataError("conversational prompt but the tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking,
        **({"tools": tools} if tools else {}),
    )  # fmt: skip


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    # `encode` where the tokenizer has it (HF tokenizers, plain encoders); else its call.
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text, add_special_tokens=special))
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Ids of text that continues a sequence (completion, step, separator): no special tokens."""
    return _encode(tokenizer, text, False)


def _leading_specials(tokenizer, text: str, plain: list[int]) -> list[int]:
    """The ids ``tokenizer(text)`` puts before the ids of `text` itself (e.g. [bos])."""
    full = _encode(tokenizer, text, True)
    extra = len(full) - len(plain)
    if extra <= 0:
        return []
    for start in range(extra + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    # The special tokens changed how the text itself splits (rare): take the leading run
    # of special ids.
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    k = 0
    while k < extra and full[k] in special:
        k += 1
    return full[:k]


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of a text that starts a sequence: the tokenizer's leading special tokens once, then the text.

    Equals ``tokenizer(text)["input_ids"]`` for a tokenizer that only prepends (BOS), minus
    a second BOS when `text` already starts with it, and minus anything appended after
    the text (see the module docstring).
    """
    plain = encode_continuation(tokenizer, text)
    prefix = _leading_specials(tokenizer, text, plain)
    if prefix and plain[: len(prefix)] == prefix:
        return plain
    return prefix + plain


def encode_prompt(
    tokenizer,
    prompt: str | list[dict],
    *,
    chat_template: bool = True,
    enable_thinking: bool = True,
    tools: list[dict] | None = None,
) -> list[int]:
    """Ids of a prompt as the model sees it before its completion.

    chat_template: render with the tokenizer's chat template (`render_prompt`) when it has
        one; False (raw-text prompts: base models, R1-Zero-style prompts) uses the string
        as is. Either way `encode_text` adds the tokenizer's BOS convention, once.
    """
    if chat_template:
        text = render_prompt(tokenizer, prompt, enable_thinking, tools)
    elif isinstance(prompt, str):
        text = prompt
    else:
        raise DataError("conversational prompt but data.chat_template is false")
    return encode_text(tokenizer, text)
