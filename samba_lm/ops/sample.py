"""The next token of each row from its logits, committed in place: the decode step's last op.

Shapes (B rows, V vocabulary):
    logits [B, V] (any float dtype)   temperature [B] float32 (0: greedy)   floor [B] float32 (a logit)
    seeds [B] int64   positions [B] int64 (the position the new token takes)
    tokens [B, 1] int64 (in: the previous tokens; out: the new ones)   finished [B] bool (in place)
    stops [S] int64 (stop token ids, -1 for an empty slot)   -> the new tokens [B] (a view of `tokens`)

    x      = logits / temperature (greedy rows: logits)
    choice = argmax_v (x_v + g_v) over the v with logits_v >= floor (greedy: argmax_v x_v)
    token  = previous token if finished, else choice;  finished |= token in stops

g_v = -log(-log(u_v)) is Gumbel noise, u_v uniform from a counter-based hash of (seed, position, v),
so the choice is a draw from softmax(x) over the kept tokens (Gumbel-max). No generator state: a
captured step draws as the eager one does, and a row's draws depend on its own seed and positions
only, never on the rows beside it. The reference and the Triton kernel compute the same hash bit for
bit; their logarithms may differ in the last bit.
"""

from __future__ import annotations

import torch

from . import dispatch
from ._checks import check_float

MASK32 = 0xFFFFFFFF
MIX = (0x7FEB352D, 0x846CA68B)  # lowbias32's multipliers (Chris Wellons' hash prospector)
SEED_SALT = 0x243F6A88


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche (lowbias32) on int64 tensors holding 32-bit values: products wrap mod 2^64,
    and their low 32 bits are the 32-bit products."""
    x = x ^ (x >> 16)
    x = (x * MIX[0]) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX[1]) & MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] 32-bit keys of (seed, position), as int64."""
    key = mix32((seeds & MASK32) ^ mix32(((seeds >> 32) & MASK32) ^ SEED_SALT))
    return mix32(key ^ (positions & MASK32))


def gumbel_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 Gumbel noise of the row keys and token ids."""
    bits = mix32(keys[:, None] ^ mix32(torch.arange(vocab, device=keys.device)[None, :]))
    u = ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24  # 24 random bits, strictly inside (0, 1)
    return -torch.log(-torch.log(u))


def scaled_logits(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / temperature in float32; greedy rows (temperature 0) as they are."""
    x = logits.float()
    t = temperature[:, None]
    return torch.where(t > 0, x / t.clamp_min(1e-30), x)


def choose_tokens_reference(logits, temperature, floor, seeds, positions, tokens, finished, stops):
    x = scaled_logits(logits, temperature)
    hot = temperature[:, None] > 0
    score = torch.where(hot, x + gumbel_noise(row_keys(seeds, positions), x.shape[-1]), x)
    score = score.masked_fill(hot & (logits.float() < floor[:, None]), float("-inf"))
    flat = tokens.view(-1)
    chosen = torch.where(finished, flat, score.argmax(dim=-1))
    flat.copy_(chosen)
    finished |= torch.isin(chosen, stops)
    return flat


def choose_tokens(logits, temperature, floor, seeds, positions, tokens, finished, stops):
    """Commit each row's next token in place (see module docstring); returns `tokens` as [B]."""
    op = "choose_tokens"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{op}: logits must have layout [B, V]")
    batch = logits.shape[0]
    check_float(op, "logits", logits)
    for name, t, dtype in (("temperature", temperature, torch.float32), ("floor", floor, torch.float32),
                           ("seeds", seeds, torch.int64), ("positions", positions, torch.int64),
                           ("finished", finished, torch.bool)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch,) or t.dtype != dtype:
            raise ValueError(f"{op}: {name} must be a [{batch}] {dtype} tensor")
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.numel() != batch \
            or not tokens.is_contiguous():
        raise ValueError(f"{op}: tokens must be a contiguous int64 tensor of {batch} elements")
    if not isinstance(stops, torch.Tensor) or stops.dim() != 1 or stops.dtype != torch.int64 or not len(stops):
        raise ValueError(f"{op}: stops must be a non-empty 1-D int64 tensor (-1 for no stop token)")
    fn = dispatch.resolve(op, logits.device, logits.dtype)
    return fn(logits, temperature, floor, seeds, positions, tokens, finished, stops)


dispatch.register("choose_tokens", "reference", choose_tokens_reference)
