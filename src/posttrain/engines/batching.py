"""Pack prompts and responses into one padded batch for the training forward.

Layout (P = longest prompt, T = response width, L = P + T)::

    row b:  [pad ... pad | prompt_b | response_b | pad ...]
             <- left-padded prompt -> <- right-padded response ->
    column: 0         P-len_b      P = response_start     P+T

so response token t of every row sits at column ``response_start + t`` and is predicted
by the hidden state at column ``response_start + t - 1``. One slice then serves the whole
batch; no per-row gather.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from posttrain.errors import DataError


@dataclass
class SequenceBatch:
    """A packed batch. input_ids / attention_mask / position_ids: [B, L] long;
    response_start: column of the first response token (= longest prompt length P);
    response_mask: [B, T] float, 1 where a response token counts (the loss mask)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_start: int
    response_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_ids(self) -> torch.Tensor:
        """[B, T] the response tokens (padding where the row has ended)."""
        T = self.response_mask.shape[1]
        return self.input_ids[:, self.response_start : self.response_start + T]

    def select(self, index: torch.Tensor | slice) -> SequenceBatch:
        """The rows `index` (a slice, [k] long indices or [B] bool), same columns."""
        return replace(
            self,
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            position_ids=self.position_ids[index],
            response_mask=self.response_mask[index],
        )

    def prompt_groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows that share their prompt: (first [U] long, inverse [B] long).

        Two rows share a prompt when their prompt columns [0, response_start) agree in
        input_ids, attention_mask and position_ids (the ids alone are not enough: a pad id
        can equal a real token id). inverse[b] is row b's prompt index in [0, U) and
        first[u] one row holding prompt u, so ``input_ids[first][inverse]`` restores the
        prompt columns of every row. A GRPO batch of P prompts x G samples has U = P.
        """
        P = self.response_start
        key = torch.cat(
            [self.input_ids[:, :P], self.attention_mask[:, :P], self.position_ids[:, :P]], dim=1
        )  # [B, 3P]
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)  # [U, 3P], [B]
        rows = torch.arange(len(self), device=inverse.device)
        # Any member row represents its prompt (all members' prompt columns are equal).
        first = torch.zeros(len(uniq), dtype=torch.long, device=inverse.device).scatter_(0, inverse, rows)
        return first, inverse

    def to(self, device: torch.device | str) -> SequenceBatch:
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            position_ids=self.position_ids.to(device),
            response_mask=self.response_mask.to(device),
        )


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of `model`'s first parameter (or buffer); cpu for a module with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_model_device(model: torch.nn.Module, batch: SequenceBatch) -> tuple[SequenceBatch, torch.device]:
    """(`batch` on `model`'s device, the device `batch` came on). The scoring functions
    (engines/logprobs.py, roles/policy.py, train/rl/trpo.py) run the model on its device and
    return their results on the batch's, so the loop's CPU tensors (advantages, masks,
    rewards) combine with them wherever the model lives."""
    home, dev = batch.input_ids.device, model_device(model)
    return (batch if dev == home else batch.to(dev)), home


def build_sequences(
    prompt_ids: list[list[int]],
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    pad_id: int,
) -> SequenceBatch:
    """Left-pad prompts, right-pad responses, and build attention mask and positions.

    prompt_ids: B non-empty token-id lists (one per row, e.g. ``Rollout.prompt_ids``).
    response_ids: [B, T] long; response_mask: [B, T], 1 where a token counts.
    pad_id: id written into padding columns (never attended to).

    The attention mask covers each prompt and each response up to its last token with
    mask 1; zeros *inside* that span (e.g. a masked step) stay attended, because they are
    real tokens that only do not count in the loss. position_ids count real tokens from 0
    (Hugging Face's convention for left padding); padding gets position 0.
    """
    if response_ids.ndim != 2 or response_mask.shape != response_ids.shape:
        raise DataError(
            f"build_sequences: response_ids {tuple(response_ids.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must both be [B, T]"
        )
    B, T = response_ids.shape
    if len(prompt_ids) != B:
        raise DataError(f"build_sequences: {len(prompt_ids)} prompts for {B} responses")
    lengths = [len(p) for p in prompt_ids]
    if min(lengths, default=1) == 0:
        raise DataError(
            f"build_sequences: prompt {lengths.index(0)} is empty (nothing predicts its first token)"
        )
    device = response_ids.device
    P = max(lengths, default=0)
    prompts = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_attn = torch.zeros((B, P), dtype=torch.long)
    for b, ids in enumerate(prompt_ids):
        prompts[b, P - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
        prompt_attn[b, P - len(ids) :] = 1
    mask = response_mask.to(torch.float32)
    cols = torch.arange(T, device=device)
    # Response length = one past the last counted token; everything after it is padding.
    resp_len = (
        torch.where(mask > 0, cols + 1, torch.zeros_like(cols)).amax(-1) if T else torch.zeros(B)
    )  # [B]
    resp_attn = (cols[None, :] < resp_len[:, None]).long()  # [B, T]
    responses = torch.where(resp_attn.bool(), response_ids.long(), torch.full_like(response_ids, pad_id))
    input_ids = torch.cat([prompts.to(device), responses], dim=1)  # [B, L]
    attention_mask = torch.cat([prompt_attn.to(device), resp_attn], dim=1)  # [B, L]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) * attention_mask  # [B, L]
    return SequenceBatch(input_ids, attention_mask, position_ids, P, mask)


def group_micro_batches(inverse: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Split rows into micro-batches of <= `size` rows that keep prompt groups whole.

    inverse: [B] long, each row's group (from `SequenceBatch.prompt_groups`); rows of a
    group need not be contiguous. Groups are packed greedily in order of first
    appearance; a group larger than `size` is cut into `size`-row pieces (each still
    shares its prompt within its piece). Returns [k] long row-index tensors that
    together cover every row exactly once, so a prompt forward is only repeated across
    micro-batches when a group cannot fit in one.
    """
    if size < 1:
        raise DataError(f"group_micro_batches: size must be >= 1 (got {size})")
    order = torch.argsort(inverse, stable=True)  # [B] rows grouped, original order within
    members = order.split(torch.bincount(inverse).tolist()) if len(inverse) else ()
    batches, current, filled = [], [], 0
    for g in dict.fromkeys(inverse.tolist()):  # group ids in order of first appearance
        for piece in members[g].split(size):
            if filled + len(piece) > size:
                batches.append(torch.cat(current))
                current, filled = [], 0
            current.append(piece)
            filled += len(piece)
    if current:
        batches.append(torch.cat(current))
    return batches
