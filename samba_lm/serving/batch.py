"""The device side of continuous batching: `max_batch` slots of one state, decoded a prefix at a time.

A request that joins takes the first free row (its prefilled batch-1 state copied in, `SambaState.assign`);
one that leaves gives its row to the last active request (compaction), so the active rows are always
rows [0, n). A step runs the smallest bucket (1, 2, 4, ... and max_batch) covering them, over views of
the buffers (`SambaState.rows`, `Sampling.rows`); the rows beyond n are marked finished and run along
harmlessly: whoever joins next overwrites all of a row. On CUDA each (bucket, truncate) pair is
captured once as a CUDA graph (`engine.StepGraphs`); elsewhere the step runs eagerly.

Stop tokens differ between requests, so the device's stop buffer stays empty and the host checks
each request's stops when its token comes back (one read per step, which the server needs anyway to
stream). The scheduler reads a step's tokens while the next one runs, so a row that ended runs one
step more before it is removed; that token is dropped, and nothing past a stop is delivered.
"""

from __future__ import annotations

import torch

from ..engine import StepGraphs
from ..model import SambaLM
from ..sampling import Sampling
from ..state import SambaState


class HostRead:
    """A 1-D device tensor's values on their way to the host: the copy is queued now, behind the work
    that writes them; `values()` waits for it. On CUDA the wait is an event's synchronize, which
    releases the GIL, so that the server's event loop streams tokens meanwhile (a plain .tolist()
    would hold the GIL for the whole step)."""

    def __init__(self, values: torch.Tensor):
        if values.device.type != "cuda":
            self._values = values.tolist()  # the work that wrote them ran eagerly
            return
        self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)  # caching host allocator
        self._host.copy_(values, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record()
        self._values = None

    def values(self) -> list[int]:
        if self._values is None:
            self._ready.synchronize()
            self._values = self._host.tolist()
        return self._values


def host_list(values: torch.Tensor) -> list[int]:
    """A 1-D tensor's values as a list, waiting for them as `HostRead` does."""
    return HostRead(values).values()


def buckets(max_batch: int) -> list[int]:
    """The batch sizes a step runs at: powers of two below max_batch, then max_batch."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


class SlotBatch:
    def __init__(self, model: SambaLM, max_batch: int, capacity: int | None, cuda_graph: bool):
        self.model, self.max_batch = model, max_batch
        self.device = model.embedding.weight.device
        self.state = model.init_state(max_batch, capacity=capacity)
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self.finished = torch.ones(max_batch, dtype=torch.bool, device=self.device)  # rows without a request
        self.sampling = Sampling.empty(max_batch, self.device)
        self.stops = torch.full((8,), -1, dtype=torch.long, device=self.device)  # per request, on the host
        self.buckets = buckets(max_batch)
        # Views made once: a captured graph is bound to the tensors it was captured with.
        self._views = {b: (self.state.rows(b), self.tokens[:b], self.finished[:b], self.sampling.rows(b))
                       for b in self.buckets}
        self._graphs = StepGraphs(self.device) if cuda_graph else None
        self.active = 0  # rows [0, active) hold requests

    def bucket(self) -> int:
        return next(b for b in self.buckets if b >= self.active)

    def add(self, state: SambaState, token: torch.Tensor, temperature: float, top_k: int | None,
            top_p: float | None, seed: int, source_row: int = 0) -> int:
        """A prefilled request joins: row `source_row` of its prefill state and of its first tokens
        ([rows, 1] on the device) and its sampling settings go into the first free row, whose index
        is returned."""
        if self.active == self.max_batch:
            raise RuntimeError("no free slot: the scheduler admits a request only when one is free")
        row = self.active
        self.state.assign(row, state, source_row)
        self.tokens[row].copy_(token[source_row])
        self.finished[row] = False
        self.sampling.set_row(row, temperature, top_k, top_p, seed)
        self.active += 1
        return row

    def remove(self, row: int):
        """Free `row`: the last active row moves into it (so remove rows in descending order)."""
        last = self.active - 1
        if row != last:
            self.state.assign(row, self.state, last)
            self.tokens[row] = self.tokens[last]
            self.sampling.copy_row(row, last)
        self.finished[last] = True
        self.active = last

    def clear(self):
        """No active rows."""
        self.finished.fill_(True)
        self.active = 0

    def step(self, truncate: bool) -> HostRead:
        """Launch one token for every active row (truncate: some row uses top-k or top-p); their values
        come back through the returned read (the one read of the device per step). The next step, and
        any change of rows, may be queued before it is read: each reads the rows as they are then."""
        self._run(self.bucket(), truncate)
        return HostRead(self.tokens[:self.active, 0])

    def capture(self):
        """Capture every bucket's step, with and without truncation, before any request waits on it
        (a capture costs a real step and the recording, hundreds of ms for a large model). The rows
        beyond the active ones are finished and are overwritten when a request joins, so the steps
        run here change nothing that is read later."""
        if self._graphs is not None:
            for size in self.buckets:
                for truncate in (False, True):
                    self._run(size, truncate)

    def _run(self, size: int, truncate: bool):
        state, tokens, finished, sampling = self._views[size]
        sampling.truncate = truncate

        def step():
            logits = self.model(tokens, state=state).logits[:, -1]
            sampling.next_tokens(logits, state.pos, tokens, finished, self.stops)

        if self._graphs is None:
            step()
        else:
            self._graphs.run((size, truncate), step, state)
