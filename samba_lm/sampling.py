"""Sampling settings as per-row tensors, and the next token: greedy, temperature, top-k, top-p.

Every setting is a [B] tensor, so one captured decode step serves any mix of them: temperature (0:
greedy), top_k (0: off), top_p (1: off) and a seed per row. top-k keeps the k largest scaled logits
(ties with the k-th kept); top-p then keeps the smallest prefix of those, largest first, whose
probability reaches p. Both come down to a floor on the logits per row, found by one sort of the
vocabulary, and only when `truncate` is set (some row uses them: the caller knows, the device need
not be asked); a row with neither gets no floor either way, so its tokens do not depend on its
neighbours' settings. The draw itself is `ops.choose_tokens` (Gumbel-max over a counter-based hash:
reproducible, batch-independent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import choose_tokens
from .ops.sample import scaled_logits


def truncation_floor(logits, temperature, top_k, top_p) -> torch.Tensor:
    """[B] float32: the smallest logit that top-k and top-p keep (-inf for a row with neither). It is a
    raw logit, compared exactly with raw logits: dividing by the temperature keeps the order."""
    raw, _ = logits.float().sort(dim=-1, descending=True)
    x = scaled_logits(raw, temperature)
    vocab = x.shape[-1]
    at = lambda index: raw.gather(1, index.clamp(0, vocab - 1)[:, None])[:, 0]  # noqa: E731
    off = torch.full_like(temperature, float("-inf"))
    kth = torch.where(top_k > 0, at(top_k - 1), off)
    probs = torch.where(raw >= kth[:, None], x, float("-inf")).softmax(dim=-1)
    kept = (probs.cumsum(dim=-1) - probs <= top_p[:, None]).sum(dim=-1)  # a prefix, at least one token
    # top_p = 1 is off exactly: a float32 cumsum may pass 1 before the tail and would drop it.
    return torch.maximum(kth, torch.where(top_p < 1, at(kept - 1), off))


@dataclass
class Sampling:
    """Per-row settings on the device (fixed buffers: a captured step reads them at every replay)."""

    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    truncate: bool = False  # some row uses top-k or top-p

    @classmethod
    def empty(cls, batch_size: int, device) -> Sampling:
        f32, i64 = dict(device=device, dtype=torch.float32), dict(device=device, dtype=torch.long)
        return cls(torch.zeros(batch_size, **f32), torch.zeros(batch_size, **i64), torch.ones(batch_size, **f32),
                   torch.zeros(batch_size, **i64))

    def set(self, temperature, top_k, top_p, seeds):
        """Fill every row (scalars, or one value per row; None: off) in place."""
        rows = self.seeds.shape[0]
        top_k = [0 if k is None else k for k in _per_row(top_k, rows)]
        top_p = [1.0 if p is None else p for p in _per_row(top_p, rows)]
        for buffer, values in ((self.temperature, _per_row(temperature, rows)), (self.top_k, top_k),
                               (self.top_p, top_p), (self.seeds, seeds)):
            buffer.copy_(torch.as_tensor(values, dtype=buffer.dtype))
        self.truncate = any(k > 0 for k in top_k) or any(p < 1 for p in top_p)
        return self

    def rows(self, n: int) -> Sampling:
        """The first n rows, sharing these buffers (a step over a prefix of the batch)."""
        return Sampling(self.temperature[:n], self.top_k[:n], self.top_p[:n], self.seeds[:n], self.truncate)

    def set_row(self, row: int, temperature: float, top_k: int | None, top_p: float | None, seed: int):
        """One row's settings (None: off), in place; `truncate` is the caller's to keep."""
        self.temperature[row] = temperature
        self.top_k[row] = top_k or 0
        self.top_p[row] = 1.0 if top_p is None else top_p
        self.seeds[row] = seed

    def copy_row(self, dst: int, src: int):
        for buffer in (self.temperature, self.top_k, self.top_p, self.seeds):
            buffer[dst] = buffer[src]

    def next_tokens(self, logits, positions, tokens, finished, stops) -> torch.Tensor:
        """Commit each row's next token into `tokens` (`ops.choose_tokens`)."""
        floor = (truncation_floor(logits, self.temperature, self.top_k, self.top_p) if self.truncate
                 else torch.full_like(self.temperature, float("-inf")))
        return choose_tokens(logits, self.temperature, floor, self.seeds, positions, tokens, finished, stops)


def _per_row(value, rows: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * rows


def row_seeds(seed, rows: int) -> list[int]:
    """One 63-bit seed per row. An int s: row i draws with (s, i) mixed, so rows differ. A list: row i
    draws with its own s_i as if alone (as row 0 of a call with seed s_i), so a prompt samples the same
    tokens whichever batch it is in. None: a random seed (from torch's CPU generator)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    pairs = [(s, 0) for s in seed] if isinstance(seed, (list, tuple)) else [(seed, i) for i in range(rows)]
    if len(pairs) != rows or not all(isinstance(s, int) and not isinstance(s, bool) for s, _ in pairs):
        raise ValueError(f"seed must be an int, None, or a list of {rows} ints (one per row), got {seed!r}")
    return [(s * 0x9E3779B97F4A7C15 + i * 0xBF58476D1CE4E5B9) % 2**63 for s, i in pairs]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, seed: int | None = None, positions=None) -> torch.Tensor:
    """logits [B, vocab] -> token ids [B]. temperature 0 is greedy (argmax). `seed` and `positions`
    ([B], default 0) make the draw: the same (seed, position) gives the same token."""
    rows = logits.shape[0]
    sampling = Sampling.empty(rows, logits.device).set(temperature, top_k, top_p, row_seeds(seed, rows))
    positions = torch.zeros(rows, dtype=torch.long, device=logits.device) if positions is None else positions
    tokens = torch.zeros(rows, 1, dtype=torch.long, device=logits.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    stops = torch.full((1,), -1, dtype=torch.long, device=logits.device)
    return sampling.next_tokens(logits, positions, tokens, finished, stops).clone()
