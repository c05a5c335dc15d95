"""Text -> token ids with the tokenizer's own special-token convention.

Every place that turns a prompt into ids (the RL loop, rollout engines given strings, the
offline trainers, evaluation, reward-model and PRM scoring, prompt-length checks) goes
through `encode_prompt` / `encode_text`, and every chat-template rendering (prompts,
multi-turn observations) through `render_messages`, so a model sees the same ids in
training, rewards and evaluation:

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


def has_chat_template(tokenizer) -> bool:
    """Whether prompts are rendered through the tokenizer's chat template (a Hugging Face
    tokenizer whose `chat_template` is set)."""
    return getattr(tokenizer, "chat_template", None) is not None


def render_messages(
    tokenizer,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    enable_thinking: bool | None = None,
    tools: list[dict] | None = None,
) -> str:
    """The chat template applied to `messages`, as text: the one call of
    `apply_chat_template` (prompts, multi-turn observations). enable_thinking / tools are
    passed only when set, so templates that do not know them render as without."""
    options: dict = {}
    if enable_thinking is not None:
        options["enable_thinking"] = enable_thinking
    if tools:
        options["tools"] = tools
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **options
    )


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
    if not has_chat_template(tokenizer):
        if isinstance(prompt, str):
            return prompt
        raise DataError("conversational prompt but the tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return render_messages(
        tokenizer, messages, add_generation_prompt=True, enable_thinking=enable_thinking, tools=tools
    )


def prompt_text(
    tokenizer, prompt, *, chat_template: bool = True, enable_thinking: bool = True, tools=None
) -> str:
    """The prompt's text as the model sees it: `render_prompt` when `chat_template`, else the
    string as is (raw-text prompts: base models, R1-Zero-style prompts). Arguments as in
    `encode_prompt`."""
    if chat_template:
        return render_prompt(tokenizer, prompt, enable_thinking, tools)
    if isinstance(prompt, str):
        return prompt
    raise DataError("conversational prompt but data.chat_template is false")


def observation_text(tokenizer, history: list[dict[str, str]], observation: str, role: str = "tool") -> str:
    """The text that follows the model's last turn when `observation` comes back as a tool
    message, up to the next assistant generation prompt — as the tokenizer's chat template
    renders it (multi-turn rollouts). history: the conversation so far, ending with the
    model's turn.

    Computed as the difference of two renderings (with and without the tool message), so
    it follows whatever the template does (Qwen's <tool_response>, Llama's ipython role,
    ...). A tokenizer without a chat template gets a plain ``<tool_response>`` block.
    """
    turn = history[-1]["content"]
    if not has_chat_template(tokenizer):
        return f"\n<tool_response>\n{observation}\n</tool_response>\n"
    before = render_messages(tokenizer, history, add_generation_prompt=False)
    after = render_messages(
        tokenizer, [*history, {"role": role, "content": observation}], add_generation_prompt=True
    )
    cut = before.rfind(turn)
    if cut < 0 or not after.startswith(before[: cut + len(turn)]):
        raise ValueError(
            "the chat template does not render the model's turn verbatim before a tool message; "
            "multi-turn rollouts need a template that does (or none)"
        )
    return after[cut + len(turn) :]


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
        as is (`prompt_text`). Either way `encode_text` adds the tokenizer's BOS
        convention, once.
    """
    text = prompt_text(
        tokenizer, prompt, chat_template=chat_template, enable_thinking=enable_thinking, tools=tools
    )
    return encode_text(tokenizer, text)
