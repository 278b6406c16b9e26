"""Inference state: one small record per sub-layer kind, plus the stream position of every row.

Ownership: `SambaLM.init_state` allocates everything once; every call updates the records in place
and returns the same object; only the model advances `pos`, after its last layer. Positions carry
the meaning: RoPE angles, the window, and empty or padded slots (negative position, never visible).
Values are stored detached: gradients do not flow from one call into the next.

| kind  | record     | tensors                                                        | size in tokens |
|-------|------------|----------------------------------------------------------------|----------------|
| mamba | MambaState | conv [B, E, K-1] (last conv inputs), ssm [B, E, N] (fp32)      | constant       |
| swa   | RingKV     | k, v [B, W-1, Hkv, Dh] (keys after RoPE), pos [B, W-1]         | constant       |
| attn  | GrowingKV  | k, v [B, capacity, Hkv, Dh], pos [B, capacity]; doubles        | grows          |
| mlp   | None       |                                                                |                |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


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
        self.conv.copy_(conv.detach())
        self.ssm.copy_(ssm.detach())


@dataclass
class RingKV:
    """Keys/values of the last W-1 positions; position p lives in slot p mod (W-1)."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor

    def prefix(self, dtype):
        """The cached keys, values and positions a chunk attends to before its own (ring order)."""
        return _snapshot(self.k.to(dtype)), _snapshot(self.v.to(dtype)), _snapshot(self.pos)

    def append(self, k, v, positions):
        """Store the chunk's newest W-1 keys, each in its position's slot."""
        slots = self.pos.shape[1]
        newest = slice(max(0, k.shape[1] - slots), None)
        k, v, positions = k[:, newest].detach(), v[:, newest].detach(), positions[:, newest]
        index = positions.remainder(slots)
        self.k.scatter_(1, index[:, :, None, None].expand_as(k), k.to(self.k.dtype))
        self.v.scatter_(1, index[:, :, None, None].expand_as(v), v.to(self.v.dtype))
        self.pos.scatter_(1, index, positions)


@dataclass
class GrowingKV:
    """Keys/values of every position so far (full attention); capacity doubles when full."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    length: int = 0

    def prefix(self, dtype):
        """Every cached key, value and position, oldest first."""
        n = self.length
        return _snapshot(self.k[:, :n].to(dtype)), _snapshot(self.v[:, :n].to(dtype)), _snapshot(self.pos[:, :n])

    def append(self, k, v, positions):
        end = self.length + k.shape[1]
        if end > self.pos.shape[1]:
            self._grow(max(end, 2 * self.pos.shape[1]))
        self.k[:, self.length:end] = k.detach()
        self.v[:, self.length:end] = v.detach()
        self.pos[:, self.length:end] = positions
        self.length = end

    def _grow(self, capacity: int):
        pad = capacity - self.pos.shape[1]
        self.k = torch.cat([self.k, self.k.new_zeros(self.k.shape[0], pad, *self.k.shape[2:])], dim=1)
        self.v = torch.cat([self.v, self.v.new_zeros(self.v.shape[0], pad, *self.v.shape[2:])], dim=1)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], pad), -1)], dim=1)


@dataclass
class SambaState:
    """Per-layer records aligned with `config.layers`, and `pos`: the position of each row's next token.

    A negative `pos` marks left padding: the row's first -pos tokens are padding that no layer lets
    into its state (generate() uses this for prompts of different lengths)."""

    layers: list
    pos: torch.Tensor
    config: object

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def tensors(self):
        yield self.pos
        for record in self.layers:
            if record is not None:
                yield from (getattr(record, f.name) for f in dataclasses.fields(record)
                            if isinstance(getattr(record, f.name), torch.Tensor))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def select(self, index) -> SambaState:
        """A new state holding the given batch rows (reorder, duplicate or drop rows)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.pos.device)

        def pick(record):
            if record is None:
                return None
            return dataclasses.replace(record, **{
                f.name: getattr(record, f.name).index_select(0, index) for f in dataclasses.fields(record)
                if isinstance(getattr(record, f.name), torch.Tensor)})

        return SambaState([pick(r) for r in self.layers], self.pos.index_select(0, index), self.config)
