"""Generation: chunked prefill, then one token per step through the same forward, in constant memory.

Prompts of different lengths are left-padded and their rows start at a negative position, so the
padding never enters any layer's state: each row generates exactly what it would alone.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .model import SambaLM


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _check_args(max_new_tokens, temperature, top_k, top_p, prefill_chunk):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive int, got {prefill_chunk!r}")


def _left_pad(prompts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, T] tensor or a list of 1-D sequences -> (ids [B, T_max], padding per row [B])."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise ValueError(f"prompt_ids must have shape [batch, time] with time >= 1, got {tuple(prompts.shape)}")
        return prompts.to(device), torch.zeros(prompts.shape[0], dtype=torch.long, device=device)
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("prompt_ids must hold at least one prompt, and every prompt at least one token")
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
    pad = torch.tensor([width - r.numel() for r in rows])
    return ids.to(device), pad.to(device)


@torch.inference_mode()
def generate_stream(model: SambaLM, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_tokens: Sequence[int] = (), prefill_chunk: int = 1024) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B] LongTensor) as it is produced.

    A row that has emitted a stop token keeps repeating it; the stream ends when every row has
    stopped or after max_new_tokens steps."""
    _check_args(max_new_tokens, temperature, top_k, top_p, prefill_chunk)
    device = model.embedding.weight.device
    ids, pad = _left_pad(prompt_ids, device)
    state = model.init_state(ids.shape[0])
    state.pos -= pad  # padded rows start at a negative position: their padding stays out of the state
    for t0 in range(0, ids.shape[1], prefill_chunk):
        logits = model(ids[:, t0:t0 + prefill_chunk], state=state, logits_to_keep=1).logits[:, -1]
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    stops = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    last = ids[:, -1]
    for step in range(max_new_tokens):
        token = torch.where(finished, last, sample_next(logits, temperature, top_k, top_p, generator))
        yield token
        finished |= torch.isin(token, stops)
        if step + 1 == max_new_tokens or bool(finished.all()):
            return
        last = token
        logits = model(token[:, None], state=state).logits[:, -1]


def generate(model: SambaLM, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_tokens: Sequence[int] = (), prefill_chunk: int = 1024):
    """Continue prompts. A [B, T] tensor gives a [B, T + n] tensor (n <= max_new_tokens; rows that
    stopped early repeat their stop token). A list of token lists of any lengths gives a list of 1-D
    tensors, each its prompt plus its new tokens up to and including its stop token."""
    steps = list(generate_stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                                 stop_tokens, prefill_chunk))
    if isinstance(prompt_ids, torch.Tensor):
        device = model.embedding.weight.device
        new = torch.stack(steps, dim=1) if steps else prompt_ids.new_zeros(prompt_ids.shape[0], 0)
        return torch.cat([prompt_ids.to(device), new.to(device)], dim=1)
    stops, out = set(stop_tokens), []
    for i, prompt in enumerate(prompt_ids):
        row = [int(s[i]) for s in steps]
        cut = next((j + 1 for j, tok in enumerate(row) if tok in stops), len(row))
        out.append(torch.tensor(torch.as_tensor(prompt).reshape(-1).tolist() + row[:cut], dtype=torch.long))
    return out
