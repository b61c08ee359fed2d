"""The data plan: which samples each rank and loader worker reads, in which order.

An epoch's samples are addressed by *global index* g in [0, N): the shards in a
seeded per-epoch permutation, their samples concatenated. A plan holds the
still-unread part of the epoch as sorted ``segments`` of global indices.

- Every rank takes the same number M of samples, a multiple of the batch size,
  so ranks never disagree on the step count; the remainder (< one global batch)
  is dropped and counted.
- Rank r takes positions [rM, (r+1)M) of the concatenated segments; its batches
  are split into contiguous runs, one per loader worker, so each worker reads
  few shards, each one mostly in full.
- A run is cut into *chunks* at segment, shard and shuffle-block boundaries;
  each chunk is read in a seeded permutation (the shuffle buffer).
- Batches are delivered in a canonical round-robin over workers. Progress is one
  number, the batches consumed, identical on every rank; from it the consumed set
  is known exactly, so a run resumed with other ranks or workers re-plans the
  rest of the epoch and reads every remaining sample exactly once.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Chunk:
    shard: int
    """Index into the manifest's shard list."""
    start: int
    """First sample offset inside the shard."""
    stop: int
    generation: int = 0

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """Offsets in read order: a seeded permutation of [start, stop)."""
        rng = np.random.default_rng([seed, epoch, self.generation, self.shard, self.start])
        return self.start + rng.permutation(self.stop - self.start)


@dataclass
class Plan:
    counts: list[int]
    """Samples per shard, manifest order."""
    seed: int
    epoch: int
    world_size: int
    batch_size: int
    num_workers: int
    shuffle_buffer: int
    segments: list[tuple[int, int]] = field(default_factory=list)
    generation: int = 0
    dropped: int = 0
    """Samples that earlier generations of this epoch's plan left out for good (normally 0: a
    re-plan takes the previous remainder back; only the final plan's ``dropped_now`` is lost)."""

    def __post_init__(self):
        if not self.segments:
            self.segments = [(0, sum(self.counts))]
        self.segments = [tuple(s) for s in self.segments]
        rng = np.random.default_rng([self.seed, self.epoch])
        self.shard_order = rng.permutation(len(self.counts)).tolist()
        self.shard_pos = {shard: p for p, shard in enumerate(self.shard_order)}
        self.starts = np.concatenate([[0], np.cumsum([self.counts[s] for s in self.shard_order])]).tolist()
        self.total = sum(b - a for a, b in self.segments)
        self.per_rank = self.total // (self.world_size * self.batch_size) * self.batch_size
        self.num_batches = self.per_rank // self.batch_size
        self.dropped_now = self.total - self.per_rank * self.world_size

    # -- layout ------------------------------------------------------------------------
    def worker_batches(self) -> list[int]:
        k = max(1, self.num_workers)
        return [self.num_batches // k + (i < self.num_batches % k) for i in range(k)]

    def schedule(self) -> list[tuple[int, int]]:
        """Canonical delivery order: (worker, local batch index) for each rank-level batch."""
        counts = self.worker_batches()
        return [(w, i) for i in range(max(counts, default=0)) for w in range(len(counts)) if i < counts[w]]

    def worker_positions(self, rank: int, worker: int) -> tuple[int, int]:
        """[a, b) positions in the concatenated segments read by (rank, worker)."""
        counts = self.worker_batches()
        first = sum(counts[:worker])
        a = rank * self.per_rank + first * self.batch_size
        return a, a + counts[worker] * self.batch_size

    def _global_ranges(self, a: int, b: int) -> list[tuple[int, int]]:
        out, pos = [], 0
        for s, e in self.segments:
            n = e - s
            lo, hi = max(a, pos), min(b, pos + n)
            if lo < hi:
                out.append((s + lo - pos, s + hi - pos))
            pos += n
            if pos >= b:
                break
        return out

    def chunks(self, rank: int, worker: int) -> list[Chunk]:
        a, b = self.worker_positions(rank, worker)
        out = []
        for g0, g1 in self._global_ranges(a, b):
            g = g0
            while g < g1:
                p = bisect.bisect_right(self.starts, g) - 1
                offset = g - self.starts[p]
                block_end = (offset // self.shuffle_buffer + 1) * self.shuffle_buffer
                stop = min(self.counts[self.shard_order[p]], block_end, offset + g1 - g)
                out.append(Chunk(self.shard_order[p], offset, stop, self.generation))
                g += stop - offset
        return out

    def sample_order(self, rank: int, worker: int) -> list[tuple[int, int]]:
        """(shard, offset) of every sample (rank, worker) yields, in order."""
        return [(c.shard, int(o)) for c in self.chunks(rank, worker) for o in c.order(self.seed, self.epoch)]

    # -- progress ----------------------------------------------------------------------
    def consumed_per_worker(self, consumed_batches: int) -> list[int]:
        done = [0] * max(1, self.num_workers)
        for w, _ in self.schedule()[:consumed_batches]:
            done[w] += 1
        return done

    def remaining_segments(self, consumed_batches: int) -> list[tuple[int, int]]:
        """Global indices not yet delivered on any rank, as sorted merged ranges."""
        left: list[int] = []
        done = self.consumed_per_worker(consumed_batches)
        for rank in range(self.world_size):
            for w in range(len(done)):
                order = self.sample_order(rank, w)[done[w] * self.batch_size :]
                left.extend(self._to_global(shard, off) for shard, off in order)
        # the remainder this plan left out is still unread: it goes back in the pool
        for g0, g1 in self._global_ranges(self.world_size * self.per_rank, self.total):
            left.extend(range(g0, g1))
        return _merge(sorted(left))

    def _to_global(self, shard: int, offset: int) -> int:
        return self.starts[self.shard_pos[shard]] + offset

    def replan(self, consumed_batches: int, *, world_size, batch_size, num_workers, shuffle_buffer) -> Plan:
        """The rest of this epoch, laid out for another world size, batch or worker count."""
        return Plan(
            self.counts,
            self.seed,
            self.epoch,
            world_size,
            batch_size,
            num_workers,
            shuffle_buffer,
            segments=self.remaining_segments(consumed_batches),
            generation=self.generation + 1,
            dropped=self.dropped,
        )

    def to_dict(self) -> dict:
        keys = (
            "seed",
            "epoch",
            "world_size",
            "batch_size",
            "num_workers",
            "shuffle_buffer",
            "generation",
            "dropped",
        )
        d = {k: asdict(self)[k] for k in keys}
        d["segments"] = [list(s) for s in self.segments]
        return d

    @classmethod
    def from_dict(cls, counts: list[int], d: dict) -> Plan:
        return cls(counts, **{**d, "segments": [tuple(s) for s in d["segments"]]})


def _merge(indices: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for g in indices:
        if out and out[-1][1] == g:
            out[-1] = (out[-1][0], g + 1)
        else:
            out.append((g, g + 1))
    return out
