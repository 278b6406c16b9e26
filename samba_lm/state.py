"""Inference state: one small record per sub-layer kind, plus the stream position of every row.

Ownership: `SambaLM.init_state` allocates everything once, with each row's start position; every
call updates the records in place and returns the same object; only the model advances `pos`, after
its last layer. Positions carry the meaning: RoPE angles, the window, and empty or padded slots
(negative position, never visible). Values are stored detached: gradients do not flow from one call
into the next.

| kind  | record     | tensors                                                        | size in tokens |
|-------|------------|----------------------------------------------------------------|----------------|
| mamba | MambaState | conv [B, E, K-1] (last conv inputs), ssm [B, E, N] (fp32)      | constant       |
| swa   | KVCache    | k, v [B, W-1, Hkv, Dh] (keys after RoPE), pos [B, W-1]: a ring | constant       |
| attn  | KVCache    | k, v [B, S, Hkv, Dh], pos [B, S]; S doubles before it wraps     | grows          |
| mlp   | None       |                                                                |                |

Both caches are positional: position p >= 0 lives in slot p mod S (S = the cache's slots), so a
captured decode step needs no host counter to find its slot, and a query at position i finds every
key it can see in slots [0, min(i, S)) (the attention kernels use that bound).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

NO_DOCUMENT = torch.iinfo(torch.int64).min  # a state's document id before its first document_ids


def _snapshot(t: torch.Tensor) -> torch.Tensor:
    """A tensor handed to autograd must not be overwritten by the next in-place state update."""
    return t.clone() if torch.is_grad_enabled() else t


@dataclass
class MambaState:
    conv: torch.Tensor
    ssm: torch.Tensor

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _snapshot(self.conv), _snapshot(self.ssm)

    def write(self, conv: torch.Tensor, ssm: torch.Tensor):
        # The decode kernels update the state in place and hand back these very tensors.
        if conv is not self.conv:
            self.conv.copy_(conv.detach())
        if ssm is not self.ssm:
            self.ssm.copy_(ssm.detach())

    def reset(self):
        self.conv.zero_()
        self.ssm.zero_()


@dataclass
class KVCache:
    """Keys (after RoPE), values and positions by slot: position p >= 0 in slot p mod S, -1 empty.

    `grows` (full attention): before a call could store a position >= S, S doubles (or more), so no
    position is ever overwritten. `length` counts on the host the positions a row may have reached (a
    bound on every row's next position), which decides that without reading the device; a captured
    step that replays n times is accounted for by `SambaState.advance_host_count(n)`. A ring (SWA,
    S = W - 1) never grows: it holds the newest W - 1 positions, all that a query can see."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    grows: bool = False
    length: int = 0

    def reserve(self, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The buffers a call of T tokens reads and then writes (`ops.attention_with_cache`)."""
        self.length += T
        if self.grows and self.length > self.pos.shape[1]:
            self._grow(max(self.length, 2 * self.pos.shape[1]))
        return self.k, self.v, self.pos

    def _grow(self, capacity: int):
        """Positions below the old S sit in slot p, which stays their slot mod the new capacity."""
        pad = capacity - self.pos.shape[1]
        self.k = torch.cat([self.k, self.k.new_zeros(self.k.shape[0], pad, *self.k.shape[2:])], dim=1)
        self.v = torch.cat([self.v, self.v.new_zeros(self.v.shape[0], pad, *self.v.shape[2:])], dim=1)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], pad), -1)], dim=1)

    def reset(self, length: int):
        self.k.zero_()
        self.v.zero_()
        self.pos.fill_(-1)
        self.length = length


@dataclass
class SambaState:
    """Per-layer records aligned with `config.layers`, and `pos`: the position of each row's next token.

    A negative `pos` marks left padding: the row's first -pos tokens are padding that no layer lets
    into its state (`init_state(start=-pad)`; generate() uses this for prompts of different lengths)."""

    layers: list
    pos: torch.Tensor
    config: object
    # Packed documents (`SambaLM(..., document_ids=)`): each row's current document id (NO_DOCUMENT
    # before any) and the position where it began; a chunk whose first id differs starts afresh.
    doc: torch.Tensor | None = None
    doc_start: torch.Tensor | None = None

    def __post_init__(self):
        if self.doc is None:
            self.doc = torch.full_like(self.pos, NO_DOCUMENT)
        if self.doc_start is None:
            self.doc_start = self.pos.clamp(min=0)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def tensors(self):
        yield self.pos
        yield self.doc
        yield self.doc_start
        for record in self.layers:
            if record is not None:
                yield from (getattr(record, f.name) for f in dataclasses.fields(record)
                            if isinstance(getattr(record, f.name), torch.Tensor))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def reset(self, start=None):
        """Back to an empty stream in the same buffers, each row starting at `start` (default 0)."""
        start, bound = start_positions(start, self.batch_size, self.pos.device)
        self.pos.copy_(start)
        self.doc.fill_(NO_DOCUMENT)
        self.doc_start.copy_(start.clamp(min=0))
        for record in self.layers:
            if isinstance(record, KVCache):
                record.reset(bound)
            elif record is not None:
                record.reset()

    def advance_host_count(self, steps: int):
        """A captured one-token step replayed `steps` times advanced the stream without running Python:
        bring the host counts of the growing caches up to date."""
        for record in self.layers:
            if isinstance(record, KVCache):
                record.length += steps

    def select(self, index) -> SambaState:
        """A new state holding the given batch rows (reorder, duplicate or drop rows)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.pos.device)

        def pick(record):
            if record is None:
                return None
            return dataclasses.replace(record, **{
                f.name: getattr(record, f.name).index_select(0, index) for f in dataclasses.fields(record)
                if isinstance(getattr(record, f.name), torch.Tensor)})

        return SambaState([pick(r) for r in self.layers], self.pos.index_select(0, index), self.config,
                          self.doc.index_select(0, index), self.doc_start.index_select(0, index))

    def rows(self, n: int) -> SambaState:
        """A view of the first n rows: the same buffers, so calls on it update this state in place (a
        step over a prefix of the batch). A view never grows its full-attention caches (growing would
        move them away from this state): give them their capacity up front."""

        def head(record):
            if record is None:
                return None
            fields = {f.name: getattr(record, f.name)[:n] for f in dataclasses.fields(record)
                      if isinstance(getattr(record, f.name), torch.Tensor)}
            return dataclasses.replace(record, **fields, **({"grows": False} if isinstance(record, KVCache) else {}))

        return SambaState([head(r) for r in self.layers], self.pos[:n], self.config, self.doc[:n], self.doc_start[:n])

    def assign(self, row: int, other: SambaState, other_row: int = 0):
        """Copy row `other_row` of `other` (another state of the same model and capacity, or this one)
        into row `row`, in place: every record and the position, so the row continues other's stream."""
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            if mine.shape[1:] != theirs.shape[1:]:
                raise ValueError(f"assign: the states' buffers differ ({tuple(mine.shape[1:])} per row here, "
                                 f"{tuple(theirs.shape[1:])} in other): the same model and capacity are needed")
            mine[row].copy_(theirs[other_row])
        for mine, theirs in zip(self.layers, other.layers):
            if isinstance(mine, KVCache):  # the host bound on every row's next position still holds
                mine.length = max(mine.length, theirs.length)


def start_positions(start, batch_size: int, device) -> tuple[torch.Tensor, int]:
    """Each row's first position as a [B] int64 tensor on `device` (0 by default, -n for n tokens of
    left padding), and the largest of them clamped at 0 as a host int (the growing caches' count).
    Give host data (a list or a CPU tensor): a CUDA tensor costs one read of the device here."""
    if start is None:
        return torch.zeros(batch_size, dtype=torch.long, device=device), 0
    start = torch.as_tensor(start)
    if start.dtype.is_floating_point or start.dtype == torch.bool or tuple(start.shape) != (batch_size,):
        raise ValueError(f"start must hold one integer position per row ({batch_size} rows), got shape "
                         f"{tuple(start.shape)} and dtype {start.dtype}")
    bound = max(0, int(start.max())) if batch_size else 0
    return start.to(device=device, dtype=torch.long), bound
