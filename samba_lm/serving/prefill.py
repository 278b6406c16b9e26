"""Short prompts prefilled together: up to `rows` of them in one forward, each left-padded to a
common length bucket, so the padding never enters a row's state (`SambaState.reset(start=-pad)`) and
each row's state and logits are its prompt's alone (the batch invariance the model is tested for).

On CUDA each (rows bucket, length bucket) forward is a CUDA graph (`engine.StepGraphs`): a short
prompt's prefill is host-bound when run eagerly (samba-1.7b, 128 tokens at batch 1: about 50 ms of
launches for a few ms of GPU work), so a graph replays it at the GPU's pace. Longer prompts take the
scheduler's chunked path instead.
"""

from __future__ import annotations

import torch

from ..engine import StepGraphs
from ..model import SambaLM
from .batch import buckets


def length_buckets(longest: int) -> list[int]:
    """The padded lengths: powers of two from 16 below `longest`, then `longest`."""
    return [n for n in (1 << i for i in range(4, longest.bit_length())) if n < longest] + [longest]


class PrefillBatch:
    def __init__(self, model: SambaLM, rows: int, longest: int, capacity: int | None, cuda_graph: bool):
        self.model, self.rows = model, rows
        self.device = model.embedding.weight.device
        self.lengths = length_buckets(longest)
        self.row_buckets = buckets(rows)
        self.state = model.init_state(rows, capacity=capacity)
        self.ids = {n: torch.zeros(rows, n, dtype=torch.long, device=self.device) for n in self.lengths}
        self.logits = torch.empty(rows, model.config.vocab_size, device=self.device,
                                  dtype=model.embedding.weight.dtype)
        self._states = {r: self.state.rows(r) for r in self.row_buckets}  # views made once, as graphs need
        self._graphs = StepGraphs(self.device) if cuda_graph else None

    @property
    def longest(self) -> int:
        return self.lengths[-1]

    def run(self, prompts: list[list[int]]):
        """Prefill `prompts` (1 to `rows` of them, each of 1 to `longest` tokens): their states (rows
        [0, len(prompts)) of the returned state) and last logits [len(prompts), vocab]."""
        k = len(prompts)
        if not 1 <= k <= self.rows or not all(1 <= len(p) <= self.longest for p in prompts):
            raise ValueError(f"PrefillBatch.run takes 1 to {self.rows} prompts of 1 to {self.longest} tokens")
        rows = next(r for r in self.row_buckets if r >= k)
        length = next(n for n in self.lengths if n >= max(map(len, prompts)))
        # Rows past k prefill a one-token prompt that nobody reads: no row is all padding.
        padded = [[0] * (length - len(p)) + list(p) for p in prompts] + [[0] * length] * (rows - k)
        pads = [length - len(p) for p in prompts] + [length - 1] * (rows - k)
        ids = self.ids[length][:rows]
        ids.copy_(torch.tensor(padded, dtype=torch.long), non_blocking=False)
        state = self._states[rows]
        state.reset(start=[-p for p in pads])
        self._forward(rows, length, ids, state)
        return state, self.logits[:k]

    def capture(self):
        """Capture every (rows, length) forward before a request waits on one (see SlotBatch.capture)."""
        if self._graphs is not None:
            for length in self.lengths:
                for rows in self.row_buckets:
                    state = self._states[rows]
                    state.reset()
                    self._forward(rows, length, self.ids[length][:rows], state)

    def _forward(self, rows: int, length: int, ids: torch.Tensor, state):
        def prefill():
            self.logits[:rows].copy_(self.model(ids, state=state, logits_to_keep=1).logits[:, -1])

        if self._graphs is None:
            prefill()
        else:
            self._graphs.run((rows, length), prefill, state, tokens=length)
