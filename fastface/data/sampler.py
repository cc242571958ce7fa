"""Which samples each rank sees in each epoch, batch by batch: sharded, shuffled, resumable.

The order is a pure function of (seed, epoch, rank, world_size): DistributedSampler's rule.
The epoch's permutation of all N samples is padded (drop_last=False: by repeating its first
samples, so every sample is seen at least once and at most twice, exactly once when
world_size divides N) or cut (drop_last=True: the last N mod world_size are skipped) to a
multiple of world_size, and rank r takes positions r, r + W, r + 2W, ... Every rank gets the
same number of samples and of batches, which DDP needs.
"""
from __future__ import annotations

import numpy as np


class ShardOrder:
    """Per-epoch sample indices of one rank, cut into batches."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if n < 1:
            raise ValueError("no samples to shard")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.per_rank = n // world_size if drop_last else -(-n // world_size)
        if self.per_rank == 0:
            raise ValueError(f"{n} samples cannot give each of {world_size} ranks one (drop_last=True)")

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of all samples (before padding and sharding)."""
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        return np.random.default_rng([int(self.seed), int(epoch), 0x5A4D]).permutation(self.n).astype(np.int64)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch``, in order."""
        perm = self.permutation(epoch)
        total = self.per_rank * self.world_size
        if total > self.n:
            perm = np.concatenate([perm, np.resize(perm, total - self.n)])
        return perm[:total][self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.per_rank // self.batch_size if self.drop_last else -(-self.per_rank // self.batch_size)

    def batches(self, epoch: int, start: int = 0) -> list[np.ndarray]:
        """Batches ``start``.. of ``epoch`` (sample indices of each)."""
        idx = self.indices(epoch)
        b = self.batch_size
        return [idx[k * b : (k + 1) * b] for k in range(start, len(self))]
