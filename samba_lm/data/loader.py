"""Training batches: fixed blocks of a token stream, in a seeded order that resumes exactly.

Block i is tokens [i*(seq_len+1), (i+1)*(seq_len+1)) (inputs are block[:-1], targets block[1:]).
The global order is epoch 0's permutation of the blocks, then epoch 1's, and so on; `position`
counts blocks consumed by all ranks together, so it is all a resume needs, whatever the world size.
The state also records what must not change under it: seq_len, seed, the number of blocks and the
data's fingerprint (the split's sha256 from the shard index).
"""

from __future__ import annotations

import numpy as np
import torch

from .shards import TokenStream


class BlockLoader:
    """Cuts `stream` into blocks of `seq_len + 1` tokens and hands out this rank's share of each batch."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        for name, value, low in (("seq_len", seq_len, 1), ("seed", seed, 0), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        self.stream, self.seq_len, self.seed = stream, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.block_len = seq_len + 1
        self.n_blocks = len(stream) // self.block_len  # the tail shorter than a block is dropped
        if self.n_blocks == 0:
            raise ValueError(f"seq_len {seq_len} is longer than the data: a block needs seq_len + 1 = "
                             f"{self.block_len} tokens but the stream holds {len(stream)}")
        self.position = 0
        self._orders: dict[int, torch.Tensor] = {}  # the last epochs' permutations

    @property
    def epoch(self) -> int:
        return self.position // self.n_blocks

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # keep the two latest: a batch rarely spans more
                self._orders.pop(next(iter(self._orders)))
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders[epoch] = torch.randperm(self.n_blocks, generator=generator)
        return self._orders[epoch]

    def _block(self, global_index: int) -> int:
        epoch, i = divmod(global_index, self.n_blocks)
        return int(self._order(epoch)[i]) if self.shuffle else i

    def next_batch(self, global_batch: int) -> torch.Tensor:
        """The next `global_batch` blocks of the global order; this rank's contiguous slice of them.

        Shape `[global_batch // world_size, seq_len + 1]`, int64.
        """
        if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
            raise ValueError(f"global_batch must be a positive int, got {global_batch!r}")
        if global_batch % self.world_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by world_size {self.world_size}")
        per_rank = global_batch // self.world_size
        first = self.position + self.rank * per_rank
        batch = np.empty((per_rank, self.block_len), dtype=np.int64)
        for row in range(per_rank):
            # A slice of the memory map: only this batch's tokens are read.
            batch[row] = self.stream.read(self._block(first + row) * self.block_len, self.block_len)
        self.position += global_batch
        return torch.from_numpy(batch)

    def state_dict(self) -> dict:
        return {"position": self.position, "seq_len": self.seq_len, "seed": self.seed, "n_blocks": self.n_blocks,
                "data_sha256": self.stream.sha256}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["position"]`; the data, seq_len and seed must be those the state was saved with.
        A state or a stream without a fingerprint (written before there was one) is checked by size only."""
        for key in ("seq_len", "seed", "n_blocks"):
            if key not in state:
                raise ValueError(f"loader state has no {key!r}")
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has "
                                 f"{getattr(self, key)!r}: resuming on other data or another seq_len/seed "
                                 "would silently change the run")
        saved, now = state.get("data_sha256"), self.stream.sha256
        if saved and now and saved != now:
            raise ValueError(f"the data differs from the data the state was saved with (its tokens' sha256 is "
                             f"{now[:12]}..., it was {saved[:12]}...)")
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"loader state position must be an int >= 0, got {position!r}")
        self.position = position
