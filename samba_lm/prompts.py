"""Prompts into a state: left padding for prompts of different lengths, and the chunked prefill.

Padded rows start at a negative position (`init_state(start=-pad)`), which every layer treats as
absent, so each row's state is exactly that of its prompt alone. The prefill streams the prompt through
the state in chunks, which equals one full forward; a chunk holds about PREFILL_TOKENS tokens over
the batch, so memory stays bounded at any prompt length while each call stays large enough to run
at the full forward's speed.
"""

from __future__ import annotations

import torch

from .model import SambaLM, check_token_ids

PREFILL_TOKENS = 32768  # tokens per prefill call over all rows (samba-1.7b: about 2 GiB of activations)


def left_pad(prompts, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, T] tensor or a list of 1-D token sequences -> (ids [B, T_max], left padding per row [B] on
    the CPU). Token ids are checked once here (on a GPU tensor, by a device-side assertion)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[1] == 0 or prompts.shape[0] == 0:
            raise ValueError(f"prompt_ids must have shape [batch, time] with batch, time >= 1, got {tuple(prompts.shape)}")
        if prompts.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompt_ids must hold int64 or int32 token ids, got {prompts.dtype}")
        check_token_ids(prompts, vocab_size)
        return prompts.long(), torch.zeros(prompts.shape[0], dtype=torch.long)
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("prompt_ids must hold at least one prompt, and every prompt at least one token")
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
    check_token_ids(ids, vocab_size)
    return ids, torch.tensor([width - r.numel() for r in rows])


@torch.inference_mode()
def prefill(model: SambaLM, input_ids: torch.Tensor, state, chunk: int | None = None) -> torch.Tensor:
    """Stream input_ids [B, T] through `state` in chunks of `chunk` tokens per row (default: about
    PREFILL_TOKENS over the batch); returns the logits of the last position, [B, vocab]."""
    if chunk is None:
        chunk = max(1, PREFILL_TOKENS // input_ids.shape[0])
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int or None (automatic), got {chunk!r}")
    for t0 in range(0, input_ids.shape[1], chunk):
        logits = model(input_ids[:, t0:t0 + chunk], state=state, logits_to_keep=1).logits
    return logits[:, -1]
