"""Pieces every engine shares: prompt checks, the sampler, finish detection, output assembly.

Sharing them is what makes the engines agree: the native sampler and the hf engine's
post-processing run the same stop-token / stop-string / repetition logic, and the
log-prob definition (temperature, then top-k, then top-p, then renormalise) is written once.

Shapes: B rows (prompts x n), V vocabulary, T generated steps.
"""

from __future__ import annotations

import torch

from posttrain.engines.encoding import encode_text
from posttrain.engines.rollout.base import Rollout, SamplingParams
from posttrain.errors import ModelError

# Finish codes kept in a tensor during generation (strings only at the very end).
RUNNING, STOP, LENGTH, REPETITION = 0, 1, 2, 3
REASONS = {STOP: "stop", LENGTH: "length", REPETITION: "repetition"}


def check_params(params: SamplingParams) -> None:
    """One-line ModelError for sampling parameters no engine can honour."""
    if params.temperature < 0:
        raise ModelError(f"SamplingParams.temperature must be >= 0, got {params.temperature}")
    if not 0.0 < params.top_p <= 1.0:
        raise ModelError(f"SamplingParams.top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ModelError(f"SamplingParams.top_k must be >= 0 (0 disables), got {params.top_k}")
    if params.max_new_tokens < 1:
        raise ModelError(f"SamplingParams.max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.n < 1:
        raise ModelError(f"SamplingParams.n must be >= 1, got {params.n}")
    if params.repetition_ngram < 0 or (params.repetition_ngram and params.repetition_max_repeats < 2):
        raise ModelError("SamplingParams: repetition_ngram must be >= 0 and repetition_max_repeats >= 2")
    if any(not s for s in params.stop_strings):
        raise ModelError("SamplingParams.stop_strings contains an empty string")


def encode_prompts(prompts, tokenizer, context_length: int | None) -> list[list[int]]:
    """Token ids of each prompt; strings are raw text, tokenized with the tokenizer's own
    BOS convention (`posttrain.engines.encoding.encode_text`), token lists used as given.

    Raises ModelError naming the prompt for an empty prompt or one that leaves no room
    to generate within `context_length` (the model's max positions).
    """
    if isinstance(prompts, (str, bytes)) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
    ):
        raise ModelError("generate: prompts must be a list of strings or a list of token-id lists")
    out: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = encode_text(tokenizer, p)
        elif isinstance(p, torch.Tensor):
            ids = p.reshape(-1).tolist()
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise ModelError(f"generate: prompt {i} is empty (nothing to condition on)")
        if context_length is not None and len(ids) >= context_length:
            raise ModelError(
                f"generate: prompt {i} has {len(ids)} tokens, the model's context is {context_length}"
            )
        out.append(ids)
    if not out:
        raise ModelError("generate: no prompts given")
    return out


def generate_in_eval_mode(engine, prompts, params: SamplingParams, **kw):
    """`engine._generate(prompt ids, params, **kw)` for an engine that samples from its own
    `engine.model` in process: checked params, encoded prompts (`encode_prompts`), no
    autograd, and dropout off while sampling (the model's train/eval mode is restored)."""
    check_params(params)
    prompt_ids = encode_prompts(prompts, engine.tokenizer, engine.context_length)
    was_training = engine.model.training
    engine.model.eval()
    try:
        with torch.inference_mode():
            return engine._generate(prompt_ids, params, **kw)
    finally:
        engine.model.train(was_training)


def eos_ids(tokenizer, model_config, params: SamplingParams) -> list[int]:
    """EOS ids (tokenizer's, model config's) plus the caller's stop token ids."""
    ids = [int(t) for t in params.stop_token_ids]
    if params.ignore_eos:
        return ids
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(model_config, "eos_token_id", None)):
        for t in src if isinstance(src, (list, tuple)) else [src]:
            if t is not None and t not in ids:
                ids.append(int(t))
    return ids


def filter_logits(z: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-k then top-p (nucleus, Holtzman et al. 2020) truncation of [B, V] logits.

    Returns (z with -inf outside the support, keep mask [B, V] bool or None when nothing
    is truncated). Top-p keeps the smallest set of most likely tokens whose mass reaches
    `top_p` (the token that crosses the threshold is kept, the most likely token always
    is) — the same rule as transformers' TopPLogitsWarper. Ties at the k-th logit are all
    kept.
    """
    keep = None
    V = z.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # [B, 1]
        keep = z >= kth
        z = z.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = sorted_z.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass strictly more likely than each token
        keep_sorted = mass_before < top_p
        keep_sorted[:, 0] = True
        keep_p = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        keep = keep_p if keep is None else keep & keep_p
        z = z.masked_fill(~keep_p, float("-inf"))
    return z, keep


def sample_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Draw one token per row from [B, V] logits.

    The distribution is softmax(filter(logits / τ)); τ = 0 is greedy (argmax), whose
    reported log-prob uses τ = 1 (the distribution a trainer would score at τ = 1).
    uniforms: optional [B] float64 in [0, 1), one per row, used instead of drawing from
    `generator` (the native engine draws them per original row, so a row's sample does
    not depend on which other rows are still in the batch).
    Returns tokens [B] long, sampling log-probs [B] float32 (under the truncated,
    renormalised distribution), keep mask [B, V] or None.
    """
    z = logits.float()
    if params.temperature not in (0.0, 1.0):  # x / 1 == x: skip the pass
        z = z / params.temperature
    z, keep = filter_logits(z, params.top_k, params.top_p)
    logp = z.log_softmax(-1)  # [B, V]
    tokens = z.argmax(-1) if params.temperature == 0 else inverse_cdf_draw(logp, generator, uniforms)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, chosen, keep


def cdf_dtype(device: torch.device) -> torch.dtype:
    """Accumulation dtype of the sampler's CDF: float64, except on Apple MPS (no float64)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def inverse_cdf_draw(
    logp: torch.Tensor, generator: torch.Generator | None, uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row of log-probs [B, V], drawn with probability exp(logp): [B] long.

    Inverse CDF with a single uniform per row: token i is chosen when u falls in
    [cdf_{i-1}, cdf_i), an interval of width p_i. It replaces an exponential race
    (argmax p_i / E_i), which needs B x V exponential draws and was ~5x slower on CPU.
    The running sum is float64 so that rounding over a long vocabulary (150k terms) cannot
    shift the boundaries of low-probability tokens; tokens with p_i = 0 (outside top-k /
    top-p) have empty intervals and are never drawn, because u is kept below the total.
    uniforms: optional [B] draws in [0, 1) to use instead of `generator`.
    """
    acc = cdf_dtype(logp.device)
    cdf = logp.exp().cumsum(-1, dtype=acc)  # [B, V]
    total = cdf[:, -1:]  # [B, 1], 1 up to rounding
    if uniforms is None:
        uniforms = torch.rand(total.shape[0], generator=generator, dtype=acc, device=logp.device)
    u = uniforms.to(acc)[:, None] * total  # [B, 1]
    # r * total can round up to total itself (r = 1 - 2^-53); that u would select nothing.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def repetition_hit(history: torch.Tensor, ngram: int, max_repeats: int) -> torch.Tensor:
    """Whether each row's last `ngram`-gram has now occurred `max_repeats` times: [b] bool.

    history: [b, t] tokens generated so far. Kimi k1.5 stops generations caught in a
    loop; occurrences may overlap (a run of one repeated token counts every position).
    """
    b, t = history.shape
    if ngram <= 0 or t < ngram + max_repeats - 1:
        return torch.zeros(b, dtype=torch.bool, device=history.device)
    windows = history.unfold(1, ngram, 1)  # [b, t-n+1, n]
    count = (windows == windows[:, -1:]).all(-1).sum(-1)  # [b]
    return count >= max_repeats


_TOKEN_TEXTS: dict[tuple[int, int], tuple[object, list[str]]] = {}


def _token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Decoded text of every token id, cached per tokenizer (a 150k vocab takes ~1 s to decode).

    Byte-level tokens that hold part of a multi-byte character decode to U+FFFD, so a stop
    string whose last character is split across tokens is only caught once that character
    is complete (deviation, rare in practice).
    """
    key = (id(tokenizer), vocab_size)
    hit = _TOKEN_TEXTS.get(key)
    if hit is None or hit[0] is not tokenizer:
        n = min(vocab_size, len(tokenizer))
        texts = [tokenizer.decode([i]) for i in range(n)] + [""] * (vocab_size - n)
        hit = _TOKEN_TEXTS[key] = (tokenizer, texts)
    return hit[1]


class StopStringMatcher:
    """Detect stop strings completed by the newest token without decoding every row.

    A stop string can only be completed by a token whose text contains the string's last
    character, so a [V] lookup picks the few candidate rows; only those are decoded.
    """

    def __init__(self, tokenizer, stop_strings: list[str], vocab_size: int):
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.max_len = max(len(s) for s in stop_strings)
        last_chars = {s[-1] for s in stop_strings}
        decoded = _token_texts(tokenizer, vocab_size)
        lookup = torch.zeros(vocab_size, dtype=torch.bool)
        for i, text in enumerate(decoded):
            if any(c in text for c in last_chars):
                lookup[i] = True
        self.lookup = lookup

    def completed(self, history: torch.Tensor, new_tokens: torch.Tensor) -> torch.Tensor:
        """history: [b, t] tokens so far (newest last); new_tokens: [b]. Returns [b] bool."""
        hit = torch.zeros(new_tokens.shape[0], dtype=torch.bool)
        candidates = self.lookup.to(new_tokens.device)[new_tokens].nonzero().flatten().tolist()
        for i in candidates:  # few rows: only those whose newest token could end a stop string
            tail = history[i, -self.max_len :].tolist()  # every token is >= 1 character
            prev, text = self.tokenizer.decode(tail[:-1]), self.tokenizer.decode(tail)
            start = max(0, len(prev) - self.max_len + 1)
            if any(
                text.find(s, start) >= 0 and text.find(s, start) + len(s) > len(prev)
                for s in self.stop_strings
            ):
                hit[i] = True
        return hit.to(new_tokens.device)


class FinishTracker:
    """Per-step finish decisions for the active rows, shared by the native and hf engines.

    Priority when several apply at one step: stop (EOS / stop token / stop string) over
    repetition over length.
    """

    def __init__(self, params: SamplingParams, stop_ids: list[int], vocab_size: int, tokenizer, device):
        self.params = params
        self.stop_lookup = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if stop_ids:
            self.stop_lookup[torch.tensor(stop_ids, device=device).clamp(max=vocab_size - 1)] = True
        self.strings = (
            StopStringMatcher(tokenizer, params.stop_strings, vocab_size) if params.stop_strings else None
        )

    @property
    def needs_history(self) -> bool:
        """Whether `step` reads the token history (repetition or stop strings are on)."""
        return bool(self.params.repetition_ngram) or self.strings is not None

    def step(
        self, history: torch.Tensor | None, new_tokens: torch.Tensor, at_limit: torch.Tensor
    ) -> torch.Tensor:
        """history: [b, t] including new_tokens [b] as its last column (may be None when
        `needs_history` is False); at_limit: [b] bool (this was the row's last allowed
        token). Returns finish codes [b] (0 = running)."""
        code = torch.where(at_limit, LENGTH, RUNNING)
        p = self.params
        if p.repetition_ngram:
            code = torch.where(
                repetition_hit(history, p.repetition_ngram, p.repetition_max_repeats), REPETITION, code
            )
        stop = self.stop_lookup[new_tokens]
        if self.strings is not None:
            stop = stop | self.strings.completed(history, new_tokens)
        return torch.where(stop, STOP, code)


def cut_after_stop_string(text: str, stop_strings: list[str]) -> str:
    """Text up to and including the earliest-ending stop string (whole text if none)."""
    ends = [text.find(s) + len(s) for s in stop_strings if s in text]
    return text[: min(ends)] if ends else text


def assemble_rollout(
    engine,
    prompt_ids: list[list[int]],
    n: int,
    response_ids: torch.Tensor,
    lengths: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    codes: torch.Tensor,
    params: SamplingParams,
    stop_ids: list[int],
    keep_mask: torch.Tensor | None = None,
) -> Rollout:
    """Build the Rollout from [B, T] buffers and per-row lengths [B] / finish codes [B].

    engine: the engine that sampled them; its `tokenizer` decodes the texts and its
    `pad_id` fills the padding.

    Everything at or after a row's length becomes padding (ids = pad, log-prob 0, mask 0,
    keep mask False). Texts exclude a final EOS/stop token and padding, keep stop strings.
    """
    tokenizer = engine.tokenizer
    B, T = response_ids.shape
    cols = torch.arange(T, device=response_ids.device)
    mask = (cols[None, :] < lengths[:, None]).float()  # [B, T]
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, engine.pad_id))
    # where, not multiply: a padding step may carry -inf (e.g. a pad token outside top-k)
    sampling_logprobs = torch.where(
        mask.bool(), sampling_logprobs.float(), torch.zeros((), device=mask.device)
    )
    if keep_mask is not None:
        keep_mask = keep_mask & mask.bool()[:, :, None]
    stop_set = set(stop_ids)
    texts, reasons = [], []
    for row, length, code in zip(response_ids.tolist(), lengths.tolist(), codes.tolist()):
        ids = row[:length]
        if ids and ids[-1] in stop_set and code == STOP:
            ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if params.stop_strings and code == STOP:
            text = cut_after_stop_string(text, params.stop_strings)
        texts.append(text)
        reasons.append(REASONS.get(code, "length"))
    prompts_per_row = [list(prompt_ids[i // n]) for i in range(B)]
    group_id = torch.arange(len(prompt_ids)).repeat_interleave(n)
    return Rollout(
        prompt_ids=prompts_per_row,
        response_ids=response_ids.cpu(),
        mask=mask.cpu(),
        sampling_logprobs=sampling_logprobs.cpu(),
        finish_reason=reasons,
        group_id=group_id,
        texts=texts,
        keep_mask=keep_mask.cpu() if keep_mask is not None else None,
    )


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A private generator for `seed` (None: the global RNG, so runs follow torch.manual_seed)."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def rollout_from_rows(
    prompts: list[list[int]],
    n: int,
    ids: list[list[int]],
    masks: list[list[float]],
    logps: list[list[float]],
    finish: list[str],
    tokenizer,
) -> Rollout:
    """A Rollout from per-sample lists (sample i answers prompt i // n), right-padded with
    the pad id; texts exclude the final EOS of a sample finished by "stop" (as the engines')."""
    B, T = len(ids), max(1, max((len(x) for x in ids), default=0))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    response = torch.full((B, T), pad, dtype=torch.long)
    mask, slp = torch.zeros((B, T)), torch.zeros((B, T))
    texts = []
    for i in range(B):
        k = len(ids[i])
        response[i, :k] = torch.tensor(ids[i], dtype=torch.long)
        mask[i, :k] = torch.tensor(masks[i], dtype=torch.float32)
        slp[i, :k] = torch.tensor(logps[i], dtype=torch.float32)
        end = k - 1 if finish[i] == "stop" and k and ids[i][-1] == tokenizer.eos_token_id else k
        texts.append(tokenizer.decode(ids[i][:end], skip_special_tokens=False))
    return Rollout(
        prompt_ids=[list(prompts[i // n]) for i in range(B)],
        response_ids=response,
        mask=mask,
        sampling_logprobs=slp,
        finish_reason=finish,
        group_id=torch.arange(len(prompts)).repeat_interleave(n),
        texts=texts,
    )
