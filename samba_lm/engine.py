"""The decode engine: a model's one-token step at a fixed batch size, captured once, replayed per token.

The step is the model's forward on the previous tokens, then the choice of the next ones
(`Sampling.next_tokens`: sampling, finished rows and stop tokens on the device), all into buffers
that never move: the state's records, the token and finished buffers and the per-row settings. On
CUDA it is captured as a CUDA graph after one eager step (which compiles the kernels) and then
replayed, so a token costs one graph launch and no host work beyond it; the host reads the tokens
back every `sync_every` steps and yields them in order. Elsewhere, or with cuda_graph=False, the same
step runs eagerly: the same kernels, the same tokens.

An engine keeps its state and graphs between calls (`generate_stream` resets the state in place), so
a caller generating many times at one batch size, a benchmark, captures once. The full-attention
layers of the baselines get `capacity` slots up front: the captured step then serves every length up
to it. `StepGraphs` (capture and replay) also serves the scheduler of `samba_lm.serving`, which
captures one step per batch bucket.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .model import SambaLM
from .prompts import left_pad, prefill
from .sampling import Sampling, row_seeds


class DecodeEngine:
    def __init__(self, model: SambaLM, batch_size: int, capacity: int | None = None, cuda_graph: bool | None = None,
                 sync_every: int = 16):
        if not isinstance(model, SambaLM):
            raise ValueError(f"model must be a SambaLM, got {type(model).__name__}")
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be a positive int (tokens between reads of the device), got {sync_every!r}")
        self.model, self.batch_size, self.sync_every = model, batch_size, sync_every
        self.device = model.embedding.weight.device
        self.capacity = capacity
        self.state = model.init_state(batch_size, capacity=capacity)  # checks batch_size and capacity
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        self.sampling = Sampling.empty(batch_size, self.device)
        self._stop_buffers: dict[int, torch.Tensor] = {}
        self._stop_buffer(())  # sets self.stops
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {self.device}")
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self._graphs = StepGraphs(self.device)

    # ------------------------------------------------------------------ one step
    def _step(self):
        """The captured work: one token through the model, the next one chosen and committed."""
        logits = self.model(self.tokens, state=self.state).logits[:, -1]
        self.sampling.next_tokens(logits, self.state.pos, self.tokens, self.finished, self.stops)

    def _advance(self):
        if not self.cuda_graph:
            return self._step()
        self._graphs.run((self.sampling.truncate, len(self.stops)), self._step, self.state)

    # ------------------------------------------------------------------ generation
    def generate_stream(self, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0,
                        top_k: int | None = None, top_p: float | None = None, seed=None,
                        stop_tokens: Sequence[int] = (), prefill_chunk: int | None = None) -> Iterator[torch.Tensor]:
        """As `samba_lm.generate_stream`, over this engine's state (reset first): yields [B] CPU tensors."""
        check_generation_args(max_new_tokens, temperature, top_k, top_p, prefill_chunk)
        ids, pad = left_pad(prompt_ids, self.model.config.vocab_size)
        return self.decode(ids, pad, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, prefill_chunk)

    def decode(self, ids, pad, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, prefill_chunk):
        """Checked, left-padded prompts (`prompts.left_pad`) -> the generator of their new tokens."""
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"this engine decodes {self.batch_size} rows; got {ids.shape[0]} prompts")
        needed = ids.shape[1] + max_new_tokens
        if self.model.config.grows and (self.capacity is None or needed > self.capacity):
            raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {needed} exceeds "
                             f"the engine's full-attention capacity ({self.capacity}); make an engine with "
                             f"capacity >= {needed}")
        stops = self._stop_buffer(stop_tokens)
        seeds = row_seeds(seed, self.batch_size)
        return self._decode(ids, pad, max_new_tokens, temperature, top_k, top_p, seeds, stops, prefill_chunk)

    @torch.inference_mode()
    def _decode(self, ids, pad, max_new_tokens, temperature, top_k, top_p, seeds, stops, prefill_chunk):
        if max_new_tokens == 0:
            return
        self.stops.copy_(stops)
        self.sampling.set(temperature, top_k, top_p, seeds)
        self.state.reset(start=-pad)
        logits = prefill(self.model, ids.to(self.device), self.state, prefill_chunk)
        self.tokens.copy_(ids[:, -1:])
        self.finished.zero_()
        self.sampling.next_tokens(logits, self.state.pos, self.tokens, self.finished, self.stops)
        stop_set = set(stops.tolist()) - {-1}
        first = self.tokens[:, 0].to("cpu", copy=True)  # at once: the time to first token
        yield first
        done = [int(t) in stop_set for t in first]
        block = torch.empty(self.batch_size, self.sync_every, dtype=torch.long, device=self.device)
        left = max_new_tokens - 1
        while left > 0 and not all(done):
            n = min(self.sync_every, left)
            for i in range(n):
                self._advance()
                block[:, i].copy_(self.tokens[:, 0])
            for column in block[:, :n].to("cpu", copy=True).unbind(1):  # one read of the device per block
                yield column
                done = [d or int(t) in stop_set for d, t in zip(done, column)]
                if all(done):
                    return
            left -= n

    def _stop_buffer(self, stop_tokens) -> torch.Tensor:
        """The stop ids padded with -1 to a power of two (>= 8), as a CPU tensor; the engine keeps one
        device buffer per size (`self.stops` is the current one), since a captured graph reads its own."""
        stops = [int(s) for s in stop_tokens]
        if any(not 0 <= s < self.model.config.vocab_size for s in stops):
            raise ValueError(f"stop_tokens must lie in [0, vocab_size={self.model.config.vocab_size}), got {stops}")
        size = max(8, 1 << max(0, len(stops) - 1).bit_length())
        if size not in self._stop_buffers:
            self._stop_buffers[size] = torch.full((size,), -1, dtype=torch.long, device=self.device)
        self.stops = self._stop_buffers[size]
        return torch.tensor(stops + [-1] * (size - len(stops)), dtype=torch.long)


class StepGraphs:
    """Steps captured as CUDA graphs, one per key (what changes the captured work: the bucket, whether
    to truncate, the stop buffer's size; a prefill's length), sharing one memory pool. A step reads and
    writes only fixed buffers allocated outside the pool, so the graphs may replay in any order, one at
    a time."""

    def __init__(self, device):
        self.device = device
        self.graphs: dict[object, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def __len__(self) -> int:
        return len(self.graphs)

    def run(self, key, step, state, tokens: int = 1):
        """Run `step` (`tokens` tokens per row, whose growing caches live in `state`) once: replay its
        graph for `key`, or capture it."""
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            state.advance_host_count(tokens)
            return
        # A real first step, eagerly on a side stream: it compiles and loads every kernel, so that the
        # capture that follows only records. The capture runs the Python of one more step (the
        # growing caches count it) without doing it.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step()
        state.advance_host_count(-tokens)
        self.pool = graph.pool()
        self.graphs[key] = graph


def check_generation_args(max_new_tokens, temperature, top_k, top_p, prefill_chunk):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive int or None (automatic), got {prefill_chunk!r}")
