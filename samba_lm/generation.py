"""Generation: chunked prefill, then one token per step through the same forward, in constant memory.

Prompts of different lengths are left-padded and their rows start at a negative position, so the
padding never enters any layer's state: each row generates exactly what it would alone (and, with a
seed per row, samples it too). Decoding runs in a `DecodeEngine`: on CUDA one captured CUDA graph per
call, with sampling and stop tokens on the device and the host reading tokens back every `sync_every`
steps; elsewhere (or with cuda_graph=False) the same step eagerly.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .engine import DecodeEngine, check_generation_args
from .model import SambaLM
from .prompts import left_pad


def generate_stream(model: SambaLM, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed=None,
                    stop_tokens: Sequence[int] = (), prefill_chunk: int | None = None,
                    cuda_graph: bool | None = None, sync_every: int = 16) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B] int64 CPU tensor) as it is produced.

    A row that has emitted a stop token keeps repeating it; the stream ends when every row has
    stopped or after max_new_tokens steps. seed: an int (each row its own stream), a list of one int
    per row (each row as it would draw alone), or None (random). prefill_chunk: tokens per row and
    prefill call (default: about 32K tokens over the batch). cuda_graph: capture the decode step
    (default: on CUDA). sync_every: decode steps between reads of the device (the first token comes
    at once; later ones arrive in blocks of this many)."""
    check_generation_args(max_new_tokens, temperature, top_k, top_p, prefill_chunk)
    ids, pad = left_pad(prompt_ids, model.config.vocab_size)
    engine = DecodeEngine(model, ids.shape[0], capacity=ids.shape[1] + max_new_tokens, cuda_graph=cuda_graph,
                          sync_every=sync_every)
    return engine.decode(ids, pad, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, prefill_chunk)


def generate(model: SambaLM, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed=None,
             stop_tokens: Sequence[int] = (), prefill_chunk: int | None = None,
             cuda_graph: bool | None = None, sync_every: int = 16):
    """Continue prompts. A [B, T] tensor gives a [B, T + n] tensor on the model's device (n <=
    max_new_tokens; rows that stopped early repeat their stop token). A list of token lists of any
    lengths gives a list of 1-D CPU tensors, each its prompt plus its new tokens up to and including its
    stop token. The arguments are generate_stream's."""
    steps = list(generate_stream(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed,
                                 stop_tokens, prefill_chunk, cuda_graph, sync_every))
    if isinstance(prompt_ids, torch.Tensor):
        device = model.embedding.weight.device
        new = torch.stack(steps, dim=1) if steps else torch.zeros(prompt_ids.shape[0], 0, dtype=torch.long)
        return torch.cat([prompt_ids.to(device), new.to(device, prompt_ids.dtype)], dim=1)
    stops, out = set(stop_tokens), []
    for i, prompt in enumerate(prompt_ids):
        row = [int(s[i]) for s in steps]
        cut = next((j + 1 for j, tok in enumerate(row) if tok in stops), len(row))
        out.append(torch.tensor(torch.as_tensor(prompt).reshape(-1).tolist() + row[:cut], dtype=torch.long))
    return out
